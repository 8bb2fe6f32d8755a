//! The WebSocket server over real sockets: a server started in process on 127.0.0.1:0, and a
//! raw client (tokio-tungstenite + tandem-protocol frames) playing the device with the edge
//! part of a tiny generated model.
//!
//! Checked: greedy output over the wire equals the whole model's; every bad frame gets its
//! error code while a concurrent session finishes unharmed; Resume after a dropped connection
//! and Replay on a second replica (Redis) leave the output unchanged; a graceful shutdown
//! drains a running generation.

use tandem_testkit::redis as redis_server;
use tandem_testkit::tiny as common;

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;
use futures_util::{SinkExt, StreamExt};
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_model::kv::ContiguousKv;
use tandem_model::layers::ForwardCtx;
use tandem_model::pipeline::{GenerateRequest, LocalSplit, LocalSplitOptions};
use tandem_model::EdgeModel;
use tandem_protocol::wire::{
    Done, DoneReason, ErrorCode, Frame, HiddenDtype, HiddenRef, ManifestId, Open, Opened, Resume,
    ResumeToken, SessionId,
};
use tandem_protocol::{f32_to_hidden, FinishReason, SamplingParams};
use tandem_serve::server::{self, ServerConfig, ServerHandle};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const MAX_TOKENS: u32 = 10;
const PROMPT_LEN: usize = 11;
const CHUNK: usize = 4;
const WAIT: Duration = Duration::from_secs(20);

/// A tiny model, split at 2 edge layers, and the reference output of the whole model.
struct Fixture {
    _tmp: tempfile::TempDir,
    split_dir: PathBuf,
    edge: EdgeModel,
    pair_id: String,
    hidden: usize,
    prompt: Vec<u32>,
    /// Greedy output ids of the whole model (eos not included) and why it stopped.
    reference: (Vec<u32>, FinishReason),
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let hf = tmp.path().join("hf");
    let spec = &common::specs()[2];
    common::write_hf(&hf, spec);
    common::write_tokenizer(&hf);
    let ck = Checkpoint::open(&hf).expect("open hf");
    let split_dir = tmp.path().join("split");
    let opts = SplitOptions {
        edge_layers: 2,
        dtype: ck.stored_dtype,
        force: false,
        progress: false,
    };
    let (edge_manifest, _) = write_split(&ck, &split_dir, &opts).expect("split");
    let load = |path: &std::path::Path, k| {
        LocalSplit::load(
            path,
            &LocalSplitOptions {
                edge_layers: k,
                dtype: None,
                device: Device::Cpu,
            },
        )
        .expect("load")
    };
    let whole = load(&hf, Some(2));
    let prompt = common::prompt(spec, PROMPT_LEN);
    let gen = whole
        .generate(
            &GenerateRequest {
                prompt_ids: prompt.clone(),
                max_tokens: MAX_TOKENS as usize,
                sampling: SamplingParams::default().validate().expect("greedy"),
                stop_strings: Vec::new(),
                eos_ids: None,
            },
            &mut |_| {},
        )
        .expect("reference");
    let parts = load(&split_dir, None);
    Fixture {
        _tmp: tmp,
        hidden: spec.hidden,
        pair_id: edge_manifest.pair_id,
        edge: parts.edge,
        split_dir,
        prompt,
        reference: (gen.output_ids, gen.finish_reason),
    }
}

impl Fixture {
    fn config(&self) -> ServerConfig {
        ServerConfig {
            cloud: self.split_dir.join("cloud"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
            kv_cache_gib: 0.01,
            drain_timeout_ms: 5_000,
            ..ServerConfig::default()
        }
    }

    fn open(&self, dtype: HiddenDtype) -> Open {
        Open {
            manifest: ManifestId::try_from(self.pair_id.as_str()).expect("id"),
            split: 2,
            hidden_size: self.hidden as u32,
            dtype,
            sampling: SamplingParams::default(),
            max_tokens: MAX_TOKENS,
            stop: Vec::new(),
            prompt_id: None,
            traceparent: None,
        }
    }

    fn device(&self, dtype: HiddenDtype) -> Sim<'_> {
        Sim {
            fx: self,
            dtype,
            kv: ContiguousKv::new(self.edge.config().num_hidden_layers, 512),
            pos: 0,
            sent: Vec::new(),
            decode_sent: 0,
            tokens: Vec::new(),
        }
    }

