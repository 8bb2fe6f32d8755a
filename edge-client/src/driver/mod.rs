//! The task behind a [`Generation`](crate::Generation): owns the edge session, the
//! connection, and everything needed to resume (every `Hidden` sent, every `Token` received).
//!
//! One loop per connection: send what the cloud has not got yet, produce the next `Hidden`
//! when one is owed (the next prompt chunk, or the hidden state of the last token), otherwise
//! wait for a frame or for the caller's cancel. The outer loop reconnects, so the prompt
//! chunks and decode steps never need to know about connections: they append to `sent`,
//! and the flush step sends from where the current connection stands.
//!
//! The edge layers never run on this task: each step goes to the blocking pool
//! ([`EdgeCompute`]), and while it runs the task keeps reading the connection (answering
//! `Ping`, taking an `Error` or a `Done`), so neither the runtime nor the cloud waits on a
//! long prompt.
//!
//! # Layout
//! - this module: the task's state ([`Driver`]), the reconnect loop, the end of a generation
//!   ([`Finished`]), and sending stored frames.
//! - `open`: connecting, `Open` or `Resume`, the wait for `Opened`, and the replay into a new
//!   session when the cloud forgot the old one.
//! - `connection`: the life of one connection after `Opened`: what is owed, the frames
//!   received, and ruling on each answer (the token that counts and the accepted drafts).
//! - `steps`: the edge steps (prompt chunks, decode steps with their drafts) on the blocking
//!   pool.

mod connection;
mod open;
mod steps;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tandem_model::privacy::RowNoiser;
use tandem_model::EdgeModel;
use tandem_protocol::{DoneReason, HiddenDtype, ManifestId, ResumeToken, SessionId};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::config::{ClientConfig, GenerateRequest};
use crate::client::events::{Event, Finished, Timings, Usage, WireStats};
use crate::compute::EdgeCompute;
use crate::draft::{DraftLength, Drafter, PromptLookup};
use crate::error::ClientError;
use crate::session::EdgeSession;
use crate::tls::SharedClientConfig;
use crate::transparency::{Compression, NoiseRecord};
use crate::transport::Jitter;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// New sessions one generation may open because the cloud no longer knew its session
/// (`unknown_session` on `Resume`, e.g. after the session store lost its data): each replays
/// everything sent. Bounded, so a cloud that keeps forgetting cannot keep the device looping.
pub(crate) const MAX_REOPENS: u32 = 3;

/// The answer the device waits for: to its last complete `Hidden` frame.
struct Awaiting {
    /// That frame's sequence number (`Token::input_seq` of its answer).
    input_seq: u64,
    /// The drafts it carried, and the position of the first of them.
    drafts: Vec<u32>,
    draft_first: usize,
    /// The answer's tokens so far: the one that counts, then one per draft row.
    got: Vec<tandem_protocol::Token>,
}

impl Awaiting {
    /// The answer is whole: a token per row sampled, or a draft token that ends the
    /// generation.
    fn is_whole(&self) -> bool {
        self.got.len() > self.drafts.len() || self.got.last().is_some_and(|t| t.last)
    }
}

/// Why a connection ended without finishing the generation.
enum Stop {
    /// Try again on a new connection (dropped, timed out, `3xx`).
    Retry(String),
    Fatal(ClientError),
}

impl From<ClientError> for Stop {
    fn from(e: ClientError) -> Self {
        Self::Fatal(e)
    }
}

impl From<tandem_protocol::WireError> for Stop {
    fn from(e: tandem_protocol::WireError) -> Self {
        Self::Fatal(e.into())
    }
}

impl From<tandem_model::ModelError> for Stop {
    fn from(e: tandem_model::ModelError) -> Self {
        Self::Fatal(e.into())
    }
}

pub(crate) struct Driver {
    manifest: ManifestId,
    cfg: ClientConfig,
    req: GenerateRequest,
    events: mpsc::UnboundedSender<Event>,
    cancel_rx: oneshot::Receiver<()>,
    cancel_requested: bool,
    /// Where a `moved` answer said the session lives: the next connection goes there.
    redirect: Option<String>,
    /// The wait the cloud asked for with its last refusal (`retry_after_ms`).
    retry_after: Option<Duration>,
    cancel_sent: bool,
    /// TLS settings for `wss://`, built at the client's first such connection.
    tls: SharedClientConfig,

