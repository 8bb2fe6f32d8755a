//! The client against a scripted fake cloud (an in-test WebSocket server on 127.0.0.1:0):
//! chunking with the system prefix on its own, resume from `next_hidden_seq`, full replay,
//! token dedupe, cancellation, error handling, and that logs above debug carry no private
//! text.

use tandem_testkit::tiny as common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::DType;
use futures_util::{SinkExt, StreamExt};
use tandem_edge::transparency::SentTraffic;
use tandem_edge::{
    ClientConfig, ClientError, EdgeBundle, EdgeClient, Event, GenerateRequest, ModelInfo,
    ReconnectPolicy, TransparencyRecord,
};
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_protocol::{
    Done, DoneReason, ErrorCode, ErrorFrame, FinishReason, Frame, HiddenDtype, HiddenRef, Limits,
    Opened, ResumeToken, SessionId, Token,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// A tiny split model on disk (hidden size 64, 4 layers, cut after layer 1).
struct Tiny {
    _dir: tempfile::TempDir,
    bundle: EdgeBundle,
}

fn tiny() -> Tiny {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[0];
    let hf = dir.path().join("hf");
    common::write_hf(&hf, spec);
    let ck = Checkpoint::open(&hf).expect("open");
    let opts = SplitOptions {
        edge_layers: 1,
        dtype: DType::F32,
        force: false,
        progress: false,
    };
    write_split(&ck, &dir.path().join("split"), &opts).expect("split");
    let bundle = EdgeBundle::load(&dir.path().join("split")).expect("load edge");
    Tiny { _dir: dir, bundle }
}

struct Fake {
    listener: TcpListener,
    url: String,
}

impl Fake {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/v1/edge/ws", listener.local_addr().expect("addr"));
        Self { listener, url }
    }

    async fn accept(&self) -> Ws {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), self.listener.accept())
            .await
            .expect("the client did not connect")
            .expect("accept");
        tokio_tungstenite::accept_async(stream)
            .await
            .expect("ws handshake")
    }
}

