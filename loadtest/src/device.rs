//! One simulated device's generation over the raw protocol (docs/protocol.md §6), timed,
//! surviving dropped connections as a real device does.
//!
//! Connect, send `Open`, wait for `Opened`, send the prompt's `Hidden` frames, then answer
//! each `Token` with the next step's frame (from the [`Cursor`]) until `Done`. A token that
//! looks final (the `max_tokens`-th, or an end-of-sequence id) is not answered at once:
//! `Done` should follow it; if none comes within [`FINAL_TOKEN_GRACE`] its hidden state is
//! sent anyway (as `tandem-edge` does).
//!
//! # Resume and replay
//! Every `Hidden` frame sent is kept (`Bytes`, shared with the replay tree: no copy), and
//! every token id received. When the connection drops, a send fails, the server is silent
//! for the silence timeout (see below), or it answers a `3xx` error (`shutting_down`,
//! `unavailable`, …), the device reconnects after a [`backoff`] and:
//! - sends `Resume` (session id, the latest resume token, the last token's sequence number);
//!   on `Opened` it resends every kept `Hidden` from the `Opened`'s next sequence number:
//!   a *resume* when the server kept the session, a *replay* when it says 0 (it lost the
//!   state but kept the session's parameters, e.g. in Redis): then every frame goes back to
//!   back and the server rebuilds its KV from them without sending the known tokens again;
//! - if the server answers `unknown_session` (an in-memory store after a restart), it sends
//!   a new `Open` and replays step by step: the prompt's frames, then for each token the
//!   server sends again the kept frame that followed it the first time. Tokens it already
//!   has are checked (same id, else `protocol_violation`) and not counted again; new ones
//!   continue the generation. This is also counted as a replay (and as a *reopen*).
//! - `moved` reconnects at once to the URL it names.
//!
//! `--max-reconnects` bounds the consecutive failed attempts of one outage; a connection
//! that brings a new token or `Done` ends the outage. A generation that runs out of attempts
//! fails with the last cause and is counted as *lost*. Refusals of the first `Open`
//! (`overloaded`, `rate_limited`) are not retried: they are what a load test measures.
//!
//! # Speculation
//! With `--max-draft-tokens N` (real edge compute only) a device drafts as `tandem-edge`
//! does, with the same types ([`tandem_edge::draft`]): prompt lookup over the prompt and the
//! output so far, as many drafts as its adaptive [`DraftLength`], the cloud's last
//! `draft_cap` and the tokens left allow. Each decode frame carries the token received and
//! the drafts; the device takes the cloud's answer whole (the token that counts, then one
//! per draft row), rules on it with [`accepted_drafts`], and its next frame starts where the
//! verdict says (the edge forgets the drafts that did not count). Only the tokens that count
//! are the generation's tokens (and are timed); the report counts drafted and accepted
//! tokens and the round trips. A drafting generation survives resumes (the server kept its
//! state: its frames are resent from where the server stands); a server that lost the
//! session (`unknown_session`) fails it, as no step-by-step replay of drafted answers is
//! made (`tandem-edge` does that one; the load generator measures, it does not recover).
//!
//! # Silence
//! The silence timeout (`--silence-timeout-s`, [`DEFAULT_SILENCE_TIMEOUT`]) bounds only the
//! waits for the server: for `Opened`, and for the next frame while the server owes a token
//! or `Done`. What the device itself takes when it is its turn to send (the step delay, the
//! edge compute, the think time between generations, the reconnection backoff) is never
//! counted, so a session kept open by a device that sends one step every ten minutes is not
//! silence, however short the timeout.
//!
//! # Timings
//! Taken on the device: TTFT from just before the first `Open` is written to the first
//! `Token`; each gap between two consecutive new tokens (so the gap spanning an outage holds
//! the outage, the reconnection and any replay: what the user sees as a stall, and it counts
//! in TPOT); end to end from the first `Open` to `Done`; the first TCP + WebSocket handshake
//! on its own (later ones are inside the gaps). They include the device's edge work (replayed
//! and usually cached, or real).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tandem_protocol::{DoneReason, ErrorCode, Frame, Open, ResumeToken, SessionId};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use tandem_edge::draft::{accepted_drafts, DraftLength, Drafter, PromptLookup};

use crate::compute::{Compute, Cursor};
use crate::live::Live;
use crate::workload::PromptId;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub use crate::timing::{
    backoff, BACKOFF_INITIAL, BACKOFF_MAX, CONNECT_TIMEOUT, DEFAULT_SILENCE_TIMEOUT,
    FINAL_TOKEN_GRACE,
};

