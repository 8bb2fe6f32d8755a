//! What a client and each generation are told: [`ClientConfig`] (the servers, the wire dtype,
//! timeouts, limits, noise, TLS roots, the device token) and [`GenerateRequest`] (one
//! prompt's ids, sampling and limits, and the transparency record to fill in).
//!
//! Plain data, below both the client that checks a request and the private session task
//! that runs it.

use std::time::Duration;

use tandem_model::privacy::GaussianMechanism;
use tandem_protocol::{HiddenDtype, Limits, SamplingParams};

use crate::device_token::DeviceToken;
use crate::inbox::config::InboxConfig;
use crate::prompt::AssembledPrompt;
use crate::tls::CertificateDer;
use crate::transparency::TransparencyRecord;
use crate::transport::{ReconnectPolicy, ServerList};

/// How a client talks to the cloud.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Replicas to connect to, in turn.
    pub servers: ServerList,
    /// Encoding of the hidden states on the wire (`HiddenDtype::Int4` is the smallest: about
    /// 0.31× f16's bytes on the demo model; docs/protocol.md §4).
    pub dtype: HiddenDtype,
    /// Most prompt tokens per `Hidden` chunk.
    pub prompt_chunk_tokens: usize,
    pub reconnect: ReconnectPolicy,
    /// Longest wait for a TCP + WebSocket connection.
    pub connect_timeout: Duration,
    /// A connection silent this long while the client waits for the cloud counts as dropped.
    pub idle_timeout: Duration,
    /// What the client accepts from the cloud.
    pub limits: Limits,
    /// The REST inbox (base URL and device token); `None`: the inbox calls fail with
    /// [`InboxError::Config`](crate::inbox::InboxError::Config).
    pub inbox: Option<InboxConfig>,
    /// Differential-privacy noise on every hidden-state row before it is encoded (clip, then
    /// Gaussian noise; `tandem_model::privacy`). `None`: rows leave as computed. The device
    /// decides; the cloud is not told.
    pub noise: Option<GaussianMechanism>,
    /// Seed of the noise; `None` (the default, and what a device should use) draws it from
    /// the operating system. A fixed seed is for tests and audits only: whoever knows it can
    /// subtract the noise.
    pub noise_seed: Option<u64>,
    /// Certificate authorities trusted for `wss://` besides the compiled-in web roots (a
    /// private CA; [`crate::tls::read_ca_file`] reads a PEM bundle).
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Speculation across the split: the most tokens the device drafts per decode step (by
    /// prompt lookup) and sends with the token it got, so that one round trip can confirm
    /// several (0: off). The cloud caps it by its load; the length follows acceptance.
    pub max_draft_tokens: usize,
    /// The device token sent as `Authorization: Bearer` on every WebSocket upgrade (a
    /// server that requires credentials answers 401 without one, which ends the generation
    /// with [`ClientError::Connect`](crate::ClientError::Connect), not retried). `None`:
    /// the inbox's token when an inbox is configured, else none.
    pub device_token: Option<DeviceToken>,
}

/// The default [`ClientConfig::max_draft_tokens`].
pub const DEFAULT_MAX_DRAFT_TOKENS: usize = 8;

impl ClientConfig {
    pub fn new(servers: impl Into<ServerList>) -> Self {
        Self {
            servers: servers.into(),
            dtype: HiddenDtype::F32,
            prompt_chunk_tokens: 256,
            reconnect: ReconnectPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            limits: Limits::default(),
            inbox: None,
            noise: None,
            noise_seed: None,
            ca_certs: Vec::new(),
            max_draft_tokens: DEFAULT_MAX_DRAFT_TOKENS,
            device_token: None,
        }
    }
}

impl ClientConfig {
    /// Sets where the inbox is (see [`InboxConfig`]); its device token also opens sessions
    /// unless [`ClientConfig::device_token`] is set.
    pub fn with_inbox(mut self, inbox: InboxConfig) -> Self {
        if self.device_token.is_none() {
            self.device_token = Some(inbox.token.clone());
        }
        self.inbox = Some(inbox);
        self
    }
}

/// One generation to run.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The chat-formatted prompt's token ids.
    pub prompt: Vec<u32>,
    /// `prompt[..system_prefix_len]` is the same for every user; sent as its own chunk.
    pub system_prefix_len: usize,
    pub sampling: SamplingParams,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    /// The provider prompt this generation answers, if any.
    pub prompt_id: Option<String>,
    /// W3C `traceparent` of the app's trace, sent in `Open`: the cloud's spans for this
    /// generation join that trace. It carries ids only, never content.
    pub traceparent: Option<String>,
    /// Filled in with the traffic and the output and returned in
    /// [`Finished::record`](super::Finished::record).
    pub record: Option<TransparencyRecord>,
}

impl GenerateRequest {
    /// Greedy, 128 tokens, no stop strings, no shared prefix.
    pub fn new(prompt: Vec<u32>) -> Self {
        Self {
            prompt,
            system_prefix_len: 0,
            sampling: SamplingParams::default(),
            max_tokens: 128,
            stop: Vec::new(),
            prompt_id: None,
            traceparent: None,
            record: None,
        }
    }

    /// The ids and shared prefix of an assembled prompt.
    pub fn from_assembled(prompt: &AssembledPrompt) -> Self {
        Self {
            system_prefix_len: prompt.system_prefix_len,
            ..Self::new(prompt.ids.clone())
        }
    }
}