/// The next protocol frame and its bytes; `None` when the client closed.
async fn recv(ws: &mut Ws) -> Option<(Frame, Vec<u8>)> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the client went silent");
        match msg {
            Some(Ok(Message::Binary(b))) => {
                let frame = Frame::decode(&b).expect("the client sent a valid frame");
                return Some((frame, b.to_vec()));
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

async fn recv_frame(ws: &mut Ws) -> Frame {
    recv(ws).await.expect("the client closed early").0
}

async fn send(ws: &mut Ws, frame: Frame) {
    ws.send(Message::Binary(frame.encode().expect("encode").into()))
        .await
        .expect("send");
}

/// Receives a `Hidden` and checks its sequence number, position and row count.
async fn expect_hidden(ws: &mut Ws, seq: u64, position: u32, rows: u32, complete: bool) -> Vec<u8> {
    let (frame, bytes) = recv(ws).await.expect("the client closed early");
    let Frame::Hidden(h) = frame else {
        panic!("expected Hidden {seq}, got {frame:?}");
    };
    assert_eq!(
        (h.seq, h.first_position, h.token_count, h.complete),
        (seq, position, rows, complete),
        "hidden frame"
    );
    HiddenRef::decode(&bytes, &Limits::default()).expect("valid hidden");
    bytes
}

fn opened(session: u128, token: u8, next: u64) -> Frame {
    Frame::Opened(Opened {
        session: SessionId(session),
        resume_token: ResumeToken([token; 32]),
        next_hidden_seq: next,
    })
}

/// Token `seq`, answering hidden frame `input`.
fn token(seq: u64, input: u64, id: u32) -> Frame {
    Frame::Token(Token {
        seq,
        input_seq: input,
        token_id: id,
        draft: false,
        last: false,
        draft_cap: 0,
        text: Some(format!("<{id}>")),
    })
}

fn done(reason: DoneReason, prompt: u32, output: u32) -> Frame {
    Frame::Done(Done {
        reason,
        prompt_tokens: prompt,
        output_tokens: output,
    })
}

fn config(url: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(url);
    cfg.prompt_chunk_tokens = 5;
    cfg.reconnect = ReconnectPolicy {
        initial_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        max_attempts: 5,
        ..ReconnectPolicy::default()
    };
    cfg
}

fn prompt(n: u32) -> Vec<u32> {
    (0..n).map(|i| 5 + (i * 7) % 250).collect()
}

/// Answers `Open` and checks what it says about the model.
async fn expect_open(ws: &mut Ws, tiny: &Tiny, dtype: HiddenDtype) {
    let Frame::Open(open) = recv_frame(ws).await else {
        panic!("expected Open");
    };
    assert_eq!(open.manifest.as_str(), Some(tiny.bundle.pair_id()));
    assert_eq!((open.split, open.hidden_size, open.dtype), (1, 64, dtype));
    assert_eq!(open.max_tokens, 3);
}

#[tokio::test]
async fn system_prefix_is_its_own_chunk_then_one_hidden_per_token() {
    let tiny = tiny();
    for dtype in [HiddenDtype::F32, HiddenDtype::F16] {
        let fake = Fake::start().await;
        let mut cfg = config(&fake.url);
        cfg.dtype = dtype;
        let client = EdgeClient::from_bundle(&tiny.bundle, cfg).expect("client");
        let mut req = GenerateRequest::new(prompt(20));
        req.system_prefix_len = 7;
        req.max_tokens = 3;
        let generation = client.generate(req).expect("generate");
        let mut ws = fake.accept().await;
        expect_open(&mut ws, &tiny, dtype).await;
        send(&mut ws, opened(1, 1, 0)).await;
        // Chunks of 5, cut at the system prefix: [0,5) [5,7) | [7,12) [12,17) [17,20).
        for (seq, (pos, rows)) in [(0, 5), (5, 2), (7, 5), (12, 5), (17, 3)]
            .into_iter()
            .enumerate()
        {
            expect_hidden(&mut ws, seq as u64, pos, rows, seq == 4).await;
        }
        send(&mut ws, token(0, 4, 40)).await;
        expect_hidden(&mut ws, 5, 20, 1, true).await;
        send(&mut ws, token(1, 5, 41)).await;
        expect_hidden(&mut ws, 6, 21, 1, true).await;
        send(&mut ws, token(2, 6, 42)).await;
        send(
            &mut ws,
            done(DoneReason::Finished(FinishReason::Length), 20, 3),
        )
        .await;
        // No hidden state for the token that ended the generation: the client just closes.
        assert!(recv(&mut ws).await.is_none(), "nothing after Done");
        let f = generation.finish().await.expect("finished");
        assert_eq!(f.token_ids, [40, 41, 42]);
        assert_eq!(f.text, "<40><41><42>");
        assert_eq!(f.reason, DoneReason::Finished(FinishReason::Length));
        assert_eq!((f.usage.prompt_tokens, f.usage.output_tokens), (20, 3));
        assert_eq!((f.wire.prompt_frames, f.wire.decode_frames), (5, 2));
        let per_step = f.wire.decode_bytes / f.wire.decode_frames;
        assert_eq!(per_step as usize, 28 + 64 * dtype.value_bits() / 8);
        println!(
            "wire {dtype}: {per_step} bytes per decode step, {:.1} bytes per prompt token \
             (hidden size 64; frame overhead 28 bytes)",
            f.wire.prompt_bytes as f64 / 20.0
        );
    }
}

#[tokio::test]
async fn resume_resends_from_next_hidden_seq_and_dedupes_tokens() {
    let tiny = tiny();
    let fake = Fake::start().await;
    let client = EdgeClient::from_bundle(&tiny.bundle, config(&fake.url)).expect("client");
    let mut req = GenerateRequest::new(prompt(8));
    req.max_tokens = 4;
    let generation = client.generate(req).expect("generate");

    // Connection 1: prompt [0,5) [5,8), token 0, its hidden, token 1, then the line drops.
    let mut ws = fake.accept().await;
    assert!(matches!(recv_frame(&mut ws).await, Frame::Open(_)));
    send(&mut ws, opened(9, 0xA, 0)).await;
    expect_hidden(&mut ws, 0, 0, 5, false).await;
    expect_hidden(&mut ws, 1, 5, 3, true).await;
    send(&mut ws, token(0, 1, 30)).await;
    expect_hidden(&mut ws, 2, 8, 1, true).await;
    send(&mut ws, token(1, 2, 31)).await;
    let seq3 = expect_hidden(&mut ws, 3, 9, 1, true).await;
    drop(ws);

    // Connection 2: Resume names the last token; the cloud kept hidden 0..=2 only, so the
    // device resends 3. The cloud resends token 1 (a duplicate), then token 2; drops again.
    let mut ws = fake.accept().await;
    let Frame::Resume(r) = recv_frame(&mut ws).await else {
        panic!("expected Resume");
    };
    assert_eq!(r.session, SessionId(9));
    assert!(r.resume_token.verify(&ResumeToken([0xA; 32])));
    assert_eq!(r.last_token_seq, Some(1));
    send(&mut ws, opened(9, 0xB, 3)).await;
    assert_eq!(
        expect_hidden(&mut ws, 3, 9, 1, true).await,
        seq3,
        "resent unchanged"
    );
    send(&mut ws, token(1, 2, 31)).await;
    send(&mut ws, token(2, 3, 32)).await;
    expect_hidden(&mut ws, 4, 10, 1, true).await;
    drop(ws);

    // Connection 3: the new resume token is used; the cloud has everything.
    let mut ws = fake.accept().await;
    let Frame::Resume(r) = recv_frame(&mut ws).await else {
        panic!("expected Resume");
    };
    assert!(
        r.resume_token.verify(&ResumeToken([0xB; 32])),
        "the latest token"
    );
    assert_eq!(r.last_token_seq, Some(2));
    send(&mut ws, opened(9, 0xC, 5)).await;
    send(&mut ws, token(3, 4, 33)).await;
    send(
        &mut ws,
        done(DoneReason::Finished(FinishReason::Length), 8, 4),
    )
    .await;

    let mut events = Vec::new();
    let mut generation = generation;
    while let Some(e) = generation.next().await {
        events.push(e);
    }
    let tokens: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { token_id, .. } => Some(*token_id),
            _ => None,
        })
        .collect();
    assert_eq!(tokens, [30, 31, 32, 33], "one uninterrupted stream");
    let resumed: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Resumed {
                next_hidden_seq,
                resent,
            } => Some((*next_hidden_seq, *resent)),
            _ => None,
        })
        .collect();
    assert_eq!(resumed, [(3, 1), (5, 0)]);
    let Some(Event::Done(f)) = events.pop() else {
        panic!("ends with Done");
    };
    assert_eq!(f.text, "<30><31><32><33>");
    assert_eq!((f.wire.reconnects, f.wire.replays), (2, 0));
}

