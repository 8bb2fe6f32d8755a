//! The delay proxy (`tandem_loadtest::netem`) over real sockets on 127.0.0.1, against small
//! servers started here.
//!
//! Checked: a small message's round trip through a 100 ms proxy lies within [95 ms, 250 ms]
//! (tolerance for timers and a busy machine, never below the emulated delay), and through a
//! 0 ms proxy well under 50 ms; 1,000 messages with ±40 ms of jitter come back in order and
//! byte for byte; 1 MB through an 8 Mbit/s uplink (or a 4 Mbit/s downlink for 500 kB) takes
//! at least 0.85 s (1 s nominal) and at most 5 s; a client closing makes the upstream see end
//! of stream and the other way round; a receiver that stops reading stops the sender
//! (bounded buffering) without losing a byte once it reads again; shutdown closes the
//! listener and the open connections; a WebSocket upgrade and binary frames up to 100 kB go
//! through unchanged, each paying at least the round trip (and the uplink's rate).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_loadtest::netem::{self, LinkConditions, ProxyConfig, ProxyHandle, Rate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PATIENCE: Duration = Duration::from_secs(10);

async fn proxy_to(upstream: SocketAddr, conditions: LinkConditions) -> ProxyHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let config = ProxyConfig {
        upstream: upstream.to_string(),
        conditions,
        seed: 42,
    };
    netem::spawn(listener, config).expect("spawn proxy")
}

/// An echo server: every connection gets back what it sends, until it closes.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            s.set_nodelay(true).expect("nodelay");
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A server that hands each accepted socket to the test.
async fn socket_server() -> (SocketAddr, tokio::sync::mpsc::Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            if tx.send(s).await.is_err() {
                break;
            }
        }
    });
    (addr, rx)
}

async fn connect(proxy: &ProxyHandle) -> TcpStream {
    let s = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect proxy");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// The round trip of `msg` through an echo server behind the proxy.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let mut back = vec![0u8; msg.len()];
    let t0 = Instant::now();
    s.write_all(msg).await.expect("write");
    tokio::time::timeout(PATIENCE, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    let rtt = t0.elapsed();
    assert_eq!(back, msg);
    rtt
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_is_the_emulated_rtt() {
    let echo = echo_server().await;
    let slow = proxy_to(
        echo,
        LinkConditions {
            rtt: ms(100),
            ..Default::default()
        },
    )
    .await;
    let mut s = connect(&slow).await;
    for i in 0..5u8 {
        let rtt = round_trip(&mut s, &[i; 16]).await;
        assert!(
            rtt >= ms(95) && rtt <= ms(250),
            "round trip {i} through a 100 ms proxy took {rtt:?}"
        );
    }

    let fast = proxy_to(echo, LinkConditions::default()).await;
    let mut s = connect(&fast).await;
    for i in 0..5u8 {
        let rtt = round_trip(&mut s, &[i; 16]).await;
        assert!(
            rtt < ms(50),
            "round trip {i} through a 0 ms proxy took {rtt:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_never_reorders_bytes() {
    let echo = echo_server().await;
    let proxy = proxy_to(
        echo,
        LinkConditions {
            rtt: ms(60),
            jitter: ms(40),
            ..Default::default()
        },
    )
    .await;
    let s = connect(&proxy).await;
    let (mut r, mut w) = s.into_split();
    // Messages of varied lengths, sent in small bursts so that the proxy reads many chunks
    // (each with its own jitter draw) rather than one big one.
    let messages: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| format!("message {i:04} {}\n", "x".repeat((i % 37) as usize)).into_bytes())
        .collect();
    let sent: Vec<u8> = messages.concat();
    let writer = tokio::spawn(async move {
        for (i, m) in messages.iter().enumerate() {
            w.write_all(m).await.expect("write");
            if i % 10 == 9 {
                tokio::time::sleep(ms(1)).await;
            }
        }
        w.shutdown().await.expect("shutdown");
    });
    let mut received = Vec::new();
    tokio::time::timeout(PATIENCE, r.read_to_end(&mut received))
        .await
        .expect("echo in time")
        .expect("read");
    writer.await.expect("writer");
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "bytes reordered or altered");
}

/// Sends `bytes` one way through a capped link and returns how long until the receiver had
/// them all (from before the first write).
async fn time_transfer(conditions: LinkConditions, bytes: usize, upward: bool) -> Duration {
    let (server, mut accepted) = socket_server().await;
    let proxy = proxy_to(server, conditions).await;
    let client = connect(&proxy).await;
    let upstream = tokio::time::timeout(PATIENCE, accepted.recv())
        .await
        .expect("accepted in time")
        .expect("accepted");
    let (mut from, mut to) = if upward {
        (client, upstream)
    } else {
        (upstream, client)
    };
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(bytes);
        to.read_to_end(&mut got).await.expect("read");
        (got, t0.elapsed())
    });
    from.write_all(&payload).await.expect("write");
    from.shutdown().await.expect("shutdown");
    let (got, took) = tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("transfer in time")
        .expect("reader");
    assert!(got == payload, "payload altered");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_rate_caps_the_transfer() {
    let conditions = LinkConditions {
        uplink: Rate::from_mbit(8.0).expect("rate"),
        ..Default::default()
    };
    let took = time_transfer(conditions, 1_000_000, true).await;
    assert!(
        took >= ms(850) && took <= Duration::from_secs(5),
        "1 MB at 8 Mbit/s took {took:?} (1 s nominal)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_rate_caps_the_transfer_and_uplink_does_not() {
    let conditions = LinkConditions {
        uplink: Rate::from_mbit(0.1).expect("rate"),
        downlink: Rate::from_mbit(4.0).expect("rate"),
        ..Default::default()
    };
    let took = time_transfer(conditions, 500_000, false).await;
    assert!(
        took >= ms(850) && took <= Duration::from_secs(5),
        "500 kB at 4 Mbit/s down took {took:?} (1 s nominal; 40 s at the uplink's rate)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_either_side_is_seen_by_the_other() {
    let (server, mut accepted) = socket_server().await;
    let proxy = proxy_to(
        server,
        LinkConditions {
            rtt: ms(40),
            ..Default::default()
        },
    )
    .await;

    // The client sends, then closes: the upstream gets the bytes, then end of stream.
    let mut client = connect(&proxy).await;
    let mut upstream = accepted.recv().await.expect("accepted");
    client.write_all(b"last words").await.expect("write");
    drop(client);
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, upstream.read_to_end(&mut got))
        .await
        .expect("upstream sees end of stream in time")
        .expect("read");
    assert_eq!(got, b"last words");

    // The upstream closes: the client sees end of stream (after the bytes before it).
    let mut client = connect(&proxy).await;
    let mut upstream = accepted.recv().await.expect("accepted");
    upstream.write_all(b"bye").await.expect("write");
    let t0 = Instant::now();
    drop(upstream);
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut got))
        .await
        .expect("client sees end of stream in time")
        .expect("read");
    assert_eq!(got, b"bye");
    assert!(
        t0.elapsed() >= ms(19),
        "end of stream not delayed: {:?}",
        t0.elapsed()
    );

    // Half-close: the client stops sending but still gets the upstream's answer.
    let mut client = connect(&proxy).await;
    let mut upstream = accepted.recv().await.expect("accepted");
    client.write_all(b"question").await.expect("write");
    client.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, upstream.read_to_end(&mut got))
        .await
        .expect("upstream sees end of stream in time")
        .expect("read");
    assert_eq!(got, b"question");
    upstream.write_all(b"answer").await.expect("write");
    drop(upstream);
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut got))
        .await
        .expect("client sees end of stream in time")
        .expect("read");
    assert_eq!(got, b"answer");
}