    /// The edge layers and the encoding; `None` only while a step runs on the blocking pool.
    edge: Option<EdgeCompute>,
    hidden_size: usize,
    /// Layers the edge runs (`k`).
    split: usize,
    eos: Vec<u32>,
    /// The cloud's session, once opened.
    session: Option<(SessionId, ResumeToken)>,
    /// Every `Hidden` frame produced, encoded; index = sequence number.
    sent: Vec<Bytes>,
    /// Prompt tokens run through the edge so far.
    prompt_fed: usize,
    /// `Hidden` frames the prompt took (valid once `prompt_fed == prompt.len()`).
    prompt_frames: usize,
    /// Token ids received; index = sequence number.
    tokens: Vec<u32>,
    text: String,
    done: Option<tandem_protocol::Done>,
    /// The token count for which the final-token grace wait was already spent.
    grace_spent_at: Option<usize>,
    /// The answer waited for, from the complete frame sent last until it is whole.
    awaiting: Option<Awaiting>,
    /// Where the next decode frame starts (drafts the cloud did not confirm are dropped).
    next_at: Option<usize>,
    /// The last token counts as a draft token that ends the generation: the verdict frame
    /// goes at once (`Done` comes only after it).
    final_by_draft: bool,
    drafter: Box<dyn Drafter>,
    draft_len: DraftLength,
    /// The most drafts the cloud asked for in its last answer.
    cloud_cap: usize,
    /// Positions the edge's cache holds (the next step's first position, before any cut).
    edge_position: usize,
    /// Whether the current connection delivered anything new (ends an outage).
    progressed: bool,
    /// New sessions opened to replay a session the cloud forgot (at most [`MAX_REOPENS`]).
    reopens: u32,
    /// While a reopened session catches up: the next of `sent` to send, each decode frame
    /// once the cloud has (re)produced the token it was made from. `None` otherwise.
    replay: Option<usize>,
    /// Tokens of the answer to the last frame replayed, so far.
    replay_got: usize,

    stats: WireStats,
    jitter: Jitter,
    started: Instant,
    first_token: Option<Instant>,
    /// Time spent in the edge layers for decode steps (one-token inputs), and their count.
    edge_decode: Duration,
    edge_decode_steps: u64,
    /// Time spent in the edge layers for the prompt.
    edge_prompt: Duration,
}

impl Driver {
    pub(crate) fn new(
        model: Arc<EdgeModel>,
        manifest: ManifestId,
        cfg: ClientConfig,
        tls: SharedClientConfig,
        mut req: GenerateRequest,
        events: mpsc::UnboundedSender<Event>,
        cancel_rx: oneshot::Receiver<()>,
    ) -> Self {
        let hidden_size = model.config().hidden_size;
        let eos = model.config().eos_token_ids.clone();
        let split = model.split().edge_layers();
        if let Some(r) = req.record.as_mut() {
            r.set_wire_dtype(cfg.dtype.as_str());
            r.compression = match cfg.dtype {
                HiddenDtype::F32 => None,
                HiddenDtype::F16 => Some(Compression::F16),
                HiddenDtype::Bf16 => Some(Compression::Bf16),
                HiddenDtype::Int8 => Some(Compression::Int8),
                HiddenDtype::Int4 => Some(Compression::Int4),
            };
            r.noise = cfg.noise.as_ref().map(NoiseRecord::from_mechanism);
        }
        // Clips and noises each row before it is encoded, when the device asked for noise.
        let noiser = cfg.noise.map(|m| RowNoiser::new(m, cfg.noise_seed));
        let edge = EdgeCompute::new(EdgeSession::new(model), noiser, cfg.dtype);
        let max_drafts = cfg
            .max_draft_tokens
            .min(usize::from(tandem_protocol::wire::MAX_DRAFTS));
        Self {
            manifest,
            cfg,
            req,
            events,
            cancel_rx,
            cancel_requested: false,
            cancel_sent: false,
            edge: Some(edge),
            hidden_size,
            split,
            eos,
            session: None,
            sent: Vec::new(),
            prompt_fed: 0,
            prompt_frames: 0,
            tokens: Vec::new(),
            text: String::new(),
            done: None,
            grace_spent_at: None,
            awaiting: None,
            next_at: None,
            final_by_draft: false,
            drafter: Box::new(PromptLookup::default()),
            draft_len: DraftLength::new(max_drafts),
            cloud_cap: 0,
            edge_position: 0,
            progressed: false,
            reopens: 0,
            replay: None,
            replay_got: 0,
            stats: WireStats::default(),
            jitter: Jitter::new(),
            redirect: None,
            retry_after: None,
            tls,
            started: Instant::now(),
            first_token: None,
            edge_decode: Duration::ZERO,
            edge_decode_steps: 0,
            edge_prompt: Duration::ZERO,
        }
    }

    pub(crate) async fn run(mut self) {
        let event = match self.run_inner().await {
            Ok(f) => Event::Done(Box::new(f)),
            Err(e) => {
                tracing::warn!(error = %e, "generation failed");
                Event::Error(e)
            }
        };
        let _ = self.events.send(event);
    }