#[tokio::test]
async fn next_hidden_seq_zero_replays_everything_back_to_back() {
    let tiny = tiny();
    let fake = Fake::start().await;
    let client = EdgeClient::from_bundle(&tiny.bundle, config(&fake.url)).expect("client");
    let mut req = GenerateRequest::new(prompt(7));
    req.max_tokens = 4;
    let generation = client.generate(req).expect("generate");

    let mut ws = fake.accept().await;
    assert!(matches!(recv_frame(&mut ws).await, Frame::Open(_)));
    send(&mut ws, opened(5, 1, 0)).await;
    let mut first = vec![
        expect_hidden(&mut ws, 0, 0, 5, false).await,
        expect_hidden(&mut ws, 1, 5, 2, true).await,
    ];
    send(&mut ws, token(0, 1, 50)).await;
    first.push(expect_hidden(&mut ws, 2, 7, 1, true).await);
    send(&mut ws, token(1, 2, 51)).await;
    first.push(expect_hidden(&mut ws, 3, 8, 1, true).await);
    drop(ws);

    // Another replica with no state: every hidden from 0, without waiting for tokens.
    let mut ws = fake.accept().await;
    let Frame::Resume(r) = recv_frame(&mut ws).await else {
        panic!("expected Resume");
    };
    assert_eq!(r.last_token_seq, Some(1));
    send(&mut ws, opened(5, 2, 0)).await;
    for (seq, bytes) in first.iter().enumerate() {
        let (frame, got) = recv(&mut ws).await.expect("replayed frame");
        assert!(matches!(frame, Frame::Hidden(_)), "replay {seq}: {frame:?}");
        assert_eq!(&got, bytes, "replayed hidden {seq} is byte-identical");
    }
    send(&mut ws, token(2, 3, 52)).await;
    expect_hidden(&mut ws, 4, 9, 1, true).await;
    send(&mut ws, token(3, 4, 53)).await;
    send(
        &mut ws,
        done(DoneReason::Finished(FinishReason::Length), 7, 4),
    )
    .await;
    let f = generation.finish().await.expect("finished");
    assert_eq!(f.token_ids, [50, 51, 52, 53]);
    assert_eq!(
        (
            f.wire.reconnects,
            f.wire.replays,
            f.wire.hidden_frames_resent
        ),
        (1, 1, 4)
    );
}

