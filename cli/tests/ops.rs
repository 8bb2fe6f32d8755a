//! What an SRE sees: `/metrics` and `/readyz` of a server started in process on
//! 127.0.0.1:0 with a tiny generated model, devices driven by the `tandem-edge` library over
//! real WebSockets, and a real Redis for the readiness test.
//!
//! Checked: `/metrics` parses as the Prometheus text format and exports every metric the
//! Grafana dashboard uses; a generation moves tokens, wire bytes, TTFT/TPOT/generation and
//! step histograms; an error answer moves `tandem_errors_total{code}`; a KV cache too small
//! for three sessions at once moves `tandem_preemptions_total` while the outputs stay those
//! of solo runs; `/readyz` turns 503 when Redis stops and back to 200 when it returns, and
//! while the engine loop is stalled. `/metrics` and `/readyz` live on the operator listener
//! (with the admin routes): the public listener refuses them without the admin key.

use tandem_testkit::http;
use tandem_testkit::redis as redis_server;
use tandem_testkit::tiny;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Req;
use tandem_edge::{ClientConfig, EdgeBundle, EdgeClient, Finished, GenerateRequest};
use tandem_serve::server::{self, ServerConfig, ServerHandle};

struct Fixture {
    _tmp: tempfile::TempDir,
    split_dir: PathBuf,
    bundle: EdgeBundle,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let split_dir = tiny::write_tiny_split(tmp.path());
    let bundle = EdgeBundle::load(&split_dir).expect("edge bundle");
    Fixture {
        _tmp: tmp,
        split_dir,
        bundle,
    }
}

