//! Network conditions on one machine: a TCP proxy that delays and rate-limits what it relays.
//!
//! This machine's kernel has no `netem`, so round trips and slow uplinks are emulated in user
//! space (issue 22). [`spawn`] runs a proxy on an already-bound listener: every accepted
//! connection gets its own connection to the upstream, and each direction goes through its
//! own [`relay`] with a [`OneWay`] link: uplink (client to upstream) and downlink (upstream
//! to client) of a [`LinkConditions`]. The proxy works on raw bytes, so it carries HTTP,
//! WebSocket or anything else over TCP unchanged. `tandem-loadtest proxy` wraps it.
//!
//! # The link model, per direction and per connection
//! A chunk read at time `t` (at most [`SEGMENT_BYTES`]; bigger reads are cut) first waits
//! for the link: the link is a FIFO that sends one chunk at a time, and a chunk of `n` bytes
//! occupies it for `n × 8 / rate` seconds. The chunk then travels for the one-way delay,
//! `rtt / 2` plus a jitter drawn uniformly from `[-jitter, +jitter]` for each chunk (a delay
//! that would come out negative is zero). It is released to the other side at
//! `max(that time, the previous chunk's release)`:
//!
//! - **Order is preserved.** Bytes are never reordered, duplicated or dropped; a chunk is
//!   never released before the one read before it. Jitter larger than the gap between chunks
//!   therefore delays the later chunks more than their own draw (as in a real TCP stream,
//!   where a late segment holds back those behind it).
//! - **Delays are lower bounds.** Nothing is released before `t + serialization +
//!   max(delay − jitter, 0)`; timers add up to about a millisecond, and a busy runtime more.
//! - **End of stream is a chunk too.** When one side closes its sending half (or the whole
//!   socket), the other side sees end of stream once everything before it has arrived and the
//!   one-way delay has passed; each direction ends on its own (TCP half-close). A
//!   connection's sockets are closed once both directions have ended; a write or read error
//!   ends that direction at once, dropping what it still held.
//! - A rate of 0 is no cap, an rtt of 0 no delay: with both 0 a chunk is written as soon as
//!   it is read.
//!
//! The connection handshake is not delayed: a client's `connect` completes at once and the
//! proxy opens its upstream connection when it accepts. A protocol's own round trips (the
//! WebSocket upgrade, a request and its answer) pay the emulated rtt.
//!
//! # Costs
//! Each direction holds at most [`QUEUE_LIMIT`] bytes (plus one read) in flight: past that
//! it stops reading, and TCP's flow control pushes back on the sender. One task per
//! connection (both directions are futures of it) with a 16 KiB read buffer per direction,
//! one timer wait per chunk released in the future, and no polling: an idle connection costs
//! its sockets, its task and its two buffers (about 32 KiB). A chunk is copied once, from
//! the read buffer into its own allocation. Chunks are released whole, so a chunk of
//! [`SEGMENT_BYTES`] arrives at most its serialization time (13 ms at 5 Mbit/s) later than
//! its first byte would over a packet-level link.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// The largest chunk the link model handles as one unit: a bigger read is cut into chunks
/// of this size, each with its own jitter and serialization time.
pub const SEGMENT_BYTES: usize = 8 * 1024;

/// Bytes one direction of one connection may hold before it stops reading (back-pressure).
pub const QUEUE_LIMIT: usize = 4 * 1024 * 1024;

/// The size of one read from a socket.
const READ_BYTES: usize = 16 * 1024;

/// What the proxy's arguments can get wrong.
#[derive(Debug, Clone, PartialEq)]
pub enum NetemError {
    /// A rate that is negative, infinite or not a number.
    InvalidRate {
        /// The rate given, in Mbit/s.
        mbit: f64,
    },
}

impl fmt::Display for NetemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidRate { mbit } => write!(
                f,
                "a link rate must be a finite number of Mbit/s, at least 0 (0: no cap); got {mbit}"
            ),
        }
    }
}

impl std::error::Error for NetemError {}

/// A link's rate in one direction: a positive number of bits per second, or no cap.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rate(Option<f64>);

impl Rate {
    /// No cap: chunks take no time on the link.
    pub const UNLIMITED: Rate = Rate(None);

