//! `tandem serve`: the cloud server as a process. Settings come from flags, the environment
//! and `--config FILE`, in that order of precedence, over the defaults; the process prints
//! `listening on URL` (and `admin on URL`) on stdout, exports telemetry when the OTEL_*
//! variables ask, and drains on SIGINT or SIGTERM.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

/// Every setting is also read from the environment and from `--config FILE` (TOML, the same
/// names with underscores); a flag beats the environment, which beats the file, which beats
/// the default.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML file with settings (see `ServerConfig`).
    #[arg(long, env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Cloud checkpoint directory written by `tandem split` (OUT/cloud, or OUT).
    #[arg(long, env = "TANDEM_CLOUD")]
    pub cloud: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "TANDEM_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// The operator listener: /metrics, /readyz, /healthz and /v1/admin/... (HOST:PORT, or
    /// `off`) [default: 127.0.0.1:9091]. The public listener serves /metrics and /readyz only
    /// with the admin key.
    #[arg(long, env = "TANDEM_ADMIN_LISTEN")]
    pub admin_listen: Option<tandem_serve::server::AdminListen>,
    /// Redis URL for sessions shared between replicas (default: in memory).
    #[arg(long, env = "TANDEM_REDIS_URL")]
    pub redis: Option<String>,
    #[arg(long, env = "TANDEM_REDIS_KEY_PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// This replica's name (a random suffix is added).
    #[arg(long, env = "TANDEM_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Weight dtype: auto (bf16 where the CPU has AMX or AVX512-BF16, else f32), f32
    /// [default], bf16 or f16; the KV cache follows it.
    #[arg(long, env = "TANDEM_DTYPE")]
    pub dtype: Option<tandem_model::weights::DtypeName>,
    /// Where the cloud layers and KV cache run: cpu [default] or cuda[:N] (a build with
    /// `--features cuda`; `--dtype auto` is bf16 there).
    #[arg(long, env = "TANDEM_DEVICE")]
    pub device: Option<tandem_model::device::DeviceName>,
    /// KV cache size as a block count (overrides --kv-cache-gib).
    #[arg(long, env = "TANDEM_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,
    #[arg(long, env = "TANDEM_KV_CACHE_GIB")]
    pub kv_cache_gib: Option<f64>,
    #[arg(long, env = "TANDEM_BLOCK_SIZE")]
    pub block_size: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_BATCH_SEQS")]
    pub max_batch_seqs: Option<usize>,
    /// decode-first or prefill-first.
    #[arg(long, env = "TANDEM_POLICY")]
    pub policy: Option<tandem_serve::server::PolicyName>,
    /// decode-first: a step with d decodes takes at most slack x (d + the step's fixed cost
    /// in rows) prompt positions, so prompts lengthen decode steps by about this fraction
    /// (default 0.5; `inf` lifts the cap).
    #[arg(long, env = "TANDEM_PREFILL_SLACK")]
    pub prefill_slack: Option<f64>,
    /// After a step, wait up to this long for devices that answered that fast before, so
    /// their decodes share the next step, or up to a step's fitted fixed cost when that is
    /// longer (at most 100 ms) (default 5; 0: never wait).
    #[arg(long, env = "TANDEM_DECODE_WAIT_MS")]
    pub decode_wait_ms: Option<f64>,
    /// Worker threads for connections, REST and the store (default: a quarter of the CPUs,
    /// at least 1; the engine's own threads take every core).
    #[arg(long, env = "TANDEM_IO_THREADS")]
    pub io_threads: Option<usize>,
    #[arg(long, env = "TANDEM_PREFIX_SHARING")]
    pub prefix_sharing: Option<bool>,
    #[arg(long, env = "TANDEM_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_QUEUED_TOKENS")]
    pub max_queued_tokens: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// MiB of hidden states kept for recompute above which new sessions get `overloaded`
    /// (default 1024).
    #[arg(long, env = "TANDEM_HIDDEN_STATE_BUDGET_MIB")]
    pub hidden_state_budget_mib: Option<f64>,
    #[arg(long, env = "TANDEM_MAX_TOKENS_CAP")]
    pub max_tokens_cap: Option<u32>,
    #[arg(long, env = "TANDEM_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    #[arg(long, env = "TANDEM_MAX_FRAMES_PER_SECOND")]
    pub max_frames_per_second: Option<u32>,
    #[arg(long, env = "TANDEM_OUTBOUND_QUEUE")]
    pub outbound_queue: Option<usize>,
    #[arg(long, env = "TANDEM_HEARTBEAT_TTL_MS")]
    pub heartbeat_ttl_ms: Option<u64>,
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,
    #[arg(long, env = "TANDEM_RESUME_GRACE_MS")]
    pub resume_grace_ms: Option<u64>,
    /// Close a connected session that waits longer than this for its device (the prompt
    /// after Opened, or the answer to a token), with `idle_timeout` (default 30000).
    #[arg(long, env = "TANDEM_SESSION_IDLE_TIMEOUT_MS")]
    pub session_idle_timeout_ms: Option<u64>,
    /// Speculation: the most drafts the engine asks each device for per decode step, at most
    /// 16 (default 8; 0: the devices are told not to draft). Fewer while steps are
    /// compute-bound.
    #[arg(long, env = "TANDEM_MAX_DRAFT_TOKENS")]
    pub max_draft_tokens: Option<u8>,
    /// Open connections from one address to the public listener; more are closed at once
    /// (default 256).
    #[arg(long, env = "TANDEM_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Open connections to the public listener in all (default 16384).
    #[arg(long, env = "TANDEM_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    #[arg(long, env = "TANDEM_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Close a connection that has not sent a complete HTTP request head this long after
    /// connecting (or after its previous answer), before any upgrade (default 10000).
    #[arg(long, env = "TANDEM_HTTP_HEADER_TIMEOUT_MS")]
    pub http_header_timeout_ms: Option<u64>,
    /// Answer 408 and close the connection when a REST request's body has not arrived this
    /// long after its head (default 10000).
    #[arg(long, env = "TANDEM_HTTP_BODY_TIMEOUT_MS")]
    pub http_body_timeout_ms: Option<u64>,
    /// Whether opening a session needs a device token on the WebSocket upgrade: auto
    /// (default: when --device-token-key is set), always, never.
    #[arg(long, env = "TANDEM_OPEN_REQUIRES_CREDENTIAL")]
    pub open_requires_credential: Option<tandem_serve::server::CredentialMode>,
    /// Sessions one user (device token subject) may hold on this replica (default 16); more
    /// get `too_many_sessions`.
    #[arg(long, env = "TANDEM_MAX_SESSIONS_PER_USER")]
    pub max_sessions_per_user: Option<usize>,
    /// Sessions waiting for a Resume, not counted against --max-sessions (default 256).
    #[arg(long, env = "TANDEM_MAX_RESUME_GRACE_SESSIONS")]
    pub max_resume_grace_sessions: Option<usize>,
    /// The provider's admin key for /v1/admin/... (at least 16 characters; without one those
    /// routes answer 503). Prefer the environment or the file: flags show in `ps`.
    #[arg(long, env = "TANDEM_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<tandem_serve::server::config::Secret>,
    /// Signs device tokens (at least 32 characters; every replica needs the same). Without
    /// one, a random key: tokens then work on this process only.
    #[arg(long, env = "TANDEM_DEVICE_TOKEN_KEY", hide_env_values = true)]
    pub device_token_key: Option<tandem_serve::server::config::Secret>,
    /// The provider's system prompt, sent to devices with every inbox item.
    #[arg(
        long,
        env = "TANDEM_SYSTEM_PROMPT",
        conflicts_with = "system_prompt_file"
    )]
    pub system_prompt: Option<String>,
    /// Reads the provider's system prompt from a file.
    #[arg(long, env = "TANDEM_SYSTEM_PROMPT_FILE")]
    pub system_prompt_file: Option<PathBuf>,
    /// Requests per minute per partner tenant (default 600).
    #[arg(long, env = "TANDEM_PARTNER_REQUESTS_PER_MINUTE")]
    pub partner_requests_per_minute: Option<u32>,
    /// Requests per minute per device user (default 120).
    #[arg(long, env = "TANDEM_DEVICE_REQUESTS_PER_MINUTE")]
    pub device_requests_per_minute: Option<u32>,
    /// /readyz turns 503 while one engine step runs longer than this (default 30000).
    #[arg(long, env = "TANDEM_ENGINE_STALL_MS")]
    pub engine_stall_ms: Option<u64>,
    /// The ws:// URL devices use to reach this replica (told to devices that resume at
    /// another replica). Default: ws://LISTEN-ADDRESS/v1/edge/ws.
    #[arg(long, env = "TANDEM_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// PEM certificate chain: serve TLS (wss://, https://) on --listen. Re-read when the file
    /// changes (no restart for a renewal). Needs --tls-key.
    #[arg(long, env = "TANDEM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate chain: serve TLS (https://) on --admin-listen. Re-read when the file
    /// changes. Needs --admin-tls-key. Default: plain HTTP (the listener is on loopback).
    #[arg(long, env = "TANDEM_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of --admin-tls-cert.
    #[arg(long, env = "TANDEM_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
    /// Send partner webhooks over plain http:// too (default: https:// only).
    #[arg(long, env = "TANDEM_WEBHOOK_ALLOW_HTTP")]
    pub webhook_allow_http: bool,
    /// A webhook target let through although internal: HOST[:PORT], IP[:PORT], [IPv6]:PORT
    /// or CIDR (repeatable; comma-separated in the environment). Default: none.
    #[arg(
        long = "webhook-allow-host",
        env = "TANDEM_WEBHOOK_ALLOW_HOST",
        value_delimiter = ','
    )]
    pub webhook_allow_host: Vec<String>,
    /// A PEM bundle of CAs trusted for https:// webhooks besides the public web roots.
    #[arg(long, env = "TANDEM_WEBHOOK_CA_CERT")]
    pub webhook_ca_cert: Option<PathBuf>,
}