    /// The reference as the wire shows it: with the eos token when the model stopped on one.
    fn check(&self, tokens: &[u32], done: &Done) {
        let (ids, reason) = &self.reference;
        assert_eq!(done.reason, DoneReason::Finished(*reason));
        let shown = match reason {
            FinishReason::Eos => &tokens[..tokens.len() - 1],
            _ => tokens,
        };
        assert_eq!(
            shown,
            &ids[..],
            "tokens over the wire differ from the whole model"
        );
        assert_eq!(done.output_tokens as usize, tokens.len());
        assert_eq!(done.prompt_tokens as usize, PROMPT_LEN);
    }
}

/// A simulated device: the edge layers with their own cache, and every `Hidden` it sent.
struct Sim<'f> {
    fx: &'f Fixture,
    dtype: HiddenDtype,
    kv: ContiguousKv,
    pos: usize,
    sent: Vec<Vec<u8>>,
    /// Tokens whose hidden state has been sent.
    decode_sent: usize,
    tokens: Vec<u32>,
}

impl Sim<'_> {
    fn hidden_frame(&mut self, tokens: &[u32], complete: bool) -> Vec<u8> {
        let h = self
            .fx
            .edge
            .forward(
                tokens,
                &ForwardCtx::single(self.pos, tokens.len()),
                &mut self.kv,
            )
            .expect("edge");
        let values: Vec<f32> = h.flatten_all().expect("flat").to_vec1().expect("vec");
        let mut payload = Vec::new();
        f32_to_hidden(
            self.dtype,
            tokens.len(),
            self.fx.hidden,
            &values,
            &mut payload,
        )
        .expect("encode payload");
        let frame = HiddenRef {
            seq: self.sent.len() as u64,
            first_position: self.pos as u32,
            token_count: tokens.len() as u32,
            complete,
            drafts: 0,
            dtype: self.dtype,
            payload: &payload,
        }
        .encode()
        .expect("encode");
        self.pos += tokens.len();
        self.sent.push(frame.clone());
        frame
    }

    async fn send_prompt(&mut self, ws: &mut Ws) {
        let prompt = self.fx.prompt.clone();
        let chunks: Vec<&[u32]> = prompt.chunks(CHUNK).collect();
        for (i, c) in chunks.iter().enumerate() {
            let f = self.hidden_frame(c, i + 1 == chunks.len());
            send_bytes(ws, f).await;
        }
    }

    /// Sends the hidden state of every received token not sent yet (unless it is the last).
    async fn catch_up(&mut self, ws: &mut Ws) {
        while self.decode_sent < self.tokens.len() && self.tokens.len() < MAX_TOKENS as usize {
            let t = self.tokens[self.decode_sent];
            self.decode_sent += 1;
            let f = self.hidden_frame(&[t], true);
            send_bytes(ws, f).await;
        }
    }

    /// Answers tokens until `Done`, or until `stop_after` tokens are held (then `None`).
    async fn drive(&mut self, ws: &mut Ws, stop_after: Option<usize>) -> Option<Done> {
        loop {
            match recv(ws).await {
                Some(Frame::Token(t)) => {
                    assert_eq!(t.seq as usize, self.tokens.len(), "tokens in order, once");
                    self.tokens.push(t.token_id);
                    if stop_after == Some(self.tokens.len()) {
                        return None;
                    }
                    self.catch_up(ws).await;
                }
                Some(Frame::Done(d)) => return Some(d),
                other => panic!("expected Token or Done, got {other:?}"),
            }
        }
    }
}

async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    ws
}

async fn send_bytes(ws: &mut Ws, bytes: Vec<u8>) {
    // The server may already have closed (e.g. after `Done`); that is fine here.
    let _ = ws.send(Message::Binary(bytes.into())).await;
}

async fn send(ws: &mut Ws, frame: &Frame) {
    send_bytes(ws, frame.encode().expect("encode")).await;
}

