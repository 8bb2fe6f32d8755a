//! `tandem`: the command-line front of Tandem.
//!
//! Subcommands so far:
//! - `tandem split`: cut a checkpoint into an edge part and a cloud part;
//! - `tandem generate`: run a split model in one process (edge then cloud), token by token;
//! - `tandem bench`: engine throughput;
//! - `tandem serve`: the cloud server devices connect to over WebSocket;
//! - `tandem admin`: tenants, API keys, quotas and device tokens on a running server;
//! - `tandem audit-privacy`: the privacy audit (docs/privacy.md).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tandem_model::checkpoint::{write_split_as, Checkpoint, EdgeWeights, SplitOptions};
use tandem_model::pipeline::{GenerateRequest, LocalSplit, LocalSplitOptions};
use tandem_model::weights::{dtype_user_name, parse_dtype};
use tandem_protocol::SamplingParams;

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "Split-inference serving for Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Cut a model into DIR/edge (embedding + layers [0,K)) and DIR/cloud (layers [K,n) + head).
    Split(SplitArgs),
    /// Generate text with the edge part and the cloud part run one after the other.
    Generate(GenerateArgs),
    /// Measure the cloud engine's throughput on a model (JSON on stdout).
    Bench(BenchArgs),
    /// Serve the cloud part to devices over WebSocket (ws://ADDR/v1/edge/ws).
    Serve(Box<ServeArgs>),
    /// The provider's administration of a running server: tenants, API keys, quotas,
    /// device tokens (over its /v1/admin routes).
    Admin(tandem_serve::admin_cli::AdminArgs),
    /// Play the server as an attacker: how much of a prompt the hidden states give away at
    /// each split depth, wire encoding and noise level, beside the quality cost.
    AuditPrivacy(Box<tandem_privacy::AuditArgs>),
    /// Write a random-weight bf16 checkpoint with the exact shapes of a real Llama model
    /// (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b), to measure the engine at real scale, or
    /// a tiny one (`tiny`) for device checks.
    RandomModel(RandomModelArgs),
    /// Check the cloud part on an accelerator (--device cuda) against the CPU on one model:
    /// logits, greedy tokens, batched against solo, and the engine end to end (JSON on
    /// stdout; exit status 1 when a check fails).
    DeviceCheck(DeviceCheckArgs),
}

#[derive(Args, Debug)]
struct DeviceCheckArgs {
    /// A whole model (HF directory or .gguf) or a split directory.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    edge_layers: Option<usize>,
    /// The device to check: cuda[:N] (cpu checks the CPU against itself).
    #[arg(long, default_value = "cuda")]
    device: tandem_model::device::DeviceName,
    /// The device's dtype: f32 (logits must agree within --tolerance) or bf16 (agreement
    /// reported, at least --min-agreement of the greedy tokens).
    #[arg(long, default_value = "f32")]
    dtype: tandem_model::weights::DtypeName,
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    #[arg(long, default_value_t = 32)]
    steps: usize,
    #[arg(long, default_value_t = 2e-3)]
    tolerance: f32,
    #[arg(long, default_value_t = 0.9)]
    min_agreement: f64,
}

#[derive(Args, Debug)]
struct RandomModelArgs {
    /// llama-3.2-1b, llama-3.2-3b, llama-3.1-8b or tiny.
    #[arg(long)]
    shape: String,
    /// Output directory (an HF model directory: config.json, model.safetensors, tokenizer).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep only the first N decoder layers (the same shapes per layer): enough to measure an
    /// edge part cut at k < N without writing the whole model.
    #[arg(long)]
    layers: Option<usize>,
    /// Replace an existing checkpoint in the output directory.
    #[arg(long)]
    force: bool,
}