/// Issue 20, item 6 ("the device failed with `unknown_session` although it holds every
/// hidden state it sent"): when no replica knows the session any more, the device opens a
/// new one with the same `Open`, sends the prompt again, and each decode frame only once the
/// new session has produced that step's token again (the cloud refuses a hidden state ahead
/// of its token); the caller sees every token once.
#[tokio::test]
async fn an_unknown_session_is_reopened_and_replayed_in_step() {
    let tiny = tiny();
    let fake = Fake::start().await;
    let client = EdgeClient::from_bundle(&tiny.bundle, config(&fake.url)).expect("client");
    let mut req = GenerateRequest::new(prompt(8));
    req.max_tokens = 4;
    let generation = client.generate(req).expect("generate");

    // Connection 1: prompt [0,5) [5,8), token 0, its hidden, token 1, its hidden; dropped.
    let mut ws = fake.accept().await;
    let (first_open, open_bytes) = recv(&mut ws).await.expect("Open");
    assert!(matches!(first_open, Frame::Open(_)));
    send(&mut ws, opened(9, 0xA, 0)).await;
    let mut sent = vec![
        expect_hidden(&mut ws, 0, 0, 5, false).await,
        expect_hidden(&mut ws, 1, 5, 3, true).await,
    ];
    send(&mut ws, token(0, 1, 30)).await;
    sent.push(expect_hidden(&mut ws, 2, 8, 1, true).await);
    send(&mut ws, token(1, 2, 31)).await;
    sent.push(expect_hidden(&mut ws, 3, 9, 1, true).await);
    drop(ws);

    // Connection 2: the store lost the session.
    let mut ws = fake.accept().await;
    assert!(matches!(recv_frame(&mut ws).await, Frame::Resume(_)));
    let unknown = ErrorFrame {
        code: ErrorCode::UnknownSession,
        seq: None,
        message: "unknown or expired session".into(),
        retry_after_ms: None,
    };
    send(&mut ws, Frame::Error(unknown)).await;
    drop(ws);

    // Connection 3: the same Open, byte for byte; a new session.
    let mut ws = fake.accept().await;
    let (_, again) = recv(&mut ws).await.expect("Open again");
    assert_eq!(
        again, open_bytes,
        "the new Open carries the same parameters"
    );
    send(&mut ws, opened(77, 0xB, 0)).await;
    for (seq, bytes) in sent.iter().enumerate().take(2) {
        let (_, got) = recv(&mut ws).await.expect("replayed prompt");
        assert_eq!(&got, bytes, "prompt frame {seq} replayed unchanged");
    }
    // Nothing ahead of the token it was made from: a Pong comes before any decode frame.
    send(&mut ws, Frame::Ping { nonce: 1 }).await;
    assert!(matches!(
        recv_frame(&mut ws).await,
        Frame::Pong { nonce: 1 }
    ));
    send(&mut ws, token(0, 1, 30)).await;
    let (_, got) = recv(&mut ws).await.expect("decode frame 0");
    assert_eq!(got, sent[2], "decode frame 0 replayed after token 0");
    send(&mut ws, Frame::Ping { nonce: 2 }).await;
    assert!(matches!(
        recv_frame(&mut ws).await,
        Frame::Pong { nonce: 2 }
    ));
    send(&mut ws, token(1, 2, 31)).await;
    let (_, got) = recv(&mut ws).await.expect("decode frame 1");
    assert_eq!(got, sent[3], "decode frame 1 replayed after token 1");
    // From here on, new tokens as usual.
    send(&mut ws, token(2, 3, 32)).await;
    expect_hidden(&mut ws, 4, 10, 1, true).await;
    drop(ws);

    // Connection 4: the new session is the one resumed.
    let mut ws = fake.accept().await;
    let Frame::Resume(r) = recv_frame(&mut ws).await else {
        panic!("expected Resume");
    };
    assert_eq!(r.session, SessionId(77));
    assert!(r.resume_token.verify(&ResumeToken([0xB; 32])));
    assert_eq!(r.last_token_seq, Some(2));
    send(&mut ws, opened(77, 0xC, 5)).await;
    send(&mut ws, token(3, 4, 33)).await;
    send(
        &mut ws,
        done(DoneReason::Finished(FinishReason::Length), 8, 4),
    )
    .await;

    let mut events = Vec::new();
    let mut generation = generation;
    while let Some(e) = generation.next().await {
        events.push(e);
    }
    let tokens: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { token_id, .. } => Some(*token_id),
            _ => None,
        })
        .collect();
    assert_eq!(tokens, [30, 31, 32, 33], "every token once");
    let Some(Event::Done(f)) = events.pop() else {
        panic!("ends with Done");
    };
    assert_eq!(f.text, "<30><31><32><33>");
    assert_eq!(f.session, SessionId(77));
    assert_eq!((f.wire.reopens, f.wire.replays), (1, 1), "{:?}", f.wire);
}

