//! [`ServerConfig`]: everything `tandem serve` can be told, with defaults, read in layers
//! ([`ServerConfig::layered`], figment): the defaults, a TOML file, then what `tandem serve`'s
//! flags and environment variables give (`cli/src/serve.rs`).
//!
//! Invariant: a `ServerConfig` may hold any values; [`ServerConfig::check`] is the one place
//! that refuses nonsense (zero limits, a bad replica id), and the [`ValidConfig`] it returns
//! is the only configuration `server::start` runs on (`check`, in `config/check.rs`).

mod check;
pub use check::ValidConfig;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use tandem_scheduler::Policy;

/// The batching policy, as configuration spells it (`decode-first`, `prefill-first`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// Decodes first, prompt chunks in the rest of the token budget (stall-free batching).
    #[default]
    DecodeFirst,
    /// Prompt chunks first (the classic baseline).
    PrefillFirst,
}

impl PolicyName {
    pub fn policy(self) -> Policy {
        match self {
            Self::DecodeFirst => Policy::DecodeFirst,
            Self::PrefillFirst => Policy::PrefillFirst,
        }
    }
}

impl std::str::FromStr for PolicyName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "decode-first" => Ok(Self::DecodeFirst),
            "prefill-first" => Ok(Self::PrefillFirst),
            other => Err(format!(
                "unknown policy `{other}` (decode-first or prefill-first)"
            )),
        }
    }
}