/// Why a generation failed.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The server sent an `Error` frame.
    Server { code: ErrorCode, message: String },
    /// No WebSocket connection could be made.
    Connect(String),
    /// The connection closed (or a send failed) before `Done`.
    Disconnected(String),
    /// The server said nothing for this long (the silence timeout) while the device waited.
    Timeout(Duration),
    /// The server broke the protocol (a bad frame, an unexpected frame, a gap in tokens, a
    /// replayed token that differs).
    Protocol(String),
    /// The edge compute failed.
    Edge(String),
}

impl Failure {
    /// The name errors are counted under: the protocol's code name for an `Error` frame
    /// (`overloaded`, `internal`, …), otherwise one of `connect_failed`, `disconnected`,
    /// `timeout`, `protocol_violation`, `edge_compute` (no protocol code has these names).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Server { code, .. } => code.as_str(),
            Self::Connect(_) => "connect_failed",
            Self::Disconnected(_) => "disconnected",
            Self::Timeout(_) => "timeout",
            Self::Protocol(_) => "protocol_violation",
            Self::Edge(_) => "edge_compute",
        }
    }

    /// A human-readable detail, for the report's examples.
    pub fn detail(&self) -> String {
        match self {
            Self::Server { code, message } => format!("{code} ({}): {message}", code.as_u16()),
            Self::Timeout(after) => format!("no frame for {}s", after.as_secs_f64()),
            Self::Connect(m) | Self::Disconnected(m) | Self::Protocol(m) | Self::Edge(m) => {
                m.clone()
            }
        }
    }
}

/// How a generation ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `Done` arrived.
    Done {
        reason: DoneReason,
        /// As `Done` reports them.
        output_tokens: u32,
    },
    Failed(Failure),
}

/// What one generation measured.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRecord {
    /// Which device (in arrival order) and which of its generations (0-based).
    pub device: usize,
    pub generation: usize,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub outcome: Outcome,
    /// Distinct `Token` frames received (a token resent after a reconnection counts once).
    pub tokens_received: u32,
    /// Their ids, in order.
    pub tokens: Vec<u32>,
    pub ttft: Option<Duration>,
    /// Between consecutive new tokens (outages included).
    pub gaps: Vec<Duration>,
    /// First `Open` to `Done` (or to the failure).
    pub e2e: Duration,
    /// The first TCP + WebSocket handshake (before `Open`; not in the other times).
    pub connect: Option<Duration>,
    /// Reconnection attempts after a lost connection.
    pub reconnects: u32,
    /// `Resume`s the server answered with the session's state kept.
    pub resumes: u32,
    /// Sessions rebuilt from the kept frames (`Resume` answered with 0, or a new `Open`).
    pub replays: u32,
    /// Of `replays`, those that needed a new `Open` (`unknown_session`).
    pub reopens: u32,
    /// Failed after every reconnection attempt (the failure is the last attempt's cause).
    pub lost: bool,
    /// Drafts sent (speculation) and those the cloud's answers confirmed.
    pub drafted: u32,
    pub accepted: u32,
    /// Answers taken: the prompt's, then one per decode frame (each a round trip).
    pub rounds: u32,
}

/// What every device shares.
#[derive(Debug)]
pub struct DeviceContext {
    pub server: String,
    /// With network conditions (`LoadConfig::network`): the URLs of the in-process delay
    /// proxies in front of the server; device `i` connects through `links[i % len]`.
    pub links: Vec<String>,
    /// The `Open` every generation sends, but for its `max_tokens`.
    pub open: Open,
    pub compute: Arc<Compute>,
    /// End-of-sequence ids: a token among them is expected to be the last.
    pub eos: Vec<u32>,
    pub live: Arc<Live>,
    /// Consecutive failed reconnection attempts before a generation is given up.
    pub max_reconnects: u32,
    /// Pause before each decode step's hidden state is computed and sent (`--step-delay-ms`).
    /// The device's own time: not counted by `silence_timeout`.
    pub step_delay: Duration,
    /// Longest wait for a frame the server owes (`--silence-timeout-s`).
    pub silence_timeout: Duration,
    /// Most drafts per decode step (`--max-draft-tokens`; 0: no speculation). Needs real
    /// edge compute.
    pub max_draft_tokens: usize,
    /// Device tokens; device `i` presents `device_tokens[i % len]` on the upgrade.
    pub device_tokens: Vec<String>,
}

