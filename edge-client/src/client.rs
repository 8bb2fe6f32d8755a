//! The device's side of a session: [`EdgeClient::generate`] runs one generation against the
//! cloud and hands back a [`Generation`], a stream of [`Event`]s.
//!
//! Flow (docs/protocol.md §6): connect, `Open`, wait for `Opened`; run the edge layers over
//! the prompt and send it as `Hidden` chunks, the shared system prefix as a chunk of its own
//! (so the cloud can share its KV blocks between users), the last one `complete`; then for
//! each `Token`, unless `Done` follows, run the edge layers on it and send its hidden state.
//!
//! Resume and replay: every `Hidden` sent is kept (encoded) and every `Token` received is
//! recorded. A dropped connection or a `3xx` error reconnects (backoff with jitter,
//! [`ReconnectPolicy`]), sends `Resume`, and resends every `Hidden` from the `Opened`'s
//! `next_hidden_seq` (all of them, back to back, when it is 0: the cloud lost the state).
//! Tokens resent by the cloud are dropped by sequence number, so the caller sees one
//! uninterrupted stream. `1xx`, `2xx` and `5xx` errors end the generation with
//! [`ClientError::Server`].
//!
//! Cancellation: [`Generation::cancel`], or dropping the [`Generation`], sends `Cancel`.
//!
//! Costs: the kept frames are the whole session's hidden states on the wire (prompt tokens
//! plus output tokens, times hidden size, times the wire dtype's size). The edge layers run
//! on tokio's blocking pool, one step at a time (a prompt chunk, or one token), never on an
//! async worker: a current-thread runtime keeps its timers while a long prompt is computed,
//! and the connection keeps answering the cloud's `Ping`s.
//!
//! Privacy: the client logs session ids, sequence numbers, counts and error codes; never
//! prompt text, token text, profile values or activations (those stay in the events and the
//! [`TransparencyRecord`], for the user).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use tandem_model::privacy::GaussianMechanism;
use tandem_model::{EdgeModel, ModelError};
use tandem_protocol::{
    DoneReason, ErrorCode, HiddenDtype, Limits, ManifestId, SamplingParams, SessionId, WireError,
};
use tokio::sync::{mpsc, oneshot};

use crate::bundle::EdgeBundle;
use crate::driver::Driver;
use crate::inbox::{InboxClient, InboxConfig};
use crate::prompt::AssembledPrompt;
use crate::transparency::{ModelInfo, TransparencyRecord};
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
    pub ca_certs: Vec<crate::tls::CertificateDer<'static>>,
    /// Speculation across the split: the most tokens the device drafts per decode step (by
    /// prompt lookup) and sends with the token it got, so that one round trip can confirm
    /// several (0: off). The cloud caps it by its load; the length follows acceptance.
    pub max_draft_tokens: usize,
    /// The device token sent as `Authorization: Bearer` on every WebSocket upgrade (a
    /// server that requires credentials answers 401 without one, which ends the generation
    /// with [`ClientError::Connect`](crate::ClientError::Connect), not retried). `None`:
    /// the inbox's token when an inbox is configured, else none.
    pub device_token: Option<crate::inbox::DeviceToken>,
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
    /// Filled in with the traffic and the output and returned in [`Finished::record`].
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

/// Token counts as the cloud reported them in `Done`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// What crossed the wire, resends included.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WireStats {
    /// `Hidden` frames of the prompt and their bytes (each frame counted once).
    pub prompt_frames: u64,
    pub prompt_bytes: u64,
    /// `Hidden` frames of decode steps and their bytes (each frame counted once).
    pub decode_frames: u64,
    pub decode_bytes: u64,
    /// Every `Hidden` frame sent, resends included.
    pub hidden_frames_sent: u64,
    pub hidden_bytes_sent: u64,
    /// `Hidden` frames sent again after a `Resume`.
    pub hidden_frames_resent: u64,
    /// All frames received from the cloud.
    pub bytes_received: u64,
    /// Connections after the first.
    pub reconnects: u32,
    /// Resumes that replayed from 0 because the cloud had lost the state.
    pub replays: u32,
    /// New sessions opened because the cloud no longer knew the session (its store lost
    /// it): each replayed every hidden state sent (also counted in `replays`).
    pub reopens: u32,
    /// Speculation: tokens drafted and sent as hidden rows, and of those the ones the cloud
    /// confirmed; decode answers received (each a round trip).
    pub drafted_tokens: u64,
    pub accepted_drafts: u64,
    pub decode_rounds: u64,
}