/// How `tandem serve` runs. `Default` gives a usable single-process server once `cloud` is
/// set; the TOML file uses the same field names.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The cloud checkpoint directory written by `tandem split` (`OUT/cloud`), or `OUT`.
    pub cloud: PathBuf,
    /// Where to listen (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// The operator listener: `/metrics`, `/readyz`, `/healthz` and the `/v1/admin/...`
    /// routes (default [`DEFAULT_ADMIN_LISTEN`], loopback; `off` turns it off). The public
    /// listener serves `/metrics` and `/readyz` only to a caller with the admin key.
    pub admin_listen: AdminListen,
    /// `redis://…` to share sessions between replicas; `None` keeps them in memory.
    pub redis: Option<String>,
    /// This process's replica name; `None` generates `tandem-XXXXXXXX`. A set id gets a random
    /// suffix too: a restarted process lost its KV and must not pass for its former self.
    pub replica_id: Option<String>,
    /// Prefix of every Redis key.
    pub redis_key_prefix: String,
    /// The weights' dtype: `f32` (the default), `bf16` (the bf16 kernels: AMX or
    /// AVX512-BF16 where the CPU has them), `f16`, or `auto` (bf16 where the CPU has bf16
    /// units, else f32). The KV cache is stored in the same dtype.
    pub dtype: tandem_model::weights::DtypeName,
    /// Where the cloud layers and the KV cache live: `cpu` (the default) or `cuda[:N]` (a
    /// build with the `cuda` feature; bf16 or f32 weights, `auto` is bf16 there).
    pub device: tandem_model::device::DeviceName,
    /// KV cache size in GiB (in the KV dtype), allocated at start.
    pub kv_cache_gib: f64,
    /// KV cache size as a block count; overrides `kv_cache_gib` when set.
    pub kv_blocks: Option<usize>,
    /// Positions per KV block.
    pub block_size: usize,
    /// Positions computed per engine step, over all sessions.
    pub max_batch_tokens: usize,
    /// Sessions per engine step.
    pub max_batch_seqs: usize,
    pub policy: PolicyName,
    /// Under decode-first, a step with `d` decodes takes at most
    /// `slack * (d + the step's fixed cost in rows)` prompt positions, so prompts lengthen the
    /// decoders' steps by about this fraction. `inf` lifts the cap.
    pub prefill_slack: f64,
    /// Milliseconds the engine waits after a step for devices that answered that fast before,
    /// so their decodes share the next step; when a step's fitted fixed cost is longer, the
    /// engine waits up to that instead (at most 100 ms). 0: never wait.
    pub decode_wait_ms: f64,
    /// Share the KV of identical prompt prefixes between sessions.
    pub prefix_sharing: bool,
    /// Live engine sessions; more get `overloaded`.
    pub max_sessions: usize,
    /// Hidden states received and not yet computed, over all sessions; more get `overloaded`.
    pub max_queued_tokens: usize,
    /// MiB of hidden states the engine may hold for recompute (every position a session
    /// sent, `hidden_size × 4` bytes each, until its generation ends) before new sessions get
    /// `overloaded`; checked at admission, so admitted sessions finish.
    pub hidden_state_budget_mib: f64,
    /// Longest prompt (positions before the first token); longer gets
    /// `context_length_exceeded`.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` an `Open` may ask for; more gets `bad_sampling_params`.
    pub max_tokens_cap: u32,
    /// Largest frame accepted; larger gets `frame_too_large`.
    pub max_frame_bytes: usize,
    /// Frames a connection may send per second; more gets `rate_limited`.
    pub max_frames_per_second: u32,
    /// Frames buffered towards one device; a device that lets it fill loses its connection.
    pub outbound_queue: usize,
    /// How long this replica's heartbeat lives in the store (it is renewed every third of it).
    pub heartbeat_ttl_ms: u64,
    /// How long a graceful shutdown lets running generations finish.
    pub drain_timeout_ms: u64,
    /// How long a session whose connection dropped keeps its KV, waiting for `Resume`.
    pub resume_grace_ms: u64,
    /// A connected session that waits this long for its device (the prompt after `Opened`,
    /// or the answer to its last token) is closed with `idle_timeout`, freeing its slot.
    pub session_idle_timeout_ms: u64,
    /// Speculation: the most drafts the engine asks each device for per decode step
    /// (`Token::draft_cap`), at most 16; 0 tells devices not to draft.
    pub max_draft_tokens: u8,
    /// Open connections to the public listener from one address (IPv4-mapped IPv6 counts as
    /// IPv4); more are closed at once. Devices behind one carrier NAT share an address: size
    /// it for the busiest such address.
    pub max_connections_per_ip: usize,
    /// Open connections to the public listener in all; keep it under the process's
    /// descriptor limit (`ulimit -n`) with room for Redis, the store and the operator listener.
    pub max_connections: usize,
    /// How long a new connection may take to send `Open` or `Resume`.
    pub handshake_timeout_ms: u64,
    /// How long a client may take to send a complete HTTP request head (from the connection,
    /// or from the previous answer on a kept-alive one); slower or silent connections are
    /// closed, before any upgrade.
    pub http_header_timeout_ms: u64,
    /// How long a REST request's body (at most 64 KiB) may take to arrive once its head has;
    /// a slower one is answered 408 `request_timeout` and its connection closed.
    pub http_body_timeout_ms: u64,
    /// Whether opening a WebSocket session needs a device token (`Authorization: Bearer
    /// tdv_…` on the upgrade): `auto` (the default) when `device_token_key` is set,
    /// `always`, or `never`.
    pub open_requires_credential: CredentialMode,
    /// Sessions one user (a device token's subject) may hold on this replica, connected or
    /// waiting for `Resume`; more get `too_many_sessions`.
    pub max_sessions_per_user: usize,
    /// Sessions waiting for `Resume` after their connection dropped; they do not count
    /// against `max_sessions`. A session whose connection drops while this many wait ends
    /// at once.
    pub max_resume_grace_sessions: usize,
    /// The provider's admin key for the `/v1/admin/...` routes (at least
    /// [`MIN_ADMIN_KEY_LEN`] characters); `None` turns those routes off (503
    /// `admin_disabled`). `Debug` never shows it.
    pub admin_key: Option<Secret>,
    /// Signs device tokens (at least 32 characters); every replica needs the same one.
    /// `None` draws a random key at start: tokens then work on this process only.
    pub device_token_key: Option<Secret>,
    /// The provider's system prompt, delivered to devices with every inbox item and never
    /// returned to partners.
    pub system_prompt: String,
    /// Requests per minute per partner tenant, over all partner routes.
    pub partner_requests_per_minute: u32,
    /// Requests per minute per user, over all device routes.
    pub device_requests_per_minute: u32,
    /// `/readyz` answers 503 while one engine step has run longer than this.
    pub engine_stall_ms: u64,
    /// The WebSocket URL devices use to reach this replica, which other replicas give a
    /// device that resumes in the wrong place (`moved`). `None`: `ws://{bound address}/v1/edge/ws`,
    /// right on one host; behind a cluster network set it (e.g. from the pod IP).
    pub advertise_url: Option<String>,
    /// Worker threads of the async runtime that runs the connections, REST and the store
    /// (`tandem serve` only; tests bring their own runtime). `None`: [`default_io_threads`].
    pub io_threads: Option<usize>,
    /// PEM certificate chain for TLS on the listener (`wss://`, `https://`); needs `tls_key`.
    /// Re-read when the file changes. `None` with `tls_key` `None`: plain TCP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM certificate chain for TLS on the operator listener (`admin_listen`); needs
    /// `admin_tls_key`. Re-read when the file changes, as `tls_cert`. `None`: plain TCP.
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of `admin_tls_cert`.
    pub admin_tls_key: Option<PathBuf>,
    /// Send partner webhooks over plain `http://` too (default: `https://` only).
    pub webhook_allow_http: bool,
    /// Webhook targets let through although internal: `HOST[:PORT]` (every address the name
    /// resolves to), `IP[:PORT]`, `[IPv6]:PORT` or a CIDR. Empty by default: nothing
    /// loopback, private, link-local or otherwise non-public is sent to.
    pub webhook_allow: Vec<String>,
    /// A PEM bundle of certificate authorities trusted for `https://` webhooks besides the
    /// web's public roots (a private PKI). `None`: the public roots only.
    pub webhook_ca_cert: Option<PathBuf>,
}