/// Every setting is also read from the environment and from `--config FILE` (TOML, the same
/// names with underscores); a flag beats the environment, which beats the file, which beats
/// the default.
#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML file with settings (see `ServerConfig`).
    #[arg(long, env = "TANDEM_CONFIG")]
    config: Option<PathBuf>,
    /// Cloud checkpoint directory written by `tandem split` (OUT/cloud, or OUT).
    #[arg(long, env = "TANDEM_CLOUD")]
    cloud: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "TANDEM_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// The operator listener: /metrics, /readyz, /healthz and /v1/admin/... (HOST:PORT, or
    /// `off`) [default: 127.0.0.1:9091]. The public listener serves /metrics and /readyz only
    /// with the admin key.
    #[arg(long, env = "TANDEM_ADMIN_LISTEN")]
    admin_listen: Option<tandem_serve::server::AdminListen>,
    /// Redis URL for sessions shared between replicas (default: in memory).
    #[arg(long, env = "TANDEM_REDIS_URL")]
    redis: Option<String>,
    #[arg(long, env = "TANDEM_REDIS_KEY_PREFIX")]
    redis_key_prefix: Option<String>,
    /// This replica's name (a random suffix is added).
    #[arg(long, env = "TANDEM_REPLICA_ID")]
    replica_id: Option<String>,
    /// Weight dtype: auto (bf16 where the CPU has AMX or AVX512-BF16, else f32), f32
    /// [default], bf16 or f16; the KV cache follows it.
    #[arg(long, env = "TANDEM_DTYPE")]
    dtype: Option<tandem_model::weights::DtypeName>,
    /// Where the cloud layers and KV cache run: cpu [default] or cuda[:N] (a build with
    /// `--features cuda`; `--dtype auto` is bf16 there).
    #[arg(long, env = "TANDEM_DEVICE")]
    device: Option<tandem_model::device::DeviceName>,
    /// KV cache size as a block count (overrides --kv-cache-gib).
    #[arg(long, env = "TANDEM_KV_BLOCKS")]
    kv_blocks: Option<usize>,
    #[arg(long, env = "TANDEM_KV_CACHE_GIB")]
    kv_cache_gib: Option<f64>,
    #[arg(long, env = "TANDEM_BLOCK_SIZE")]
    block_size: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_BATCH_TOKENS")]
    max_batch_tokens: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_BATCH_SEQS")]
    max_batch_seqs: Option<usize>,
    /// decode-first or prefill-first.
    #[arg(long, env = "TANDEM_POLICY")]
    policy: Option<tandem_serve::server::PolicyName>,
    /// decode-first: a step with d decodes takes at most slack x (d + the step's fixed cost
    /// in rows) prompt positions, so prompts lengthen decode steps by about this fraction
    /// (default 0.5; `inf` lifts the cap).
    #[arg(long, env = "TANDEM_PREFILL_SLACK")]
    prefill_slack: Option<f64>,
    /// After a step, wait up to this long for devices that answered that fast before, so
    /// their decodes share the next step, or up to a step's fitted fixed cost when that is
    /// longer (at most 100 ms) (default 5; 0: never wait).
    #[arg(long, env = "TANDEM_DECODE_WAIT_MS")]
    decode_wait_ms: Option<f64>,
    /// Worker threads for connections, REST and the store (default: a quarter of the CPUs,
    /// at least 1; the engine's own threads take every core).
    #[arg(long, env = "TANDEM_IO_THREADS")]
    io_threads: Option<usize>,
    #[arg(long, env = "TANDEM_PREFIX_SHARING")]
    prefix_sharing: Option<bool>,
    #[arg(long, env = "TANDEM_MAX_SESSIONS")]
    max_sessions: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_QUEUED_TOKENS")]
    max_queued_tokens: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_PROMPT_TOKENS")]
    max_prompt_tokens: Option<usize>,
    /// MiB of hidden states kept for recompute above which new sessions get `overloaded`
    /// (default 1024).
    #[arg(long, env = "TANDEM_HIDDEN_STATE_BUDGET_MIB")]
    hidden_state_budget_mib: Option<f64>,
    #[arg(long, env = "TANDEM_MAX_TOKENS_CAP")]
    max_tokens_cap: Option<u32>,
    #[arg(long, env = "TANDEM_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_FRAMES_PER_SECOND")]
    max_frames_per_second: Option<u32>,
    #[arg(long, env = "TANDEM_OUTBOUND_QUEUE")]
    outbound_queue: Option<usize>,
    #[arg(long, env = "TANDEM_HEARTBEAT_TTL_MS")]
    heartbeat_ttl_ms: Option<u64>,
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
    #[arg(long, env = "TANDEM_RESUME_GRACE_MS")]
    resume_grace_ms: Option<u64>,
    /// Close a connected session that waits longer than this for its device (the prompt
    /// after Opened, or the answer to a token), with `idle_timeout` (default 30000).
    #[arg(long, env = "TANDEM_SESSION_IDLE_TIMEOUT_MS")]
    session_idle_timeout_ms: Option<u64>,
    /// Speculation: the most drafts the engine asks each device for per decode step, at most
    /// 16 (default 8; 0: the devices are told not to draft). Fewer while steps are
    /// compute-bound.
    #[arg(long, env = "TANDEM_MAX_DRAFT_TOKENS")]
    max_draft_tokens: Option<u8>,
    /// Open connections from one address to the public listener; more are closed at once
    /// (default 256).
    #[arg(long, env = "TANDEM_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,
    /// Open connections to the public listener in all (default 16384).
    #[arg(long, env = "TANDEM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    #[arg(long, env = "TANDEM_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: Option<u64>,
    /// Close a connection that has not sent a complete HTTP request head this long after
    /// connecting (or after its previous answer), before any upgrade (default 10000).
    #[arg(long, env = "TANDEM_HTTP_HEADER_TIMEOUT_MS")]
    http_header_timeout_ms: Option<u64>,
    /// Answer 408 and close the connection when a REST request's body has not arrived this
    /// long after its head (default 10000).
    #[arg(long, env = "TANDEM_HTTP_BODY_TIMEOUT_MS")]
    http_body_timeout_ms: Option<u64>,
    /// Whether opening a session needs a device token on the WebSocket upgrade: auto
    /// (default: when --device-token-key is set), always, never.
    #[arg(long, env = "TANDEM_OPEN_REQUIRES_CREDENTIAL")]
    open_requires_credential: Option<tandem_serve::server::CredentialMode>,
    /// Sessions one user (device token subject) may hold on this replica (default 16); more
    /// get `too_many_sessions`.
    #[arg(long, env = "TANDEM_MAX_SESSIONS_PER_USER")]
    max_sessions_per_user: Option<usize>,
    /// Sessions waiting for a Resume, not counted against --max-sessions (default 256).
    #[arg(long, env = "TANDEM_MAX_RESUME_GRACE_SESSIONS")]
    max_resume_grace_sessions: Option<usize>,
    /// The provider's admin key for /v1/admin/... (at least 16 characters; without one those
    /// routes answer 503). Prefer the environment or the file: flags show in `ps`.
    #[arg(long, env = "TANDEM_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<tandem_serve::server::config::Secret>,
    /// Signs device tokens (at least 32 characters; every replica needs the same). Without
    /// one, a random key: tokens then work on this process only.
    #[arg(long, env = "TANDEM_DEVICE_TOKEN_KEY", hide_env_values = true)]
    device_token_key: Option<tandem_serve::server::config::Secret>,
    /// The provider's system prompt, sent to devices with every inbox item.
    #[arg(
        long,
        env = "TANDEM_SYSTEM_PROMPT",
        conflicts_with = "system_prompt_file"
    )]
    system_prompt: Option<String>,
    /// Reads the provider's system prompt from a file.
    #[arg(long, env = "TANDEM_SYSTEM_PROMPT_FILE")]
    system_prompt_file: Option<PathBuf>,
    /// Requests per minute per partner tenant (default 600).
    #[arg(long, env = "TANDEM_PARTNER_REQUESTS_PER_MINUTE")]
    partner_requests_per_minute: Option<u32>,
    /// Requests per minute per device user (default 120).
    #[arg(long, env = "TANDEM_DEVICE_REQUESTS_PER_MINUTE")]
    device_requests_per_minute: Option<u32>,
    /// /readyz turns 503 while one engine step runs longer than this (default 30000).
    #[arg(long, env = "TANDEM_ENGINE_STALL_MS")]
    engine_stall_ms: Option<u64>,
    /// The ws:// URL devices use to reach this replica (told to devices that resume at
    /// another replica). Default: ws://LISTEN-ADDRESS/v1/edge/ws.
    #[arg(long, env = "TANDEM_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// PEM certificate chain: serve TLS (wss://, https://) on --listen. Re-read when the file
    /// changes (no restart for a renewal). Needs --tls-key.
    #[arg(long, env = "TANDEM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM certificate chain: serve TLS (https://) on --admin-listen. Re-read when the file
    /// changes. Needs --admin-tls-key. Default: plain HTTP (the listener is on loopback).
    #[arg(long, env = "TANDEM_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    admin_tls_cert: Option<PathBuf>,
    /// PEM private key of --admin-tls-cert.
    #[arg(long, env = "TANDEM_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// Send partner webhooks over plain http:// too (default: https:// only).
    #[arg(long, env = "TANDEM_WEBHOOK_ALLOW_HTTP")]
    webhook_allow_http: bool,
    /// A webhook target let through although internal: HOST[:PORT], IP[:PORT], [IPv6]:PORT
    /// or CIDR (repeatable; comma-separated in the environment). Default: none.
    #[arg(
        long = "webhook-allow-host",
        env = "TANDEM_WEBHOOK_ALLOW_HOST",
        value_delimiter = ','
    )]
    webhook_allow_host: Vec<String>,
    /// A PEM bundle of CAs trusted for https:// webhooks besides the public web roots.
    #[arg(long, env = "TANDEM_WEBHOOK_CA_CERT")]
    webhook_ca_cert: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// An HF model directory, a .gguf file, or a split directory.
    #[arg(long, env = "TANDEM_MODEL")]
    model: PathBuf,
    #[arg(long, default_value_t = 1)]
    edge_layers: usize,
    /// Session counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    sessions: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// decode-first or prefill-first.
    #[arg(long, default_value = "decode-first")]
    policy: String,
    #[arg(long, default_value_t = 256)]
    max_batch_tokens: usize,
    /// As `tandem serve --prefill-slack` (`inf`: no cap).
    #[arg(long, default_value_t = 0.5)]
    prefill_slack: f64,
    /// As `tandem serve --decode-wait-ms`. The simulated devices answer each token in
    /// rounds (all of them, then all the answers at once), so a wait longer than a round
    /// (e.g. 200) makes every decode step carry every session: the cloud step alone.
    #[arg(long, default_value_t = 5.0)]
    decode_wait_ms: f64,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// KV cache size in GiB (in the KV dtype, which follows --dtype).
    #[arg(long, default_value_t = 2.0)]
    kv_cache_gib: f64,
    /// Weight dtype: auto (bf16 where the CPU has AMX or AVX512-BF16, else f32), f32, bf16
    /// or f16; the KV cache follows it.
    #[arg(long, default_value = "f32")]
    dtype: tandem_model::weights::DtypeName,
    /// Where the cloud layers and KV cache run: cpu or cuda[:N] (a build with
    /// `--features cuda`; `--dtype auto` is bf16 there). The edge layers stay on the CPU.
    #[arg(long, default_value = "cpu")]
    device: tandem_model::device::DeviceName,
    /// Also measure the machine's memory bandwidth and the kernel's peak, and report each
    /// figure as a fraction of its roofline.
    #[arg(long)]
    roofline: bool,
    /// Mixed run: sessions decoding while prompts arrive (0 skips the run).
    #[arg(long, default_value_t = 16)]
    mixed_decoders: usize,
    /// Mixed run: prompts arriving.
    #[arg(long, default_value_t = 4)]
    mixed_prompts: usize,
    /// Mixed run: tokens per arriving prompt.
    #[arg(long, default_value_t = 512)]
    mixed_prompt_tokens: usize,
    /// Prefix run: sessions sharing one system prompt (0 skips the run).
    #[arg(long, default_value_t = 32)]
    prefix_sessions: usize,
    /// Prefix run: tokens of the shared system prompt.
    #[arg(long, default_value_t = 200)]
    prefix_tokens: usize,
}