impl ServeArgs {
    /// The file's settings (or the defaults) with the flags and environment on top.
    fn into_config(self) -> Result<tandem_serve::server::ServerConfig> {
        let mut c = match &self.config {
            Some(path) => tandem_serve::server::ServerConfig::from_toml_file(path)?,
            None => tandem_serve::server::ServerConfig::default(),
        };
        // A flag or variable given replaces the file's value; `set_some!` is for settings
        // that are optional in the config too.
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        macro_rules! set_some {
            ($($field:ident),*) => { $( if self.$field.is_some() { c.$field = self.$field; } )* };
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
        set_some!(
            device_token_key,
            redis,
            kv_blocks,
            io_threads,
            advertise_url,
            replica_id,
            admin_key,
            webhook_ca_cert
        );
        if let Some(path) = self.system_prompt_file {
            c.system_prompt = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the system prompt {}", path.display()))?;
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert;
            c.tls_key = self.tls_key;
        }
        if self.admin_tls_cert.is_some() {
            c.admin_tls_cert = self.admin_tls_cert;
            c.admin_tls_key = self.admin_tls_key;
        }
        c.webhook_allow_http |= self.webhook_allow_http;
        c.webhook_allow.extend(self.webhook_allow_host);
        Ok(c)
    }
}

pub fn serve(a: ServeArgs) -> Result<()> {
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