/// A cloud that forgets the session every time cannot keep the device reopening: after
/// three new sessions, `unknown_session` ends the generation. A partner prompt's generation
/// (its ticket was single-use) is never reopened.
#[tokio::test]
async fn reopening_a_forgotten_session_is_bounded() {
    let tiny = tiny();
    let fake = Fake::start().await;
    let mut cfg = config(&fake.url);
    cfg.reconnect.max_attempts = 50;
    let client = EdgeClient::from_bundle(&tiny.bundle, cfg).expect("client");
    let unknown = || {
        Frame::Error(ErrorFrame {
            code: ErrorCode::UnknownSession,
            seq: None,
            message: "unknown or expired session".into(),
            retry_after_ms: None,
        })
    };
    let generation = client
        .generate(GenerateRequest::new(prompt(2)))
        .expect("generate");
    let mut opens = 0;
    let mut resumes = 0;
    while resumes <= 3 {
        let mut ws = fake.accept().await;
        match recv_frame(&mut ws).await {
            Frame::Open(_) => {
                opens += 1;
                send(&mut ws, opened(opens, 1, 0)).await;
                expect_hidden(&mut ws, 0, 0, 2, true).await;
            }
            Frame::Resume(_) => {
                resumes += 1;
                send(&mut ws, unknown()).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    match generation.finish().await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::UnknownSession),
        other => panic!("expected unknown_session, got {other:?}"),
    }
    assert_eq!((opens, resumes), (4, 4), "one Open and three reopens");

    let mut req = GenerateRequest::new(prompt(2));
    req.prompt_id = Some("tkt_partner".into());
    let generation = client.generate(req).expect("generate");
    let mut ws = fake.accept().await;
    assert!(matches!(recv_frame(&mut ws).await, Frame::Open(_)));
    send(&mut ws, opened(50, 1, 0)).await;
    expect_hidden(&mut ws, 0, 0, 2, true).await;
    drop(ws);
    let mut ws = fake.accept().await;
    assert!(matches!(recv_frame(&mut ws).await, Frame::Resume(_)));
    send(&mut ws, unknown()).await;
    match generation.finish().await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::UnknownSession),
        other => panic!("expected unknown_session, got {other:?}"),
    }
}

