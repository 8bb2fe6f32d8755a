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

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tandem_model::privacy::RowNoiser;
use tandem_model::EdgeModel;
use tandem_protocol::{
    DoneReason, ErrorCode, Frame, HiddenDtype, ManifestId, Open, ResumeToken, SessionId,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::{
    ClientConfig, ClientError, Event, Finished, GenerateRequest, Timings, Usage, WireStats,
};
use crate::compute::{Computed, EdgeCompute, Step};
use crate::draft::{DraftLength, Drafter, PromptLookup};
use crate::transparency::{Compression, NoiseRecord};
use crate::transport::Jitter;
use crate::EdgeSession;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long to wait for `Done` after a token that looks final (end of sequence, token limit)
/// before sending its hidden state anyway.
const FINAL_TOKEN_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for `Done(cancelled)` after sending `Cancel`.
const CANCEL_WAIT: Duration = Duration::from_secs(5);
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
    tls: crate::tls::SharedClientConfig,

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
        tls: crate::tls::SharedClientConfig,
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

    /// Connects, sends `Open` or `Resume`, and waits for `Opened`.
    async fn open(&mut self, attempt: usize) -> Result<Ws, Stop> {
        let url = match self.redirect.take() {
            Some(url) => url,
            None => self.cfg.servers.pick(attempt).ok_or_else(|| {
                Stop::Fatal(ClientError::Request("no server URL to connect to".into()))
            })?,
        };
        let connector = if url.starts_with("wss://") {
            let cfg = self
                .tls
                .get_or_init(|| crate::tls::client_config(&self.cfg.ca_certs))
                .clone()
                .map_err(|reason| {
                    Stop::Fatal(ClientError::Connect {
                        url: url.clone(),
                        reason,
                    })
                })?;
            Some(tokio_tungstenite::Connector::Rustls(cfg))
        } else {
            None
        };
        let request = crate::tls::upgrade_request(&url, self.cfg.device_token.as_ref()).map_err(
            |reason| {
                Stop::Fatal(ClientError::Connect {
                    url: url.clone(),
                    reason,
                })
            },
        )?;
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(
                WebSocketConfig::default()
                    .read_buffer_size(tandem_protocol::wire::WS_READ_BUFFER_BYTES),
            ),
            true, // no Nagle: every frame is waited for
            connector,
        );
        let mut ws = match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                if let Some(reason) = crate::tls::permanent_failure(&e) {
                    return Err(Stop::Fatal(ClientError::Connect { url, reason }));
                }
                return Err(Stop::Retry(format!("connect to {url}: {e}")));
            }
            Err(_) => return Err(Stop::Retry(format!("connect to {url}: timed out"))),
        };
        let first = match &self.session {
            None => Frame::Open(Open {
                manifest: self.manifest.clone(),
                split: self.split as u32,
                hidden_size: self.hidden_size as u32,
                dtype: self.cfg.dtype,
                sampling: self.req.sampling.clone(),
                max_tokens: self.req.max_tokens,
                stop: self.req.stop.clone(),
                prompt_id: self.req.prompt_id.clone(),
                traceparent: self.req.traceparent.clone(),
            }),
            Some((session, token)) => Frame::Resume(tandem_protocol::Resume {
                session: *session,
                resume_token: token.clone(),
                // The tokens it holds: those that count, then those of the answer under way.
                last_token_seq: ((self.tokens.len()
                    + self.awaiting.as_ref().map_or(0, |a| a.got.len()))
                    as u64)
                    .checked_sub(1),
            }),
        };
        let resuming = self.session.is_some();
        // Frames already sent with no session to resume: the cloud forgot the session, and
        // this `Open` starts a new one that replays them.
        let reopening = !resuming && !self.sent.is_empty();
        self.replay = None;
        send(&mut ws, Bytes::from(first.encode()?)).await?;
        loop {
            let frame = match self.recv(&mut ws, self.cfg.idle_timeout).await? {
                Some(f) => f,
                None => continue,
            };
            match frame {
                Frame::Opened(o) => {
                    if let Some((session, _)) = &self.session {
                        if o.session != *session {
                            return Err(ClientError::Protocol(format!(
                                "resumed session {} but the server answered for {}",
                                session, o.session
                            ))
                            .into());
                        }
                    }
                    let next = o.next_hidden_seq;
                    if next > self.sent.len() as u64 {
                        return Err(ClientError::Protocol(format!(
                            "the server wants hidden frames from {next}, but only {} were sent",
                            self.sent.len()
                        ))
                        .into());
                    }
                    self.session = Some((o.session, o.resume_token));
                    if resuming {
                        self.stats.reconnects += 1;
                        let resent = self.sent.len() as u64 - next;
                        if next == 0 && resent > 0 {
                            self.stats.replays += 1;
                        }
                        tracing::info!(session = %o.session, next_hidden_seq = next, resent, "session resumed");
                        let _ = self.events.send(Event::Resumed {
                            next_hidden_seq: next,
                            resent,
                        });
                        self.stats.hidden_frames_resent += resent;
                        return self.flush(&mut ws, next as usize).await.map(|()| ws);
                    }
                    if reopening {
                        return self.replay_reopened(&mut ws, next).await.map(|()| ws);
                    }
                    tracing::info!(session = %o.session, "session opened");
                    let _ = self.events.send(Event::Opened { session: o.session });
                    return Ok(ws);
                }
                Frame::Error(e) if e.code == ErrorCode::Moved && is_ws_url(&e.message) => {
                    tracing::info!(to = %e.message, "the session lives on another replica");
                    self.redirect = Some(e.message.clone());
                    return Err(Stop::Retry(format!("moved to {}", e.message)));
                }
                Frame::Error(e) if e.code.is_retryable() => {
                    // At most the policy's whole budget: a refusal cannot park the client.
                    self.retry_after = e.retry_after_ms.map(|ms| {
                        Duration::from_millis(ms.into()).min(self.cfg.reconnect.max_elapsed)
                    });
                    return Err(Stop::Retry(format!("server error {}", e.code)));
                }
                Frame::Error(e) if resuming && self.may_reopen(e.code) => {
                    self.reopens += 1;
                    tracing::warn!(
                        reopen = self.reopens,
                        "the cloud does not know the session; opening a new one to replay it"
                    );
                    self.session = None;
                    return Err(Stop::Retry(
                        "the cloud no longer knows the session; opening a new one".into(),
                    ));
                }
                Frame::Error(e) => {
                    return Err(ClientError::Server {
                        code: e.code,
                        message: e.message,
                    }
                    .into())
                }
                Frame::Ping { nonce } => {
                    send(&mut ws, Bytes::from(Frame::Pong { nonce }.encode()?)).await?
                }
                Frame::Pong { .. } => {}
                other => {
                    return Err(ClientError::Protocol(format!(
                        "{:?} frame before Opened",
                        other.frame_type()
                    ))
                    .into())
                }
            }
        }
    }

    /// Whether an error answering `Resume` lets the device open a new session and replay
    /// what it holds instead: the session is unknown (the cloud lost it), the generation is
    /// not a partner prompt's (its ticket was single-use), and reopens are left.
    fn may_reopen(&self, code: ErrorCode) -> bool {
        code == ErrorCode::UnknownSession
            && self.req.prompt_id.is_none()
            && self.reopens < MAX_REOPENS
            && !self.cancel_requested
    }

    /// After `Opened` for a new session that replaces one the cloud forgot: sends what needs
    /// no token (the prompt), then paces the decode frames on the tokens the new session
    /// produces again ([`replay_after_token`](Self::replay_after_token)): the cloud accepts
    /// a decode step's hidden state only once it has produced that step's token. Tokens the
    /// caller already has are not delivered again.
    async fn replay_reopened(&mut self, ws: &mut Ws, next: u64) -> Result<(), Stop> {
        if next != 0 {
            return Err(ClientError::Protocol(format!(
                "a new session wants hidden frames from {next}, not 0"
            ))
            .into());
        }
        let upfront = if self.prompt_fed == self.req.prompt.len() {
            self.prompt_frames
        } else {
            self.sent.len()
        };
        self.stats.reconnects += 1;
        self.stats.replays += 1;
        self.stats.reopens += 1;
        let resent = self.sent.len() as u64;
        if let Some((session, _)) = &self.session {
            tracing::info!(session = %session, resent, tokens = self.tokens.len(), "new session opened; replaying");
        }
        let _ = self.events.send(Event::Resumed {
            next_hidden_seq: 0,
            resent,
        });
        self.stats.hidden_frames_resent += resent;
        for seq in 0..upfront {
            self.send_stored(ws, seq).await?;
        }
        self.replay_got = 0;
        if !self.tokens.is_empty() && upfront < self.sent.len() {
            self.replay = Some(upfront);
        }
        Ok(())
    }

    /// During a replay into a new session, the cloud sent a token again: once the answer to
    /// the last frame replayed is whole (a token, and one per draft row of that frame, or a
    /// draft token that ends the generation), the next stored frame may go (the cloud takes a
    /// complete frame only once the previous one is answered). The answer to the last stored
    /// frame is not consumed here: it is the one the device may still wait for. Returns
    /// whether the token was consumed.
    async fn replay_on_token(
        &mut self,
        ws: &mut Ws,
        t: &tandem_protocol::Token,
    ) -> Result<bool, Stop> {
        let Some(next) = self.replay else {
            return Ok(false);
        };
        if next >= self.sent.len() {
            self.replay = None;
            return Ok(false);
        }
        if t.input_seq + 1 != next as u64 {
            return Ok(true); // an answer to an earlier frame: the caller has it
        }
        self.replay_got += 1;
        let drafts = usize::from(self.sent[next - 1].get(22).copied().unwrap_or(0));
        if self.replay_got < 1 + drafts && !t.last {
            return Ok(true);
        }
        self.replay_got = 0;
        self.send_stored(ws, next).await?;
        self.replay = (next + 1 < self.sent.len()).then_some(next + 1);
        Ok(true)
    }

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

    /// The life of one connection after `Opened`: `Ok` when the generation ended.
    async fn connection(&mut self, mut ws: Ws) -> Result<(), Stop> {
        loop {
            if self.done.is_some() {
                let _ = ws.close(None).await;
                return Ok(());
            }
            if !self.cancel_requested {
                if self.prompt_fed < self.req.prompt.len() {
                    self.push_prompt_chunk(&mut ws).await?;
                    if self.done.is_none() {
                        let seq = self.sent.len() - 1;
                        self.flush(&mut ws, seq).await?;
                    }
                    continue;
                }
                if self.owes_hidden() {
                    // A `Done` may follow the token: look at what already arrived first.
                    while let Some(msg) = ws.next().now_or_never() {
                        if let Some(frame) = self.classify(msg)? {
                            self.handle(&mut ws, frame).await?;
                        }
                        if self.done.is_some() {
                            break;
                        }
                    }
                    if self.done.is_some() || !self.owes_hidden() {
                        continue;
                    }
                    if self.looks_final() && self.grace_spent_at != Some(self.tokens.len()) {
                        self.grace_spent_at = Some(self.tokens.len());
                        if let Ok(msg) = tokio::time::timeout(FINAL_TOKEN_GRACE, ws.next()).await {
                            if let Some(frame) = self.classify(msg)? {
                                self.handle(&mut ws, frame).await?;
                            }
                            continue;
                        }
                    }
                    if self.push_decode_hidden(&mut ws).await? {
                        let seq = self.sent.len() - 1;
                        self.flush(&mut ws, seq).await?;
                    }
                    continue;
                }
            }
            let wait = if self.cancel_sent {
                CANCEL_WAIT
            } else {
                self.cfg.idle_timeout
            };
            let armed = !self.cancel_requested;
            let woke = tokio::select! {
                _ = &mut self.cancel_rx, if armed => None,
                msg = tokio::time::timeout(wait, ws.next()) => Some(msg),
            };
            let msg = match woke {
                None => {
                    self.cancel_requested = true;
                    tracing::info!("cancelling");
                    send(&mut ws, Bytes::from(Frame::Cancel.encode()?)).await?;
                    self.cancel_sent = true;
                    continue;
                }
                Some(Ok(msg)) => self.classify(msg),
                Some(Err(_)) => Err(Stop::Retry(format!(
                    "no frame from the server for {wait:?}"
                ))),
            };
            match msg {
                Ok(Some(frame)) => self.handle(&mut ws, frame).await?,
                Ok(None) => {}
                Err(Stop::Retry(_)) if self.cancel_sent => {
                    self.done = Some(self.local_done(DoneReason::Cancelled));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one frame (`None`: a non-protocol message such as a WebSocket ping).
    async fn recv(&mut self, ws: &mut Ws, wait: Duration) -> Result<Option<Frame>, Stop> {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(msg) => self.classify(msg),
            Err(_) => Err(Stop::Retry(format!(
                "no frame from the server for {wait:?}"
            ))),
        }
    }

    fn classify(
        &mut self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<Option<Frame>, Stop> {
        match msg {
            None => Err(Stop::Retry("connection closed".into())),
            Some(Err(e)) => Err(Stop::Retry(format!("connection lost: {e}"))),
            Some(Ok(Message::Binary(bytes))) => {
                self.stats.bytes_received += bytes.len() as u64;
                if let Some(r) = self.req.record.as_mut() {
                    r.record_received(bytes.len() as u64);
                }
                Ok(Some(Frame::decode_with(&bytes, &self.cfg.limits)?))
            }
            Some(Ok(Message::Close(_))) => {
                Err(Stop::Retry("the server closed the connection".into()))
            }
            Some(Ok(Message::Text(_))) => Err(ClientError::Protocol(
                "a text message (the protocol uses binary messages only)".into(),
            )
            .into()),
            Some(Ok(_)) => Ok(None),
        }
    }

    /// Applies one frame received after `Opened`.
    async fn handle(&mut self, ws: &mut Ws, frame: Frame) -> Result<(), Stop> {
        match frame {
            Frame::Token(t) => {
                if self.replay_on_token(ws, &t).await? {
                    return Ok(());
                }
                if t.input_seq >= self.sent.len() as u64 {
                    return Err(ClientError::Protocol(format!(
                        "token {} answers hidden frame {}, not sent yet",
                        t.seq, t.input_seq
                    ))
                    .into());
                }
                let Some(aw) = self.awaiting.as_mut() else {
                    // An answer already taken (resent after a resume), or draft tokens the
                    // device has ruled on.
                    return Ok(());
                };
                if t.input_seq != aw.input_seq {
                    return Ok(());
                }
                let have = (self.tokens.len() + aw.got.len()) as u64;
                if t.seq < have {
                    return Ok(()); // resent after a resume: already here
                }
                if t.seq > have {
                    return Err(ClientError::Protocol(format!(
                        "token {} arrived but {have} was expected",
                        t.seq
                    ))
                    .into());
                }
                if t.draft == aw.got.is_empty() || aw.got.len() > aw.drafts.len() {
                    return Err(ClientError::Protocol(format!(
                        "token {}: not the answer to {} drafts",
                        t.seq,
                        aw.drafts.len()
                    ))
                    .into());
                }
                aw.got.push(t);
                self.progressed = true;
                if aw.is_whole() {
                    self.take_answer();
                }
                Ok(())
            }
            Frame::Done(d) => {
                // A token that counts and ends the generation comes without draft tokens
                // after it: its answer is whole with `Done`.
                if self.awaiting.as_ref().is_some_and(|a| !a.got.is_empty()) {
                    self.take_answer();
                }
                tracing::info!(
                    reason = d.reason.code(),
                    output_tokens = d.output_tokens,
                    "generation done"
                );
                self.progressed = true;
                self.done = Some(d);
                Ok(())
            }
            Frame::Error(e) if e.code.is_retryable() => {
                Err(Stop::Retry(format!("server error {}", e.code)))
            }
            Frame::Error(e) => Err(ClientError::Server {
                code: e.code,
                message: e.message,
            }
            .into()),
            Frame::Ping { nonce } => {
                send(ws, Bytes::from(Frame::Pong { nonce }.encode()?)).await?;
                Ok(())
            }
            Frame::Pong { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "unexpected {:?} frame",
                other.frame_type()
            ))
            .into()),
        }
    }

    /// Rules on a whole answer: the token that counts, and each draft token whose drafts
    /// before it all matched the cloud's tokens; records them and delivers them in order.
    fn take_answer(&mut self) {
        let Some(aw) = self.awaiting.take() else {
            return;
        };
        let answer: Vec<u32> = aw.got.iter().map(|t| t.token_id).collect();
        let accepted = crate::draft::accepted_drafts(&aw.drafts, &answer);
        if !aw.drafts.is_empty() {
            self.stats.drafted_tokens += aw.drafts.len() as u64;
            self.stats.accepted_drafts += accepted as u64;
            self.draft_len.update(aw.drafts.len(), accepted);
            if let Some(r) = self.req.record.as_mut() {
                r.record_drafts(aw.drafts.len() as u64, accepted as u64);
            }
            self.next_at = Some(aw.draft_first + accepted);
        } else {
            self.next_at = None;
        }
        if self.prompt_frames > 0 && aw.input_seq as usize >= self.prompt_frames {
            self.stats.decode_rounds += 1;
        }
        let counted = &aw.got[..=accepted];
        self.final_by_draft = counted.last().is_some_and(|t| t.last);
        if let Some(t) = counted.last() {
            self.cloud_cap = usize::from(t.draft_cap);
        }
        for t in counted {
            self.tokens.push(t.token_id);
            self.first_token.get_or_insert_with(Instant::now);
            let text = t.text.clone().unwrap_or_default();
            self.text.push_str(&text);
            let _ = self.events.send(Event::Token {
                seq: t.seq,
                token_id: t.token_id,
                text,
            });
        }
    }

    /// The cloud waits for the next decode frame: the prompt was sent and its last answer
    /// was ruled on.
    fn owes_hidden(&self) -> bool {
        self.done.is_none()
            && self.replay.is_none()
            && self.prompt_fed == self.req.prompt.len()
            && self.awaiting.is_none()
            && !self.tokens.is_empty()
    }

    /// The last token is probably the end (end of sequence, or the token limit) and `Done`
    /// should follow it (a draft token that ends the generation needs the verdict first).
    fn looks_final(&self) -> bool {
        !self.final_by_draft
            && (self.tokens.len() >= self.req.max_tokens as usize
                || self.tokens.last().is_some_and(|t| self.eos.contains(t)))
    }

    /// Drafts for the next decode step: prompt lookup over the prompt and the output, as
    /// many as the acceptance so far, the cloud's cap and the tokens left allow.
    fn drafts(&mut self) -> Vec<u32> {
        let last = self.tokens.last().copied();
        let ends = self.final_by_draft
            || last.is_some_and(|t| self.eos.contains(&t))
            || self.tokens.len() >= self.req.max_tokens as usize;
        if ends {
            return Vec::new();
        }
        let left = (self.req.max_tokens as usize).saturating_sub(self.tokens.len() + 1);
        let max = self.draft_len.get().min(self.cloud_cap).min(left);
        if max == 0 {
            return Vec::new();
        }
        let mut context = Vec::with_capacity(self.req.prompt.len() + self.tokens.len());
        context.extend_from_slice(&self.req.prompt);
        context.extend_from_slice(&self.tokens);
        let mut drafts = self.drafter.draft(&context, max);
        drafts.truncate(max);
        drafts
    }

    /// Runs the edge over the next prompt chunk and keeps its frame. The shared system prefix
    /// is a chunk (or chunks) of its own.
    async fn push_prompt_chunk(&mut self, ws: &mut Ws) -> Result<(), Stop> {
        let len = self.req.prompt.len();
        let start = self.prompt_fed;
        let boundary = if start < self.req.system_prefix_len {
            self.req.system_prefix_len
        } else {
            len
        };
        let end = boundary.min(start + self.cfg.prompt_chunk_tokens);
        let step = Step {
            ids: self.req.prompt[start..end].to_vec(),
            seq: self.sent.len() as u64,
            complete: end == len,
            drafts: 0,
            at: None,
        };
        let (computed, interrupted) = self.compute(ws, step).await?;
        self.edge_prompt += computed.elapsed;
        self.stats.prompt_frames += 1;
        self.stats.prompt_bytes += computed.frame.len() as u64;
        self.sent.push(computed.frame);
        self.edge_position = end;
        self.prompt_fed = end;
        if end == len {
            self.prompt_frames = self.sent.len();
            self.awaiting = Some(Awaiting {
                input_seq: (self.sent.len() - 1) as u64,
                drafts: Vec::new(),
                draft_first: end,
                got: Vec::new(),
            });
        }
        interrupted.map_or(Ok(()), Err)
    }

    /// Runs the edge over the last token and keeps its frame; `false` when the generation
    /// ended (a `Done` came) while it ran, and there is nothing to send.
    async fn push_decode_hidden(&mut self, ws: &mut Ws) -> Result<bool, Stop> {
        let token = *self.tokens.last().ok_or_else(|| {
            Stop::Fatal(ClientError::Protocol("no token to continue from".into()))
        })?;
        let drafts = self.drafts();
        let mut ids = Vec::with_capacity(1 + drafts.len());
        ids.push(token);
        ids.extend_from_slice(&drafts);
        let at = self.next_at.take();
        let step = Step {
            ids,
            seq: self.sent.len() as u64,
            complete: true,
            drafts: drafts.len() as u8,
            at,
        };
        // The step's first position: where the edge's cache stands after the cut.
        let position = at.unwrap_or(self.edge_position);
        let (computed, interrupted) = self.compute(ws, step).await?;
        if self.done.is_some() {
            return interrupted.map_or(Ok(false), Err);
        }
        self.edge_position = position + 1 + drafts.len();
        self.awaiting = Some(Awaiting {
            input_seq: self.sent.len() as u64,
            draft_first: position + 1,
            drafts,
            got: Vec::new(),
        });
        self.edge_decode += computed.elapsed;
        self.edge_decode_steps += 1;
        self.stats.decode_frames += 1;
        self.stats.decode_bytes += computed.frame.len() as u64;
        self.sent.push(computed.frame);
        interrupted.map_or(Ok(true), Err)
    }

    /// Runs `step` on the blocking pool and, meanwhile, handles what arrives on `ws` (a
    /// `Ping` is answered, a `Done` or an `Error` is taken). The step's frame comes back even
    /// when the connection failed meanwhile (the second value): the caller keeps it, since
    /// the edge's cache has consumed its tokens, and a later connection sends it.
    async fn compute(&mut self, ws: &mut Ws, step: Step) -> Result<(Computed, Option<Stop>), Stop> {
        let edge = self.edge.take().ok_or(Stop::Fatal(ClientError::TaskGone))?;
        let mut task = edge.spawn(step);
        let mut interrupted: Option<Stop> = None;
        let joined = loop {
            if interrupted.is_some() {
                break (&mut task).await;
            }
            let msg = tokio::select! {
                joined = &mut task => break joined,
                msg = ws.next() => msg,
            };
            let handled = match self.classify(msg) {
                Ok(Some(frame)) => self.handle(ws, frame).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            interrupted = handled.err();
        };
        // A panic in the edge layers loses the session's cache: nothing can continue.
        let (edge, result) = joined.map_err(|_| Stop::Fatal(ClientError::TaskGone))?;
        if let (Some(r), Some(noiser)) = (self.req.record.as_mut(), edge.noiser()) {
            if let Some(n) = r.noise.as_mut() {
                n.update(noiser);
            }
        }
        self.edge = Some(edge);
        Ok((result?, interrupted))
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