#[derive(Args, Debug)]
struct SplitArgs {
    /// An HF model directory (config.json + *.safetensors) or a .gguf file.
    #[arg(long, env = "TANDEM_MODEL")]
    model: PathBuf,
    /// Number of decoder layers that run on the device.
    #[arg(long, env = "TANDEM_EDGE_LAYERS")]
    edge_layers: usize,
    /// Output directory; edge/ and cloud/ are created inside it.
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype of the parts: auto (bf16 where the CPU has AMX or AVX512-BF16, else
    /// f32), f32, f16 or bf16 (default: the source's; f32 for GGUF).
    #[arg(long)]
    dtype: Option<String>,
    /// A light edge part for devices: bf16, int8 (projections and embedding in int8, one
    /// scale per row) or q4-embed (int8 projections, the embedding in 4-bit blocks of 32).
    /// The cloud part is unchanged. Default: the edge like the cloud (--dtype).
    #[arg(long)]
    edge_dtype: Option<String>,
    /// Replace existing parts in the output directory.
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// An HF model directory, a .gguf file, or a directory written by `tandem split`.
    #[arg(long, env = "TANDEM_MODEL")]
    model: PathBuf,
    /// Decoder layers on the device (default 1 for a whole model; a split directory knows its own).
    #[arg(long, env = "TANDEM_EDGE_LAYERS")]
    edge_layers: Option<usize>,
    /// The user's prompt.
    #[arg(long)]
    prompt: String,
    /// A system message (needs --chat).
    #[arg(long)]
    system: Option<String>,
    /// Apply the model's chat template to the system and user messages.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop when the output contains this text (repeatable); the text is not shown.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Weight dtype: auto (bf16 where the CPU has AMX or AVX512-BF16, else f32), f32, f16 or
    /// bf16 (default: the checkpoint's; f32 for GGUF). bf16 runs on the bf16 kernels with f32
    /// activations.
    #[arg(long)]
    dtype: Option<String>,
    /// Where the cloud layers run: cpu [default] or cuda[:N] (a build with `--features
    /// cuda`; `--dtype auto` is bf16 there). The edge layers stay on the CPU.
    #[arg(long, default_value = "cpu")]
    device: tandem_model::device::DeviceName,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    // Logs go to stderr, filtered by RUST_LOG (default `warn`); TANDEM_LOG_FORMAT=json
    // writes one JSON object per line (for log collectors). `serve` also exports OTLP
    // traces and metrics when the OTEL_* variables ask (tandem_serve::telemetry).
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        tandem_serve::telemetry::init_logs();
    }
    let result = match cli.command {
        Command::Split(a) => split(a),
        Command::Generate(a) => generate(a),
        Command::Bench(a) => bench(a),
        Command::Serve(a) => serve(*a),
        Command::AuditPrivacy(a) => tandem_privacy::run_cli(*a),
        Command::RandomModel(a) => random_model(a),
        Command::DeviceCheck(a) => device_check(a),
        Command::Admin(a) => match tandem_serve::admin_cli::run(a) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn split(a: SplitArgs) -> Result<()> {
    let started = Instant::now();
    let ck =
        Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let dtype = match &a.dtype {
        Some(d) => parse_dtype(d)?,
        None => ck.stored_dtype,
    };
    let opts = SplitOptions {
        edge_layers: a.edge_layers,
        dtype,
        force: a.force,
        progress: !a.quiet,
    };
    let edge_weights = match &a.edge_dtype {
        Some(d) => d.parse::<EdgeWeights>().map_err(anyhow::Error::msg)?,
        None => EdgeWeights::AsSplit,
    };
    let (edge, cloud) = write_split_as(&ck, &a.out, &opts, edge_weights)?;
    eprintln!(
        "split {} at layer {} of {} ({}{}) in {:.1}s",
        a.model.display(),
        edge.edge_layers,
        edge.num_layers,
        dtype_user_name(dtype),
        edge.edge_weights
            .as_deref()
            .map(|w| format!(", edge {w}"))
            .unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    for (m, dir) in [(&edge, "edge"), (&cloud, "cloud")] {
        eprintln!(
            "  {}: layers [{}, {}), {} tensors, {:.1} MiB",
            a.out.join(dir).display(),
            m.layers[0],
            m.layers[1],
            m.weights.tensors,
            m.weights.bytes as f64 / (1024.0 * 1024.0)
        );
    }
    eprintln!("  pair id {}", edge.pair_id);
    Ok(())
}

fn device_check(a: DeviceCheckArgs) -> Result<()> {
    anyhow::ensure!(
        (1..=64).contains(&a.sessions) && (1..=1024).contains(&a.steps),
        "--sessions must be 1..=64 and --steps 1..=1024"
    );
    let plan = tandem_engine::devcheck::CheckPlan {
        device: a.device,
        dtype: a.device.resolve_dtype(a.dtype),
        sessions: a.sessions,
        steps: a.steps,
        tolerance: a.tolerance,
        min_agreement: a.min_agreement,
    };
    let report = tandem_engine::devcheck::run(&a.model, a.edge_layers, &plan)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report["passed"] != serde_json::Value::Bool(true) {
        anyhow::bail!("the device check failed (see the report above)");
    }
    Ok(())
}

fn random_model(a: RandomModelArgs) -> Result<()> {
    use tandem_model::random_model::{write, RealShape};
    let mut shape = RealShape::named(&a.shape)?.clone();
    if let Some(layers) = a.layers {
        anyhow::ensure!(
            (1..=shape.layers).contains(&layers),
            "--layers must be 1..={} for {}",
            shape.layers,
            shape.name
        );
        shape.layers = layers;
    }
    let shape = &shape;
    anyhow::ensure!(
        a.force || !a.out.join("model.safetensors").exists(),
        "{} already holds a checkpoint (--force replaces it)",
        a.out.display()
    );
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("writing {}", shape.name));
    let bytes = write(&a.out, shape, a.seed, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    eprintln!(
        "{}: {:.2} B parameters, {:.2} GiB of bf16 in {} ({:.1}s)",
        shape.name,
        shape.parameters() as f64 / 1e9,
        bytes as f64 / (1u64 << 30) as f64,
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        seed: a.seed,
        repetition_penalty: a.repetition_penalty,
    }
    .validate()?;
    let dtype = match a.dtype.as_deref() {
        Some(d) if d.eq_ignore_ascii_case("auto") => Some(a.device.auto_dtype()),
        Some(d) => Some(parse_dtype(d)?),
        None => None,
    };
    let load_started = Instant::now();
    let edge_layers = if tandem_model::checkpoint::is_split_dir(&a.model) {
        a.edge_layers
    } else {
        Some(a.edge_layers.unwrap_or(1))
    };
    let model = LocalSplit::load(
        &a.model,
        &LocalSplitOptions {
            edge_layers,
            dtype,
            device: a.device.open()?,
        },
    )
    .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = load_started.elapsed().as_secs_f64();
    let prompt_ids = model.prompt_ids(&a.prompt, a.system.as_deref(), a.chat)?;
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: a.max_tokens,
        sampling,
        stop_strings: a.stop.clone(),
        eos_ids: None,
    };
    let k = model.edge.split().edge_layers();
    let n = model.edge.split().num_layers();
    let stdout = std::io::stdout();
    let gen = if a.json {
        model.generate(&req, &mut |_| {})?
    } else {
        let mut lock = stdout.lock();
        let g = model.generate(&req, &mut |piece| {
            let _ = lock.write_all(piece.as_bytes());
            let _ = lock.flush();
        })?;
        let _ = writeln!(lock);
        let _ = lock.flush();
        g
    };
    let decode_tokens = gen.output_ids.len().saturating_sub(1);
    let decode_s = gen.total_s - gen.time_to_first_token_s;
    if a.json {
        let obj = serde_json::json!({
            "prompt_ids": gen.prompt_ids,
            "output_ids": gen.output_ids,
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "edge_layers": k,
            "num_layers": n,
            "load_s": load_s,
            "time_to_first_token_s": gen.time_to_first_token_s,
            "total_s": gen.total_s,
        });
        println!("{obj}");
    } else {
        eprintln!(
            "[edge layers {k}/{n}] {} prompt + {} output tokens, finish: {}, load {:.2}s, first token {:.2}s, {:.1} tokens/s after",
            gen.prompt_ids.len(),
            gen.output_ids.len(),
            gen.finish_reason,
            load_s,
            gen.time_to_first_token_s,
            if decode_s > 0.0 { decode_tokens as f64 / decode_s } else { 0.0 }
        );
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    use tandem_kvcache::KvLayout;
    use tandem_scheduler::{Policy, SchedulerConfig};
    let policy = match a.policy.as_str() {
        "decode-first" => Policy::DecodeFirst,
        "prefill-first" => Policy::PrefillFirst,
        other => anyhow::bail!("unknown policy `{other}` (decode-first or prefill-first)"),
    };
    let dtype = a.device.resolve_dtype(a.dtype);
    let load_started = Instant::now();
    let model = LocalSplit::load(
        &a.model,
        &LocalSplitOptions {
            edge_layers: Some(a.edge_layers),
            dtype: Some(dtype),
            device: a.device.open()?,
        },
    )
    .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = load_started.elapsed().as_secs_f64();
    let kv_dtype = tandem_serve::server::kv_dtype_for(dtype);
    let c = model.cloud.config();
    let range = model.cloud.split().cloud_range();
    let layout = KvLayout {
        first_layer: range.start,
        num_layers: range.len(),
        num_blocks: 0,
        block_size: a.block_size,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        dtype: kv_dtype,
    };
    let kv_blocks = layout.blocks_for_budget((a.kv_cache_gib * (1u64 << 30) as f64) as usize);
    let cfg = tandem_engine::EngineConfig {
        scheduler: SchedulerConfig {
            policy,
            max_batch_tokens: a.max_batch_tokens,
            max_batch_seqs: 256,
            max_sessions: 4096,
            max_queued_tokens: 1 << 20,
            max_context: c.max_position_embeddings,
            prefill_slack: Some(a.prefill_slack),
        },
        block_size: a.block_size,
        kv_blocks,
        kv_dtype,
        prefix_sharing: true,
        decode_wait: {
            anyhow::ensure!(
                a.decode_wait_ms.is_finite() && (0.0..=10_000.0).contains(&a.decode_wait_ms),
                "--decode-wait-ms must be within 0..=10000, got {}",
                a.decode_wait_ms
            );
            std::time::Duration::from_secs_f64(a.decode_wait_ms / 1000.0)
        },
        max_draft_tokens: tandem_engine::MAX_DRAFT_CAP,
    };
    let plan = tandem_engine::bench::BenchPlan {
        sessions: a.sessions,
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        prefill_tokens: a.prefill_tokens,
        mixed_decoders: a.mixed_decoders,
        mixed_prompts: a.mixed_prompts,
        mixed_prompt_tokens: a.mixed_prompt_tokens,
        prefix_sessions: a.prefix_sessions,
        prefix_tokens: a.prefix_tokens,
        roofline: a.roofline,
    };
    eprintln!(
        "loaded {} as {} in {load_s:.1}s ({:.0} MiB of cloud weights, resident {:.0} MiB)",
        a.model.display(),
        dtype_user_name(dtype),
        model.cloud.weight_bytes() as f64 / (1u64 << 20) as f64,
        tandem_engine::bench::memory_mib("VmRSS").unwrap_or(0.0)
    );
    let report = tandem_engine::bench::run(model, cfg, &plan)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

impl ServeArgs {
    /// The file's settings (or the defaults) with the flags and environment on top.
    fn into_config(self) -> Result<tandem_serve::server::ServerConfig> {
        let mut c = match &self.config {
            Some(path) => tandem_serve::server::ServerConfig::from_toml_file(path)?,
            None => tandem_serve::server::ServerConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            cloud,
            listen,
            admin_listen,
            redis_key_prefix,
            dtype,
            device,
            kv_cache_gib,
            block_size,
            max_batch_tokens,
            max_batch_seqs,
            policy,
            prefill_slack,
            decode_wait_ms,
            prefix_sharing,
            max_sessions,
            max_queued_tokens,
            max_prompt_tokens,
            hidden_state_budget_mib,
            max_tokens_cap,
            max_frame_bytes,
            max_frames_per_second,
            outbound_queue,
            heartbeat_ttl_ms,
            drain_timeout_ms,
            resume_grace_ms,
            session_idle_timeout_ms,
            max_draft_tokens,
            max_connections_per_ip,
            max_connections,
            handshake_timeout_ms,
            http_header_timeout_ms,
            http_body_timeout_ms,
            open_requires_credential,
            max_sessions_per_user,
            max_resume_grace_sessions,
            system_prompt,
            partner_requests_per_minute,
            device_requests_per_minute,
            engine_stall_ms
        );
        if let Some(path) = self.system_prompt_file {
            c.system_prompt = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the system prompt {}", path.display()))?;
        }
        if self.device_token_key.is_some() {
            c.device_token_key = self.device_token_key;
        }
        if self.redis.is_some() {
            c.redis = self.redis;
        }
        if self.kv_blocks.is_some() {
            c.kv_blocks = self.kv_blocks;
        }
        if self.io_threads.is_some() {
            c.io_threads = self.io_threads;
        }
        if self.advertise_url.is_some() {
            c.advertise_url = self.advertise_url;
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert;
            c.tls_key = self.tls_key;
        }
        if self.admin_tls_cert.is_some() {
            c.admin_tls_cert = self.admin_tls_cert;
            c.admin_tls_key = self.admin_tls_key;
        }
        if self.replica_id.is_some() {
            c.replica_id = self.replica_id;
        }
        if self.admin_key.is_some() {
            c.admin_key = self.admin_key;
        }
        c.webhook_allow_http |= self.webhook_allow_http;
        c.webhook_allow.extend(self.webhook_allow_host);
        if self.webhook_ca_cert.is_some() {
            c.webhook_ca_cert = self.webhook_ca_cert;
        }
        Ok(c)
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let cfg = a.into_config()?;
    // Checked here as well as in `server::start`: the runtime below is built from the config,
    // and tokio panics on zero workers where `check` gives a clear error.
    cfg.check()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            cfg.io_threads
                .unwrap_or_else(tandem_serve::server::default_io_threads),
        )
        .enable_all()
        .thread_name("tandem-io")
        .build()
        .context("starting the tokio runtime")?;
    let mut telemetry = {
        let _in_runtime = rt.enter();
        let plan = tandem_serve::telemetry::ExportPlan::from_env()?;
        tandem_serve::telemetry::init(plan)?
    };
    let result = rt.block_on(async move {
        let server = tandem_serve::server::start(cfg).await?;
        {
            // Scripts and tests read this line; logs go to stderr.
            let mut out = std::io::stdout().lock();
            // One write, so a reader that takes the first line and closes the pipe finds
            // both lines there already.
            let mut lines = format!("listening on {}\n", server.ws_url());
            if let Some(admin) = server.admin_url() {
                lines.push_str(&format!("admin on {admin}\n"));
            }
            out.write_all(lines.as_bytes())?;
            out.flush()?;
        }
        shutdown_signal().await;
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok(())
    });
    // Spans and metrics still buffered leave before the process ends.
    telemetry.shutdown();
    result
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