/// Byte `i` of the stream in the back-pressure test.
fn pattern(i: u64) -> u8 {
    (i % 253) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_receiver_stops_the_sender() {
    let (server, mut accepted) = socket_server().await;
    let proxy = proxy_to(server, LinkConditions::default()).await;
    let mut client = connect(&proxy).await;
    let mut upstream = accepted.recv().await.expect("accepted");
    // Far more than the kernel's socket buffers (autotuned receive buffers reach 32 MiB
    // here) and the proxy's 4 MiB together hold.
    const BLOCK: u64 = 1 << 20;
    const TOTAL: u64 = 256 * BLOCK;
    let writer = tokio::spawn(async move {
        let mut block = vec![0u8; BLOCK as usize];
        for b in 0..TOTAL / BLOCK {
            for (j, byte) in block.iter_mut().enumerate() {
                *byte = pattern(b * BLOCK + j as u64);
            }
            client.write_all(&block).await.expect("write");
        }
        client.shutdown().await.expect("shutdown");
    });
    // Nobody reads: the writer must be held back, not the proxy fill its memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !writer.is_finished(),
        "256 MiB written with nobody reading: the proxy buffers without bound"
    );
    let check = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            let n = upstream.read(&mut buf).await.expect("read");
            if n == 0 {
                return at;
            }
            for &byte in &buf[..n] {
                assert_eq!(byte, pattern(at), "byte {at} altered");
                at += 1;
            }
        }
    };
    let got = tokio::time::timeout(Duration::from_secs(60), check)
        .await
        .expect("transfer in time");
    assert_eq!(got, TOTAL);
    writer.await.expect("writer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_listener_and_connections() {
    let echo = echo_server().await;
    let proxy = proxy_to(echo, LinkConditions::default()).await;
    let addr = proxy.local_addr();
    let mut s = connect(&proxy).await;
    round_trip(&mut s, b"ping").await;
    proxy.shutdown().await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest))
        .await
        .expect("connection closed in time");
    // End of stream or a reset: either way nothing more comes.
    assert!(closed.is_err() || rest.is_empty());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener still accepts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carries_a_websocket_unchanged() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    // A WebSocket echo server.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
    let server = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.expect("upgrade");
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_binary() && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let proxy = proxy_to(
        server,
        LinkConditions {
            rtt: ms(40),
            jitter: ms(5),
            uplink: Rate::from_mbit(5.0).expect("rate"),
            downlink: Rate::from_mbit(50.0).expect("rate"),
        },
    )
    .await;
    let url = format!("ws://{}/", proxy.local_addr());
    let t0 = Instant::now();
    let (mut ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("upgrade in time")
        .expect("upgrade");
    // The upgrade is one request and its answer: one round trip.
    assert!(t0.elapsed() >= ms(30), "upgrade took {:?}", t0.elapsed());
    for size in [1usize, 1000, 100_000] {
        let frame: Vec<u8> = (0..size).map(|i| (i % 241) as u8).collect();
        let t0 = Instant::now();
        ws.send(Message::binary(frame.clone())).await.expect("send");
        let back = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("echo in time")
            .expect("a message")
            .expect("no error");
        assert_eq!(back.into_data().as_ref(), frame.as_slice());
        // Round trip (30 ms at least) plus 100 kB at 5 Mbit/s up (160 ms) for the big one.
        let floor = if size == 100_000 { ms(180) } else { ms(30) };
        assert!(t0.elapsed() >= floor, "{size} bytes: {:?}", t0.elapsed());
    }
}
