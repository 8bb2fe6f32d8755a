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
//!
//! # Layout
//! - `config`: [`ClientConfig`] and [`GenerateRequest`].
//! - `events`: [`Event`], [`Finished`] and its [`Usage`], [`WireStats`] and [`Timings`].
//! - this module: [`EdgeClient`] (checks a request and starts the session task, the private
//!   `driver` module) and the [`Generation`] stream.
//!
//! [`ClientError`] lives in the crate's error module, shared with the inbox; it is re-exported
//! here.
//!
//! [`ReconnectPolicy`]: crate::transport::ReconnectPolicy
//! [`TransparencyRecord`]: crate::transparency::TransparencyRecord

pub(crate) mod config;
pub(crate) mod events;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tandem_model::EdgeModel;
use tandem_protocol::ManifestId;
use tokio::sync::{mpsc, oneshot};

pub use self::config::{ClientConfig, GenerateRequest, DEFAULT_MAX_DRAFT_TOKENS};
pub use self::events::{Event, Finished, Timings, Usage, WireStats};
use crate::bundle::EdgeBundle;
use crate::driver::Driver;
pub use crate::error::ClientError;
use crate::inbox::rest::InboxClient;
use crate::transparency::ModelInfo;

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

    /// The split and shapes of the model, for a
    /// [`TransparencyRecord`](crate::TransparencyRecord).
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