/// Which generation: the device, its index there, the prompt and `max_tokens`.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub device: usize,
    pub generation: usize,
    pub prompt: PromptId,
    pub max_tokens: u32,
}

/// Runs one generation.
pub async fn generate(ctx: &DeviceContext, job: Job) -> GenerationRecord {
    let mut run = Run {
        ctx,
        job,
        started: Instant::now(),
        open_sent: false,
        opened_once: false,
        reopening: false,
        ttft: None,
        gaps: Vec::new(),
        last_token_at: None,
        e2e: Duration::ZERO,
        connect: None,
        tokens: Vec::new(),
        frames: Vec::new(),
        prompt_frames: 0,
        cursor: None,
        session: None,
        redirect: None,
        progressed: false,
        reconnects: 0,
        resumes: 0,
        replays: 0,
        reopens: 0,
        spec: (ctx.max_draft_tokens > 0).then(|| Speculation::new(ctx.max_draft_tokens)),
        rounds: 0,
    };
    let (outcome, lost) = match run.drive().await {
        Ok(done) => (
            Outcome::Done {
                reason: done.reason,
                output_tokens: done.output_tokens,
            },
            false,
        ),
        Err((f, lost)) => (Outcome::Failed(f), lost),
    };
    if lost {
        ctx.live.lost();
    }
    GenerationRecord {
        device: job.device,
        generation: job.generation,
        prompt_tokens: ctx.compute.prompt_len(job.prompt) as u32,
        max_tokens: job.max_tokens,
        outcome,
        tokens_received: run.tokens.len() as u32,
        tokens: run.tokens,
        ttft: run.ttft,
        gaps: run.gaps,
        e2e: run.e2e,
        connect: run.connect,
        reconnects: run.reconnects,
        resumes: run.resumes,
        replays: run.replays,
        reopens: run.reopens,
        lost,
        drafted: run.spec.as_ref().map_or(0, |s| s.drafted),
        accepted: run.spec.as_ref().map_or(0, |s| s.accepted),
        rounds: run.rounds,
    }
}

/// A drafting device's state (see the module doc's *Speculation*).
struct Speculation {
    drafter: PromptLookup,
    length: DraftLength,
    /// The `draft_cap` of the last token that counted (0 before the first answer).
    cloud_cap: usize,
    /// The answer waited for, from the frame sent last until it is whole.
    awaiting: Option<Awaiting>,
    /// Where the next decode frame starts, when the last one's drafts did not all count.
    next_at: Option<usize>,
    /// Positions the edge holds after the last frame (the next frame's first, but for a cut).
    edge_position: usize,
    /// The last token that counts is a draft token that ends the generation: its frame goes
    /// at once (that frame is the verdict the server waits for before `Done`).
    final_by_draft: bool,
    drafted: u32,
    accepted: u32,
}

/// The answer to one frame, as it arrives.
struct Awaiting {
    input_seq: u64,
    drafts: Vec<u32>,
    /// Position of the first draft.
    draft_first: usize,
    /// `(token id, last)` in order: the one that counts, then one per draft row.
    got: Vec<(u32, bool, u8)>,
}

impl Awaiting {
    fn is_whole(&self) -> bool {
        self.got.len() > self.drafts.len() || self.got.last().is_some_and(|g| g.1)
    }
}

impl Speculation {
    fn new(max: usize) -> Self {
        Self {
            drafter: PromptLookup::default(),
            length: DraftLength::new(max.min(usize::from(tandem_protocol::wire::MAX_DRAFTS))),
            cloud_cap: 0,
            awaiting: None,
            next_at: None,
            edge_position: 0,
            final_by_draft: false,
            drafted: 0,
            accepted: 0,
        }
    }
}

/// Why a connection ended without `Done`.
enum Stop {
    /// Try again on a new connection.
    Retry(Failure),
    /// The server forgot the session: open a new one now and replay.
    Reopen,
    /// The generation cannot go on.
    Fatal(Failure),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Self::Fatal(f)
    }
}

/// How the connection after `Opened` should start.
enum Entry {
    /// A new session: the server waits for the prompt.
    Fresh,
    /// The server has (or rebuilds) every token we hold and waits for the rest of our
    /// frames, then for the last token's hidden state if we still owe it.
    Resumed,
    /// A new session for a generation that already has tokens: they come again.
    Reopened,
}

