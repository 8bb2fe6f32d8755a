//! The load generator against a real server started in process on 127.0.0.1:0 (in-memory
//! session store) with a tiny generated model split at 2 edge layers.
//!
//! Checked: 200 devices arriving at once all complete, with no error, the tokens counted on
//! the wire equal to what `Done` reports and to the server's own counter, and a report that
//! round-trips through JSON; a server with room for few sessions shows up as `overloaded`
//! errors; the deadline cuts a run and counts what never started; the replayed hidden
//! states are bit-for-bit those of a real device, and each row is computed once however
//! many devices ask for it; real per-device compute sends the same frames and gets the same
//! outputs as replay; connections cut by a proxy resume, and a server stopped and started
//! again on the same port (sessions lost) is replayed, both with every device's tokens equal
//! to an uninterrupted run's; a device that idles between its steps far longer than the
//! silence timeout is not taken for a silent server, while a server that really goes silent
//! (a proxy that stops passing its bytes) trips it; a stop future ends a run early; a trace
//! sets the lengths; the PNG decodes; devices that draft (speculation) get the same tokens
//! as devices that do not, with drafts sent and confirmed; `tiny-model` writes a split a server and the load test
//! run on.

use tandem_testkit::tiny as common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::DType;
use tandem_edge::{EdgeBundle, EdgeSession};
use tandem_loadtest::compute::Compute;
use tandem_loadtest::device::{GenerationRecord, Outcome};
use tandem_loadtest::replay::Replay;
use tandem_loadtest::workload::PromptId;
use tandem_loadtest::{
    DeviceCompute, FixedPrompts, LengthDist, LoadConfig, Report, StopReason, Trace,
};
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
            admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
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
    cfg.metrics_url = Some(format!(
        "{}/metrics",
        srv.admin_url().expect("admin listener")
    ));
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
    assert_eq!(report.edge.mode, DeviceCompute::Replay);
    assert_eq!(report.edge.prompts, 8);
    assert_eq!(report.edge.rows_requested, t.output_tokens - 200);
    assert!(report.edge.rows_computed <= 8 * 3, "{:?}", report.edge);
    // Nothing dropped.
    assert_eq!(report.resume.reconnects, 0);
    assert_eq!(report.resume.lost, 0);

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

