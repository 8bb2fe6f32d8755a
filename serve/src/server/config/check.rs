//! The parse step: [`ServerConfig::check`] refuses values the server cannot run with and
//! turns the rest into a [`ValidConfig`], the configuration `server::start` and everything
//! after it hold. Only `check` builds a `ValidConfig`, and it is read-only (it derefs to the
//! `ServerConfig` inside), so no part of the server sees a configuration that skipped the
//! checks. The checks' messages name the setting as the TOML file spells it.

use std::ops::Deref;

use super::{ServerConfig, MAX_SYSTEM_PROMPT_BYTES, MIN_ADMIN_KEY_LEN};

/// A [`ServerConfig`] that passed [`ServerConfig::check`].
#[derive(Clone, Debug)]
pub struct ValidConfig(ServerConfig);

impl Deref for ValidConfig {
    type Target = ServerConfig;

    fn deref(&self) -> &ServerConfig {
        &self.0
    }
}

/// `server::start` takes anything that converts into a `ValidConfig`: a checked one, or a
/// `ServerConfig` that it checks first.
impl TryFrom<ServerConfig> for ValidConfig {
    type Error = anyhow::Error;

    fn try_from(cfg: ServerConfig) -> anyhow::Result<Self> {
        cfg.check()
    }
}

impl ServerConfig {
    /// Refuses values the server cannot run with; what passes is a [`ValidConfig`].
    pub fn check(self) -> anyhow::Result<ValidConfig> {
        self.check_model()?;
        self.check_listeners()?;
        self.check_limits()?;
        self.check_secrets()?;
        self.webhook_policy()?;
        Ok(ValidConfig(self))
    }

    /// The model, its device and the KV cache.
    fn check_model(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.cloud.as_os_str().is_empty(),
            "no cloud checkpoint given (--cloud)"
        );
        anyhow::ensure!(
            self.kv_cache_gib.is_finite() && self.kv_cache_gib > 0.0,
            "kv_cache_gib must be > 0"
        );
        anyhow::ensure!(self.kv_blocks != Some(0), "kv_blocks must be > 0");
        anyhow::ensure!(
            !(self.device.is_cuda()
                && self.device.resolve_dtype(self.dtype) == candle_core::DType::F16),
            "on a CUDA device the weights and KV cache are bf16 or f32, not f16"
        );
        anyhow::ensure!(self.io_threads != Some(0), "io_threads must be > 0");
        Ok(())
    }

    /// The listeners and their TLS files.
    fn check_listeners(&self) -> anyhow::Result<()> {
        if let Some(admin) = self.admin_listen.addr() {
            anyhow::ensure!(
                admin.port() == 0 || admin != self.listen,
                "admin_listen must differ from listen ({admin})"
            );
        }
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "TLS needs both tls_cert and tls_key (--tls-cert, --tls-key)"
        );
        anyhow::ensure!(
            self.admin_tls_cert.is_some() == self.admin_tls_key.is_some(),
            "TLS on the operator listener needs both admin_tls_cert and admin_tls_key \
             (--admin-tls-cert, --admin-tls-key)"
        );
        Ok(())
    }

    /// Sizes, rates, caps and timeouts.
    fn check_limits(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("block_size", self.block_size),
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_batch_seqs", self.max_batch_seqs),
            ("max_sessions", self.max_sessions),
            ("max_queued_tokens", self.max_queued_tokens),
            ("max_prompt_tokens", self.max_prompt_tokens),
            ("max_frame_bytes", self.max_frame_bytes),
            ("outbound_queue", self.outbound_queue),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_connections", self.max_connections),
            ("max_sessions_per_user", self.max_sessions_per_user),
            ("max_resume_grace_sessions", self.max_resume_grace_sessions),
        ] {
            anyhow::ensure!(v > 0, "{name} must be > 0");
        }
        anyhow::ensure!(self.max_tokens_cap > 0, "max_tokens_cap must be > 0");
        anyhow::ensure!(
            self.prefill_slack > 0.0,
            "prefill_slack must be > 0 (inf lifts the cap), got {}",
            self.prefill_slack
        );
        anyhow::ensure!(
            self.decode_wait_ms.is_finite() && (0.0..=10_000.0).contains(&self.decode_wait_ms),
            "decode_wait_ms must be within 0..=10000, got {}",
            self.decode_wait_ms
        );
        anyhow::ensure!(
            self.max_frames_per_second > 0,
            "max_frames_per_second must be > 0"
        );
        anyhow::ensure!(
            self.session_idle_timeout_ms >= 100,
            "session_idle_timeout_ms must be >= 100"
        );
        anyhow::ensure!(
            self.max_draft_tokens <= tandem_protocol::wire::MAX_DRAFTS,
            "max_draft_tokens must be at most {}",
            tandem_protocol::wire::MAX_DRAFTS
        );
        anyhow::ensure!(
            self.http_header_timeout_ms >= 100,
            "http_header_timeout_ms must be >= 100"
        );
        anyhow::ensure!(
            self.hidden_state_budget_mib.is_finite() && self.hidden_state_budget_mib > 0.0,
            "hidden_state_budget_mib must be a positive number"
        );
        anyhow::ensure!(
            self.http_body_timeout_ms >= 100,
            "http_body_timeout_ms must be >= 100"
        );
        anyhow::ensure!(
            self.heartbeat_ttl_ms >= 30,
            "heartbeat_ttl_ms must be >= 30"
        );
        Ok(())
    }

    /// Keys, the system prompt, the advertised URL and the request rates.
    fn check_secrets(&self) -> anyhow::Result<()> {
        if let Some(key) = &self.admin_key {
            anyhow::ensure!(
                key.expose().chars().count() >= MIN_ADMIN_KEY_LEN,
                "admin_key must be at least {MIN_ADMIN_KEY_LEN} characters"
            );
        }
        if let Some(key) = &self.device_token_key {
            anyhow::ensure!(
                key.expose().chars().count() >= crate::rest::device::MIN_DEVICE_KEY_LEN,
                "device_token_key must be at least {} characters",
                crate::rest::device::MIN_DEVICE_KEY_LEN
            );
        }
        anyhow::ensure!(
            self.system_prompt.len() <= MAX_SYSTEM_PROMPT_BYTES,
            "system_prompt must be at most {MAX_SYSTEM_PROMPT_BYTES} bytes"
        );
        if let Some(url) = &self.advertise_url {
            anyhow::ensure!(
                (url.starts_with("ws://") || url.starts_with("wss://"))
                    && url.len() <= crate::server::MAX_ADVERTISE_URL_LEN,
                "advertise_url must be a ws:// or wss:// URL of at most {} bytes",
                crate::server::MAX_ADVERTISE_URL_LEN
            );
        }
        anyhow::ensure!(
            self.partner_requests_per_minute > 0 && self.device_requests_per_minute > 0,
            "partner_requests_per_minute and device_requests_per_minute must be > 0"
        );
        Ok(())
    }
}