/// The state of one generation in progress.
struct Run<'a> {
    ctx: &'a DeviceContext,
    job: Job,
    /// Just before the first `Open`.
    started: Instant,
    open_sent: bool,
    opened_once: bool,
    /// The server forgot the session: the next `Opened` starts a replay by new `Open`.
    reopening: bool,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    last_token_at: Option<Instant>,
    e2e: Duration,
    connect: Option<Duration>,
    /// Token ids received; index = sequence number.
    tokens: Vec<u32>,
    /// Every `Hidden` frame produced; index = sequence number.
    frames: Vec<Bytes>,
    /// Frames the prompt took (`frames[prompt_frames + s]` answers token `s`).
    prompt_frames: usize,
    cursor: Option<Cursor>,
    session: Option<(SessionId, ResumeToken)>,
    /// Where a `moved` answer said the session lives.
    redirect: Option<String>,
    /// The current connection brought a new token or `Done` (ends an outage).
    progressed: bool,
    reconnects: u32,
    resumes: u32,
    replays: u32,
    reopens: u32,
    /// `Some` when this generation drafts.
    spec: Option<Speculation>,
    /// Answers taken (see [`GenerationRecord::rounds`]).
    rounds: u32,
}

impl Run<'_> {
    /// Connections until `Done`, a fatal failure, or the end of the reconnection budget
    /// (`Err((failure, true))`: lost).
    async fn drive(&mut self) -> Result<tandem_protocol::Done, (Failure, bool)> {
        let mut failures: u32 = 0;
        loop {
            self.progressed = false;
            let stop = match self.connection().await {
                Ok(done) => {
                    self.e2e = self.started.elapsed();
                    return Ok(done);
                }
                Err(stop) => stop,
            };
            self.e2e = self.started.elapsed();
            if self.progressed {
                failures = 0;
            }
            let delay = match stop {
                Stop::Fatal(f) => return Err((f, false)),
                Stop::Reopen => {
                    self.reopening = true;
                    Duration::ZERO
                }
                Stop::Retry(f) => {
                    if failures >= self.ctx.max_reconnects {
                        return Err((f, true));
                    }
                    failures += 1;
                    if self.redirect.is_some() {
                        Duration::ZERO
                    } else {
                        backoff(failures - 1, rand::random::<f64>())
                    }
                }
            };
            tokio::time::sleep(delay).await;
            self.reconnects += 1;
            self.ctx.live.reconnect();
        }
    }

    /// One connection: handshake, `Open` or `Resume`, then frames until `Done`.
    async fn connection(&mut self) -> Result<tandem_protocol::Done, Stop> {
        let url = self
            .redirect
            .take()
            .unwrap_or_else(|| match self.ctx.links.len() {
                0 => self.ctx.server.clone(),
                n => self.ctx.links[self.job.device % n].clone(),
            });
        let began = Instant::now();
        let mut request = match url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => return Err(Stop::Retry(Failure::Connect(e.to_string()))),
        };
        let tokens = &self.ctx.device_tokens;
        if !tokens.is_empty() {
            let bearer = format!("Bearer {}", tokens[self.job.device % tokens.len()]);
            match tokio_tungstenite::tungstenite::http::HeaderValue::from_str(&bearer) {
                Ok(v) => {
                    request.headers_mut().insert("authorization", v);
                }
                Err(e) => return Err(Stop::Retry(Failure::Connect(e.to_string()))),
            }
        }
        let connect = tokio_tungstenite::connect_async_with_config(
            request,
            Some(
                WebSocketConfig::default()
                    .read_buffer_size(tandem_protocol::wire::WS_READ_BUFFER_BYTES),
            ),
            true, // no Nagle: frames are small and every one is waited for
        );
        let mut ws = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok((ws, _))) => ws,
            // A refused credential or a wrong path does not get better by retrying.
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(r)))
                if matches!(r.status().as_u16(), 401 | 403 | 404) =>
            {
                return Err(Stop::Fatal(Failure::Connect(format!(
                    "the upgrade was refused with {}",
                    r.status()
                ))))
            }
            Ok(Err(e)) => return Err(Stop::Retry(Failure::Connect(e.to_string()))),
            Err(_) => return Err(Stop::Retry(Failure::Connect("timed out".into()))),
        };
        if self.connect.is_none() {
            self.connect = Some(began.elapsed());
        }
        let result = self.session(&mut ws).await;
        let _ = ws.close(None).await;
        result
    }

    async fn session(&mut self, ws: &mut Ws) -> Result<tandem_protocol::Done, Stop> {
        let resuming = self.session.is_some();
        let first = match &self.session {
            Some((session, token)) => Frame::Resume(tandem_protocol::Resume {
                session: *session,
                resume_token: token.clone(),
                last_token_seq: ((self.tokens.len() + self.answer_so_far()) as u64).checked_sub(1),
            }),
            None => Frame::Open(Open {
                max_tokens: self.job.max_tokens,
                ..self.ctx.open.clone()
            }),
        };
        let first = first
            .encode()
            .map_err(|e| Failure::Protocol(format!("encoding the first frame: {e}")))?;
        if !self.open_sent {
            self.started = Instant::now();
            self.open_sent = true;
        }
        send(ws, Bytes::from(first)).await?;
        let opened = self.wait_opened(ws, resuming).await?;
        self.opened_once = true;

        let entry = if resuming {
            if opened.session != self.session_id() {
                return Err(Stop::Fatal(Failure::Protocol(format!(
                    "resumed session {} but the server answered for {}",
                    self.session_id(),
                    opened.session
                ))));
            }
            let next = opened.next_hidden_seq;
            if next > self.frames.len() as u64 {
                return Err(Stop::Fatal(Failure::Protocol(format!(
                    "the server wants hidden frames from {next}, but only {} were sent",
                    self.frames.len()
                ))));
            }
            if next == 0 && !self.frames.is_empty() {
                self.replays += 1;
                self.ctx.live.replay();
            } else {
                self.resumes += 1;
                self.ctx.live.resume();
            }
            self.session = Some((opened.session, opened.resume_token));
            for frame in self.frames[next as usize..].iter().cloned() {
                send(ws, frame).await?;
            }
            Entry::Resumed
        } else {
            self.session = Some((opened.session, opened.resume_token));
            if self.cursor.is_none() {
                let (cursor, frames) = self
                    .ctx
                    .compute
                    .start(self.job.prompt)
                    .await
                    .map_err(|e| Failure::Edge(format!("{e:#}")))?;
                self.cursor = Some(cursor);
                self.prompt_frames = frames.len();
                self.frames = frames;
                let prompt_len = self.ctx.compute.prompt_len(self.job.prompt);
                if let Some(spec) = self.spec.as_mut() {
                    spec.edge_position = prompt_len;
                    spec.awaiting = Some(Awaiting {
                        input_seq: (self.prompt_frames - 1) as u64,
                        drafts: Vec::new(),
                        draft_first: prompt_len,
                        got: Vec::new(),
                    });
                }
            }
            let reopened = std::mem::take(&mut self.reopening);
            if reopened {
                self.replays += 1;
                self.reopens += 1;
                self.ctx.live.replay();
            }
            for frame in self.frames[..self.prompt_frames].iter().cloned() {
                send(ws, frame).await?;
            }
            if reopened && !self.tokens.is_empty() {
                Entry::Reopened
            } else {
                Entry::Fresh
            }
        };
        // Frames sent on this connection so far: the next one to send is `frames[sent]`.
        let mut sent = match entry {
            Entry::Resumed => self.frames.len(),
            Entry::Fresh | Entry::Reopened => self.prompt_frames,
        };
        // A final-looking token whose hidden state has not been sent.
        let mut held: Option<u32> = None;
        if matches!(entry, Entry::Resumed) && self.unanswered() && self.spec.is_some() {
            self.after_answer(ws, &mut held, &mut sent).await?;
        } else if matches!(entry, Entry::Resumed) && self.unanswered() {
            // The server waits for the hidden state of our last token.
            let last = self.tokens[self.tokens.len() - 1];
            if self.looks_final(last) {
                held = Some(last);
            } else {
                self.answer(ws, last, &mut sent).await?;
            }
        }
        loop {
            // The server's turn: the device sends nothing until a frame comes (an answer to
            // the last token, when it was held, goes after the grace).
            let wait = if held.is_some() {
                FINAL_TOKEN_GRACE
            } else {
                self.ctx.silence_timeout
            };
            let frame = match tokio::time::timeout(wait, recv(ws)).await {
                Ok(frame) => frame?,
                Err(_) => match held.take() {
                    // No `Done` after all: the server wants this token's hidden state.
                    Some(token) => {
                        self.answer(ws, token, &mut sent).await?;
                        continue;
                    }
                    None => return Err(Stop::Retry(Failure::Timeout(wait))),
                },
            };
            match frame {
                Frame::Token(t) if self.spec.is_some() => {
                    if held.is_some() {
                        return Err(Stop::Fatal(Failure::Protocol(format!(
                            "token {} arrived before the last one's hidden state was sent",
                            t.seq
                        ))));
                    }
                    if self.on_spec_token(&t)? {
                        self.after_answer(ws, &mut held, &mut sent).await?;
                    }
                }
                Frame::Token(t) => {
                    let have = self.tokens.len() as u64;
                    if t.seq > have || held.is_some() {
                        return Err(Stop::Fatal(Failure::Protocol(format!(
                            "token {} arrived after {have} tokens{}",
                            t.seq,
                            if held.is_some() {
                                " before the last one's hidden state was sent"
                            } else {
                                ""
                            }
                        ))));
                    }
                    let s = t.seq as usize;
                    if t.seq < have {
                        // Sent again by a reopened session: must be the same token.
                        if self.tokens[s] != t.token_id {
                            return Err(Stop::Fatal(Failure::Protocol(format!(
                                "token {} came back as id {} after a replay, was {}",
                                t.seq, t.token_id, self.tokens[s]
                            ))));
                        }
                    } else {
                        self.on_token(t.token_id);
                        self.rounds += 1;
                    }
                    let index = self.prompt_frames + s;
                    if index < self.frames.len() {
                        // Answered before the connection dropped: send the same frame again.
                        if index == sent {
                            send(ws, self.frames[index].clone()).await?;
                            sent += 1;
                        }
                    } else if self.looks_final(t.token_id) {
                        held = Some(t.token_id);
                    } else {
                        self.answer(ws, t.token_id, &mut sent).await?;
                    }
                }
                Frame::Done(d) => {
                    // A token that counts and ends the generation comes without the draft
                    // tokens after it: its answer is whole with `Done`.
                    if self
                        .spec
                        .as_ref()
                        .and_then(|s| s.awaiting.as_ref())
                        .is_some_and(|a| !a.got.is_empty())
                    {
                        self.take_answer();
                    }
                    self.progressed = true;
                    return Ok(d);
                }
                Frame::Error(e) if e.code.is_retryable() => {
                    if e.code == ErrorCode::Moved && e.message.starts_with("ws") {
                        self.redirect = Some(e.message.clone());
                    }
                    return Err(Stop::Retry(Failure::Server {
                        code: e.code,
                        message: e.message,
                    }));
                }
                Frame::Error(e) => {
                    return Err(Stop::Fatal(Failure::Server {
                        code: e.code,
                        message: e.message,
                    }))
                }
                Frame::Ping { nonce } => send_frame(ws, &Frame::Pong { nonce }).await?,
                Frame::Pong { .. } => {}
                other => {
                    return Err(Stop::Fatal(Failure::Protocol(format!(
                        "unexpected {:?} frame",
                        other.frame_type()
                    ))))
                }
            }
        }
    }

    fn session_id(&self) -> SessionId {
        self.session
            .as_ref()
            .map_or(SessionId(u128::MAX), |(id, _)| *id)
    }

    /// Whether the last token received still waits for its hidden state.
    fn unanswered(&self) -> bool {
        match &self.spec {
            Some(spec) => !self.tokens.is_empty() && spec.awaiting.is_none(),
            None => {
                !self.tokens.is_empty()
                    && self.frames.len() - self.prompt_frames < self.tokens.len()
            }
        }
    }

    /// Tokens of the answer under way (drafting only), before the device rules on it.
    fn answer_so_far(&self) -> usize {
        self.spec
            .as_ref()
            .and_then(|s| s.awaiting.as_ref())
            .map_or(0, |a| a.got.len())
    }

    /// A drafting device's `Token`: adds it to the answer waited for; `true` when the answer
    /// became whole and was ruled on (the next frame is owed, or the generation ended).
    fn on_spec_token(&mut self, t: &tandem_protocol::Token) -> Result<bool, Stop> {
        let have = self.tokens.len();
        let Some(aw) = self.spec.as_mut().and_then(|s| s.awaiting.as_mut()) else {
            return Ok(false); // resent after a resume: already ruled on
        };
        if t.input_seq != aw.input_seq {
            return Ok(false);
        }
        let have = (have + aw.got.len()) as u64;
        if t.seq < have {
            return Ok(false); // resent after a resume: already here
        }
        if t.seq > have || t.draft == aw.got.is_empty() || aw.got.len() > aw.drafts.len() {
            return Err(Stop::Fatal(Failure::Protocol(format!(
                "token {} (draft: {}) does not continue the answer to {} drafts after {have} tokens",
                t.seq,
                t.draft,
                aw.drafts.len()
            ))));
        }
        aw.got.push((t.token_id, t.last, t.draft_cap));
        self.progressed = true;
        if !aw.is_whole() {
            return Ok(false);
        }
        self.take_answer();
        Ok(true)
    }

    /// Rules on the answer waited for: the tokens that count become the generation's.
    fn take_answer(&mut self) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        let Some(aw) = spec.awaiting.take() else {
            return;
        };
        let answer: Vec<u32> = aw.got.iter().map(|g| g.0).collect();
        let accepted = accepted_drafts(&aw.drafts, &answer);
        if aw.drafts.is_empty() {
            spec.next_at = None;
        } else {
            spec.drafted += aw.drafts.len() as u32;
            spec.accepted += accepted as u32;
            spec.length.update(aw.drafts.len(), accepted);
            spec.next_at = Some(aw.draft_first + accepted);
        }
        let counted = &aw.got[..=accepted.min(aw.got.len().saturating_sub(1))];
        spec.final_by_draft = counted.last().is_some_and(|g| g.1);
        if let Some(g) = counted.last() {
            spec.cloud_cap = usize::from(g.2);
        }
        let ids: Vec<u32> = counted.iter().map(|g| g.0).collect();
        self.rounds += 1;
        for id in ids {
            self.on_token(id);
        }
    }

    /// After a drafting device ruled on an answer: holds a final-looking token (`Done`
    /// should follow), else sends the next frame.
    async fn after_answer(
        &mut self,
        ws: &mut Ws,
        held: &mut Option<u32>,
        sent: &mut usize,
    ) -> Result<(), Stop> {
        let Some(&last) = self.tokens.last() else {
            return Ok(());
        };
        let by_draft = self.spec.as_ref().is_some_and(|s| s.final_by_draft);
        if !by_draft && self.looks_final(last) {
            *held = Some(last);
            return Ok(());
        }
        self.answer(ws, last, sent).await
    }

    /// Drafts for the next decode step (as `tandem-edge`'s driver makes them).
    fn drafts(&mut self) -> Vec<u32> {
        let left = (self.job.max_tokens as usize).saturating_sub(self.tokens.len() + 1);
        let ends = self.tokens.last().is_some_and(|t| self.ctx.eos.contains(t));
        let Some(spec) = self.spec.as_mut() else {
            return Vec::new();
        };
        if ends || spec.final_by_draft {
            return Vec::new();
        }
        let max = spec.length.get().min(spec.cloud_cap).min(left);
        if max == 0 {
            return Vec::new();
        }
        let prompt = self.ctx.compute.prompt_ids(self.job.prompt).unwrap_or(&[]);
        let mut context = Vec::with_capacity(prompt.len() + self.tokens.len());
        context.extend_from_slice(prompt);
        context.extend_from_slice(&self.tokens);
        let mut drafts = spec.drafter.draft(&context, max);
        drafts.truncate(max);
        drafts
    }

    fn looks_final(&self, token: u32) -> bool {
        self.tokens.len() as u32 >= self.job.max_tokens || self.ctx.eos.contains(&token)
    }

    /// Waits for `Opened` after `Open` (`resuming: false`) or `Resume`.
    async fn wait_opened(
        &mut self,
        ws: &mut Ws,
        resuming: bool,
    ) -> Result<tandem_protocol::Opened, Stop> {
        loop {
            let limit = self.ctx.silence_timeout;
            let frame = tokio::time::timeout(limit, recv(ws))
                .await
                .map_err(|_| Stop::Retry(Failure::Timeout(limit)))??;
            match frame {
                Frame::Opened(o) => return Ok(o),
                Frame::Error(e)
                    if resuming && e.code == ErrorCode::UnknownSession && self.spec.is_some() =>
                {
                    return Err(Stop::Fatal(Failure::Server {
                        code: e.code,
                        message: format!(
                            "{} (a drafting device does not replay into a new session)",
                            e.message
                        ),
                    }));
                }
                Frame::Error(e) if resuming && e.code == ErrorCode::UnknownSession => {
                    // The server lost the session (restarted, in-memory store).
                    self.session = None;
                    return Err(Stop::Reopen);
                }
                Frame::Error(e) => {
                    let failure = Failure::Server {
                        code: e.code,
                        message: e.message.clone(),
                    };
                    // Refusals of a brand-new generation are what the test measures.
                    let first_open = !self.opened_once && self.tokens.is_empty() && !resuming;
                    let refused = matches!(e.code, ErrorCode::Overloaded | ErrorCode::RateLimited);
                    if !e.code.is_retryable() || (first_open && refused) {
                        return Err(Stop::Fatal(failure));
                    }
                    if e.code == ErrorCode::Moved && e.message.starts_with("ws") {
                        self.redirect = Some(e.message);
                    }
                    return Err(Stop::Retry(failure));
                }
                Frame::Ping { nonce } => send_frame(ws, &Frame::Pong { nonce }).await?,
                Frame::Pong { .. } => {}
                other => {
                    return Err(Stop::Fatal(Failure::Protocol(format!(
                        "{:?} frame before Opened",
                        other.frame_type()
                    ))))
                }
            }
        }
    }

    fn on_token(&mut self, token: u32) {
        let now = Instant::now();
        match self.last_token_at {
            None => self.ttft = Some(now - self.started),
            Some(prev) => self.gaps.push(now - prev),
        }
        self.last_token_at = Some(now);
        self.tokens.push(token);
        self.progressed = true;
        self.ctx.live.token();
    }

    /// Computes the hidden state of `token` (the newest one), keeps it and sends it, after
    /// the step delay. (Frames sent again after a reconnection go at once.)
    async fn answer(&mut self, ws: &mut Ws, token: u32, sent: &mut usize) -> Result<(), Stop> {
        if !self.ctx.step_delay.is_zero() {
            tokio::time::sleep(self.ctx.step_delay).await;
        }
        let drafts = self.drafts();
        let input_seq = self.frames.len() as u64;
        let at = self.spec.as_mut().and_then(|s| s.next_at.take());
        let cursor = self
            .cursor
            .as_mut()
            .ok_or_else(|| Failure::Edge("no edge state".into()))?;
        let frame = cursor
            .next_drafted(token, &drafts, at)
            .await
            .map_err(|e| Failure::Edge(format!("{e:#}")))?;
        if let Some(spec) = self.spec.as_mut() {
            let position = at.unwrap_or(spec.edge_position);
            spec.edge_position = position + 1 + drafts.len();
            spec.awaiting = Some(Awaiting {
                input_seq,
                draft_first: position + 1,
                drafts,
                got: Vec::new(),
            });
        }
        self.frames.push(frame.clone());
        send(ws, frame).await?;
        *sent = self.frames.len();
        Ok(())
    }
}

