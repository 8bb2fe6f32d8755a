//! End to end: the device library (`tandem-edge`) against the real server, over real
//! sockets. Greedy output equals the whole model run locally; 32 concurrent devices get their
//! solo outputs; a cut connection resumes; a restarted or killed replica (Redis-backed) is
//! replaced by another that rebuilds the KV from a replay; the CLI runs on the demo model.

use tandem_testkit::redis as redis_server;
use tandem_testkit::tiny as common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use clap::Parser;
use tandem_edge::cli::{Cli, Command as EdgeCommand};
use tandem_edge::{
    ClientConfig, EdgeBundle, EdgeClient, Event, Finished, GenerateRequest, ReconnectPolicy,
    ServerList,
};
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_model::pipeline::{self, LocalSplit, LocalSplitOptions};
use tandem_protocol::{DoneReason, FinishReason, HiddenDtype, SamplingParams};
use tandem_serve::server::{self, ServerConfig, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A tiny model split after layer 1, with a tokenizer and chat template.
struct Fixture {
    dir: tempfile::TempDir,
    bundle: EdgeBundle,
    local: LocalSplit,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = &common::specs()[0];
        let hf = dir.path().join("hf");
        common::write_hf(&hf, spec);
        common::write_tokenizer(&hf);
        let ck = Checkpoint::open(&hf).expect("open");
        let opts = SplitOptions {
            edge_layers: 1,
            dtype: DType::F32,
            force: false,
            progress: false,
        };
        let split = dir.path().join("split");
        write_split(&ck, &split, &opts).expect("split");
        let bundle = EdgeBundle::load(&split).expect("edge");
        let local = LocalSplit::load(
            &split,
            &LocalSplitOptions {
                edge_layers: None,
                dtype: None,
                device: Device::Cpu,
            },
        )
        .expect("local split");
        Self { dir, bundle, local }
    }

    fn split_dir(&self) -> PathBuf {
        self.dir.path().join("split")
    }

    fn server_config(&self) -> ServerConfig {
        ServerConfig {
            cloud: self.split_dir().join("cloud"),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
            kv_cache_gib: 0.02,
            ..ServerConfig::default()
        }
    }

    async fn server(&self) -> ServerHandle {
        server::start(self.server_config()).await.expect("server")
    }

    fn client(&self, servers: ServerList, chunk: usize) -> EdgeClient {
        let mut cfg = ClientConfig::new(servers);
        cfg.prompt_chunk_tokens = chunk;
        cfg.reconnect = ReconnectPolicy {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            max_attempts: 100,
            max_elapsed: Duration::from_secs(60),
            ..ReconnectPolicy::default()
        };
        EdgeClient::from_bundle(&self.bundle, cfg).expect("client")
    }

    /// The whole model, greedy, in one process.
    fn reference(&self, prompt: &[u32], max_tokens: u32) -> pipeline::Generation {
        let req = pipeline::GenerateRequest {
            prompt_ids: prompt.to_vec(),
            max_tokens: max_tokens as usize,
            sampling: SamplingParams::default().validate().expect("greedy"),
            stop_strings: vec![],
            eos_ids: None,
        };
        self.local
            .generate(&req, &mut |_| {})
            .expect("local generate")
    }

    /// Prompt number `i`: distinct lengths and contents, a shared 6-token "system prefix".
    fn prompt(&self, i: usize) -> Vec<u32> {
        let spec = &common::specs()[0];
        let mut p: Vec<u32> = (0..6).map(|t| 10 + t).collect();
        let body = common::prompt(spec, 40);
        p.extend(
            body.iter()
                .skip(i % 7)
                .take(5 + (i * 3) % 17)
                .map(|t| (t + i as u32) % 290 + 4),
        );
        p
    }

    /// A prompt whose greedy output is at least `min` tokens (so a failure can land
    /// mid-generation).
    fn long_prompt(&self, min: usize, max_tokens: u32) -> Vec<u32> {
        (0..200)
            .map(|i| self.prompt(i))
            .find(|p| self.reference(p, max_tokens).output_ids.len() >= min)
            .expect("a prompt with a long output")
    }
}