#[tokio::test]
async fn cancel_and_drop_send_cancel() {
    let tiny = tiny();
    for drop_it in [false, true] {
        let fake = Fake::start().await;
        let client = EdgeClient::from_bundle(&tiny.bundle, config(&fake.url)).expect("client");
        let mut generation = client
            .generate(GenerateRequest::new(prompt(3)))
            .expect("generate");
        let mut ws = fake.accept().await;
        assert!(matches!(recv_frame(&mut ws).await, Frame::Open(_)));
        send(&mut ws, opened(3, 1, 0)).await;
        expect_hidden(&mut ws, 0, 0, 3, true).await;
        send(&mut ws, token(0, 0, 60)).await;
        assert!(matches!(
            generation.next().await,
            Some(Event::Opened { .. })
        ));
        assert!(matches!(
            generation.next().await,
            Some(Event::Token { token_id: 60, .. })
        ));
        let mut kept = None;
        if drop_it {
            drop(generation);
        } else {
            generation.cancel();
            kept = Some(generation);
        }
        // The hidden state of token 0 may already be on its way; then comes Cancel.
        loop {
            match recv_frame(&mut ws).await {
                Frame::Hidden(_) => {}
                Frame::Cancel => break,
                other => panic!("expected Cancel, got {other:?}"),
            }
        }
        send(&mut ws, done(DoneReason::Cancelled, 3, 1)).await;
        if let Some(generation) = kept {
            let f = generation.finish().await.expect("finished");
            assert_eq!(f.reason, DoneReason::Cancelled);
            assert_eq!(f.token_ids, [60]);
        }
    }
}

#[tokio::test]
async fn fatal_errors_end_the_generation_and_3xx_on_open_retries() {
    let tiny = tiny();
    let fake = Fake::start().await;
    let client = EdgeClient::from_bundle(&tiny.bundle, config(&fake.url)).expect("client");

    // overloaded: try Open again (there is no session to resume).
    let generation = client
        .generate(GenerateRequest::new(prompt(2)))
        .expect("generate");
    let mut ws = fake.accept().await;
    assert!(matches!(recv_frame(&mut ws).await, Frame::Open(_)));
    // The refusal asks for 300 ms, more than the policy's backoff (at most 50 ms here).
    let busy = ErrorFrame {
        code: ErrorCode::Overloaded,
        seq: None,
        message: "busy".into(),
        retry_after_ms: Some(300),
    };
    send(&mut ws, Frame::Error(busy)).await;
    let refused_at = std::time::Instant::now();
    drop(ws);
    let mut ws = fake.accept().await;
    assert!(
        matches!(recv_frame(&mut ws).await, Frame::Open(_)),
        "Open again"
    );
    assert!(
        refused_at.elapsed() >= Duration::from_millis(300),
        "the client waited as long as the cloud asked"
    );
    send(&mut ws, opened(4, 1, 0)).await;
    expect_hidden(&mut ws, 0, 0, 2, true).await;
    send(&mut ws, token(0, 0, 2)).await;
    send(&mut ws, done(DoneReason::Finished(FinishReason::Eos), 2, 1)).await;
    let f = generation.finish().await.expect("finished after a retry");
    assert_eq!(f.reason, DoneReason::Finished(FinishReason::Eos));

    // manifest_mismatch: no retry, a typed error.
    let generation = client
        .generate(GenerateRequest::new(prompt(2)))
        .expect("generate");
    let mut ws = fake.accept().await;
    assert!(matches!(recv_frame(&mut ws).await, Frame::Open(_)));
    let mismatch = ErrorFrame {
        code: ErrorCode::ManifestMismatch,
        seq: None,
        message: "not served".into(),
        retry_after_ms: None,
    };
    send(&mut ws, Frame::Error(mismatch)).await;
    match generation.finish().await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::ManifestMismatch),
        other => panic!("expected a server error, got {other:?}"),
    }
    let again = tokio::time::timeout(Duration::from_millis(300), fake.listener.accept()).await;
    assert!(again.is_err(), "a 1xx error must not be retried");

    // Nobody listening: give up within the policy.
    let dead = format!(
        "ws://{}/v1/edge/ws",
        fake.listener.local_addr().expect("addr")
    );
    drop(fake);
    let client = EdgeClient::from_bundle(&tiny.bundle, config(&dead)).expect("client");
    let err = client
        .generate(GenerateRequest::new(prompt(2)))
        .expect("generate")
        .finish()
        .await
        .expect_err("unreachable");
    assert!(
        matches!(err, ClientError::Unreachable { attempts: 6, .. }),
        "{err}"
    );
}