/// Times of one generation, measured on the device.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    pub time_to_first_token_s: f64,
    pub total_s: f64,
    /// Output tokens after the first, per second after the first.
    pub decode_tokens_per_s: f64,
    /// Seconds this device spent in its edge layers over the prompt.
    pub edge_prompt_s: f64,
    /// Milliseconds this device spent in its edge layers per decode step (one token): the
    /// device's share of each token's round trip.
    pub edge_decode_ms_per_token: f64,
}

/// The end of a generation.
#[derive(Clone, Debug)]
pub struct Finished {
    pub reason: DoneReason,
    /// The concatenated text deltas.
    pub text: String,
    /// Every token id received, in order (the last may be an end-of-sequence token).
    pub token_ids: Vec<u32>,
    pub usage: Usage,
    pub session: SessionId,
    pub wire: WireStats,
    pub timings: Timings,
    /// The request's record, filled in.
    pub record: Option<TransparencyRecord>,
}

/// What a [`Generation`] yields.
#[derive(Debug)]
pub enum Event {
    /// The cloud accepted the session.
    Opened { session: SessionId },
    /// One new token (never repeated, even across a resume). `text` may be empty.
    Token {
        seq: u64,
        token_id: u32,
        text: String,
    },
    /// The connection was lost; the client tries again after `delay`.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        cause: String,
    },
    /// A new connection took over the session; `resent` hidden frames were sent again, from
    /// `next_hidden_seq` (0 with frames to resend: a replay). Also sent when the cloud no
    /// longer knew the session and a new one was opened to replay it (`WireStats::reopens`).
    Resumed { next_hidden_seq: u64, resent: u64 },
    /// The end; no more events follow.
    Done(Box<Finished>),
    /// The generation failed; no more events follow.
    Error(ClientError),
}

/// Why a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    Request(String),
    /// The cloud answered with an error that ends the generation (`1xx`, `2xx`, `5xx`).
    #[error("the server refused: {code} ({}): {message}", code.as_u16())]
    Server { code: ErrorCode, message: String },
    /// The cloud broke the protocol (an unexpected frame, a gap in token numbers, …).
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("edge model: {0}")]
    Model(#[from] ModelError),
    /// No connection could be made (or kept) within the reconnect policy.
    #[error("gave up after {attempts} connection attempt(s) in {elapsed_s:.1}s: {last}")]
    Unreachable {
        attempts: u32,
        elapsed_s: f64,
        last: String,
    },
    /// A connection failure that retrying cannot fix: TLS (an untrusted, expired or
    /// wrongly named certificate), or an upgrade the server refused with a client error.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The generation's task ended without reporting (a panic).
    #[error("the generation task stopped unexpectedly")]
    TaskGone,
}

/// Runs generations against the cloud for one edge model.
#[derive(Clone, Debug)]
pub struct EdgeClient {
    model: Arc<EdgeModel>,
    manifest: ManifestId,
    cfg: ClientConfig,
    /// Built from `cfg.inbox`.
    pub(crate) inbox: Option<InboxClient>,
    /// TLS settings for `wss://` (from `cfg.ca_certs`), built at the first such connection
    /// and shared by every generation of this client.
    tls: crate::tls::SharedClientConfig,
}