/// The next frame, or `None` when the server closed.
async fn recv(ws: &mut Ws) -> Option<Frame> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame");
        match msg {
            Some(Ok(Message::Binary(b))) => return Some(Frame::decode(&b).expect("decode")),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

async fn expect_opened(ws: &mut Ws) -> Opened {
    match recv(ws).await {
        Some(Frame::Opened(o)) => o,
        other => panic!("expected Opened, got {other:?}"),
    }
}

/// The WebSocket close the server ends with: status code and reason. Frames before it are
/// skipped.
async fn close_status(ws: &mut Ws) -> Option<(u16, String)> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for the close");
        match msg {
            Some(Ok(Message::Close(Some(f)))) => {
                return Some((f.code.into(), f.reason.to_string()))
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// The close status that follows an `Error` with `code` (issue 20: "close frames carry a
/// status code"): 1001 going away, 1013 try again later, 1011 internal error, 1008 policy
/// violation; the reason is the code's name.
fn close_for(code: ErrorCode) -> (u16, String) {
    let status = match code.as_u16() {
        _ if code == ErrorCode::ShuttingDown => 1001,
        300..=399 => 1013,
        500..=599 => 1011,
        _ => 1008,
    };
    (status, code.as_str().to_owned())
}

/// Reads until an `Error` (skipping `Pong`s), checks its code and that the server closes.
async fn expect_error(ws: &mut Ws, code: ErrorCode) {
    loop {
        match recv(ws).await {
            Some(Frame::Pong { .. }) => continue,
            Some(Frame::Error(e)) => {
                assert_eq!(e.code, code, "error code (message: {})", e.message);
                break;
            }
            other => panic!("expected Error({code}), got {other:?}"),
        }
    }
    if !code.is_retryable() || code == ErrorCode::RateLimited {
        assert_eq!(
            close_status(ws).await,
            Some(close_for(code)),
            "the server closes after {code}, with its status"
        );
    }
}

/// One whole generation on its own connection.
async fn generate(fx: &Fixture, url: &str, dtype: HiddenDtype) -> (Vec<u32>, Done) {
    let mut ws = connect(url).await;
    send(&mut ws, &Frame::Open(fx.open(dtype))).await;
    let opened = expect_opened(&mut ws).await;
    assert_eq!(opened.next_hidden_seq, 0);
    let mut dev = fx.device(dtype);
    dev.send_prompt(&mut ws).await;
    let done = dev.drive(&mut ws, None).await.expect("done");
    assert_eq!(
        close_status(&mut ws).await,
        Some((1000, "done".to_owned())),
        "closed normally after Done"
    );
    (dev.tokens, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_over_the_socket_matches_the_whole_model() {
    let fx = fixture();
    let server = server::start(fx.config()).await.expect("start");
    assert!(server.ws_url().starts_with("ws://127.0.0.1:"));
    assert!(server.ws_url().ends_with("/v1/edge/ws"));
    let (tokens, done) = generate(&fx, &server.ws_url(), HiddenDtype::F32).await;
    fx.check(&tokens, &done);

    // f16 on the wire: it completes; agreement with f32 is reported, not required.
    let (t16, d16) = generate(&fx, &server.ws_url(), HiddenDtype::F16).await;
    assert_eq!(d16.output_tokens as usize, t16.len());
    let same = t16.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
    eprintln!(
        "f16 wire: {same} of {} leading tokens equal to f32",
        tokens.len()
    );
    server.shutdown().await;
}

/// Opens a session and returns the connection after `Opened`.
async fn opened(fx: &Fixture, url: &str) -> (Ws, Opened) {
    let mut ws = connect(url).await;
    send(&mut ws, &Frame::Open(fx.open(HiddenDtype::F32))).await;
    let o = expect_opened(&mut ws).await;
    (ws, o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_their_codes_and_do_not_disturb_others() {
    let fx = fixture();
    let cfg = ServerConfig {
        max_frame_bytes: 64 << 10,
        max_frames_per_second: 40,
        ..fx.config()
    };
    let server = server::start(cfg).await.expect("start");
    let url = server.ws_url();

    // A well-behaved device, interleaved with the bad ones: it opens first, sends its prompt
    // after the bad cases started, and must finish with the right output.
    let mut good = connect(&url).await;
    send(&mut good, &Frame::Open(fx.open(HiddenDtype::F32))).await;
    expect_opened(&mut good).await;
    let mut dev = fx.device(HiddenDtype::F32);

    let ping = Frame::Ping { nonce: 7 }.encode().expect("ping");
    // Truncated frame.
    let mut ws = connect(&url).await;
    send_bytes(&mut ws, ping[..ping.len() - 3].to_vec()).await;
    expect_error(&mut ws, ErrorCode::MalformedFrame).await;
    // Wrong version byte.
    let mut ws = connect(&url).await;
    let mut v2 = ping.clone();
    v2[2] = 1; // a version-1 peer
    send_bytes(&mut ws, v2).await;
    expect_error(&mut ws, ErrorCode::UnsupportedVersion).await;
    // Wrong manifest id; wrong hidden size.
    let mut ws = connect(&url).await;
    let mut open = fx.open(HiddenDtype::F32);
    open.manifest = ManifestId::try_from("not-this-model").expect("id");
    send(&mut ws, &Frame::Open(open)).await;
    expect_error(&mut ws, ErrorCode::ManifestMismatch).await;
    let mut ws = connect(&url).await;
    let mut open = fx.open(HiddenDtype::F32);
    open.hidden_size += 1;
    send(&mut ws, &Frame::Open(open)).await;
    expect_error(&mut ws, ErrorCode::ManifestMismatch).await;
    // Bad sampling parameters.
    let mut ws = connect(&url).await;
    let mut open = fx.open(HiddenDtype::F32);
    open.sampling.temperature = -1.0;
    send(&mut ws, &Frame::Open(open)).await;
    expect_error(&mut ws, ErrorCode::BadSamplingParams).await;
    // Hidden before Open.
    let mut ws = connect(&url).await;
    let mut other = fx.device(HiddenDtype::F32);
    let h0 = other.hidden_frame(&fx.prompt[..2], true);
    send_bytes(&mut ws, h0.clone()).await;
    expect_error(&mut ws, ErrorCode::UnexpectedFrame).await;

    // The good device sends its prompt now, and its first token arrives.
    dev.send_prompt(&mut good).await;

    // NaN in a payload.
    let (mut ws, _) = opened(&fx, &url).await;
    let mut payload = Vec::new();
    let mut values = vec![0.5f32; fx.hidden];
    f32_to_hidden(HiddenDtype::F32, 1, fx.hidden, &values, &mut payload).expect("payload");
    payload[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let nan = HiddenRef {
        seq: 0,
        first_position: 0,
        token_count: 1,
        complete: true,
        drafts: 0,
        dtype: HiddenDtype::F32,
        payload: &payload,
    };
    send_bytes(&mut ws, nan.encode().expect("nan frame")).await;
    expect_error(&mut ws, ErrorCode::NonFinite).await;
    // Sequence number out of order.
    let (mut ws, _) = opened(&fx, &url).await;
    values[0] = 1.0;
    payload.clear();
    f32_to_hidden(HiddenDtype::F32, 1, fx.hidden, &values, &mut payload).expect("payload");
    let skip = HiddenRef {
        seq: 1,
        first_position: 0,
        token_count: 1,
        complete: true,
        drafts: 0,
        dtype: HiddenDtype::F32,
        payload: &payload,
    };
    send_bytes(&mut ws, skip.encode().expect("frame")).await;
    expect_error(&mut ws, ErrorCode::SequenceOutOfOrder).await;
    // Hidden while a token is owed: two complete chunks in one write.
    let (mut ws, _) = opened(&fx, &url).await;
    let mut other = fx.device(HiddenDtype::F32);
    let a = other.hidden_frame(&fx.prompt[..3], true);
    let b = other.hidden_frame(&fx.prompt[3..4], true);
    ws.feed(Message::Binary(a.into())).await.expect("feed");
    ws.feed(Message::Binary(b.into())).await.expect("feed");
    ws.flush().await.expect("flush");
    expect_error(&mut ws, ErrorCode::UnexpectedFrame).await;
    // Resume of an unknown session; a forged token for a real one.
    let mut ws = connect(&url).await;
    let resume = |session, token| {
        Frame::Resume(Resume {
            session,
            resume_token: ResumeToken(token),
            last_token_seq: None,
        })
    };
    send(&mut ws, &resume(SessionId(u128::MAX - 5), [1; 32])).await;
    expect_error(&mut ws, ErrorCode::UnknownSession).await;
    let (_keep, real) = opened(&fx, &url).await;
    let mut forged = real.resume_token.0;
    forged[0] ^= 1;
    let mut ws = connect(&url).await;
    send(&mut ws, &resume(real.session, forged)).await;
    // A wrong token is answered exactly as an unknown session (no probing of ids).
    let wrong = loop {
        match recv(&mut ws).await {
            Some(Frame::Error(e)) => break e,
            Some(Frame::Pong { .. }) => continue,
            other => panic!("expected an Error, got {other:?}"),
        }
    };
    assert_eq!(wrong.code, ErrorCode::UnknownSession);
    assert_eq!(wrong.message, "unknown or expired session");
    // A frame over the limit.
    let (mut ws, _) = opened(&fx, &url).await;
    let rows = (64 << 10) / (fx.hidden * 4) + 1;
    let big = vec![0.0f32; rows * fx.hidden];
    payload.clear();
    f32_to_hidden(HiddenDtype::F32, rows, fx.hidden, &big, &mut payload).expect("payload");
    let big = HiddenRef {
        seq: 0,
        first_position: 0,
        token_count: rows as u32,
        complete: true,
        drafts: 0,
        dtype: HiddenDtype::F32,
        payload: &payload,
    };
    send_bytes(&mut ws, big.encode().expect("frame")).await;
    expect_error(&mut ws, ErrorCode::FrameTooLarge).await;
    // A flood of frames (pings answered with pongs until the limit).
    let mut ws = connect(&url).await;
    for _ in 0..60 {
        ws.feed(Message::Binary(ping.clone().into()))
            .await
            .expect("feed");
    }
    ws.flush().await.expect("flush");
    expect_error(&mut ws, ErrorCode::RateLimited).await;

    // The good device finishes, with the whole model's output.
    let done = dev.drive(&mut good, None).await.expect("done");
    fx.check(&dev.tokens, &done);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_dropped_connection_keeps_the_output() {
    let fx = fixture();
    let server = server::start(fx.config()).await.expect("start");
    let url = server.ws_url();
    let (mut ws, opened1) = opened(&fx, &url).await;
    let mut dev = fx.device(HiddenDtype::F32);
    dev.send_prompt(&mut ws).await;
    // Three tokens held; the third one's hidden state not sent yet; the line drops.
    assert!(dev.drive(&mut ws, Some(3)).await.is_none());
    drop(ws);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut ws = connect(&url).await;
    let resume = Frame::Resume(Resume {
        session: opened1.session,
        resume_token: opened1.resume_token.clone(),
        last_token_seq: Some(1), // pretend token 2 was lost on the way: it comes again
    });
    dev.tokens.truncate(2);
    send(&mut ws, &resume).await;
    let o = expect_opened(&mut ws).await;
    assert_eq!(o.session, opened1.session);
    assert_eq!(
        o.next_hidden_seq,
        dev.sent.len() as u64,
        "the server kept its state"
    );
    let done = dev.drive(&mut ws, None).await.expect("done");
    fx.check(&dev.tokens, &done);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_another_replica_keeps_the_output() {
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let fx = fixture();
    let cfg = ServerConfig {
        redis: Some(redis.url()),
        drain_timeout_ms: 100,
        heartbeat_ttl_ms: 3_000,
        ..fx.config()
    };
    let a = server::start(cfg.clone()).await.expect("start A");
    let (mut ws, opened1) = opened(&fx, &a.ws_url()).await;
    let mut dev = fx.device(HiddenDtype::F32);
    dev.send_prompt(&mut ws).await;
    assert!(dev.drive(&mut ws, Some(3)).await.is_none());
    // A goes away mid-generation: the device is told to resume elsewhere.
    a.shutdown().await;
    expect_error(&mut ws, ErrorCode::ShuttingDown).await;

    let b = server::start(cfg).await.expect("start B");
    let mut ws = connect(&b.ws_url()).await;
    send(
        &mut ws,
        &Frame::Resume(Resume {
            session: opened1.session,
            resume_token: opened1.resume_token.clone(),
            last_token_seq: Some(2),
        }),
    )
    .await;
    let o = expect_opened(&mut ws).await;
    assert_eq!(o.next_hidden_seq, 0, "B lost the state: replay from 0");
    // Replay every Hidden back to back, then the one for the last token held.
    for f in dev.sent.clone() {
        send_bytes(&mut ws, f).await;
    }
    dev.catch_up(&mut ws).await;
    let done = dev.drive(&mut ws, None).await.expect("done");
    fx.check(&dev.tokens, &done);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_a_running_generation() {
    let fx = fixture();
    let server: ServerHandle = server::start(fx.config()).await.expect("start");
    let url = server.ws_url();
    let addr = server.addr();
    let (mut ws, _) = opened(&fx, &url).await;
    let mut dev = fx.device(HiddenDtype::F32);
    dev.send_prompt(&mut ws).await;
    assert!(dev.drive(&mut ws, Some(1)).await.is_none());
    let shutdown = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // New sessions are refused while draining (or the listener is already closed).
    let late = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await;
    if let Ok(Ok((mut late, _))) = late {
        send(&mut late, &Frame::Open(fx.open(HiddenDtype::F32))).await;
        expect_error(&mut late, ErrorCode::ShuttingDown).await;
    }
    dev.catch_up(&mut ws).await;
    let done = dev.drive(&mut ws, None).await.expect("done");
    fx.check(&dev.tokens, &done);
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown finishes")
        .expect("join");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing listens after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_at_another_replica_is_moved_to_the_live_owner() {
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let fx = fixture();
    let cfg = ServerConfig {
        redis: Some(redis.url()),
        heartbeat_ttl_ms: 3_000,
        ..fx.config()
    };
    let a = server::start(cfg.clone()).await.expect("start A");
    let b = server::start(cfg).await.expect("start B");
    let (mut ws, opened1) = opened(&fx, &a.ws_url()).await;
    let mut dev = fx.device(HiddenDtype::F32);
    dev.send_prompt(&mut ws).await;
    assert!(dev.drive(&mut ws, Some(3)).await.is_none());
    // The device loses its connection and comes back through B (a load balancer's choice).
    drop(ws);
    let resume = Frame::Resume(Resume {
        session: opened1.session,
        resume_token: opened1.resume_token.clone(),
        last_token_seq: Some(2),
    });
    let mut ws = connect(&b.ws_url()).await;
    send(&mut ws, &resume).await;
    let moved_to = match recv(&mut ws).await {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Moved, "{}", e.message);
            e.message
        }
        other => panic!("expected Error(moved), got {other:?}"),
    };
    assert_eq!(moved_to, a.ws_url(), "B names the owner's advertised URL");
    // At the owner the session goes on from where it was: no replay.
    let mut ws = connect(&moved_to).await;
    send(&mut ws, &resume).await;
    let o = expect_opened(&mut ws).await;
    assert_eq!(
        o.next_hidden_seq as usize,
        dev.sent.len(),
        "A kept the state"
    );
    dev.catch_up(&mut ws).await;
    let done = dev.drive(&mut ws, None).await.expect("done");
    fx.check(&dev.tokens, &done);
    a.shutdown().await;
    b.shutdown().await;
}

/// A device that opens a session and goes quiet (before its prompt, or after a token) is
/// closed with `idle_timeout`, and its slot goes to the next device; one that keeps
/// answering, more slowly than the engine but inside the timeout, finishes unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_device_is_closed_and_its_slot_freed() {
    let fx = fixture();
    let server = server::start(ServerConfig {
        max_sessions: 1,
        session_idle_timeout_ms: 600,
        ..fx.config()
    })
    .await
    .expect("start");
    let url = server.ws_url();

    // Opens and never sends its prompt: the only slot is held, then freed.
    let (mut quiet, _) = opened(&fx, &url).await;
    expect_error(&mut quiet, ErrorCode::IdleTimeout).await;
    let (tokens, done) = generate(&fx, &url, HiddenDtype::F32).await;
    fx.check(&tokens, &done);

    // Sends its prompt, takes two tokens, then stops answering.
    let (mut stalled, _) = opened(&fx, &url).await;
    let mut dev = fx.device(HiddenDtype::F32);
    dev.send_prompt(&mut stalled).await;
    assert!(dev.drive(&mut stalled, Some(2)).await.is_none());
    expect_error(&mut stalled, ErrorCode::IdleTimeout).await;

    // Answers every token after 200 ms (a slow phone): never idle long enough.
    let (mut slow, _) = opened(&fx, &url).await;
    let mut dev = fx.device(HiddenDtype::F32);
    dev.send_prompt(&mut slow).await;
    let done = loop {
        match recv(&mut slow).await {
            Some(Frame::Token(t)) => {
                dev.tokens.push(t.token_id);
                tokio::time::sleep(Duration::from_millis(200)).await;
                dev.catch_up(&mut slow).await;
            }
            Some(Frame::Done(d)) => break d,
            other => panic!("expected Token or Done, got {other:?}"),
        }
    };
    fx.check(&dev.tokens, &done);
    server.shutdown().await;
}

/// A message longer than the frame limit (plus the small slack that lets a frame just over
/// it get `frame_too_large`) is refused by the WebSocket layer: the connection ends without
/// the server decoding it, also before `Open`; the server keeps serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_frame_limit_is_refused_before_it_is_decoded() {
    let fx = fixture();
    let limit = 64 << 10;
    let server = server::start(ServerConfig {
        max_frame_bytes: limit,
        ..fx.config()
    })
    .await
    .expect("start");
    let url = server.ws_url();
    // 1.5 times the limit: before this change the server buffered up to twice the limit and
    // answered `frame_too_large`; now the message never reaches the decoder.
    for opened_first in [false, true] {
        let mut ws = if opened_first {
            opened(&fx, &url).await.0
        } else {
            connect(&url).await
        };
        send_bytes(&mut ws, vec![0u8; limit + limit / 2]).await;
        match recv(&mut ws).await {
            None => {}
            // Before Open the 64 KiB pre-Open limit refuses it at its header, with a word.
            Some(Frame::Error(e)) if !opened_first && e.code == ErrorCode::FrameTooLarge => {
                assert!(recv(&mut ws).await.is_none(), "closed after the error");
            }
            Some(Frame::Error(e)) => panic!("the oversized message was decoded: {e:?}"),
            other => panic!("expected the connection to end, got {other:?}"),
        }
    }
    let (tokens, done) = generate(&fx, &url, HiddenDtype::F32).await;
    fx.check(&tokens, &done);
    server.shutdown().await;
}

/// A `Resume` of a session that still has a connection takes it over: the old connection is
/// told why (`session_taken_over`) and closed; the new one gets `Opened` and the rest of the
/// generation, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_a_second_connection_tells_the_first_why() {
    let fx = fixture();
    let server = server::start(fx.config()).await.expect("start");
    let url = server.ws_url();
    let (mut first, o) = opened(&fx, &url).await;
    let mut dev = fx.device(HiddenDtype::F32);
    dev.send_prompt(&mut first).await;
    assert!(dev.drive(&mut first, Some(2)).await.is_none());
    let mut second = connect(&url).await;
    send(
        &mut second,
        &Frame::Resume(Resume {
            session: o.session,
            resume_token: o.resume_token.clone(),
            last_token_seq: Some(1),
        }),
    )
    .await;
    let again = expect_opened(&mut second).await;
    assert_eq!(again.session, o.session);
    expect_error(&mut first, ErrorCode::SessionTakenOver).await;
    // The token rotated: the one used above is refused now, as an unknown session.
    assert_ne!(again.resume_token, o.resume_token);
    let mut third = connect(&url).await;
    send(
        &mut third,
        &Frame::Resume(Resume {
            session: o.session,
            resume_token: o.resume_token.clone(),
            last_token_seq: Some(1),
        }),
    )
    .await;
    expect_error(&mut third, ErrorCode::UnknownSession).await;
    // The new connection finishes the generation with the reference output.
    dev.catch_up(&mut second).await;
    let done = dev.drive(&mut second, None).await.expect("done");
    fx.check(&dev.tokens, &done);
    server.shutdown().await;
}

/// Connect from `source` (any 127.x.y.z address reaches the loopback listener) and ask for
/// `/healthz`; the status line, or `None` when the server closed without answering.
async fn healthz_from(source: std::net::IpAddr, server: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(std::net::SocketAddr::new(source, 0))
        .expect("bind source");
    let mut s = sock.connect(server).await.expect("connect");
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    text.lines().next().map(str::to_owned)
}

/// Issue 20's "150 silent TCP connections": one address may hold at most
/// `max_connections_per_ip` connections; the next is closed at once, while another address
/// still reaches `/healthz` and opens sessions; closing the idle ones gives the slots back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_connection() {
    let fx = fixture();
    let server = server::start(ServerConfig {
        max_connections_per_ip: 5,
        ..fx.config()
    })
    .await
    .expect("start");
    let addr = server.addr();
    let attacker: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    let other: std::net::IpAddr = "127.0.0.2".parse().expect("ip");
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // Let the server accept them all before the next one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        healthz_from(attacker, addr).await,
        None,
        "a sixth was served"
    );
    let ok = healthz_from(other, addr).await.expect("an answer");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    drop(silent);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(line) = healthz_from(attacker, addr).await {
            assert!(line.starts_with("HTTP/1.1 200"), "{line}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

/// Speculation, attacked: a device that claims drafts the cloud never sampled (a verdict past
/// the answer) or goes back before the token that counts gets `hidden_shape`, and an honest
/// device beside it finishes with the whole model's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_outside_the_draft_answer_are_refused() {
    let fx = fixture();
    let server = server::start(fx.config()).await.expect("start");
    let url = server.ws_url();
    let row = |seq: u64, first_position: u32, rows: usize, drafts: u8| {
        let mut payload = Vec::new();
        let values = vec![0.25f32; rows * fx.hidden];
        f32_to_hidden(HiddenDtype::F32, rows, fx.hidden, &values, &mut payload).expect("payload");
        HiddenRef {
            seq,
            first_position,
            token_count: rows as u32,
            complete: true,
            drafts,
            dtype: HiddenDtype::F32,
            payload: &payload,
        }
        .encode()
        .expect("frame")
    };
    let p = fx.prompt.len() as u32;
    // Verdicts relative to the draft answer at position p (drafts at p+1, p+2): too far (3
    // drafts accepted of 2), and before the token that counts.
    for bad_position in [p + 4, p] {
        let (mut ws, _) = opened(&fx, &url).await;
        send_bytes(&mut ws, row(0, 0, p as usize, 0)).await;
        let first = loop {
            match recv(&mut ws).await {
                Some(Frame::Token(t)) => break t,
                Some(Frame::Pong { .. }) => continue,
                other => panic!("expected the first token, got {other:?}"),
            }
        };
        assert!(!first.draft);
        send_bytes(&mut ws, row(1, p, 3, 2)).await;
        let mut answer = Vec::new();
        while answer.len() < 3 {
            match recv(&mut ws).await {
                Some(Frame::Token(t)) => answer.push(t),
                other => panic!("expected the draft answer, got {other:?}"),
            }
        }
        assert_eq!(
            answer
                .iter()
                .map(|t| (t.draft, t.input_seq))
                .collect::<Vec<_>>(),
            [(false, 1), (true, 1), (true, 1)]
        );
        send_bytes(&mut ws, row(2, bad_position, 1, 0)).await;
        expect_error(&mut ws, ErrorCode::HiddenShape).await;
    }
    // An honest device is undisturbed.
    let mut good = connect(&url).await;
    send(&mut good, &Frame::Open(fx.open(HiddenDtype::F32))).await;
    expect_opened(&mut good).await;
    let mut dev = fx.device(HiddenDtype::F32);
    dev.send_prompt(&mut good).await;
    let done = dev.drive(&mut good, None).await.expect("done");
    assert_eq!(done.output_tokens as usize, dev.tokens.len());
    server.shutdown().await;
}