/// The async runtime's workers when `io_threads` is not set: a quarter of the CPUs, at least
/// one. The engine's matmul team already takes every core, and the runtime's work is short
/// bursts after each step (64 tokens out, 64 hidden states in); every extra worker adds
/// wake-ups and sleeps to each burst. On the 2-core machine one worker instead of two cut
/// the I/O threads' CPU at 64 decoding devices by about 10% (`docs/performance.md`).
pub fn default_io_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / 4).max(1)
}

/// The provider system prompt when none is configured.
pub const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful assistant. Answer briefly and concretely.";

/// The longest provider system prompt, in bytes.
pub const MAX_SYSTEM_PROMPT_BYTES: usize = 16 * 1024;

/// The shortest admin key accepted.
pub const MIN_ADMIN_KEY_LEN: usize = 16;

/// Where the operator listener binds by default: loopback, so `/metrics`, `/readyz` and the
/// admin routes are not on the internet unless the operator puts them there.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9091);

/// The operator listener's address, or `off` (configuration and `--admin-listen` spell it
/// `HOST:PORT` or `off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminListen {
    /// No operator listener: `/metrics` and `/readyz` only behind the admin key on the
    /// public listener.
    Off,
    /// Listen here (port 0 picks a free port).
    On(SocketAddr),
}

impl AdminListen {
    /// The address to bind, if any.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Self::Off => None,
            Self::On(a) => Some(a),
        }
    }
}

impl Default for AdminListen {
    fn default() -> Self {
        Self::On(DEFAULT_ADMIN_LISTEN)
    }
}

impl std::str::FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none") {
            return Ok(Self::Off);
        }
        s.parse::<SocketAddr>().map(Self::On).map_err(|_| {
            format!("admin_listen `{s}`: expected HOST:PORT (an IP address and a port) or `off`")
        })
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// As configuration spells it: `HOST:PORT` or `off`.
impl Serialize for AdminListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Off => s.serialize_str("off"),
            Self::On(a) => s.collect_str(a),
        }
    }
}

/// Whether opening a session needs a credential (`auto`, `always`, `never`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialMode {
    /// Required when a device-token key is configured (tokens then verify on every replica).
    #[default]
    Auto,
    Always,
    /// Anonymous sessions allowed (a token, when sent, is still checked).
    Never,
}

impl std::str::FromStr for CredentialMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            other => Err(format!(
                "open_requires_credential `{other}`: expected auto, always or never"
            )),
        }
    }
}