    /// `mbit` megabits (10⁶ bits) per second; 0 means no cap.
    pub fn from_mbit(mbit: f64) -> Result<Self, NetemError> {
        if !mbit.is_finite() || mbit < 0.0 {
            return Err(NetemError::InvalidRate { mbit });
        }
        Ok(if mbit == 0.0 {
            Self::UNLIMITED
        } else {
            Rate(Some(mbit * 1e6))
        })
    }

    /// Bits per second; `None` when uncapped.
    pub fn bits_per_s(self) -> Option<f64> {
        self.0
    }

    /// How long `bytes` occupy the link.
    pub fn serialization(self, bytes: usize) -> Duration {
        match self.0 {
            Some(bps) => Duration::from_secs_f64(bytes as f64 * 8.0 / bps),
            None => Duration::ZERO,
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(bps) => write!(f, "{} Mbit/s", bps / 1e6),
            None => f.write_str("unlimited"),
        }
    }
}

/// One direction of a link: its one-way delay, the jitter on it, and its rate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OneWay {
    /// The mean one-way delay (half the round trip).
    pub delay: Duration,
    /// Each chunk's delay is `delay` plus a uniform draw from `[-jitter, +jitter]`, at least 0.
    pub jitter: Duration,
    /// The link's rate.
    pub rate: Rate,
}

/// The conditions of a client's link to the upstream, both directions.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkConditions {
    /// The round trip: each direction is delayed by half of it.
    pub rtt: Duration,
    /// The jitter on each direction's delay, drawn per chunk.
    pub jitter: Duration,
    /// Client to upstream.
    pub uplink: Rate,
    /// Upstream to client.
    pub downlink: Rate,
}

impl LinkConditions {
    /// Client to upstream.
    pub fn uplink(&self) -> OneWay {
        OneWay {
            delay: self.rtt / 2,
            jitter: self.jitter,
            rate: self.uplink,
        }
    }

    /// Upstream to client.
    pub fn downlink(&self) -> OneWay {
        OneWay {
            rate: self.downlink,
            ..self.uplink()
        }
    }
}

impl fmt::Display for LinkConditions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rtt {} ms, jitter ±{} ms each way, uplink {}, downlink {}",
            self.rtt.as_secs_f64() * 1e3,
            self.jitter.as_secs_f64() * 1e3,
            self.uplink,
            self.downlink
        )
    }
}

/// When each chunk of one direction is released: the FIFO link and the delay line of the
/// module doc, as a pure function of the read times so that it can be tested without a clock.
#[derive(Debug)]
pub struct Schedule {
    link: OneWay,
    rng: StdRng,
    /// When the link has sent everything handed to it so far.
    link_free: Option<Instant>,
    /// The last release time handed out.
    last_release: Option<Instant>,
}

impl Schedule {
    /// A schedule whose jitter draws come from `seed`.
    pub fn new(link: OneWay, seed: u64) -> Self {
        Self {
            link,
            rng: StdRng::seed_from_u64(seed),
            link_free: None,
            last_release: None,
        }
    }

    /// The release time of a chunk of `bytes` read at `read_at` (0 bytes: end of stream,
    /// which takes no time on the link). Never earlier than the previous release.
    pub fn release(&mut self, read_at: Instant, bytes: usize) -> Instant {
        let start = self.link_free.map_or(read_at, |free| free.max(read_at));
        let sent = start + self.link.rate.serialization(bytes);
        self.link_free = Some(sent);
        let release = sent + self.delay();
        let release = self.last_release.map_or(release, |last| last.max(release));
        self.last_release = Some(release);
        release
    }

    /// One draw of the one-way delay: `delay ± jitter`, at least 0.
    fn delay(&mut self) -> Duration {
        let jitter = self.link.jitter.as_micros() as i64;
        let base = self.link.delay.as_micros() as i64;
        let drawn = if jitter == 0 {
            base
        } else {
            base + self.rng.random_range(-jitter..=jitter)
        };
        Duration::from_micros(drawn.max(0) as u64)
    }
}

/// A chunk on its way: its bytes (empty: end of stream), when it may be written, and its
/// share of the direction's byte budget, given back once written.
struct Chunk {
    bytes: Vec<u8>,
    release: Instant,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Copies `src` to `dst` through `link` until `src` ends, then shuts `dst`'s sending half
/// down (after the delay, like the data). Returns the bytes relayed. Order is preserved and
/// at most [`QUEUE_LIMIT`] bytes (plus one read) are held; see the module doc.
pub async fn relay<R, W>(mut src: R, mut dst: W, link: OneWay, seed: u64) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Unbounded in chunks but bounded in bytes: every data chunk holds permits for its bytes.
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
    let budget = Arc::new(Semaphore::new(QUEUE_LIMIT));
    let mut schedule = Schedule::new(link, seed);