    async fn run_inner(&mut self) -> Result<Finished, ClientError> {
        let mut attempt: usize = 0; // all connection attempts, for round robin
        let mut outage: Option<(Instant, u32)> = None;
        loop {
            let stop = match self.open(attempt).await {
                Ok(ws) => {
                    self.progressed = false;
                    match self.connection(ws).await {
                        Ok(()) => return Ok(self.finished()),
                        Err(stop) => stop,
                    }
                }
                Err(stop) => stop,
            };
            attempt += 1;
            let cause = match stop {
                Stop::Fatal(e) => return Err(e),
                Stop::Retry(cause) => cause,
            };
            if self.cancel_requested {
                // The caller wants to stop anyway: no need to come back.
                self.done = Some(self.local_done(DoneReason::Cancelled));
                return Ok(self.finished());
            }
            if self.progressed {
                outage = None;
            }
            let (since, failures) = outage.get_or_insert((Instant::now(), 0));
            let policy = &self.cfg.reconnect;
            if *failures >= policy.max_attempts || since.elapsed() >= policy.max_elapsed {
                return Err(ClientError::Unreachable {
                    attempts: *failures + 1,
                    elapsed_s: since.elapsed().as_secs_f64(),
                    last: cause,
                });
            }
            // Told where the session lives: go there now (it still counts as an attempt, so
            // two replicas sending a device back and forth end like any outage).
            let delay = if self.redirect.is_some() {
                Duration::ZERO
            } else {
                let asked = self.retry_after.take().unwrap_or_default();
                policy.delay(*failures, &mut self.jitter).max(asked)
            };
            *failures += 1;
            tracing::info!(attempt = *failures, delay_ms = delay.as_millis() as u64, cause = %cause, "reconnecting");
            let _ = self.events.send(Event::Reconnecting {
                attempt: *failures,
                delay,
                cause,
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut self.cancel_rx, if !self.cancel_requested => {
                    self.cancel_requested = true;
                }
            }
        }
    }

    fn local_done(&self, reason: DoneReason) -> tandem_protocol::Done {
        tandem_protocol::Done {
            reason,
            prompt_tokens: self.req.prompt.len() as u32,
            output_tokens: self.tokens.len() as u32,
        }
    }

    fn finished(&mut self) -> Finished {
        let done = self
            .done
            .unwrap_or_else(|| self.local_done(DoneReason::Cancelled));
        let total = self.started.elapsed();
        let ttft = self.first_token.map_or(total, |t| t - self.started);
        let decode_s = (total - ttft).as_secs_f64();
        let after_first = self.tokens.len().saturating_sub(1) as f64;
        let mut record = self.req.record.take();
        if let Some(r) = record.as_mut() {
            match done.reason {
                DoneReason::Finished(reason) => r.finish(self.text.clone(), reason),
                DoneReason::Cancelled => r.output = Some(self.text.clone()),
            }
        }
        Finished {
            reason: done.reason,
            text: std::mem::take(&mut self.text),
            token_ids: self.tokens.clone(),
            usage: Usage {
                prompt_tokens: done.prompt_tokens,
                output_tokens: done.output_tokens,
            },
            session: self.session.as_ref().map_or(SessionId(0), |(s, _)| *s),
            wire: self.stats.clone(),
            timings: Timings {
                time_to_first_token_s: ttft.as_secs_f64(),
                total_s: total.as_secs_f64(),
                decode_tokens_per_s: if decode_s > 0.0 {
                    after_first / decode_s
                } else {
                    0.0
                },
                edge_prompt_s: self.edge_prompt.as_secs_f64(),
                edge_decode_ms_per_token: if self.edge_decode_steps > 0 {
                    1e3 * self.edge_decode.as_secs_f64() / self.edge_decode_steps as f64
                } else {
                    0.0
                },
            },
            record,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sending
// ---------------------------------------------------------------------------------------------

impl Driver {
    async fn send_stored(&mut self, ws: &mut Ws, seq: usize) -> Result<(), Stop> {
        let frame = self.sent[seq].clone();
        let len = frame.len() as u64;
        send(ws, frame).await?;
        self.count_sent(seq, len);
        Ok(())
    }

    /// Sends `sent[from..]` on `ws`.
    async fn flush(&mut self, ws: &mut Ws, from: usize) -> Result<(), Stop> {
        for seq in from..self.sent.len() {
            let frame = self.sent[seq].clone();
            let len = frame.len() as u64;
            send(ws, frame).await?;
            self.count_sent(seq, len);
        }
        Ok(())
    }

    fn count_sent(&mut self, seq: usize, bytes: u64) {
        self.stats.hidden_frames_sent += 1;
        self.stats.hidden_bytes_sent += bytes;
        let rows = hidden_rows(&self.sent[seq]);
        if let Some(r) = self.req.record.as_mut() {
            r.record_sent(rows, bytes);
        }
    }
}

/// Rows of an encoded `Hidden` frame (its token count).
fn hidden_rows(frame: &[u8]) -> usize {
    frame
        .get(16..20)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u32::from_le_bytes(b) as usize)
}

async fn send(ws: &mut Ws, frame: Bytes) -> Result<(), Stop> {
    ws.send(Message::Binary(frame))
        .await
        .map_err(|e| Stop::Retry(format!("send failed: {e}")))
}

/// Whether `s` is a WebSocket URL a `moved` answer may send the device to.
fn is_ws_url(s: &str) -> bool {
    (s.starts_with("ws://") || s.starts_with("wss://"))
        && s.len() <= 512
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}