/// A device token for `user` from `srv`'s admin route.
async fn device_token(srv: &ServerHandle, admin_key: &str, user: &str) -> String {
    let admin = srv.admin_addr().expect("admin listener");
    let base = tandem_http::BaseUrl::parse(&format!("http://{admin}")).expect("base");
    let mut req = tandem_http::Request::new(tandem_http::Method::POST, "/v1/admin/device-tokens");
    req.bearer = Some(admin_key);
    let body = format!("{{\"user_id\":\"{user}\"}}");
    req.body = Some((body.into(), "application/json"));
    let reply = tandem_http::send(&base, req).await.expect("issue a token");
    assert_eq!(
        reply.status.as_u16(),
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let json: serde_json::Value = serde_json::from_slice(&reply.body).expect("json");
    json["token"].as_str().expect("token").to_owned()
}

/// Against a server that requires device tokens: devices given tokens (spread over two
/// users, each under the per-user cap) complete; without tokens every upgrade is refused
/// with 401 and counted at once as `connect_failed`, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_present_their_tokens_to_a_server_that_requires_them() {
    const ADMIN: &str = "an admin key for the load tests";
    let fx = fixture();
    let srv = server::start(ServerConfig {
        device_token_key: Some(server::config::Secret::new(
            "a device-token key of at least 32 characters",
        )),
        admin_key: Some(server::config::Secret::new(ADMIN)),
        max_sessions_per_user: 4,
        ..fx.server_config()
    })
    .await
    .expect("start");
    let tokens = vec![
        device_token(&srv, ADMIN, "load-a").await,
        device_token(&srv, ADMIN, "load-b").await,
    ];
    let mut cfg = fx.load(&srv, 8);
    cfg.device_tokens = tokens;
    let report = tandem_loadtest::run(cfg).await.expect("run");
    assert_eq!(report.counts.completed, 8, "{:?}", report.error_examples);

    let started = Instant::now();
    let report = tandem_loadtest::run(fx.load(&srv, 3)).await.expect("run");
    assert_eq!(report.counts.failed, 3, "{:?}", report.counts);
    assert_eq!(
        report.errors.get("connect_failed").copied(),
        Some(3),
        "{:?}",
        report.error_examples
    );
    assert_eq!(report.resume.reconnects, 0, "a 401 is not retried");
    assert!(started.elapsed() < Duration::from_secs(30));
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
        drafts: 0,
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

/// Token ids of every generation, by (device, generation); panics on a failed one.
fn outputs(records: &[GenerationRecord]) -> Vec<((usize, usize), Vec<u32>)> {
    records
        .iter()
        .map(|r| {
            assert!(
                matches!(r.outcome, Outcome::Done { .. }),
                "device {} generation {}: {:?}",
                r.device,
                r.generation,
                r.outcome
            );
            ((r.device, r.generation), r.tokens.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_compute_sends_the_frames_replay_sends() {
    let fx = fixture();
    let bundle = EdgeBundle::load(&fx.split_dir).expect("edge");
    let dtype = HiddenDtype::Bf16;
    // A prompt longer than one chunk (256 tokens), to compare chunked prompts too.
    let prompts: Vec<Vec<u32>> = vec![(0..300).map(|i| 4 + (i * 7) % 250).collect()];
    let replay = Arc::new(Replay::new(bundle.model.clone(), dtype));
    let roots = vec![replay.prompt(&prompts[0]).expect("root")];
    let replayed = Compute::replay(replay, roots);
    let real = Compute::real(bundle.model.clone(), dtype, prompts);
    let (mut a, frames_a) = replayed.start(PromptId(0)).await.expect("replay start");
    let (mut b, frames_b) = real.start(PromptId(0)).await.expect("real start");
    assert_eq!(frames_a.len(), 2);
    assert_eq!(frames_a, frames_b, "prompt frames");
    for t in [17u32, 5, 5, 260] {
        let (fa, fb) = (
            a.next(t).await.expect("replay"),
            b.next(t).await.expect("real"),
        );
        assert_eq!(fa, fb, "token {t}");
    }
    let stats = real.stats();
    assert_eq!((stats.prompts, stats.rows_computed), (1, 4));
    assert!(stats.edge_compute_s > 0.0);

    // Through a server: same outputs, every row computed by its device.
    let srv = server::start(fx.server_config()).await.expect("start");
    let mut cfg = fx.load(&srv, 4);
    cfg.generations_per_device = 2;
    cfg.output_tokens = LengthDist::fixed(6).expect("6");
    let replay_run = tandem_loadtest::run_detailed(cfg.clone())
        .await
        .expect("replay run");
    cfg.device_compute = DeviceCompute::Real;
    let real_run = tandem_loadtest::run_detailed(cfg).await.expect("real run");
    assert_eq!(outputs(&real_run.records), outputs(&replay_run.records));
    let edge = &real_run.report.edge;
    assert_eq!(edge.mode, DeviceCompute::Real);
    assert_eq!(edge.prompts, 8, "one prompt per generation");
    assert_eq!(edge.rows_requested, edge.rows_computed);
    assert_eq!(
        edge.rows_computed,
        real_run.report.throughput.output_tokens - 8,
        "{edge:?}"
    );
    assert!(edge.edge_compute_s > 0.0);
    srv.shutdown().await;
}

/// What [`limiting_proxy`] does to a connection once its byte limit is reached.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AtLimit {
    /// Close it.
    Cut,
    /// Keep it open and pass the device's bytes on, but drop every further byte from the
    /// server: to the device, a server gone silent.
    Mute,
}

/// A TCP proxy to `upstream` that closes every connection once `cut_after` bytes went from
/// the server to the device. Returns its address and the number of connections it cut.
async fn cutting_proxy(
    upstream: std::net::SocketAddr,
    cut_after: usize,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    limiting_proxy(upstream, cut_after, AtLimit::Cut).await
}

/// A TCP proxy to `upstream` that passes `limit` bytes from the server to the device on each
/// connection (after the HTTP upgrade answer), then does `at_limit`. Returns its address and
/// the number of connections that reached the limit.
async fn limiting_proxy(
    upstream: std::net::SocketAddr,
    limit: usize,
    at_limit: AtLimit,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let addr = listener.local_addr().expect("addr");
    let cuts = Arc::new(AtomicU64::new(0));
    let counter = cuts.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let cuts = counter.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                };
                let down = async move {
                    // The HTTP upgrade answer passes whole; the count starts after it.
                    let (mut head, mut headers_done, mut left) = (Vec::new(), false, limit);
                    let mut limited = false;
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if limited {
                            continue; // muted: the server's bytes go nowhere
                        }
                        let mut data = &buf[..n];
                        if !headers_done {
                            head.extend_from_slice(data);
                            let end = head.windows(4).position(|w| w == b"\r\n\r\n");
                            // Bytes of this read that belong to the headers.
                            let in_headers = match end {
                                Some(end) => end + 4 - (head.len() - n),
                                None => n,
                            };
                            if cw.write_all(&data[..in_headers]).await.is_err() {
                                return;
                            }
                            data = &data[in_headers..];
                            headers_done = end.is_some();
                        }
                        let pass = data.len().min(left);
                        if cw.write_all(&data[..pass]).await.is_err() {
                            return;
                        }
                        left -= pass;
                        if left == 0 && headers_done {
                            cuts.fetch_add(1, Ordering::Relaxed);
                            match at_limit {
                                // Both halves drop: the connection closes mid-stream.
                                AtLimit::Cut => return,
                                AtLimit::Mute => limited = true,
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    (addr, cuts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_resume_without_losing_or_repeating_tokens() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let mut cfg = fx.load(&srv, 6);
    cfg.generations_per_device = 2;
    cfg.output_tokens = LengthDist::fixed(12).expect("12");
    let reference = tandem_loadtest::run_detailed(cfg.clone())
        .await
        .expect("uninterrupted run");
    assert_eq!(reference.report.resume.reconnects, 0);

    // Opened is 54 bytes on the wire and a Token about 20: each connection carries a few
    // tokens, then is cut.
    let (proxy, cuts) = cutting_proxy(srv.addr(), 120).await;
    cfg.server = format!("ws://{proxy}/v1/edge/ws");
    let cut = tandem_loadtest::run_detailed(cfg).await.expect("cut run");
    let report = &cut.report;
    eprintln!("{}", report.summary());
    assert!(
        cuts.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the proxy cut nothing"
    );
    assert_eq!(report.counts.completed, 12, "{:?}", report.error_examples);
    assert_eq!(report.counts.failed, 0);
    assert_eq!(report.resume.lost, 0);
    assert!(report.resume.reconnects >= 1, "{:?}", report.resume);
    assert!(report.resume.resumes >= 1, "{:?}", report.resume);
    assert!(report.resume.recovered >= 1, "{:?}", report.resume);
    // The same tokens as without the cuts, each counted once.
    assert_eq!(outputs(&cut.records), outputs(&reference.records));
    let t = &report.throughput;
    assert_eq!(t.output_tokens, t.output_tokens_done);
    assert_eq!(t.output_tokens, reference.report.throughput.output_tokens);
    // One TPOT sample per gap between new tokens, outages included.
    let tpot = report.latency_ms.tpot.as_ref().expect("tpot");
    assert_eq!(tpot.count as u64, t.output_tokens - 12);
    srv.shutdown().await;
}

/// A device's own pauses are not the server's silence: with a step delay three times the
/// silence timeout and no reconnection allowed, every generation still completes on its
/// first connection (and the server keeps the idle sessions open meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_delay_longer_than_the_silence_timeout_is_not_silence() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let mut cfg = fx.load(&srv, 4);
    cfg.output_tokens = LengthDist::fixed(3).expect("3");
    // 400 ms: a loaded CI machine running the debug server has answered a first frame
    // after more than 100 ms (a spurious timeout, not what this test is about).
    cfg.silence_timeout = Duration::from_millis(400);
    cfg.step_delay = Duration::from_millis(1200);
    cfg.think = Duration::from_millis(300);
    cfg.generations_per_device = 2;
    cfg.max_reconnects = 0;
    let report = tandem_loadtest::run(cfg).await.expect("run");
    eprintln!("{}", report.summary());
    assert!(report.errors.is_empty(), "{:?}", report.error_examples);
    assert_eq!(report.counts.completed, 8);
    assert_eq!(report.resume.reconnects, 0, "{:?}", report.resume);
    assert_eq!(report.settings.silence_timeout_s, 0.4);
    srv.shutdown().await;
}

/// The silence timeout still catches a server that stops talking: behind a proxy that passes
/// `Opened` (54 bytes on the wire) and then drops the server's bytes without closing, every
/// generation fails with `timeout` and, with no reconnection allowed, is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_trips_the_silence_timeout() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let (proxy, muted) = limiting_proxy(srv.addr(), 54, AtLimit::Mute).await;
    let mut cfg = fx.load(&srv, 3);
    cfg.server = format!("ws://{proxy}/v1/edge/ws");
    cfg.silence_timeout = Duration::from_millis(200);
    cfg.max_reconnects = 0;
    let report = tandem_loadtest::run(cfg).await.expect("run");
    assert_eq!(report.stopped_by, StopReason::AllFinished);
    assert_eq!(muted.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(report.counts.failed, 3, "{}", report.summary());
    assert_eq!(
        report.errors.get("timeout"),
        Some(&3),
        "{:?}",
        report.errors
    );
    assert_eq!(report.resume.lost, 3);
    assert_eq!(report.error_examples["timeout"], "no frame for 0.2s");
    srv.shutdown().await;
}

/// `run_until`'s stop future ends a run before its deadline, as `SIGINT` does the command's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_future_interrupts_the_run() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let mut cfg = fx.load(&srv, 5);
    // One arrival per 1,000 s on average, and a deadline far away: only the stop ends it.
    cfg.arrival = "poisson:0.001".parse().expect("arrival");
    cfg.duration = Duration::from_secs(3_600);
    let stop = tokio::time::sleep(Duration::from_millis(200));
    let out = tandem_loadtest::run_until(cfg, stop).await.expect("run");
    assert_eq!(out.report.stopped_by, StopReason::Interrupted);
    assert_eq!(out.report.counts.not_started, 5);
    srv.shutdown().await;
}

/// Polls the server's `/metrics` until a session is active and tokens have gone out since
/// `before`.
async fn wait_for_running_sessions(
    metrics_url: &str,
    before: &tandem_loadtest::scrape::Exposition,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = tandem_loadtest::scrape::fetch(metrics_url).await {
            let m = tandem_loadtest::scrape::Exposition::parse(&text).since(before);
            let active = m.gauges.get("tandem_sessions_active").copied();
            let out = m.counters_delta.get("tandem_tokens_out_total").copied();
            if active.unwrap_or(0.0) >= 1.0 && out.unwrap_or(0.0) >= 3.0 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no session ever ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_gets_its_sessions_replayed() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let addr = srv.addr();
    let mut cfg = fx.load(&srv, 4);
    cfg.generations_per_device = 2;
    cfg.think = Duration::from_millis(50);
    cfg.output_tokens = LengthDist::fixed(200).expect("200");
    cfg.max_reconnects = 8;
    let reference = tandem_loadtest::run_detailed(cfg.clone())
        .await
        .expect("uninterrupted run");
    let reference_tokens = reference.report.throughput.output_tokens;
    assert!(reference_tokens > 50, "{}", reference.report.summary());

    // The same load; mid-run the server stops (sessions still running get shutting_down or
    // a closed connection) and another one starts on the same port with an empty in-memory
    // store, so every resume meets unknown_session and replays.
    let metrics_url = format!("{}/metrics", srv.admin_url().expect("admin listener"));
    let before = tandem_loadtest::scrape::Exposition::parse(
        &tandem_loadtest::scrape::fetch(&metrics_url)
            .await
            .expect("scrape"),
    );
    let run = tokio::spawn(tandem_loadtest::run_detailed(cfg));
    wait_for_running_sessions(&metrics_url, &before).await;
    srv.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let srv = server::start(ServerConfig {
        listen: addr,
        ..fx.server_config()
    })
    .await
    .expect("restart on the same port");
    let restarted = run.await.expect("join").expect("run");
    let report = &restarted.report;
    eprintln!("{}", report.summary());
    assert_eq!(report.counts.failed, 0, "{:?}", report.error_examples);
    assert_eq!(report.counts.completed, 8);
    assert_eq!(report.resume.lost, 0);
    assert!(report.resume.reconnects >= 1, "{:?}", report.resume);
    assert!(report.resume.replays >= 1, "{:?}", report.resume);
    assert!(report.resume.reopens >= 1, "{:?}", report.resume);
    assert_eq!(outputs(&restarted.records), outputs(&reference.records));
    assert_eq!(report.throughput.output_tokens, reference_tokens);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_sets_lengths_and_the_png_decodes() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let mut cfg = fx.load(&srv, 10);
    cfg.generations_per_device = 2;
    cfg.trace = Some(
        Trace::parse(
            r#"[{"prompt_tokens": 5, "output_tokens": 3},
                {"prompt_tokens": 11, "output_tokens": 2, "think_ms": 30}]"#,
            "inline",
        )
        .expect("trace"),
    );
    let out = tandem_loadtest::run_detailed(cfg).await.expect("run");
    let report = &out.report;
    assert!(report.errors.is_empty(), "{:?}", report.error_examples);
    assert_eq!(report.settings.trace_records, Some(2));
    // Record (generation × 10 + device) % 2: devices of even index take record 0 first.
    for r in &out.records {
        let want = if (r.generation * 10 + r.device) % 2 == 0 {
            (5, 3)
        } else {
            (11, 2)
        };
        assert_eq!((r.prompt_tokens, r.max_tokens), want, "{r:?}");
        assert!(r.tokens_received <= want.1);
    }
    assert_eq!(report.throughput.prompt_tokens_done, 10 * 5 + 10 * 11);

    let tmp = tempfile::tempdir().expect("tmp");
    let png_path = tmp.path().join("run.png");
    let text =
        tandem_loadtest::plot::write_png(report, &out.records, &png_path, None).expect("png");
    let font_installed = std::path::Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .exists()
        || std::path::Path::new("/usr/share/fonts/TTF/DejaVuSans.ttf").exists()
        || std::path::Path::new("/usr/share/fonts/dejavu/DejaVuSans.ttf").exists();
    assert_eq!(text, font_installed);
    let bytes = std::fs::read(&png_path).expect("read png");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h, rgb) = tandem_loadtest::plot::decode_png(&bytes).expect("decode");
    assert_eq!(
        (w, h),
        (tandem_loadtest::plot::WIDTH, tandem_loadtest::plot::HEIGHT)
    );
    // Lines were drawn: a good share of the pixels is not white, and some are the
    // throughput panel's orange.
    let pixels: Vec<&[u8]> = rgb.chunks_exact(3).collect();
    let ink = pixels.iter().filter(|p| *p != &[255, 255, 255]).count();
    assert!(ink > pixels.len() / 200, "{ink} of {}", pixels.len());
    assert!(pixels.iter().any(|p| *p == [230, 120, 0]));
    // An explicit font that is not there is an error naming the flag.
    let missing = tandem_loadtest::plot::write_png(
        report,
        &out.records,
        &png_path,
        Some(std::path::Path::new("/nonexistent/font.ttf")),
    )
    .expect_err("no such font");
    assert!(
        format!("{missing:#}").contains("--plot-font"),
        "{missing:#}"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_model_writes_a_split_that_serves_long_prompts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("tiny");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-loadtest"))
        .args(["tiny-model", "--seed", "5", "--context", "1024", "--out"])
        .arg(&dir)
        .status()
        .expect("run tiny-model");
    assert!(status.success());
    for part in ["edge", "cloud"] {
        assert!(dir.join(part).join("manifest.json").is_file(), "{part}");
    }
    // Again without --force: refused, the split is kept.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-loadtest"))
        .args(["tiny-model", "--out"])
        .arg(&dir)
        .output()
        .expect("run tiny-model");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let srv = server::start(ServerConfig {
        cloud: dir.join("cloud"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
        kv_cache_gib: 0.05,
        drain_timeout_ms: 100,
        ..ServerConfig::default()
    })
    .await
    .expect("start on the tiny model");
    // 600-token prompts: past the generator's usual 512 context, in three chunks.
    let mut cfg = LoadConfig::new(srv.ws_url(), dir.join("edge"), 3);
    cfg.prompt_tokens = LengthDist::fixed(600).expect("600");
    cfg.output_tokens = LengthDist::fixed(4).expect("4");
    let report = tandem_loadtest::run(cfg).await.expect("run");
    assert!(report.errors.is_empty(), "{:?}", report.error_examples);
    assert_eq!(report.counts.completed, 3);
    assert_eq!(report.model.max_position_embeddings, 1024);
    assert_eq!(report.throughput.prompt_tokens_done, 3 * 600);
    srv.shutdown().await;
}

/// Issue 22: network conditions inside the load generator. Devices spread over links whose
/// round trips are 60 ms and 100 ms (`--rtt-ms 80 --rtt-spread-ms 20 --links 2`) finish
/// every generation, each decode step waits at least the shorter round trip (a bound, not a
/// timing), and the report names the conditions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_behind_emulated_round_trips() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let mut cfg = fx.load(&srv, 4);
    cfg.network = Some(tandem_loadtest::config::Network {
        rtt: Duration::from_millis(80),
        rtt_spread: Duration::from_millis(20),
        jitter: Duration::ZERO,
        uplink: tandem_loadtest::netem::Rate::UNLIMITED,
        downlink: tandem_loadtest::netem::Rate::UNLIMITED,
        links: 2,
    });
    let report = tandem_loadtest::run(cfg).await.expect("run");
    assert!(report.errors.is_empty(), "{:?}", report.error_examples);
    assert_eq!(report.counts.completed, 4);
    let tpot = report.latency_ms.tpot.as_ref().expect("tpot");
    assert!(
        tpot.p50 >= 55.0,
        "a decode step within one round trip: {tpot:?}"
    );
    assert!(
        report
            .settings
            .network
            .as_deref()
            .is_some_and(|n| n.starts_with("rtt 80±20 ms over 2 links")),
        "{:?}",
        report.settings.network
    );
    srv.shutdown().await;
}

/// Issue 22: speculation in the load generator's devices. Devices on prompts that repeat a
/// span, drafting up to 6 tokens per step (prompt lookup, real edge compute), receive exactly
/// the tokens of devices that do not draft (greedy), and drafting happened: drafts sent,
/// some confirmed, fewer round trips than tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafting_devices_get_the_tokens_of_devices_that_do_not() {
    let fx = fixture();
    let srv = server::start(fx.server_config()).await.expect("start");
    let mut cfg = fx.load(&srv, 6);
    cfg.device_compute = DeviceCompute::Real;
    cfg.output_tokens = LengthDist::fixed(24).expect("24");
    cfg.generations_per_device = 2;
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|k| {
            let span: Vec<u32> = (0..5).map(|i| 4 + (k * 37 + i * 11) % 200).collect();
            span.repeat(4)
        })
        .collect();
    cfg.prompts = Some(FixedPrompts::Ids(prompts));
    let off = tandem_loadtest::run_detailed(cfg.clone())
        .await
        .expect("run without drafts");
    cfg.max_draft_tokens = 6;
    let on = tandem_loadtest::run_detailed(cfg)
        .await
        .expect("run with drafts");
    assert!(
        on.report.errors.is_empty(),
        "{:?}",
        on.report.error_examples
    );
    assert_eq!(on.report.counts.completed, 12);
    assert_eq!(outputs(&on.records), outputs(&off.records));

    let (s_off, s_on) = (&off.report.speculation, &on.report.speculation);
    assert_eq!((s_off.drafted_tokens, s_off.accepted_drafts), (0, 0));
    assert_eq!(s_off.tokens_per_round_trip, 1.0, "{s_off:?}");
    assert!(s_on.drafted_tokens > 0, "{s_on:?}");
    assert!(s_on.accepted_drafts > 0, "{s_on:?}");
    assert!(s_on.accepted_drafts <= s_on.drafted_tokens);
    // Every accepted draft saves a round trip.
    let tokens = on.report.throughput.output_tokens_received_done;
    assert_eq!(s_on.round_trips + s_on.accepted_drafts, tokens, "{s_on:?}");
    assert!(s_on.tokens_per_round_trip > 1.0, "{s_on:?}");
    assert_eq!(on.report.settings.max_draft_tokens, 6);
    // Drafted rows are computed too.
    assert!(on.report.edge.rows_computed > off.report.edge.rows_computed);
    srv.shutdown().await;
}