impl EdgeClient {
    /// A client for `model`, whose edge/cloud pair has id `pair_id` (the manifest's).
    pub fn new(
        model: Arc<EdgeModel>,
        pair_id: &str,
        cfg: ClientConfig,
    ) -> Result<Self, ClientError> {
        if cfg.prompt_chunk_tokens == 0 {
            return Err(ClientError::Request(
                "prompt_chunk_tokens must be at least 1".into(),
            ));
        }
        Ok(Self {
            model,
            manifest: ManifestId::try_from(pair_id)?,
            inbox: cfg.inbox.clone().map(InboxClient::new),
            tls: Default::default(),
            cfg,
        })
    }

    /// A client for a loaded edge checkpoint.
    pub fn from_bundle(bundle: &EdgeBundle, cfg: ClientConfig) -> Result<Self, ClientError> {
        Self::new(bundle.model.clone(), bundle.pair_id(), cfg)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// The split and shapes of the model, for a [`TransparencyRecord`].
    pub fn model_info(&self) -> ModelInfo {
        ModelInfo::from_edge(
            &self.model,
            String::from_utf8_lossy(self.manifest.as_bytes()),
        )
    }

    /// Starts a generation on the current tokio runtime. Checks the request first; every
    /// later failure comes as [`Event::Error`].
    pub fn generate(&self, req: GenerateRequest) -> Result<Generation, ClientError> {
        self.check(&req)?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let driver = Driver::new(
            self.model.clone(),
            self.manifest.clone(),
            self.cfg.clone(),
            self.tls.clone(),
            req,
            events_tx,
            cancel_rx,
        );
        tokio::spawn(driver.run());
        Ok(Generation {
            events: events_rx,
            cancel: Some(cancel_tx),
            ended: false,
        })
    }

    fn check(&self, req: &GenerateRequest) -> Result<(), ClientError> {
        let bad = |m: String| Err(ClientError::Request(m));
        if req.prompt.is_empty() {
            return bad("the prompt is empty".into());
        }
        if req.system_prefix_len > req.prompt.len() {
            return bad(format!(
                "system_prefix_len {} is longer than the prompt ({} tokens)",
                req.system_prefix_len,
                req.prompt.len()
            ));
        }
        let context = self.model.config().max_position_embeddings;
        if req.prompt.len() >= context {
            return bad(format!(
                "the prompt has {} tokens; the model's context is {context}",
                req.prompt.len()
            ));
        }
        if req.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if let Err(e) = req.sampling.validate() {
            return bad(e.to_string());
        }
        let vocab = self.model.config().vocab_size as u32;
        if req.prompt.iter().any(|&t| t >= vocab) {
            return bad(format!(
                "a prompt token id is outside the vocabulary ({vocab})"
            ));
        }
        Ok(())
    }
}

/// A running generation: a stream of [`Event`]s ending with `Done` or `Error`.
///
/// Dropping it cancels the generation (the client sends `Cancel`).
#[derive(Debug)]
pub struct Generation {
    events: mpsc::UnboundedReceiver<Event>,
    cancel: Option<oneshot::Sender<()>>,
    ended: bool,
}

impl Generation {
    /// The next event; `None` after `Done` or `Error`.
    pub async fn next(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Asks the cloud to stop; the stream then ends with `Done` (reason `Cancelled`, or the
    /// reason the generation had already ended with).
    pub fn cancel(&mut self) {
        if let Some(tx) = self.cancel.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the end, passing each new token's text to `on_text`.
    pub async fn finish_with(
        mut self,
        mut on_text: impl FnMut(&str),
    ) -> Result<Finished, ClientError> {
        while let Some(event) = self.next().await {
            match event {
                Event::Token { text, .. } if !text.is_empty() => on_text(&text),
                Event::Done(f) => return Ok(*f),
                Event::Error(e) => return Err(e),
                _ => {}
            }
        }
        Err(ClientError::TaskGone)
    }

    /// Waits for the end.
    pub async fn finish(self) -> Result<Finished, ClientError> {
        self.finish_with(|_| {}).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(e)) => {
                if matches!(e, Event::Done(_) | Event::Error(_)) {
                    self.ended = true;
                }
                Poll::Ready(Some(e))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Event::Error(ClientError::TaskGone)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl futures_util::Stream for Generation {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_event(cx)
    }
}