async fn send(ws: &mut Ws, frame: Bytes) -> Result<(), Stop> {
    ws.send(Message::Binary(frame))
        .await
        .map_err(|e| Stop::Retry(Failure::Disconnected(format!("send failed: {e}"))))
}

async fn send_frame(ws: &mut Ws, frame: &Frame) -> Result<(), Stop> {
    let bytes = frame
        .encode()
        .map_err(|e| Failure::Protocol(format!("encoding {:?}: {e}", frame.frame_type())))?;
    send(ws, Bytes::from(bytes)).await
}

/// The next protocol frame.
async fn recv(ws: &mut Ws) -> Result<Frame, Stop> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                return Frame::decode(&b)
                    .map_err(|e| Stop::Fatal(Failure::Protocol(format!("bad frame: {e}"))))
            }
            Some(Ok(Message::Text(_))) => {
                return Err(Stop::Fatal(Failure::Protocol("a text message".into())));
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(Stop::Retry(Failure::Disconnected(
                    "the server closed the connection".into(),
                )))
            }
            Some(Err(e)) => return Err(Stop::Retry(Failure::Disconnected(e.to_string()))),
            Some(Ok(_)) => {} // WebSocket-level ping/pong
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_less_jitter() {
        let ms = |a, j| backoff(a, j).as_millis();
        assert_eq!(
            (0..6).map(|a| ms(a, 0.0)).collect::<Vec<_>>(),
            [250, 500, 1000, 2000, 4000, 4000]
        );
        assert_eq!(ms(100, 0.0), 4000);
        // Jitter takes off at most a quarter.
        assert_eq!(ms(0, 1.0), 187);
        assert!((187..=250).contains(&ms(0, 0.5)));
        assert_eq!(ms(3, 2.0), 1500); // clamped to 1
    }
}