    let read = async move {
        let mut buf = vec![0u8; READ_BYTES];
        let mut total = 0u64;
        loop {
            let n = src.read(&mut buf).await?;
            let read_at = Instant::now();
            if n == 0 {
                let release = schedule.release(read_at, 0);
                // A closed receiver means the writer already failed; its error wins.
                let _ = tx.send(Chunk {
                    bytes: Vec::new(),
                    release,
                    _budget: None,
                });
                return Ok::<_, io::Error>(total);
            }
            total += n as u64;
            for piece in buf[..n].chunks(SEGMENT_BYTES) {
                // Waits while the direction holds QUEUE_LIMIT bytes: back-pressure.
                let permit = Arc::clone(&budget)
                    .acquire_many_owned(piece.len() as u32)
                    .await
                    .map_err(|_| io::Error::other("relay budget closed"))?;
                let chunk = Chunk {
                    bytes: piece.to_vec(),
                    release: schedule.release(read_at, piece.len()),
                    _budget: Some(permit),
                };
                if tx.send(chunk).is_err() {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "relay writer stopped",
                    ));
                }
            }
        }
    };

    let write = async move {
        while let Some(chunk) = rx.recv().await {
            if chunk.release > Instant::now() {
                tokio::time::sleep_until(chunk.release).await;
            }
            if chunk.bytes.is_empty() {
                dst.shutdown().await?;
                return Ok::<_, io::Error>(());
            }
            dst.write_all(&chunk.bytes).await?;
            dst.flush().await?;
        }
        Ok(())
    };

    let (total, ()) = tokio::try_join!(read, write)?;
    Ok(total)
}

/// What [`spawn`] needs besides the listener.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where each accepted connection is relayed to: `HOST:PORT`, resolved per connection.
    pub upstream: String,
    /// The link's conditions, the same for every connection.
    pub conditions: LinkConditions,
    /// Seeds the jitter draws (each connection and direction gets its own stream).
    pub seed: u64,
}

/// A running proxy. Dropping it stops the proxy as [`ProxyHandle::shutdown`] does, without
/// waiting.
#[derive(Debug)]
pub struct ProxyHandle {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ProxyHandle {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every connection (dropping what was in flight) and waits until
    /// the listener is closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        // The accept task never panics; a cancelled one is stopped all the same.
        let _ = self.task.await;
    }
}

/// Runs the proxy on `listener` in a task of the current Tokio runtime (call it inside one).
/// A connection whose upstream cannot be reached is closed.
pub fn spawn(listener: TcpListener, config: ProxyConfig) -> io::Result<ProxyHandle> {
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(accept_loop(listener, Arc::new(config), stopped));
    Ok(ProxyHandle { addr, stop, task })
}

async fn accept_loop(
    listener: TcpListener,
    config: Arc<ProxyConfig>,
    mut stopped: oneshot::Receiver<()>,
) {
    // Dropping the set (when the loop ends) aborts every connection task.
    let mut connections = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            // A send or a dropped handle both stop the proxy.
            _ = &mut stopped => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(serve(client, Arc::clone(&config), next_id));
                    next_id += 1;
                }
                // Out of file descriptors and the like: pause instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
        }
    }
}

