//! The load generator against a real server started in process on 127.0.0.1:0 (in-memory
//! session store) with a tiny generated model split at 2 edge layers.
//!
//! Checked: 200 devices arriving at once all complete, with no error, the tokens counted on
//! the wire equal to what `Done` reports and to the server's own counter, and a report that
//! round-trips through JSON; a server with room for few sessions shows up as `overloaded`
//! errors; the deadline cuts a run and counts what never started; the replayed hidden
//! states are bit-for-bit those of a real device, and each row is computed once however
//! many devices ask for it.

#[path = "../../model/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::DType;
use tandem_edge::{EdgeBundle, EdgeSession};
use tandem_loadtest::replay::Replay;
use tandem_loadtest::{LengthDist, LoadConfig, Report, StopReason};
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_protocol::{f32_to_hidden, HiddenDtype, HiddenRef};
use tandem_serve::server::{self, ServerConfig, ServerHandle};

struct Fixture {
    _tmp: tempfile::TempDir,
    split_dir: PathBuf,
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
    write_split(&ck, &split_dir, &opts).expect("split");
    Fixture {
        _tmp: tmp,
        split_dir,
    }
}

impl Fixture {
    fn server_config(&self) -> ServerConfig {
        ServerConfig {
            cloud: self.split_dir.join("cloud"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            kv_cache_gib: 0.05,
            drain_timeout_ms: 100,
            ..ServerConfig::default()
        }
    }

    fn load(&self, srv: &ServerHandle, devices: usize) -> LoadConfig {
        let mut cfg = LoadConfig::new(srv.ws_url(), self.split_dir.join("edge"), devices);
        cfg.prompt_tokens = LengthDist::fixed(8).expect("8");
        cfg.output_tokens = LengthDist::fixed(4).expect("4");
        cfg.duration = Duration::from_secs(60);
        cfg
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_at_once() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let mut cfg = fx.load(&srv, 200);
    cfg.metrics_url = Some(format!("{}/metrics", srv.http_url()));
    let started = Instant::now();
    let report = tandem_loadtest::run(cfg).await.expect("run");
    eprintln!("{}", report.summary());
    eprintln!("200 devices in {:?}", started.elapsed());

    assert!(
        report.errors.is_empty(),
        "errors: {:?}",
        report.error_examples
    );
    assert_eq!(report.stopped_by, StopReason::AllFinished);
    let c = &report.counts;
    assert_eq!(
        (c.devices, c.generations_planned, c.started),
        (200, 200, 200)
    );
    assert_eq!(
        (c.completed, c.failed, c.cut_by_deadline, c.not_started),
        (200, 0, 0, 0)
    );

    // Every token on the wire is one `Done` counted, and the server counted the same.
    let t = &report.throughput;
    assert_eq!(t.output_tokens, t.output_tokens_done);
    assert_eq!(t.output_tokens_received_done, t.output_tokens_done);
    let length = report.finish_reasons.get("length").copied().unwrap_or(0);
    let eos = report.finish_reasons.get("eos").copied().unwrap_or(0);
    assert_eq!(length + eos, 200, "{:?}", report.finish_reasons);
    if eos == 0 {
        assert_eq!(t.output_tokens, 200 * 4);
    }
    assert_eq!(t.prompt_tokens_done, 200 * 8);
    assert!(t.output_tokens_per_s > 0.0);
    let server = report.server_metrics.as_ref().expect("scraped");
    assert_eq!(server.error, None);
    assert_eq!(
        server
            .counters_delta
            .get("tandem_tokens_out_total")
            .copied(),
        Some(t.output_tokens as f64),
        "{:?}",
        server.counters_delta
    );
    assert_eq!(
        server.gauges.get("tandem_sessions_active").copied(),
        Some(0.0)
    );

    // Latencies: one TTFT and one E2E per generation, one TPOT per gap.
    let lat = &report.latency_ms;
    let ttft = lat.ttft.as_ref().expect("ttft");
    let e2e = lat.e2e.as_ref().expect("e2e");
    let tpot = lat.tpot.as_ref().expect("tpot");
    assert_eq!((ttft.count, e2e.count), (200, 200));
    assert_eq!(lat.connect.as_ref().map(|c| c.count), Some(200));
    assert_eq!(tpot.count as u64, t.output_tokens - 200);
    assert!(ttft.p50 <= ttft.p90 && ttft.p90 <= ttft.p99 && ttft.p99 <= ttft.max);
    assert!(e2e.p50 >= ttft.p50);

    // 200 devices on 8 prompts: the edge rows are shared.
    assert_eq!(report.replay.prompts, 8);
    assert_eq!(report.replay.rows_requested, t.output_tokens - 200);
    assert!(report.replay.rows_computed <= 8 * 3, "{:?}", report.replay);

    let json = serde_json::to_string_pretty(&report).expect("json");
    let back: Report = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, report);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_counts_as_overloaded() {
    let fx = fixture();
    let srv = server::start(ServerConfig {
        max_sessions: 2,
        ..fx.server_config()
    })
    .await
    .expect("start");
    let mut cfg = fx.load(&srv, 30);
    cfg.output_tokens = LengthDist::fixed(16).expect("16");
    let report = tandem_loadtest::run(cfg).await.expect("run");
    let c = &report.counts;
    assert_eq!(c.completed + c.failed, 30);
    assert!(c.completed >= 2, "{c:?}");
    assert!(
        report.errors.get("overloaded").copied().unwrap_or(0) > 0,
        "{:?}",
        report.errors
    );
    assert_eq!(
        report.errors.values().sum::<u64>(),
        c.failed,
        "{:?}",
        report.error_examples
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_stops_the_run() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let mut cfg = fx.load(&srv, 5);
    // One arrival per 1,000 s on average: nobody starts within the limit.
    cfg.arrival = "poisson:0.001".parse().expect("arrival");
    cfg.duration = Duration::from_millis(300);
    let started = Instant::now();
    let report = tandem_loadtest::run(cfg).await.expect("run");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(report.stopped_by, StopReason::Deadline);
    assert_eq!(report.counts.not_started, 5);
    assert_eq!(report.counts.started, 0);
    assert!(report.latency_ms.ttft.is_none());
    srv.shutdown().await;
}

/// The frame a real device (the `tandem-edge` session) sends for `tokens`.
fn device_frame(
    session: &mut EdgeSession,
    tokens: &[u32],
    seq: u64,
    dtype: HiddenDtype,
    hidden: usize,
) -> Vec<u8> {
    let position = session.position();
    let h = session.feed(tokens).expect("feed");
    let values: Vec<f32> = h
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values");
    let mut payload = Vec::new();
    f32_to_hidden(dtype, tokens.len(), hidden, &values, &mut payload).expect("payload");
    HiddenRef {
        seq,
        first_position: position as u32,
        token_count: tokens.len() as u32,
        complete: true,
        dtype,
        payload: &payload,
    }
    .encode()
    .expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_what_a_device_would_and_computes_each_row_once() {
    let fx = fixture();
    let bundle = EdgeBundle::load(&fx.split_dir).expect("edge");
    let hidden = bundle.model.config().hidden_size;
    let dtype = HiddenDtype::F16;
    let replay = Arc::new(Replay::new(bundle.model.clone(), dtype));
    let prompt: Vec<u32> = (10..22).collect();
    let root = replay.prompt(&prompt).expect("prompt");

    // Two histories that share their first token and then part: 5, 6, 7 and 5, 9.
    for history in [vec![5u32, 6, 7], vec![5, 9]] {
        let mut device = EdgeSession::new(bundle.model.clone());
        let first = device_frame(&mut device, &prompt, 0, dtype, hidden);
        assert_eq!(root.frames().len(), 1);
        assert_eq!(&root.frames()[0][..], &first[..], "prompt frame");
        let mut at = root.clone();
        for (i, &t) in history.iter().enumerate() {
            at = replay.next(&at, t).await.expect("next");
            let want = device_frame(&mut device, &[t], 1 + i as u64, dtype, hidden);
            assert_eq!(
                &at.frames()[0][..],
                &want[..],
                "history {history:?}, step {i}"
            );
        }
    }
    assert_eq!(replay.stats().rows_computed, 4); // 5, 6, 7 and 9 (5 once)

    // Fifty devices asking at once for a new row: one computation.
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (replay, root) = (replay.clone(), root.clone());
            tokio::spawn(async move { replay.next(&root, 42).await.expect("next") })
        })
        .collect();
    let mut steps = Vec::new();
    for t in tasks {
        steps.push(t.await.expect("join"));
    }
    assert!(steps.iter().all(|s| Arc::ptr_eq(s, &steps[0])));
    let stats = replay.stats();
    assert_eq!(stats.rows_computed, 5);
    assert_eq!(stats.rows_requested, 5 + 50);
}