#[test]
fn requests_are_checked_before_anything_is_sent() {
    let tiny = tiny();
    let client = EdgeClient::from_bundle(&tiny.bundle, ClientConfig::new("ws://127.0.0.1:9/x"))
        .expect("client");
    let mut req = GenerateRequest::new(vec![]);
    assert!(matches!(
        client.generate(req.clone()),
        Err(ClientError::Request(_))
    ));
    req.prompt = prompt(3);
    req.system_prefix_len = 4;
    assert!(matches!(
        client.generate(req.clone()),
        Err(ClientError::Request(_))
    ));
    req.system_prefix_len = 0;
    req.prompt.push(100_000);
    assert!(matches!(client.generate(req), Err(ClientError::Request(_))));
}

/// A `MakeWriter` that appends to a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn nothing_above_debug_logs_private_text() {
    const MARKER: &str = "zq-private-marker-7731";
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // One thread: the driver task logs under this thread's subscriber.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tiny = tiny();
    rt.block_on(async {
        let fake = Fake::start().await;
        let client = EdgeClient::from_bundle(&tiny.bundle, config(&fake.url)).expect("client");
        let mut req = GenerateRequest::new(prompt(4));
        req.stop = vec![MARKER.into()];
        req.prompt_id = Some(MARKER.into());
        req.record = Some(TransparencyRecord {
            partner: Some(MARKER.into()),
            prompt_id: Some(MARKER.into()),
            system_prompt: Some(MARKER.into()),
            template: format!("Hello {MARKER}"),
            user_prompt: format!("Hello {MARKER}"),
            fields_used: vec![tandem_edge::FieldUse {
                name: "name".into(),
                value: serde_json::json!(MARKER),
            }],
            ..bare_record(&tiny, 4)
        });
        let generation = client.generate(req).expect("generate");
        let mut ws = fake.accept().await;
        assert!(matches!(recv_frame(&mut ws).await, Frame::Open(_)));
        send(&mut ws, opened(8, 1, 0)).await;
        expect_hidden(&mut ws, 0, 0, 4, true).await;
        let secret = Token {
            seq: 0,
            input_seq: 0,
            draft: false,
            last: false,
            draft_cap: 0,
            token_id: 70,
            text: Some(MARKER.into()),
        };
        send(&mut ws, Frame::Token(secret)).await;
        drop(ws); // a reconnect, so the resume path logs too
        let mut ws = fake.accept().await;
        assert!(matches!(recv_frame(&mut ws).await, Frame::Resume(_)));
        send(&mut ws, opened(8, 2, 1)).await;
        expect_hidden(&mut ws, 1, 4, 1, true).await;
        send(
            &mut ws,
            done(DoneReason::Finished(FinishReason::Length), 4, 1),
        )
        .await;
        let f = generation.finish().await.expect("finished");
        assert_eq!(f.text, MARKER, "the caller does get the text");
        assert!(f.record.expect("record").render_text().contains(MARKER));
    });
    let logs = String::from_utf8(capture.0.lock().expect("lock").clone()).expect("utf8");
    assert!(
        logs.contains("session opened"),
        "logs were captured: {logs}"
    );
    assert!(
        logs.contains("session resumed"),
        "logs were captured: {logs}"
    );
    assert!(!logs.contains(MARKER), "private text in the logs:\n{logs}");
}

