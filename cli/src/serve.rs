//! `tandem serve`: the cloud server as a process. Settings come from flags, the environment
//! and `--config FILE`, in that order of precedence, over the defaults; the process prints
//! `listening on URL` (and `admin on URL`) on stdout, exports telemetry when the OTEL_*
//! variables ask, and drains on SIGINT or SIGTERM.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};
use serde::Serialize;
use tandem_serve::server::config::Secret;
use tandem_serve::server::{ServerConfig, ValidConfig};

/// Every setting is also read from the environment and from `--config FILE` (TOML, the same
/// names with underscores); a flag beats the environment, which beats the file, which beats
/// the default.
///
/// Each field is a `ServerConfig` field of the same name (`webhook_allow_host` is
/// `webhook_allow`), and its `env` is that setting's one variable: clap reads a flag or else
/// its variable with the flag's own parser, and what it read is the top layer over the file
/// and the defaults ([`ServerConfig::layered`]). Only the `TANDEM_*` variables named here
/// are read, so others (`TANDEM_LOG_FORMAT`, the tests' own) never reach the configuration.
#[derive(Args, Debug, Serialize)]
pub struct ServeArgs {
    /// TOML file with settings (see `ServerConfig`).
    #[arg(long, env = "TANDEM_CONFIG")]
    #[serde(skip)]
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
    #[serde(serialize_with = "expose")]
    pub admin_key: Option<Secret>,
    /// Signs device tokens (at least 32 characters; every replica needs the same). Without
    /// one, a random key: tokens then work on this process only.
    #[arg(long, env = "TANDEM_DEVICE_TOKEN_KEY", hide_env_values = true)]
    #[serde(serialize_with = "expose")]
    pub device_token_key: Option<Secret>,
    /// The provider's system prompt, sent to devices with every inbox item.
    #[arg(
        long,
        env = "TANDEM_SYSTEM_PROMPT",
        conflicts_with = "system_prompt_file"
    )]
    pub system_prompt: Option<String>,
    /// Reads the provider's system prompt from a file.
    #[arg(long, env = "TANDEM_SYSTEM_PROMPT_FILE")]
    #[serde(skip)]
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
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub webhook_allow_http: bool,
    /// A webhook target let through although internal: HOST[:PORT], IP[:PORT], [IPv6]:PORT
    /// or CIDR (repeatable; comma-separated in the environment). Default: none.
    #[arg(
        long = "webhook-allow-host",
        env = "TANDEM_WEBHOOK_ALLOW_HOST",
        value_delimiter = ','
    )]
    #[serde(rename = "webhook_allow")]
    pub webhook_allow_host: Vec<String>,
    /// A PEM bundle of CAs trusted for https:// webhooks besides the public web roots.
    #[arg(long, env = "TANDEM_WEBHOOK_CA_CERT")]
    pub webhook_ca_cert: Option<PathBuf>,
}

impl ServeArgs {
    /// The defaults, under the `--config` file, under the flags and variables given.
    fn into_config(mut self) -> Result<ServerConfig> {
        if let Some(path) = self.system_prompt_file.take() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the system prompt {}", path.display()))?;
            self.system_prompt = Some(text);
        }
        ServerConfig::layered(self.config.as_deref(), &self)
    }
}

/// The flags and variables given, as a figment layer: a setting left out (`None`) keeps the
/// file's value, `--webhook-allow-http` only turns it on, and `--webhook-allow-host` adds to
/// the file's list.
impl Provider for &ServeArgs {
    fn metadata(&self) -> Metadata {
        Metadata::named("`tandem serve` flags and TANDEM_* variables")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut given = Value::serialize(self)?
            .into_dict()
            .ok_or_else(|| figment::Error::from("the flags are not a map".to_owned()))?;
        given.retain(|_, v| !matches!(v, Value::Empty(..)));
        Ok(Profile::Default.collect(given))
    }
}

/// A key given as a flag or variable, as the text it is.
fn expose<S: serde::Serializer>(key: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    key.as_ref().map(Secret::expose).serialize(s)
}