fn request(prompt: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    let mut req = GenerateRequest::new(prompt);
    req.system_prefix_len = 6;
    req.max_tokens = max_tokens;
    req
}

/// The client's tokens (with the end-of-sequence token the cloud sends) vs the local run's.
fn assert_same(f: &Finished, want: &pipeline::Generation, what: &str) {
    let mut ids = f.token_ids.clone();
    if f.reason == DoneReason::Finished(FinishReason::Eos) {
        ids.pop();
    }
    assert_eq!(ids, want.output_ids, "{what}: tokens");
    assert_eq!(f.text, want.text, "{what}: text");
    assert_eq!(
        f.reason,
        DoneReason::Finished(want.finish_reason),
        "{what}: reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_over_a_real_socket_equals_the_whole_model() {
    let fx = Fixture::new();
    let server = fx.server().await;
    for (i, chunk) in [(0, 4), (1, 256), (2, 1)] {
        let prompt = fx.prompt(i);
        let want = fx.reference(&prompt, 20);
        let f = fx
            .client(ServerList::single(server.ws_url()), chunk)
            .generate(request(prompt.clone(), 20))
            .expect("generate")
            .finish()
            .await
            .expect("finished");
        assert_same(&f, &want, &format!("prompt {i}, chunk {chunk}"));
        assert_eq!(f.usage.prompt_tokens as usize, prompt.len());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_devices_get_their_solo_outputs() {
    let fx = Fixture::new();
    let server = fx.server().await;
    let prompts: Vec<Vec<u32>> = (0..32).map(|i| fx.prompt(i)).collect();
    let wants: Vec<_> = prompts.iter().map(|p| fx.reference(p, 16)).collect();
    let client = fx.client(ServerList::single(server.ws_url()), 8);
    let generations: Vec<_> = prompts
        .iter()
        .map(|p| client.generate(request(p.clone(), 16)).expect("generate"))
        .collect();
    let mut tasks = Vec::new();
    for g in generations {
        tasks.push(tokio::spawn(g.finish()));
    }
    for (i, (task, want)) in tasks.into_iter().zip(&wants).enumerate() {
        let f = task.await.expect("join").expect("finished");
        assert_same(&f, want, &format!("device {i}"));
    }
    server.shutdown().await;
}

/// A TCP proxy that adds `delay` before each chunk it forwards to the server (so a
/// generation is slow enough to interrupt) and can cut every open connection.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<tokio::sync::Notify>,
    generation: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(tokio::sync::Notify::new());
        let generation = Arc::new(AtomicUsize::new(0));
        let (c, g) = (cut.clone(), generation.clone());
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let (c, g) = (c.clone(), g.clone());
                tokio::spawn(async move {
                    let born = g.load(Ordering::SeqCst);
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let to_server = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = dr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            tokio::time::sleep(delay).await;
                            if uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let to_device = async {
                        let _ = tokio::io::copy(&mut ur, &mut dw).await;
                    };
                    let cut_now = async {
                        loop {
                            c.notified().await;
                            if g.load(Ordering::SeqCst) > born {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = to_server => {}
                        _ = to_device => {}
                        _ = cut_now => {}
                    }
                    // Dropping both halves of both sockets: the device sees a dead line.
                });
            }
        });
        Self {
            addr,
            cut,
            generation,
            task,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/edge/ws", self.addr)
    }

    /// Drops every connection open now (later ones pass).
    fn cut_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cut.notify_waiters();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits for `n` token events; returns how many tokens were seen.
async fn wait_tokens(g: &mut tandem_edge::Generation, n: usize) -> usize {
    let mut seen = 0;
    while seen < n {
        match g.next().await.expect("events") {
            Event::Token { .. } => seen += 1,
            Event::Done(_) => panic!("the generation ended before the failure was injected"),
            Event::Error(e) => panic!("generation failed: {e}"),
            _ => {}
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_with_unchanged_output() {
    let fx = Fixture::new();
    let server = fx.server().await;
    let prompt = fx.long_prompt(24, 32);
    let want = fx.reference(&prompt, 32);
    let proxy = Proxy::start(server.addr(), Duration::from_millis(15)).await;
    let mut g = fx
        .client(ServerList::single(proxy.url()), 8)
        .generate(request(prompt, 32))
        .expect("generate");
    let before = wait_tokens(&mut g, 3).await;
    proxy.cut_all();
    let f = g.finish().await.expect("finished");
    assert!(
        f.token_ids.len() > before + 10,
        "the cut was mid-generation"
    );
    assert!(f.wire.reconnects >= 1, "it reconnected: {:?}", f.wire);
    assert_same(&f, &want, "after a cut");
    server.shutdown().await;
}

/// `tandem serve` as a child process.
struct ServeProcess {
    child: Child,
    url: String,
    addr: SocketAddr,
}

impl ServeProcess {
    /// With `extra` flags after the defaults.
    fn start(cloud: &Path, redis: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--kv-cache-gib", "0.02"])
            .args(extra)
            .arg("--cloud")
            .arg(cloud)
            .args(["--redis", redis])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tandem serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let addr = url
            .trim_start_matches("ws://")
            .trim_end_matches("/v1/edge/ws")
            .parse()
            .expect("address");
        Self { child, url, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a generation on replica A (through a slow proxy), kills A mid-generation, and
/// points the device at replica B, which must rebuild the session from a replay. Both run
/// with `serve_args`; the generation must finish within `within`. With `flush_redis`, Redis
/// loses every key (`FLUSHALL`) just before the kill: no replica knows the session, and the
/// device opens a new one and replays.
async fn fail_over(
    second_started_before: bool,
    serve_args: &[&str],
    within: Duration,
    flush_redis: bool,
) {
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let fx = Fixture::new();
    let cloud = fx.split_dir().join("cloud");
    let prompt = fx.long_prompt(24, 32);
    let want = fx.reference(&prompt, 32);
    let start = || ServeProcess::start(&cloud, &redis.url(), serve_args);
    let mut a = start();
    let mut b = second_started_before.then(start);
    let proxy = Proxy::start(a.addr, Duration::from_millis(15)).await;
    let servers = ServerList::single(proxy.url());
    let mut g = fx
        .client(servers.clone(), 8)
        .generate(request(prompt, 32))
        .expect("generate");
    let before = wait_tokens(&mut g, 3).await;
    if flush_redis {
        redis.flushall();
    }
    a.kill();
    proxy.cut_all();
    let b = b.get_or_insert_with(start);
    servers.set(vec![b.url.clone()]);
    // Every token reaches the caller once, in order, across the fail-over.
    let rest = async {
        let mut seen = before;
        loop {
            match g.next().await.expect("events") {
                Event::Token { seq, .. } => {
                    assert_eq!(seq, seen as u64, "tokens delivered once, in order");
                    seen += 1;
                }
                Event::Done(f) => return (f, seen),
                Event::Error(e) => panic!("the fail-over failed: {e}"),
                _ => {}
            }
        }
    };
    let (f, seen) = tokio::time::timeout(within, rest)
        .await
        .expect("the fail-over took too long");
    assert_eq!(seen, f.token_ids.len(), "token events");
    assert!(
        f.token_ids.len() > before + 10,
        "the kill was mid-generation"
    );
    assert!(
        f.wire.replays >= 1,
        "the new replica replayed: {:?}",
        f.wire
    );
    assert_eq!(
        f.wire.reopens >= 1,
        flush_redis,
        "a new session only when the store lost the old one: {:?}",
        f.wire
    );
    assert_same(&f, &want, "after a fail-over");
}

/// Longer than any fail-over may take with the default heartbeat (10 s) and the client's
/// reconnect policy (60 s).
const NO_LIMIT: Duration = Duration::from_secs(300);

/// Issue 20's "kill -9 of a replica: the survivor answered `moved` to the dead replica until
/// its heartbeat expired": with a heartbeat that lives two minutes, the survivor finds that
/// nothing listens at the dead owner's address, takes the session over and the generation
/// finishes long before the heartbeat would have expired (45 s; the client's policy allows
/// 60), with unchanged output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_is_not_trusted_until_its_heartbeat_expires() {
    let ttl = ["--heartbeat-ttl-ms", "120000"];
    fail_over(true, &ttl, Duration::from_secs(45), false).await;
}

/// Issue 20's "`FLUSHALL` on Redis, then kill -9 of the replica serving a generation: the
/// device failed with `unknown_session` although it holds every hidden state it sent": the
/// survivor knows nothing of the session, so the device opens a new one there and replays
/// everything it sent; the output is the undisturbed run's, every token delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_with_redis_and_its_replica_is_reopened_and_replayed() {
    fail_over(true, &[], NO_LIMIT, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_rebuilds_the_session_from_a_replay() {
    fail_over(false, &[], NO_LIMIT, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_started_on_one_replica_finishes_on_another() {
    fail_over(true, &[], NO_LIMIT, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_bytes_per_token_for_each_dtype() {
    let fx = Fixture::new();
    let server = fx.server().await;
    let prompt = fx.long_prompt(8, 8);
    let hidden = fx.bundle.model.config().hidden_size;
    for dtype in HiddenDtype::ALL {
        let mut client_cfg = fx
            .client(ServerList::single(server.ws_url()), 256)
            .config()
            .clone();
        client_cfg.dtype = dtype;
        // One row per decode step (drafts add rows by design; see the speculation test).
        client_cfg.max_draft_tokens = 0;
        let client = EdgeClient::from_bundle(&fx.bundle, client_cfg).expect("client");
        let mut req = request(prompt.clone(), 8);
        req.system_prefix_len = 0;
        let f = client
            .generate(req)
            .expect("generate")
            .finish()
            .await
            .expect("done");
        let per_step = f.wire.decode_bytes / f.wire.decode_frames.max(1);
        let expected = 28 + dtype.payload_len(1, hidden).expect("len") as u64;
        assert_eq!(per_step, expected, "{dtype}");
        println!(
            "{dtype}: {per_step} bytes per decode step, {:.1} bytes per prompt token \
             (hidden size {hidden}, {} prompt tokens in one chunk)",
            f.wire.prompt_bytes as f64 / prompt.len() as f64,
            prompt.len()
        );
        if dtype == HiddenDtype::F32 {
            assert_same(&f, &fx.reference(&prompt, 8), "f32");
        }
    }
    server.shutdown().await;
}

/// `tandem-edge run ... --max-tokens 24 --json`, in process; returns the result and stdout.
async fn run_cli(
    edge: &Path,
    url: &str,
    profile: &Path,
    prompt: &Path,
    system: &str,
    dtype: &str,
) -> (Finished, Vec<u8>) {
    let cli = Cli::try_parse_from([
        "tandem-edge",
        "run",
        "--edge",
        edge.to_str().expect("utf8"),
        "--server",
        url,
        "--profile",
        profile.to_str().expect("utf8"),
        "--prompt-file",
        prompt.to_str().expect("utf8"),
        "--system",
        system,
        "--max-tokens",
        "24",
        "--dtype",
        dtype,
        "--json",
    ])
    .expect("arguments");
    let EdgeCommand::Run(args) = cli.command else {
        panic!("the arguments parse as another subcommand");
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let f = tandem_edge::cli::run(args, &mut out, &mut err)
        .await
        .expect("cli run");
    (f, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_the_demo_model_produces_text() {
    let Some(gguf) = common::demo_model() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let ck = Checkpoint::open(&gguf).expect("open demo");
    let opts = SplitOptions {
        edge_layers: 1,
        dtype: DType::F32,
        force: false,
        progress: false,
    };
    write_split(&ck, dir.path(), &opts).expect("split demo");
    let cfg = ServerConfig {
        cloud: dir.path().join("cloud"),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
        kv_cache_gib: 0.1,
        ..ServerConfig::default()
    };
    let server = server::start(cfg).await.expect("server");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let edge = dir.path().join("edge");
    let profile = examples.join("profile.json");
    let prompt = examples.join("gift-prompt.txt");
    let url = server.ws_url();
    let (f, out) = run_cli(
        &edge,
        &url,
        &profile,
        &prompt,
        "You are a helpful assistant.",
        "f16",
    )
    .await;
    assert!(!f.text.trim().is_empty(), "some text");
    println!(
        "demo (hidden 576, f16): {} bytes per decode step, {:.1} bytes per prompt token; \
         first token after {:.0} ms, {:.1} tokens/s",
        f.wire.decode_bytes / f.wire.decode_frames.max(1),
        f.wire.prompt_bytes as f64 / f.usage.prompt_tokens.max(1) as f64,
        f.timings.time_to_first_token_s * 1e3,
        f.timings.decode_tokens_per_s
    );
    let json: serde_json::Value = serde_json::from_slice(&out).expect("one JSON object");
    assert_eq!(json["output"].as_str(), Some(f.text.as_str()));
    assert!(json["transparency"]["sent"]["bytes"].as_u64().unwrap_or(0) > 0);
    assert!(json["timings"]["time_to_first_token_s"].as_f64().is_some());

    // With f32 on the wire the split over the socket is exact: the same tokens as the
    // in-process split over the same assembled prompt.
    let system = "You are a helpful shopping assistant.";
    let (f32_run, _) = run_cli(&edge, &url, &profile, &prompt, system, "f32").await;
    let local = LocalSplit::load(
        dir.path(),
        &LocalSplitOptions {
            edge_layers: None,
            dtype: None,
            device: Device::Cpu,
        },
    )
    .expect("local split");
    let assembled = tandem_edge::assemble(
        Some(system),
        &tandem_edge::PromptTemplate::from_file(&prompt).expect("template"),
        &tandem_edge::Profile::from_file(&profile).expect("profile"),
        &tandem_edge::Sanitizer::default(),
        local.chat_template.as_ref(),
        local.tokenizer.as_ref().expect("tokenizer"),
    )
    .expect("assemble");
    let want = local
        .generate(
            &pipeline::GenerateRequest {
                prompt_ids: assembled.ids.clone(),
                max_tokens: 24,
                sampling: SamplingParams::default().validate().expect("greedy"),
                stop_strings: vec![],
                eos_ids: None,
            },
            &mut |_| {},
        )
        .expect("local generate");
    assert_eq!(f32_run.usage.prompt_tokens as usize, assembled.ids.len());
    assert_same(&f32_run, &want, "demo over the socket, f32");
    println!(
        "demo (hidden 576, f32): {} bytes per decode step; {:.1} tokens/s; edge layers {:.2} ms per token",
        f32_run.wire.decode_bytes / f32_run.wire.decode_frames.max(1),
        f32_run.timings.decode_tokens_per_s,
        f32_run.timings.edge_decode_ms_per_token
    );
    server.shutdown().await;
}

/// Speculation through the real server and client: with drafts on (the default) and off, the
/// same tokens and text for greedy and seeded sampling and with a stop string; with drafts on,
/// some are confirmed, so fewer round trips than tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_changes_no_output_and_saves_round_trips() {
    let fx = Fixture::new();
    let server = fx.server().await;
    // A prompt for which prompt lookup guesses right at least once on the greedy output
    // (on this tiny random model, found by running the lookup over reference outputs).
    use tandem_edge::draft::{Drafter, PromptLookup};
    let prompt = (0..200)
        .map(|i| fx.prompt(i))
        .find(|p| {
            let out = fx.reference(p, 24).output_ids;
            (1..out.len()).any(|t| {
                let mut ctx = p.clone();
                ctx.extend_from_slice(&out[..t]);
                PromptLookup::default().draft(&ctx, 1) == [out[t]]
            })
        })
        .expect("a prompt whose output prompt lookup can guess");
    let run = |drafts: usize, sampling: SamplingParams, stop: Vec<String>| {
        let mut cfg = fx
            .client(ServerList::single(server.ws_url()), 256)
            .config()
            .clone();
        cfg.max_draft_tokens = drafts;
        let client = EdgeClient::from_bundle(&fx.bundle, cfg).expect("client");
        let mut req = request(prompt.clone(), 24);
        req.sampling = sampling;
        req.stop = stop;
        async move {
            client
                .generate(req)
                .expect("generate")
                .finish()
                .await
                .expect("done")
        }
    };
    let seeded = SamplingParams {
        temperature: 0.8,
        seed: 11,
        ..SamplingParams::default()
    };
    let mut drafted = 0;
    let mut accepted = 0;
    for sampling in [SamplingParams::default(), seeded] {
        let off = run(0, sampling.clone(), Vec::new()).await;
        assert_eq!(off.wire.drafted_tokens, 0);
        let on = run(8, sampling.clone(), Vec::new()).await;
        assert_eq!(on.token_ids, off.token_ids, "{sampling:?}: tokens");
        assert_eq!(on.text, off.text, "{sampling:?}: text");
        assert_eq!(on.reason, off.reason, "{sampling:?}: reason");
        assert_eq!(on.usage, off.usage, "{sampling:?}: usage");
        drafted += on.wire.drafted_tokens;
        accepted += on.wire.accepted_drafts;
        if on.wire.accepted_drafts > 0 {
            assert!(
                on.wire.decode_rounds < off.wire.decode_rounds,
                "{sampling:?}: {:?} vs {:?}",
                on.wire,
                off.wire
            );
        }
        // A stop string taken from the middle of the output: it ends both runs at the same
        // place, whether it falls on a token that counts or inside a draft answer.
        let text = &off.text;
        if text.chars().count() > 12 {
            let start = text.char_indices().nth(8).map_or(0, |(i, _)| i);
            let end = text.char_indices().nth(11).map_or(text.len(), |(i, _)| i);
            let stop = vec![text[start..end].to_string()];
            let off_s = run(0, sampling.clone(), stop.clone()).await;
            let on_s = run(8, sampling.clone(), stop).await;
            assert_eq!(on_s.token_ids, off_s.token_ids, "{sampling:?}: stop tokens");
            assert_eq!(on_s.text, off_s.text, "{sampling:?}: stop text");
            assert_eq!(on_s.reason, off_s.reason);
        }
    }
    assert!(drafted > 0, "the device drafted");
    assert!(
        accepted > 0,
        "some drafts counted ({accepted} of {drafted})"
    );
    let plain = run(0, SamplingParams::default(), Vec::new()).await;
    server.shutdown().await;

    // An operator who turns speculation off (`--max-draft-tokens 0`): the cloud's cap is 0 in
    // every answer, so a device that would draft 8 drafts none, with the same output.
    let capped = server::start(ServerConfig {
        max_draft_tokens: 0,
        ..fx.server_config()
    })
    .await
    .expect("server");
    let mut cfg = fx
        .client(ServerList::single(capped.ws_url()), 256)
        .config()
        .clone();
    cfg.max_draft_tokens = 8;
    let client = EdgeClient::from_bundle(&fx.bundle, cfg).expect("client");
    let f = client
        .generate(request(prompt.clone(), 24))
        .expect("generate")
        .finish()
        .await
        .expect("done");
    assert_eq!(f.wire.drafted_tokens, 0, "the cloud's cap holds");
    assert_eq!(f.token_ids, plain.token_ids);
    capped.shutdown().await;
}