/// A configured secret: readable with [`Secret::expose`], redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            cloud: PathBuf::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: AdminListen::default(),
            redis: None,
            replica_id: None,
            redis_key_prefix: "tandem".to_owned(),
            dtype: tandem_model::weights::DtypeName::F32,
            device: tandem_model::device::DeviceName::Cpu,
            kv_cache_gib: 1.0,
            kv_blocks: None,
            block_size: 16,
            max_batch_tokens: 256,
            max_batch_seqs: 64,
            policy: PolicyName::DecodeFirst,
            prefill_slack: 0.5,
            decode_wait_ms: 5.0,
            prefix_sharing: true,
            max_sessions: 1024,
            max_queued_tokens: 64 * 1024,
            hidden_state_budget_mib: 1024.0,
            max_prompt_tokens: 8192,
            max_tokens_cap: 4096,
            max_frame_bytes: tandem_protocol::wire::DEFAULT_MAX_FRAME_BYTES,
            max_frames_per_second: 200,
            outbound_queue: 256,
            heartbeat_ttl_ms: 10_000,
            drain_timeout_ms: 30_000,
            resume_grace_ms: 60_000,
            session_idle_timeout_ms: 30_000,
            max_draft_tokens: tandem_engine::MAX_DRAFT_CAP,
            max_connections_per_ip: 256,
            max_connections: 16_384,
            handshake_timeout_ms: 30_000,
            http_header_timeout_ms: 10_000,
            http_body_timeout_ms: 10_000,
            open_requires_credential: CredentialMode::Auto,
            max_sessions_per_user: 16,
            max_resume_grace_sessions: 256,
            admin_key: None,
            device_token_key: None,
            system_prompt: DEFAULT_SYSTEM_PROMPT.to_owned(),
            partner_requests_per_minute: 600,
            device_requests_per_minute: 120,
            engine_stall_ms: 30_000,
            advertise_url: None,
            io_threads: None,
            tls_cert: None,
            tls_key: None,
            admin_tls_cert: None,
            admin_tls_key: None,
            webhook_allow_http: false,
            webhook_allow: Vec::new(),
            webhook_ca_cert: None,
        }
    }
}

/// The `--config` file's layer: its text, read already, named by its path in errors (as
/// figment's `Toml::file` names it, with the key as written in the file).
struct TomlFile<'a> {
    path: &'a Path,
    text: String,
}

impl Provider for TomlFile<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::from("TOML file", self.path).interpolater(|_, keys| keys.join("."))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(&self.text).data()
    }
}