/// One connection: both directions until both have ended. Errors close the connection; a
/// proxy has no one to report them to.
async fn serve(mut client: TcpStream, config: Arc<ProxyConfig>, id: u64) {
    let Ok(mut upstream) = TcpStream::connect(config.upstream.as_str()).await else {
        return;
    };
    // The delay is the proxy's to add: Nagle's algorithm would add its own to small writes.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let seed = config
        .seed
        .wrapping_add(id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let (client_rx, client_tx) = client.split();
    let (upstream_rx, upstream_tx) = upstream.split();
    let conditions = &config.conditions;
    // Each direction ends on its own (half-close); an error in one leaves the other running.
    let _ = tokio::join!(
        relay(client_rx, upstream_tx, conditions.uplink(), seed),
        relay(upstream_rx, client_tx, conditions.downlink(), seed ^ 1),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn rates_parse_and_serialize() {
        assert_eq!(Rate::from_mbit(0.0), Ok(Rate::UNLIMITED));
        assert!(Rate::from_mbit(-1.0).is_err());
        assert!(Rate::from_mbit(f64::NAN).is_err());
        assert!(Rate::from_mbit(f64::INFINITY).is_err());
        let r = Rate::from_mbit(8.0).expect("rate");
        assert_eq!(r.serialization(1_000_000), Duration::from_secs(1));
        assert_eq!(Rate::UNLIMITED.serialization(1_000_000), Duration::ZERO);
        let c = LinkConditions {
            rtt: ms(100),
            jitter: ms(10),
            uplink: Rate::from_mbit(5.0).expect("rate"),
            downlink: Rate::UNLIMITED,
        };
        assert_eq!(
            c.to_string(),
            "rtt 100 ms, jitter ±10 ms each way, uplink 5 Mbit/s, downlink unlimited"
        );
        assert_eq!((c.uplink().delay, c.downlink().delay), (ms(50), ms(50)));
        assert_eq!(c.downlink().rate, Rate::UNLIMITED);
    }

    #[test]
    fn delay_without_rate_is_half_the_rtt() {
        let c = LinkConditions {
            rtt: ms(100),
            ..Default::default()
        };
        let mut s = Schedule::new(c.uplink(), 0);
        let t0 = Instant::now();
        assert_eq!(s.release(t0, 10), t0 + ms(50));
        assert_eq!(s.release(t0 + ms(7), 10), t0 + ms(57));
        // End of stream is delayed like data.
        assert_eq!(s.release(t0 + ms(9), 0), t0 + ms(59));
    }

    #[test]
    fn the_link_is_a_fifo() {
        let link = OneWay {
            delay: ms(10),
            jitter: Duration::ZERO,
            rate: Rate::from_mbit(8.0).expect("rate"),
        };
        let mut s = Schedule::new(link, 0);
        let t0 = Instant::now();
        // 1,000 bytes at 8 Mbit/s: 1 ms each. Three at once queue behind each other.
        assert_eq!(s.release(t0, 1000), t0 + ms(11));
        assert_eq!(s.release(t0, 1000), t0 + ms(12));
        assert_eq!(s.release(t0, 1000), t0 + ms(13));
        // An idle link starts fresh.
        assert_eq!(s.release(t0 + ms(100), 1000), t0 + ms(111));
    }

    #[test]
    fn jitter_stays_in_bounds_and_never_reorders() {
        let link = OneWay {
            delay: ms(50),
            jitter: ms(40),
            rate: Rate::UNLIMITED,
        };
        let mut s = Schedule::new(link, 7);
        let t0 = Instant::now();
        let mut last = t0;
        let mut held_back = 0;
        for i in 0..10_000u64 {
            let read_at = t0 + Duration::from_micros(i * 100);
            let r = s.release(read_at, 100);
            assert!(r >= last, "chunk {i} released before its predecessor");
            assert!(
                r >= read_at + ms(10),
                "chunk {i} earlier than delay - jitter"
            );
            // Released with its predecessor: its own draw would have overtaken it.
            if i > 0 && r == last {
                held_back += 1;
            }
            last = r;
        }
        // Chunks 0.1 ms apart with ±40 ms of jitter: most wait for an earlier, later draw.
        assert!(held_back > 1000, "held back: {held_back}");
        // The draws themselves cover the range.
        let mut s = Schedule::new(link, 7);
        let spread: Vec<Duration> = (0..1000)
            .map(|i| {
                let at = t0 + Duration::from_secs(i);
                s.release(at, 1) - at
            })
            .collect();
        let lo = spread.iter().min().copied().unwrap_or_default();
        let hi = spread.iter().max().copied().unwrap_or_default();
        assert!(lo >= ms(10) && lo < ms(15), "min {lo:?}");
        assert!(hi <= ms(90) && hi > ms(85), "max {hi:?}");
    }

    #[test]
    fn a_negative_draw_is_no_delay() {
        let link = OneWay {
            delay: ms(5),
            jitter: ms(20),
            rate: Rate::UNLIMITED,
        };
        let mut s = Schedule::new(link, 3);
        let t0 = Instant::now();
        let zero = (0..1000)
            .map(|i| {
                let at = t0 + Duration::from_secs(i);
                s.release(at, 1) - at
            })
            .filter(|d| d.is_zero())
            .count();
        // Draws below -5 ms are 15 of 40 ms of the range.
        assert!((250..500).contains(&zero), "zero delays: {zero}");
    }
}