/// A record with nothing filled in but the model and the prompt length.
fn bare_record(tiny: &Tiny, prompt_tokens: usize) -> TransparencyRecord {
    TransparencyRecord {
        partner: None,
        prompt_id: None,
        system_prompt: None,
        template: "t".into(),
        user_prompt: "u".into(),
        fields_used: vec![],
        redactions: vec![],
        prompt_tokens,
        shared_prefix_tokens: 0,
        model: ModelInfo::from_edge(&tiny.bundle.model, tiny.bundle.pair_id()),
        sent: SentTraffic::default(),
        bytes_received: 0,
        compression: None,
        noise: None,
        output: None,
        finish_reason: None,
    }
}

/// Runs a 6-token prompt and 2 output tokens against the fake cloud with `noise`; answers
/// the hidden frames received and the finished generation.
async fn run_with_noise(
    tiny: &Tiny,
    noise: Option<tandem_model::privacy::GaussianMechanism>,
) -> (Vec<Vec<u8>>, tandem_edge::Finished) {
    let fake = Fake::start().await;
    let mut cfg = config(&fake.url);
    cfg.noise = noise;
    cfg.noise_seed = Some(99);
    let client = EdgeClient::from_bundle(&tiny.bundle, cfg).expect("client");
    let mut req = GenerateRequest::new(prompt(6));
    req.max_tokens = 2;
    req.record = Some(bare_record(tiny, 6));
    let generation = client.generate(req).expect("generate");
    let mut ws = fake.accept().await;
    assert!(matches!(recv_frame(&mut ws).await, Frame::Open(_)));
    send(&mut ws, opened(3, 1, 0)).await;
    let mut frames = vec![expect_hidden(&mut ws, 0, 0, 5, false).await];
    frames.push(expect_hidden(&mut ws, 1, 5, 1, true).await);
    send(&mut ws, token(0, 1, 40)).await;
    frames.push(expect_hidden(&mut ws, 2, 6, 1, true).await);
    send(&mut ws, token(1, 2, 41)).await;
    send(
        &mut ws,
        done(DoneReason::Finished(FinishReason::Length), 6, 2),
    )
    .await;
    (frames, generation.finish().await.expect("finished"))
}

#[tokio::test]
async fn noise_is_applied_before_sending_and_reported() {
    use tandem_model::privacy::{DpConfig, GaussianMechanism};
    let tiny = tiny();
    let (plain, f) = run_with_noise(&tiny, None).await;
    assert!(f.record.expect("record").noise.is_none());

    // Zero noise (epsilon = inf) under a bound no row reaches: the same bytes as no noise.
    let zero = GaussianMechanism::new(DpConfig::new(f64::INFINITY, 1e-5, 1e6)).expect("ok");
    let (same, f) = run_with_noise(&tiny, Some(zero)).await;
    assert_eq!(same, plain, "zero noise must be bit-identical to no noise");
    let n = f.record.expect("record").noise.expect("noise record");
    assert_eq!((n.epsilon, n.sigma, n.rows_noised), (None, 0.0, 7));

    // Real noise: other bytes, and the record says what was spent.
    let mech = GaussianMechanism::new(DpConfig::new(2.0, 1e-5, 4.0)).expect("ok");
    let (noisy, f) = run_with_noise(&tiny, Some(mech)).await;
    assert_ne!(noisy, plain);
    let record = f.record.expect("record");
    let n = record.noise.clone().expect("noise record");
    assert_eq!(n.epsilon, Some(2.0));
    assert_eq!(n.delta, Some(1e-5));
    assert_eq!(n.clip_norm, 4.0);
    assert_eq!(n.sensitivity, 8.0);
    assert!((f64::from(n.sigma) - mech.sigma()).abs() < 1e-5);
    // Five prompt rows, one more prompt row, one decode row.
    assert_eq!(n.rows_noised, 7);
    assert_eq!(n.total.rows, 7);
    assert_eq!(n.total.basic_epsilon, Some(14.0));
    assert!((n.total.basic_delta - 7e-5).abs() < 1e-12);
    let text = record.render_text();
    assert!(text.contains("epsilon 2, delta 0.00001"), "{text}");
    assert!(text.contains("Rows noised: 7"), "{text}");
    let json = serde_json::to_value(&record).expect("json");
    assert_eq!(json["noise"]["epsilon"], 2.0);
    assert_eq!(json["noise"]["delta"], 1e-5);
}
