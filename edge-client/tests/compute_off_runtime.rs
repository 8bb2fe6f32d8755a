//! The edge's compute never runs on an async worker (issue 21, item 4): on a current-thread
//! runtime, a timer keeps firing and the cloud's `Ping` is answered while the edge layers
//! compute a long prompt.
//!
//! A scripted fake cloud (WebSocket on 127.0.0.1:0, on the same runtime) opens the session,
//! sends a `Ping` at once, and waits for the prompt's one `Hidden` frame. With the compute on
//! the runtime's only thread, the `Pong` could only come after the `Hidden` (the driver reads
//! nothing while it computes) and the timer would stand still for the whole forward pass.

use tandem_testkit::tiny as common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::DType;
use futures_util::{SinkExt, StreamExt};
use tandem_edge::{ClientConfig, EdgeBundle, EdgeClient, GenerateRequest};
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_protocol::{
    Done, DoneReason, FinishReason, Frame, Opened, ResumeToken, SessionId, Token,
};
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

/// Prompt tokens: one forward pass of the edge layer over all of them.
const PROMPT: usize = 1536;

/// A random-weight model wide enough that its first layer over [`PROMPT`] tokens takes a
/// while on any CPU (about 15 GFLOP), with room for the prompt in its context.
fn wide_model(dir: &std::path::Path) -> EdgeBundle {
    let spec = common::TinySpec {
        name: "wide",
        hidden: 512,
        intermediate: 2048,
        vocab: 300,
        layers: 2,
        heads: 8,
        kv_heads: 8,
        tied: true,
        llama3_rope: false,
        shards: 1,
        seed: 7,
    };
    let hf = dir.join("hf");
    common::write_hf(&hf, &spec);
    let config = hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).expect("config")).expect("json");
    cfg["max_position_embeddings"] = serde_json::json!(4096);
    std::fs::write(&config, serde_json::to_vec(&cfg).expect("json")).expect("write config");
    let ck = Checkpoint::open(&hf).expect("open");
    let opts = SplitOptions {
        edge_layers: 1,
        dtype: DType::F32,
        force: false,
        progress: false,
    };
    write_split(&ck, &dir.join("split"), &opts).expect("split");
    EdgeBundle::load(&dir.join("split")).expect("load edge")
}

async fn send(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, f: Frame) {
    ws.send(Message::Binary(f.encode().expect("encode").into()))
        .await
        .expect("send");
}

/// What the fake cloud saw: when it sent `Opened`, when each answer came.
#[derive(Debug, Default)]
struct Seen {
    opened_at: Option<Instant>,
    pong_at: Option<Instant>,
    hidden_at: Option<Instant>,
}

#[test]
fn a_timer_and_pings_keep_going_while_the_edge_computes_a_long_prompt() {
    let dir = tempfile::tempdir().expect("tmp");
    let bundle = wide_model(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/v1/edge/ws", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let cloud = tokio::spawn(fake_cloud(listener, seen.clone()));

        let ticks = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(2));
                // Late ticks are not fired in a burst afterwards: a stall shows as a gap.
                every.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    ticks.lock().expect("lock").push(Instant::now());
                }
            })
        };

        let mut cfg = ClientConfig::new(url.as_str());
        cfg.prompt_chunk_tokens = PROMPT; // the whole prompt in one forward pass
        let client = EdgeClient::from_bundle(&bundle, cfg).expect("client");
        let mut req = GenerateRequest::new((0..PROMPT as u32).map(|i| 4 + i % 290).collect());
        req.max_tokens = 1;
        let f = client
            .generate(req)
            .expect("generate")
            .finish()
            .await
            .expect("finished");
        ticker.abort();
        cloud.await.expect("fake cloud");

        let seen = seen.lock().expect("lock");
        let (opened, pong, hidden) = (
            seen.opened_at.expect("opened"),
            seen.pong_at.expect("the client answered the Ping"),
            seen.hidden_at.expect("the prompt's hidden state arrived"),
        );
        let window = hidden - opened;
        let ticks = ticks.lock().expect("lock");
        let inside: Vec<Instant> = ticks
            .iter()
            .copied()
            .filter(|t| *t > opened && *t < hidden)
            .collect();
        let marks: Vec<Instant> = std::iter::once(opened)
            .chain(inside.iter().copied())
            .chain(std::iter::once(hidden))
            .collect();
        let longest_gap = marks
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(window);
        println!(
            "edge prompt compute {:.0} ms ({PROMPT} tokens); the cloud waited {:.0} ms for it; \
             {} timer ticks meanwhile, longest gap {:.1} ms; Pong after {:.1} ms",
            f.timings.edge_prompt_s * 1e3,
            window.as_secs_f64() * 1e3,
            inside.len(),
            longest_gap.as_secs_f64() * 1e3,
            (pong - opened).as_secs_f64() * 1e3,
        );
        assert!(
            f.timings.edge_prompt_s > 0.0 && inside.len() >= 3,
            "the timer stood still while the edge computed ({} ticks in {window:?})",
            inside.len()
        );
        assert!(
            longest_gap < window / 2,
            "the timer stalled for {longest_gap:?} of the {window:?} the compute took"
        );
        assert!(
            pong < hidden,
            "the Ping was answered only after the prompt was computed"
        );
    });
}

/// Opens, pings at once, waits for the `Pong` and the prompt's `Hidden` (in whatever order
/// they come), then ends the generation with one token.
async fn fake_cloud(listener: TcpListener, seen: Arc<Mutex<Seen>>) {
    let (stream, _) = listener.accept().await.expect("accept");
    let mut ws = tokio_tungstenite::accept_async(stream)
        .await
        .expect("handshake");
    let Some(Ok(Message::Binary(open))) = ws.next().await else {
        panic!("expected Open");
    };
    assert!(matches!(Frame::decode(&open), Ok(Frame::Open(_))));
    send(
        &mut ws,
        Frame::Opened(Opened {
            session: SessionId(1),
            resume_token: ResumeToken([1; 32]),
            next_hidden_seq: 0,
        }),
    )
    .await;
    seen.lock().expect("lock").opened_at = Some(Instant::now());
    send(&mut ws, Frame::Ping { nonce: 77 }).await;
    loop {
        let Some(Ok(Message::Binary(bytes))) = ws.next().await else {
            panic!("the client closed early");
        };
        let mut s = seen.lock().expect("lock");
        match Frame::decode_with(&bytes, &Default::default()).expect("frame") {
            Frame::Pong { nonce } => {
                assert_eq!(nonce, 77);
                s.pong_at = Some(Instant::now());
            }
            Frame::Hidden(_) => s.hidden_at = Some(Instant::now()),
            other => panic!("unexpected {other:?}"),
        }
        if s.pong_at.is_some() && s.hidden_at.is_some() {
            break;
        }
    }
    send(
        &mut ws,
        Frame::Token(Token {
            seq: 0,
            input_seq: 0,
            draft: false,
            last: false,
            draft_cap: 0,
            token_id: 9,
            text: Some("x".into()),
        }),
    )
    .await;
    send(
        &mut ws,
        Frame::Done(Done {
            reason: DoneReason::Finished(FinishReason::Length),
            prompt_tokens: PROMPT as u32,
            output_tokens: 1,
        }),
    )
    .await;
    while let Some(Ok(_)) = ws.next().await {}
}