pub fn serve(a: ServeArgs) -> Result<()> {
    // Checked before anything starts: the runtime below is built from the config, and tokio
    // panics on zero workers where `check` gives a clear error.
    let cfg: ValidConfig = a.into_config()?.check()?;
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

#[cfg(test)]
// figment's `Jail` and `extract` return its own error type (about 200 bytes); boxing it in
// the tests would only hide where a layering assertion failed.
#[allow(clippy::result_large_err)]
mod tests {
    use std::net::SocketAddr;

    use clap::Parser;
    use figment::Jail;
    use tandem_serve::server::PolicyName;

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: ServeArgs,
    }

    /// `tandem serve ARGV`'s configuration, in the jail's environment and directory.
    fn config(argv: &[&str]) -> figment::Result<ServerConfig> {
        let argv = std::iter::once("serve").chain(argv.iter().copied());
        let cmd = Cmd::try_parse_from(argv).map_err(|e| e.to_string())?;
        Ok(cmd.args.into_config().map_err(|e| format!("{e:#}"))?)
    }

    /// One setting of each kind: a number, an address, an enum, an optional.
    fn kinds(c: &ServerConfig) -> (usize, SocketAddr, PolicyName, Option<usize>) {
        (c.max_sessions, c.listen, c.policy, c.kv_blocks)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_flag_beats_the_environment_beats_the_file_beats_the_default() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            // Other parts' variables are not settings and do not get in the way.
            for other in [
                "TANDEM_LOG_FORMAT",
                "TANDEM_REQUIRE_REDIS",
                "TANDEM_UPDATE_OPENAPI",
            ] {
                jail.set_env(other, "1");
            }
            let d = ServerConfig::default();
            assert_eq!(kinds(&config(&[])?), kinds(&d));
            assert_eq!(kinds(&d), (1024, addr(8080), PolicyName::DecodeFirst, None));

            jail.create_file(
                "tandem.toml",
                "max_sessions = 11\nlisten = \"127.0.0.1:1111\"\npolicy = \"prefill-first\"\n\
                 kv_blocks = 111\nmax_batch_seqs = 7\nsystem_prompt = \"from the file\"\n\
                 webhook_allow = [\"10.0.0.1\"]\n",
            )?;
            let file = config(&["--config", "tandem.toml"])?;
            let from_file = (11, addr(1111), PolicyName::PrefillFirst, Some(111));
            assert_eq!(kinds(&file), from_file);
            assert_eq!(file.system_prompt, "from the file");

            jail.set_env("TANDEM_CONFIG", "tandem.toml");
            assert_eq!(
                kinds(&config(&[])?),
                from_file,
                "TANDEM_CONFIG names the file"
            );
            jail.set_env("TANDEM_MAX_SESSIONS", 22);
            jail.set_env("TANDEM_LISTEN", "127.0.0.1:2222");
            jail.set_env("TANDEM_POLICY", "decode-first");
            jail.set_env("TANDEM_KV_BLOCKS", 222);
            jail.set_env("TANDEM_PREFILL_SLACK", "inf");
            jail.set_env("TANDEM_ADMIN_KEY", "0123456789012345");
            let env = config(&[])?;
            assert_eq!(
                kinds(&env),
                (22, addr(2222), PolicyName::DecodeFirst, Some(222))
            );
            assert_eq!(env.prefill_slack, f64::INFINITY, "the flag's own parser");
            let key = env.admin_key.as_ref().map(Secret::expose);
            assert_eq!(key, Some("0123456789012345"), "digits stay text");
            assert_eq!(env.max_batch_seqs, 7, "what the environment leaves out");

            jail.create_file("prompt.txt", " from a file \n")?;
            let flags = config(&[
                "--max-sessions=33",
                "--listen=127.0.0.1:3333",
                "--policy=prefill-first",
                "--kv-blocks=333",
                "--system-prompt-file=prompt.txt",
                "--webhook-allow-http",
                "--webhook-allow-host=10.0.0.2",
            ])?;
            assert_eq!(
                kinds(&flags),
                (33, addr(3333), PolicyName::PrefillFirst, Some(333))
            );
            assert_eq!(flags.system_prompt, " from a file \n");
            assert!(flags.webhook_allow_http);
            assert_eq!(
                flags.webhook_allow,
                ["10.0.0.1", "10.0.0.2"],
                "flags add to the file's"
            );
            assert_eq!(flags.max_batch_seqs, 7, "what the flags leave out");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_naming_the_file() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("typo.toml", "max_session = 3\n")?;
            let e = config(&["--config", "typo.toml"]).expect_err("unknown key");
            let e = e.to_string();
            assert!(e.contains("max_session") && e.contains("typo.toml"), "{e}");
            let missing = config(&["--config", "absent.toml"]).expect_err("no file");
            assert!(
                missing.to_string().contains("reading absent.toml"),
                "{missing}"
            );
            Ok(())
        });
    }
}