impl ServerConfig {
    /// The certificate files, when TLS is configured.
    pub fn tls_files(&self) -> Option<super::tls::TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(super::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    /// The operator listener's certificate files, when its TLS is configured.
    pub fn admin_tls_files(&self) -> Option<super::tls::TlsFiles> {
        match (&self.admin_tls_cert, &self.admin_tls_key) {
            (Some(cert), Some(key)) => Some(super::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    /// The settings in layers (figment), extracted once: the defaults, then the TOML `file`
    /// when one is given, then `over` (`tandem serve`'s flags and environment variables):
    /// `over`'s values replace the file's and its lists extend the file's lists. A key the
    /// file has and `ServerConfig` lacks is an error naming the file.
    pub fn layered(file: Option<&Path>, over: impl Provider) -> anyhow::Result<Self> {
        let mut layers = Figment::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            layers = layers.merge(TomlFile { path, text });
        }
        layers
            .admerge(over)
            .extract()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn from_toml_file(path: &Path) -> anyhow::Result<Self> {
        Self::layered(Some(path), Figment::new())
    }

    /// Parses TOML text; fields it leaves out keep their defaults.
    pub fn from_toml_str(text: &str) -> anyhow::Result<Self> {
        Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The configuration parser's fuzz property (`serve/fuzz`, target `config_parse`; its
    /// committed seeds run in `cargo test`): any bytes either fail to parse or give a
    /// configuration whose [`Self::check`] answers, and every configuration that passes the
    /// check yields every value the server derives from it (durations, the webhook policy,
    /// the TLS files, the byte budgets) without a panic.
    #[doc(hidden)]
    pub fn fuzz_property(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(cfg) = Self::from_toml_str(text) else {
            return;
        };
        let Ok(cfg) = cfg.check() else {
            return;
        };
        let _ = cfg.webhook_policy();
        let _ = (
            cfg.tls_files(),
            cfg.admin_tls_files(),
            cfg.credential_required(),
        );
        let _ = [
            cfg.drain_timeout(),
            cfg.resume_grace(),
            cfg.session_idle_timeout(),
            cfg.heartbeat_ttl(),
            cfg.handshake_timeout(),
            cfg.http_header_timeout(),
            cfg.http_body_timeout(),
            Duration::from_secs_f64(cfg.decode_wait_ms / 1000.0),
        ];
        let _ = (cfg.kv_cache_gib * (1u64 << 30) as f64) as usize;
        let _ = (cfg.hidden_state_budget_mib * f64::from(1u32 << 20)) as u64;
        let _ = cfg.policy.policy();
        let _ = cfg.admin_listen.addr();
    }

    /// Where partner webhooks may go.
    pub fn webhook_policy(&self) -> anyhow::Result<crate::rest::webhook_target::WebhookPolicy> {
        crate::rest::webhook_target::WebhookPolicy::new(
            self.webhook_allow_http,
            &self.webhook_allow,
        )
        .map_err(anyhow::Error::msg)
    }

    pub(crate) fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    pub(crate) fn resume_grace(&self) -> Duration {
        Duration::from_millis(self.resume_grace_ms)
    }

    pub(crate) fn session_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.session_idle_timeout_ms)
    }

    pub(crate) fn heartbeat_ttl(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ttl_ms)
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub(crate) fn http_header_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_timeout_ms)
    }

    pub(crate) fn http_body_timeout(&self) -> Duration {
        Duration::from_millis(self.http_body_timeout_ms)
    }

    /// Whether a WebSocket upgrade without a valid device token is refused.
    pub fn credential_required(&self) -> bool {
        match self.open_requires_credential {
            CredentialMode::Auto => self.device_token_key.is_some(),
            CredentialMode::Always => true,
            CredentialMode::Never => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cloud() -> ServerConfig {
        ServerConfig {
            cloud: PathBuf::from("cloud"),
            ..ServerConfig::default()
        }
    }

    #[test]
    fn pacing_settings_are_checked() {
        assert!(with_cloud().check().is_ok(), "the defaults pass");
        for slack in [0.0, -1.0, f64::NAN] {
            let c = ServerConfig {
                prefill_slack: slack,
                ..with_cloud()
            };
            let e = c.check().expect_err("bad slack").to_string();
            assert!(e.contains("prefill_slack"), "{e}");
        }
        let lifted = ServerConfig {
            prefill_slack: f64::INFINITY,
            ..with_cloud()
        };
        assert!(lifted.check().is_ok(), "inf lifts the cap");
        for wait in [-1.0, f64::INFINITY, 10_001.0] {
            let c = ServerConfig {
                decode_wait_ms: wait,
                ..with_cloud()
            };
            let e = c.check().expect_err("bad wait").to_string();
            assert!(e.contains("decode_wait_ms"), "{e}");
        }
    }

    /// The config fuzz target's committed seeds (`serve/fuzz/seeds/config_parse`) run through
    /// its property in every `cargo test`; the full and minimal files pass the check, the
    /// `refused_*` ones parse and are refused, `broken` does not parse.
    #[test]
    fn config_seeds() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/config_parse");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("seeds") {
            let path = entry.expect("entry").path();
            let bytes = std::fs::read(&path).expect("seed");
            ServerConfig::fuzz_property(&bytes);
            let name = path
                .file_stem()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let parsed = ServerConfig::from_toml_str(std::str::from_utf8(&bytes).expect("utf-8"));
            match name {
                "broken" => assert!(parsed.is_err(), "{name}"),
                n if n.starts_with("refused_") => {
                    let cfg = parsed.expect(n);
                    assert!(cfg.check().is_err(), "{n} passed the check");
                }
                "full" | "minimal" | "off_and_inf" => {
                    let cfg = parsed.expect(name);
                    cfg.check().unwrap_or_else(|e| panic!("{name}: {e}"));
                }
                _ => {}
            }
            seen += 1;
        }
        assert!(seen >= 8, "only {seen} seeds in {}", dir.display());
        let full = ServerConfig::from_toml_file(&dir.join("full.toml")).expect("full");
        assert_eq!(full.http_body_timeout_ms, 10_000);
        assert_eq!(full.webhook_allow.len(), 2);
    }

    /// The top layer's values replace the file's, its lists extend the file's, what it
    /// leaves out keeps the file's value or the default; an unknown key in the file is an
    /// error that names the key and the file.
    #[test]
    fn layers_replace_values_extend_lists_and_refuse_unknown_file_keys() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("tandem.toml");
        let file = "max_sessions = 5\nblock_size = 8\nwebhook_allow = [\"10.0.0.1\"]\n";
        std::fs::write(&path, file).expect("write");
        let over = figment::providers::Serialized::defaults(serde_json::json!({
            "max_sessions": 6,
            "listen": "127.0.0.1:7070",
            "webhook_allow": ["10.0.0.2"],
        }));
        let c = ServerConfig::layered(Some(&path), over).expect("layers");
        assert_eq!((c.max_sessions, c.block_size), (6, 8));
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 7070)));
        assert_eq!(c.webhook_allow, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(c.max_batch_seqs, ServerConfig::default().max_batch_seqs);
        std::fs::write(&path, "max_session = 5\n").expect("write");
        let e = ServerConfig::layered(Some(&path), Figment::new())
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("`max_session`"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn pacing_settings_read_from_toml() {
        let c = ServerConfig::from_toml_str("prefill_slack = 0.5\ndecode_wait_ms = 0.0\n")
            .expect("toml");
        assert_eq!((c.prefill_slack, c.decode_wait_ms), (0.5, 0.0));
    }

    #[test]
    fn admin_listen_parses_addresses_and_off() {
        assert_eq!(
            ServerConfig::default().admin_listen.addr(),
            Some(DEFAULT_ADMIN_LISTEN)
        );
        assert!(DEFAULT_ADMIN_LISTEN.ip().is_loopback());
        let c = ServerConfig::from_toml_str("admin_listen = \"0.0.0.0:9191\"\n").expect("toml");
        assert_eq!(
            c.admin_listen,
            AdminListen::On("0.0.0.0:9191".parse().expect("addr"))
        );
        let off = ServerConfig::from_toml_str("admin_listen = \"off\"\n").expect("toml");
        assert_eq!(off.admin_listen, AdminListen::Off);
        assert_eq!("none".parse::<AdminListen>(), Ok(AdminListen::Off));
        let e = ServerConfig::from_toml_str("admin_listen = \"localhost\"\n")
            .expect_err("not an address")
            .to_string();
        assert!(e.contains("admin_listen"), "{e}");
    }

    #[test]
    fn credentials_are_required_by_default_with_a_device_key() {
        let mut c = with_cloud();
        assert!(!c.credential_required(), "no key, auto: anonymous");
        c.device_token_key = Some(Secret::new("k".repeat(32)));
        assert!(c.credential_required(), "a key, auto: required");
        c.open_requires_credential = CredentialMode::Never;
        assert!(!c.credential_required());
        let t =
            ServerConfig::from_toml_str("open_requires_credential = \"always\"\n").expect("toml");
        assert!(t.credential_required());
        assert_eq!("never".parse(), Ok(CredentialMode::Never));
        assert!("sometimes".parse::<CredentialMode>().is_err());
    }

    #[test]
    fn io_threads_are_read_from_toml_and_zero_is_refused() {
        let c = ServerConfig::from_toml_str("io_threads = 3\n").expect("toml");
        assert_eq!(c.io_threads, Some(3));
        assert_eq!(ServerConfig::default().io_threads, None);
        let zero = ServerConfig {
            io_threads: Some(0),
            ..with_cloud()
        };
        let e = zero.check().expect_err("zero workers").to_string();
        assert!(e.contains("io_threads"), "{e}");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = default_io_threads();
        assert!(auto >= 1 && auto <= cpus.max(1), "{auto} of {cpus} CPUs");
    }
}