impl Fixture {
    fn config(&self) -> ServerConfig {
        ServerConfig {
            cloud: self.split_dir.join("cloud"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
            kv_cache_gib: 0.01,
            drain_timeout_ms: 100,
            ..ServerConfig::default()
        }
    }

    async fn generate(&self, url: &str, prompt: Vec<u32>, max_tokens: u32) -> Finished {
        let client = EdgeClient::from_bundle(&self.bundle, ClientConfig::new(url)).expect("client");
        let mut req = GenerateRequest::new(prompt);
        req.max_tokens = max_tokens;
        client
            .generate(req)
            .expect("generate")
            .finish()
            .await
            .expect("finished")
    }
}

/// One parsed exposition: sample name with labels → value.
type Samples = BTreeMap<String, f64>;

/// Parses the Prometheus text format (0.0.4) strictly: every line is a `# HELP`, a
/// `# TYPE` with a known type, or a sample `name[{label="value",...}] number`; every sample
/// belongs to a declared family; names are valid.
fn parse_exposition(text: &str) -> (Samples, BTreeMap<String, String>) {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut samples = Samples::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().expect("name");
            assert!(valid_name(name), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().expect("name"), it.next().expect("type"));
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.trim().is_empty(),
            "{line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let name = series.split('{').next().expect("name");
        assert!(valid_name(name), "{line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').expect("label pair");
                    assert!(valid_name(k), "{line}");
                    assert!(
                        v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                        "{line}"
                    );
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        samples.insert(series.to_owned(), value);
    }
    (samples, types)
}

/// The operator listener's address (every fixture server has one).
fn admin(srv: &ServerHandle) -> std::net::SocketAddr {
    srv.admin_addr().expect("the operator listener is on")
}

async fn scrape(srv: &ServerHandle) -> (Samples, BTreeMap<String, String>) {
    let r = Req::new("GET", "/metrics").send(admin(srv)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    parse_exposition(&r.text())
}

fn get(s: &Samples, series: &str) -> f64 {
    s.get(series).copied().unwrap_or(0.0)
}

fn dashboard_metric_names(repo: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo.join("deploy/grafana/dashboards/tandem.json"))
        .expect("the dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    if k == "expr" {
                        if let Some(s) = v.as_str() {
                            out.push(s.to_owned());
                        }
                    }
                    walk(v, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    assert!(
        exprs.len() > 10,
        "the dashboard has {} queries",
        exprs.len()
    );
    let mut names = BTreeSet::new();
    for e in exprs {
        let bytes = e.as_bytes();
        let mut i = 0;
        while let Some(pos) = e[i..].find("tandem_") {
            let start = i + pos;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            names.insert(e[start..end].to_owned());
            i = end;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_cover_the_dashboard_and_move() {
    let fx = fixture();
    let srv = server::start(fx.config()).await.expect("start");
    let (before, types) = scrape(&srv).await;

    // Every name the dashboard queries is exported (histograms through their series).
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for name in dashboard_metric_names(&repo) {
        let exported = types.contains_key(&name)
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                name.strip_suffix(s)
                    .is_some_and(|f| types.get(f).is_some_and(|t| t == "histogram"))
            });
        assert!(
            exported,
            "the dashboard uses {name}, which /metrics does not export"
        );
    }
    // Units in names; no unbounded labels (no session ids) anywhere.
    for (name, kind) in &types {
        assert!(name.starts_with("tandem_"), "{name}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
    }

    let prompt: Vec<u32> = (1..=12).collect();
    let f = fx.generate(&srv.ws_url(), prompt, 6).await;
    let out_tokens = f64::from(f.usage.output_tokens);
    assert!(out_tokens >= 1.0);
    // A REST error answer.
    Req::new("GET", "/v1/prompts")
        .send(srv.addr())
        .await
        .expect_error(401, "unauthorized");

    let (after, _) = scrape(&srv).await;
    let delta = |s: &str| get(&after, s) - get(&before, s);
    assert_eq!(delta("tandem_tokens_out_total"), out_tokens);
    assert!(
        delta("tandem_tokens_in_total") >= 12.0,
        "{}",
        delta("tandem_tokens_in_total")
    );
    assert!(delta("tandem_wire_bytes_total{direction=\"in\"}") > 12.0 * 4.0);
    assert!(delta("tandem_wire_bytes_total{direction=\"out\"}") > 0.0);
    assert_eq!(delta("tandem_ttft_seconds_count"), 1.0);
    assert_eq!(delta("tandem_tpot_seconds_count"), out_tokens - 1.0);
    assert_eq!(delta("tandem_generation_duration_seconds_count"), 1.0);
    assert!(delta("tandem_step_duration_seconds_count") >= out_tokens);
    assert!(delta("tandem_batch_tokens_sum") >= 12.0 + out_tokens - 1.0);
    assert_eq!(delta("tandem_errors_total{code=\"unauthorized\"}"), 1.0);
    // The engine's phases and steps, and (on Linux) the threads' CPU time.
    assert_eq!(
        delta("tandem_engine_steps_total"),
        delta("tandem_step_duration_seconds_count")
    );
    assert!(delta("tandem_engine_seconds_total{phase=\"forward\"}") > 0.0);
    assert!(delta("tandem_engine_seconds_total{phase=\"bookkeeping\"}") > 0.0);
    if cfg!(target_os = "linux") {
        // This test's runtime workers have tokio's default name: the `io` group.
        assert!(
            delta("tandem_thread_cpu_seconds_total{threads=\"io\"}") > 0.0,
            "{after:?}"
        );
        assert!(delta("tandem_thread_cpu_seconds_total{threads=\"engine\"}") > 0.0);
    }
    // Histogram buckets are cumulative and end at the count.
    assert_eq!(
        get(&after, "tandem_ttft_seconds_bucket{le=\"+Inf\"}"),
        get(&after, "tandem_ttft_seconds_count")
    );
    // The session is over: nothing is held.
    assert_eq!(get(&after, "tandem_sessions_active"), 0.0);
    assert_eq!(get(&after, "tandem_kv_blocks_used"), 0.0);
    assert!(get(&after, "tandem_kv_blocks_free") > 0.0);
    // No label value looks like a session id or holds text.
    for series in after.keys() {
        let labels = series.split_once('{').map_or("", |(_, l)| l);
        for (key, _) in labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|p| p.split_once('='))
        {
            assert!(
                ["le", "code", "direction", "tenant", "phase", "threads"].contains(&key),
                "unexpected label {key} in {series}"
            );
        }
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_cache_too_small_preempts_and_the_outputs_stay_the_same() {
    let fx = fixture();
    // Solo outputs first, on a roomy cache.
    let roomy = server::start(fx.config()).await.expect("start");
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|s| (0..30u32).map(|i| 1 + (i * 7 + s * 13) % 60).collect())
        .collect();
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(fx.generate(&roomy.ws_url(), p.clone(), 24).await.token_ids);
    }
    roomy.shutdown().await;

    // 5 blocks of 16 positions; three sessions of 30 + 24 positions need 4 blocks each.
    let tight = server::start(ServerConfig {
        kv_blocks: Some(5),
        block_size: 16,
        ..fx.config()
    })
    .await
    .expect("start");
    let (before, _) = scrape(&tight).await;
    let url = tight.ws_url();
    let runs = prompts
        .iter()
        .map(|p| fx.generate(&url, p.clone(), 24))
        .collect::<Vec<_>>();
    let outs = futures_util::future::join_all(runs).await;
    for (i, (f, want)) in outs.iter().zip(&solo).enumerate() {
        assert_eq!(&f.token_ids, want, "session {i} changed under preemption");
    }
    let (after, _) = scrape(&tight).await;
    let preempted =
        get(&after, "tandem_preemptions_total") - get(&before, "tandem_preemptions_total");
    assert!(
        preempted >= 1.0,
        "no preemption with 5 blocks for 3 × 4 blocks"
    );
    tight.shutdown().await;
}

async fn ready(srv: &ServerHandle) -> http::Reply {
    Req::new("GET", "/readyz").send(admin(srv)).await
}

/// Polls `/readyz` until it answers `status` (at most 15 s).
async fn wait_ready(srv: &ServerHandle, status: u16) -> http::Reply {
    let mut last = ready(srv).await;
    for _ in 0..150 {
        if last.status == status {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = ready(srv).await;
    }
    panic!(
        "/readyz never answered {status}: {} {}",
        last.status,
        last.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis_and_the_engine_loop() {
    let Some(mut redis) = redis_server::RedisServer::start() else {
        return;
    };
    let fx = fixture();
    let srv = server::start(ServerConfig {
        redis: Some(redis.url()),
        redis_key_prefix: "ops".to_owned(),
        engine_stall_ms: 300,
        ..fx.config()
    })
    .await
    .expect("start");
    let r = wait_ready(&srv, 200).await;
    assert_eq!(r.json()["status"], "ready");
    let healthz = Req::new("GET", "/healthz").send(srv.addr()).await;
    assert_eq!(healthz.status, 200);

    redis.stop();
    let r = wait_ready(&srv, 503).await;
    let msg = r.expect_error(503, "unavailable");
    assert!(msg.contains("store"), "{msg}");
    assert!(r.header("retry-after").is_some());
    // Liveness is not readiness: the process still serves.
    assert_eq!(
        Req::new("GET", "/healthz").send(srv.addr()).await.status,
        200
    );

    redis.restart();
    wait_ready(&srv, 200).await;

    // A step that does not end: unready while it lasts, ready after.
    srv.stall_engine_for_tests(Duration::from_millis(2500));
    let r = wait_ready(&srv, 503).await;
    let msg = r.expect_error(503, "unavailable");
    assert!(msg.contains("engine"), "{msg}");
    wait_ready(&srv, 200).await;
    srv.shutdown().await;
}

/// A TCP relay to `to` that the test can cut (every connection through it at once, by
/// sending `true`).
async fn relay(to: std::net::SocketAddr) -> (String, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (cut, cut_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut cut_rx = cut_rx.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                }
            });
        }
    });
    (format!("ws://{addr}/v1/edge/ws"), cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_told_moved_reconnects_to_the_owner_and_keeps_its_output() {
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let fx = fixture();
    let cfg = ServerConfig {
        redis: Some(redis.url()),
        redis_key_prefix: "mv".to_owned(),
        heartbeat_ttl_ms: 3_000,
        ..fx.config()
    };
    let a = server::start(cfg.clone()).await.expect("start A");
    let b = server::start(cfg).await.expect("start B");
    let prompt: Vec<u32> = (3..=20).collect();
    let solo = fx.generate(&a.ws_url(), prompt.clone(), 24).await.token_ids;

    // The device reaches A through a relay; the relay dies mid-generation and the device's
    // list now names only B, which sends it to A.
    let (via, cut) = relay(a.addr()).await;
    let mut cfg = ClientConfig::new(via.as_str());
    cfg.reconnect.initial_delay = Duration::from_millis(10);
    let servers = cfg.servers.clone();
    let client = EdgeClient::from_bundle(&fx.bundle, cfg).expect("client");
    let mut req = GenerateRequest::new(prompt);
    req.max_tokens = 24;
    let mut generation = client.generate(req).expect("generate");
    let mut tokens = 0;
    let mut moved = false;
    let finished = loop {
        match generation.next().await.expect("an event") {
            tandem_edge::Event::Token { .. } => {
                tokens += 1;
                if tokens == 4 {
                    servers.set(vec![b.ws_url()]);
                    let _ = cut.send(true);
                }
            }
            tandem_edge::Event::Reconnecting { cause, .. } => {
                moved |= cause.contains("moved");
            }
            tandem_edge::Event::Done(f) => break f,
            tandem_edge::Event::Error(e) => panic!("generation failed: {e}"),
            _ => {}
        }
    };
    assert!(moved, "the device was never told `moved`");
    assert_eq!(
        finished.token_ids, solo,
        "the output changed across the move"
    );
    assert_eq!(
        finished.wire.replays, 0,
        "the owner kept the state: no replay"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_replica_moves_its_sessions_to_the_other_unchanged() {
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let fx = fixture();
    let cfg = ServerConfig {
        redis: Some(redis.url()),
        redis_key_prefix: "drain".to_owned(),
        heartbeat_ttl_ms: 3_000,
        // Long generations do not finish within the drain: they must move.
        drain_timeout_ms: 50,
        ..fx.config()
    };
    let a = server::start(cfg.clone()).await.expect("start A");
    let b = server::start(cfg).await.expect("start B");
    let prompts: Vec<Vec<u32>> = [0u32, 2, 3]
        .iter()
        .map(|s| (0..16u32).map(|i| 1 + (i * 5 + s * 11) % 60).collect())
        .collect();
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(fx.generate(&b.ws_url(), p.clone(), 200).await.token_ids);
    }
    // Long enough to be caught mid-way (greedy: the same lengths under the drain).
    assert!(
        solo.iter().all(|t| t.len() > 20),
        "{:?}",
        solo.iter().map(Vec::len).collect::<Vec<_>>()
    );

    // Three devices on A (their lists: A, then B).
    let mut gens = Vec::new();
    for p in &prompts {
        let mut cfg = ClientConfig::new(tandem_edge::ServerList::new(vec![a.ws_url(), b.ws_url()]));
        cfg.reconnect.initial_delay = Duration::from_millis(10);
        let client = EdgeClient::from_bundle(&fx.bundle, cfg).expect("client");
        let mut req = GenerateRequest::new(p.clone());
        req.max_tokens = 200;
        gens.push(client.generate(req).expect("generate"));
    }
    // Once every device holds a few tokens, drain A (what SIGTERM does).
    let mut held = vec![0usize; gens.len()];
    while held.iter().any(|h| *h < 3) {
        for (i, g) in gens.iter_mut().enumerate() {
            if held[i] < 3 {
                match g.next().await.expect("event") {
                    tandem_edge::Event::Token { .. } => held[i] += 1,
                    tandem_edge::Event::Done(_) => panic!("finished before the drain"),
                    tandem_edge::Event::Error(e) => panic!("{e}"),
                    _ => {}
                }
            }
        }
    }
    let drained_at = std::time::Instant::now();
    a.shutdown().await;
    let drain_s = drained_at.elapsed().as_secs_f64();
    let mut replays = 0;
    for (i, g) in gens.into_iter().enumerate() {
        let f = g.finish().await.expect("finished on B");
        assert_eq!(
            f.token_ids, solo[i],
            "device {i}'s output changed across the drain"
        );
        assert!(f.wire.reconnects >= 1, "device {i} never moved");
        replays += f.wire.replays;
    }
    let moved_s = drained_at.elapsed().as_secs_f64();
    // B took all three over and had them replay (A's KV went with it).
    assert_eq!(replays, 3);
    eprintln!(
        "drain figures: A's shutdown took {drain_s:.3} s; all 3 sessions finished on B {moved_s:.3} s after the drain began, 3 replays"
    );
    b.shutdown().await;
}

const OPS_ADMIN_KEY: &str = "ops-admin-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_surfaces_are_off_the_public_listener() {
    let fx = fixture();
    let srv = server::start(ServerConfig {
        admin_key: Some(tandem_serve::server::config::Secret::new(OPS_ADMIN_KEY)),
        ..fx.config()
    })
    .await
    .expect("start");
    let (public, ops) = (srv.addr(), admin(&srv));
    assert_ne!(public, ops);
    assert_eq!(srv.admin_url(), Some(format!("http://{ops}")));

    // The admin routes work on the operator listener (with the admin key): a tenant, its key,
    // and a prompt of it, so that /metrics holds a `tenant="…"` series.
    let r = Req::new("GET", "/v1/admin/tenants").send(ops).await;
    r.expect_error(401, "unauthorized");
    let quotas =
        serde_json::json!({"prompts_per_minute": 30, "tokens_per_day": 10000, "max_audience": 5});
    let r = Req::new("POST", "/v1/admin/tenants")
        .bearer(OPS_ADMIN_KEY)
        .json(&serde_json::json!({"name": "Acme", "quotas": quotas}))
        .send(ops)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let tenant = r.json()["id"].as_str().expect("id").to_owned();
    let r = Req::new("POST", &format!("/v1/admin/tenants/{tenant}/keys"))
        .bearer(OPS_ADMIN_KEY)
        .json(&serde_json::json!({}))
        .send(ops)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.json()["key"].as_str().expect("key").to_owned();
    let listed = Req::new("GET", "/v1/admin/tenants")
        .bearer(OPS_ADMIN_KEY)
        .send(ops)
        .await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert!(listed.text().contains(&tenant), "{}", listed.text());
    // The partner route is public only.
    let prompt = serde_json::json!({
        "template": "Suggest a gift for someone who likes {{interests}}.",
        "audience": ["alice"],
        "max_tokens": 4,
        "expires_in_seconds": 600,
    });
    let r = Req::new("POST", "/v1/prompts")
        .bearer(&key)
        .json(&prompt)
        .send(public)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    Req::new("POST", "/v1/prompts")
        .bearer(&key)
        .json(&prompt)
        .send(ops)
        .await
        .expect_error(404, "not_found");
    Req::new("GET", tandem_serve::server::WS_PATH)
        .send(ops)
        .await
        .expect_error(404, "not_found");

    // The operator listener: /metrics (with the tenant's series) and /readyz, no credentials.
    let m = Req::new("GET", "/metrics").send(ops).await;
    assert_eq!(m.status, 200, "{}", m.text());
    assert!(
        m.text().contains(&format!(
            "tandem_prompts_submitted_total{{tenant=\"{tenant}\"}} 1"
        )),
        "{}",
        m.text()
    );
    let r = Req::new("GET", "/readyz").send(ops).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ready");
    assert_eq!(Req::new("GET", "/healthz").send(ops).await.status, 200);

    // The public listener: /metrics and /readyz refused without the admin key, and the
    // refusal holds nothing of the counters.
    for path in ["/metrics", "/readyz"] {
        for presented in [None, Some("not-the-admin-key-at-all"), Some(key.as_str())] {
            let mut req = Req::new("GET", path);
            if let Some(k) = presented {
                req = req.bearer(k);
            }
            let r = req.send(public).await;
            r.expect_error(401, "unauthorized");
            let body = r.text();
            assert!(
                !body.contains("tenant") && !body.contains(&tenant) && !body.contains("tandem_"),
                "{path}: {body}"
            );
        }
    }
    // With the admin key, the public listener answers them too.
    let m = Req::new("GET", "/metrics")
        .bearer(OPS_ADMIN_KEY)
        .send(public)
        .await;
    assert_eq!(m.status, 200, "{}", m.text());
    assert!(m.text().contains("tandem_prompts_submitted_total"));
    let r = Req::new("GET", "/readyz")
        .bearer(OPS_ADMIN_KEY)
        .send(public)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Liveness stays public.
    assert_eq!(Req::new("GET", "/healthz").send(public).await.status, 200);

    // `tandem admin` reaches the operator listener.
    let ops_url = srv.admin_url().expect("admin url");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["admin", "--admin-url", &ops_url, "tenant", "list"])
            .env("TANDEM_ADMIN_KEY", OPS_ADMIN_KEY)
            .output()
            .expect("run tandem admin")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&tenant), "{stdout}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_key_the_public_listener_has_no_metrics_and_off_means_off() {
    let fx = fixture();
    // No admin key: /metrics and /readyz are unknown routes on the public listener.
    let srv = server::start(fx.config()).await.expect("start");
    for path in ["/metrics", "/readyz"] {
        Req::new("GET", path)
            .send(srv.addr())
            .await
            .expect_error(404, "not_found");
        assert_eq!(Req::new("GET", path).send(admin(&srv)).await.status, 200);
    }
    srv.shutdown().await;

    let off = server::start(ServerConfig {
        admin_listen: tandem_serve::server::AdminListen::Off,
        ..fx.config()
    })
    .await
    .expect("start");
    assert_eq!(off.admin_addr(), None);
    assert_eq!(off.admin_url(), None);
    assert_eq!(
        Req::new("GET", "/healthz").send(off.addr()).await.status,
        200
    );
    off.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_listener_reports_the_drain() {
    let fx = fixture();
    let srv = server::start(ServerConfig {
        drain_timeout_ms: 5_000,
        ..fx.config()
    })
    .await
    .expect("start");
    let ops = admin(&srv);
    // A generation that cannot end while the engine is held: the drain waits for it.
    let client = EdgeClient::from_bundle(&fx.bundle, ClientConfig::new(srv.ws_url().as_str()))
        .expect("client");
    let mut req = GenerateRequest::new((1..=12).collect());
    req.max_tokens = 200;
    let mut generation = client.generate(req).expect("generate");
    loop {
        match generation.next().await.expect("an event") {
            tandem_edge::Event::Token { .. } => break,
            tandem_edge::Event::Done(_) => panic!("done before the drain"),
            tandem_edge::Event::Error(e) => panic!("generation failed: {e}"),
            _ => {}
        }
    }
    srv.stall_engine_for_tests(Duration::from_millis(3_000));
    let drain = tokio::spawn(srv.shutdown());
    // The public listener stops accepting at once; the operator one answers through the drain.
    let mut last = Req::new("GET", "/readyz").send(ops).await;
    for _ in 0..100 {
        if last.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        last = Req::new("GET", "/readyz").send(ops).await;
    }
    let msg = last.expect_error(503, "unavailable");
    assert!(msg.contains("draining"), "{msg}");
    drop(generation);
    drain.await.expect("shutdown");
}
