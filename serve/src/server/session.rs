//! One actor task per session: the single owner of the session's protocol state.
//!
//! The connection task decodes frames and sends them here as [`SessionCmd`]s; the engine sends
//! [`Event`]s on the session's own unbounded channel. The actor checks each `Hidden` against
//! the state machine of docs/protocol.md §6 (sequence numbers, positions, the token owed,
//! limits), queues accepted inputs and feeds the engine one complete input at a time (the
//! scheduler takes no input while a token is owed), and turns tokens into frames.
//!
//! Invariants:
//! - `tokens` holds every token the engine produced for this session, in order; the device
//!   has (or is sent) every one from `device_has` on, so a `Resume` resends exactly the ones
//!   after the device's last.
//! - A `Hidden` is accepted only when the device may send it: the complete inputs accepted so
//!   far are at most the tokens it holds (`max(device_has, tokens.len())`). In a Replay the
//!   device holds tokens the new engine session has not produced yet, so its replayed frames
//!   are queued here and fed as the tokens come, and those tokens are not sent again.
//! - The session leaves the live table when the actor ends: at the end of the grace period
//!   after its connection dropped (or after `Done`, so a device that missed `Done` can still
//!   `Resume` and get it), on a fatal error, or at shutdown.
//!
//! Costs: per session, its tokens (ids and text) and the inputs queued but not yet fed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_protocol::wire::{
    Done, DoneReason, ErrorCode, ErrorFrame, Frame, HiddenDtype, Opened, ResumeToken, SessionId,
    Token, MAX_ERROR_MESSAGE_LEN, MAX_TEXT_DELTA_LEN,
};
use tandem_scheduler::{SchedError, SeqId};
use tokio::sync::{mpsc, oneshot, Notify};

use super::admission::SessionSlot;
use super::{stopped, Shared};
use crate::rest::store::prompts::GenerationResult;
use crate::store::{self, SessionState, SessionUpdate};
use tandem_engine::{EngineError, Event};

/// What goes to a connection's writer.
#[derive(Debug)]
pub(crate) enum Outbound {
    Frame(Vec<u8>),
    /// Send a WebSocket close with this status and stop.
    Close(CloseStatus),
}

/// The status of the WebSocket close frame a connection ends with (RFC 6455 §7.4.1); the
/// reason is the wire error code's name (or `done`), so a device or a proxy log can tell
/// why without decoding the last frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CloseStatus {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
}

impl CloseStatus {
    /// 1000: the generation ended (`Done` was sent).
    pub(crate) const DONE: Self = Self {
        code: 1000,
        reason: "done",
    };

    /// After an `Error` frame: 1001 (going away) for `shutting_down`, 1013 (try again later)
    /// for the other `3xx` codes, 1011 (internal error) for `5xx`, and 1008 (policy
    /// violation) for `1xx` and `2xx`: a bad frame, a refused credential or ticket, an
    /// unknown session, a session taken over, a timeout.
    pub(crate) fn for_error(code: ErrorCode) -> Self {
        let status = match code {
            ErrorCode::ShuttingDown => 1001,
            c if c.is_retryable() => 1013,
            c if (500..600).contains(&c.as_u16()) => 1011,
            _ => 1008,
        };
        Self {
            code: status,
            reason: code.as_str(),
        }
    }
}

/// A connection as a session sees it.
#[derive(Clone, Debug)]
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) out: mpsc::Sender<Outbound>,
    /// Wakes the writer to drop the socket at once (when its queue is full).
    pub(crate) kill: Arc<Notify>,
}

impl Conn {
    /// Queues a frame; `false` if the queue is full or the writer is gone.
    fn send(&self, frame: &Frame) -> bool {
        match frame.encode() {
            Ok(bytes) => self.out.try_send(Outbound::Frame(bytes)).is_ok(),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an outgoing frame");
                false
            }
        }
    }

    fn close(&self, status: CloseStatus) {
        if self.out.try_send(Outbound::Close(status)).is_err() {
            self.kill.notify_one();
        }
    }
}

/// One `Hidden` frame, decoded to f32 and checked for shape and finiteness.
#[derive(Debug)]
pub(crate) struct Input {
    pub(crate) seq: u64,
    pub(crate) first_position: u32,
    pub(crate) rows: usize,
    pub(crate) complete: bool,
    /// The last rows that are device drafts (speculation).
    pub(crate) drafts: usize,
    pub(crate) dtype: HiddenDtype,
    pub(crate) data: Vec<f32>,
}

/// One token of the session's log, as its `Token` frame says it.
#[derive(Clone, Debug)]
struct Logged {
    id: u32,
    text: Option<String>,
    /// The `Hidden` frame it answers.
    input_seq: u64,
    draft: bool,
    last: bool,
    draft_cap: u8,
}

pub(crate) enum SessionCmd {
    /// A connection takes the session over; the actor answers `Opened` on it, then resends
    /// what the device missed. The reply says whether the session accepted it.
    Attach {
        conn: Conn,
        token: [u8; 32],
        last_token_seq: Option<u64>,
        reply: oneshot::Sender<bool>,
    },
    Hidden {
        conn: u64,
        input: Input,
    },
    Cancel {
        conn: u64,
    },
    /// The connection found a bad frame; the actor answers it (and ends the session unless the
    /// code is a 3xx one).
    Fail {
        conn: u64,
        error: ErrorFrame,
    },
    /// The connection is gone.
    Detach {
        conn: u64,
    },
}

/// The live table's entry for a session.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    pub(crate) id: u128,
    pub(crate) tx: mpsc::Sender<SessionCmd>,
    running: Arc<AtomicBool>,
}

impl SessionHandle {
    /// Whether the generation has not ended yet.
    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}

/// How a session starts.
#[derive(Debug)]
pub(crate) struct Setup {
    pub(crate) id: u128,
    pub(crate) seq: SeqId,
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    pub(crate) dtype: HiddenDtype,
    pub(crate) max_tokens: u32,
    /// Tokens the device already holds (`last_token_seq + 1` of a Replay's `Resume`).
    pub(crate) device_has: u64,
    /// The partner prompt this generation answers, if any: its result is stored there.
    pub(crate) assignment: Option<super::assignment::AssignmentRef>,
    /// The session's place in the admission counts.
    pub(crate) slot: SessionSlot,
    /// The `session` span (ends with the actor) and its `generation` child (ends with
    /// `Done` or the error); see [`crate::telemetry`].
    pub(crate) span: tracing::Span,
    pub(crate) generation: tracing::Span,
}

/// Spawns the actor and registers it in the live table.
pub(crate) fn spawn(shared: Arc<Shared>, setup: Setup) -> SessionHandle {
    let (tx, cmds) = mpsc::channel(64);
    let running = Arc::new(AtomicBool::new(true));
    let handle = SessionHandle {
        id: setup.id,
        tx,
        running: running.clone(),
    };
    shared.sessions.insert(setup.id, handle.clone());
    let stop = shared.stop.subscribe();
    let actor = Actor {
        shared,
        id: setup.id,
        seq: setup.seq,
        events: setup.events,
        cmds,
        running,
        conn: None,
        dtype: setup.dtype,
        max_tokens: setup.max_tokens,
        next_hidden_seq: 0,
        next_position: 0,
        prompt_tokens: None,
        completes_accepted: 0,
        completes_fed: 0,
        queue: VecDeque::new(),
        tokens: Vec::new(),
        device_has: setup.device_has,
        answered: 0,
        answer_left: 0,
        answering: 0,
        answer_start: 0,
        draft_first: None,
        last_fed_draft_first: None,
        accepted_last: 0,
        done: None,
        grace: None,
        marked_generating: false,
        assignment: setup.assignment,
        slot: setup.slot,
        started: Instant::now(),
        first_token_at: None,
        last_token_at: None,
        last_activity: Instant::now(),
        span: setup.span,
        generation: Some(setup.generation),
    };
    tokio::spawn(actor.run(stop));
    handle
}

struct Actor {
    shared: Arc<Shared>,
    id: u128,
    seq: SeqId,
    events: mpsc::UnboundedReceiver<Event>,
    cmds: mpsc::Receiver<SessionCmd>,
    running: Arc<AtomicBool>,
    conn: Option<Conn>,
    dtype: HiddenDtype,
    max_tokens: u32,
    next_hidden_seq: u64,
    next_position: u64,
    /// Positions of the prompt, once its complete chunk arrived.
    prompt_tokens: Option<u64>,
    completes_accepted: u64,
    completes_fed: u64,
    queue: VecDeque<Input>,
    tokens: Vec<Logged>,
    device_has: u64,
    /// Complete inputs whose answer has fully arrived (its token, and a token per draft
    /// row up to the first that would end the generation).
    answered: u64,
    /// Tokens still due for the last complete input fed.
    answer_left: usize,
    /// The `Hidden` sequence number of the last complete input fed, and where its answer
    /// starts in `tokens`.
    answering: u64,
    answer_start: usize,
    /// Position of the first draft row of the last complete input accepted, when it had
    /// drafts: the next input may start anywhere from there to `next_position`.
    draft_first: Option<u64>,
    /// The same for the last complete input fed to the engine (the log's truncation point
    /// is known when the next one is fed).
    last_fed_draft_first: Option<u64>,
    /// Draft tokens the last verdict accepted (they share the next answer's wait in TPOT).
    accepted_last: usize,
    done: Option<Done>,
    /// When the session gives up waiting for a `Resume`.
    grace: Option<Instant>,
    marked_generating: bool,
    assignment: Option<super::assignment::AssignmentRef>,
    slot: SessionSlot,
    started: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    /// The last time the device moved the session on (attached, sent a frame) or was sent a
    /// token: the idle timeout counts from here.
    last_activity: Instant,
    /// Held (not entered) for the actor's life; closing it exports it.
    #[allow(dead_code)]
    span: tracing::Span,
    /// `None` once the generation ended.
    generation: Option<tracing::Span>,
}

/// Whether the actor goes on.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

fn error_frame(code: ErrorCode, seq: Option<u64>, message: impl Into<String>) -> ErrorFrame {
    let mut message = message.into();
    if message.len() > MAX_ERROR_MESSAGE_LEN {
        let mut cut = MAX_ERROR_MESSAGE_LEN;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    ErrorFrame {
        code,
        seq,
        message,
        retry_after_ms: None,
    }
}

impl Actor {
    async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        tracing::debug!(session = self.id, "session started");
        loop {
            let grace = self.grace;
            let idle = self.idle_deadline();
            let flow = tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => Flow::Exit,
                },
                ev = self.events.recv(), if self.done.is_none() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => {
                        self.fail(error_frame(ErrorCode::Internal, None, "the engine stopped"))
                            .await
                    }
                },
                _ = sleep_until_opt(grace), if grace.is_some() => {
                    if self.done.is_none() {
                        tracing::info!(session = self.id, "no resume within the grace period; closing");
                        self.release(true).await;
                    }
                    Flow::Exit
                }
                _ = sleep_until_opt(idle), if idle.is_some() => {
                    tracing::info!(session = self.id, "the device went idle; closing");
                    let e = error_frame(
                        ErrorCode::IdleTimeout,
                        None,
                        format!(
                            "no input from the device for {} ms",
                            self.shared.cfg.session_idle_timeout_ms
                        ),
                    );
                    self.fail(e).await
                }
                _ = stopped(&mut stop) => {
                    self.on_shutdown().await;
                    Flow::Exit
                }
            };
            if flow == Flow::Exit {
                break;
            }
        }
        self.running.store(false, Ordering::SeqCst);
        self.shared.sessions.remove(&self.id);
        tracing::debug!(session = self.id, "session left the table");
    }

    /// When the session gives up on its device: only while it is connected, running, and
    /// owed nothing by the engine (every input fed has its token; none is queued), so time
    /// the cloud itself takes never counts.
    fn idle_deadline(&self) -> Option<Instant> {
        let waiting_on_device = self.conn.is_some()
            && self.done.is_none()
            && self.queue.is_empty()
            && self.completes_fed <= self.answered;
        waiting_on_device.then(|| self.last_activity + self.shared.cfg.session_idle_timeout())
    }

    async fn handle(&mut self, cmd: SessionCmd) -> Flow {
        if let SessionCmd::Attach { .. } | SessionCmd::Hidden { .. } | SessionCmd::Cancel { .. } =
            &cmd
        {
            self.last_activity = Instant::now();
        }
        match cmd {
            SessionCmd::Attach {
                conn,
                token,
                last_token_seq,
                reply,
            } => {
                self.attach(conn, token, last_token_seq);
                let _ = reply.send(true);
                Flow::Continue
            }
            SessionCmd::Hidden { conn, input } if self.is_current(conn) => {
                self.on_hidden(input).await
            }
            SessionCmd::Cancel { conn } if self.is_current(conn) => {
                if self.done.is_none() {
                    tracing::info!(session = self.id, "cancelled by the device");
                    self.end_generation(DoneReason::Cancelled).await;
                }
                Flow::Continue
            }
            SessionCmd::Fail { conn, error } if self.is_current(conn) => {
                if error.code.is_retryable() {
                    tracing::info!(session = self.id, code = %error.code, "dropping the connection");
                    let status = CloseStatus::for_error(error.code);
                    self.send(&Frame::Error(error));
                    self.detach_current(status);
                    Flow::Continue
                } else {
                    self.fail(error).await
                }
            }
            SessionCmd::Detach { conn } if self.is_current(conn) => {
                tracing::info!(
                    session = self.id,
                    conn,
                    "connection dropped; waiting for resume"
                );
                self.conn = None;
                self.enter_grace();
                Flow::Continue
            }
            // A frame from a connection the session no longer listens to.
            SessionCmd::Hidden { .. }
            | SessionCmd::Cancel { .. }
            | SessionCmd::Fail { .. }
            | SessionCmd::Detach { .. } => Flow::Continue,
        }
    }

    fn is_current(&self, conn: u64) -> bool {
        self.conn.as_ref().is_some_and(|c| c.id == conn)
    }

    /// Sends on the current connection; a full queue (the device does not read) drops it.
    fn send(&mut self, frame: &Frame) {
        if let Frame::Error(e) = frame {
            self.shared.metrics.errors_total.with(e.code.as_str()).inc();
        }
        let Some(conn) = &self.conn else { return };
        if !conn.send(frame) {
            tracing::warn!(
                session = self.id,
                conn = conn.id,
                "outbound queue full or closed; dropping the connection"
            );
            conn.kill.notify_one();
            self.conn = None;
            self.enter_grace();
        }
    }

    /// The session has no connection now: it waits for a `Resume` for the grace period, or
    /// ends at once when the grace is full (`max_resume_grace_sessions`).
    fn enter_grace(&mut self) {
        let now = Instant::now();
        self.grace = Some(if self.slot.move_to_grace() {
            now + self.shared.cfg.resume_grace()
        } else {
            tracing::info!(
                session = self.id,
                "too many sessions wait for a resume; ending this one"
            );
            now
        });
    }

    /// Closes the current connection (after what was queued) and waits for a `Resume`.
    fn detach_current(&mut self, status: CloseStatus) {
        if let Some(conn) = self.conn.take() {
            conn.close(status);
        }
        self.enter_grace();
    }

    fn attach(&mut self, conn: Conn, token: [u8; 32], last_token_seq: Option<u64>) {
        if let Some(old) = self.conn.take() {
            // Tell the connection that loses the session why, before it closes.
            tracing::info!(
                session = self.id,
                old = old.id,
                new = conn.id,
                "session taken over"
            );
            let e = error_frame(
                ErrorCode::SessionTakenOver,
                None,
                "another connection resumed this session",
            );
            self.shared.metrics.errors_total.with(e.code.as_str()).inc();
            old.send(&Frame::Error(e));
            old.close(CloseStatus::for_error(ErrorCode::SessionTakenOver));
        }
        tracing::info!(
            session = self.id,
            conn = conn.id,
            next_hidden_seq = self.next_hidden_seq,
            "attached"
        );
        self.conn = Some(conn);
        self.grace = None;
        self.slot.move_to_attached();
        let resend_from = last_token_seq.map_or(0, |s| s.saturating_add(1));
        self.device_has = self.device_has.max(resend_from);
        self.send(&Frame::Opened(Opened {
            session: SessionId(self.id),
            resume_token: ResumeToken(token),
            next_hidden_seq: self.next_hidden_seq,
        }));
        let from = usize::try_from(resend_from).unwrap_or(usize::MAX);
        for seq in from..self.tokens.len() {
            let frame = self.token_frame(seq);
            self.send(&frame);
        }
        if let Some(done) = self.done {
            self.send(&Frame::Done(done));
            self.detach_current(CloseStatus::DONE);
        }
    }

    fn token_frame(&self, seq: usize) -> Frame {
        let t = self.tokens[seq].clone();
        Frame::Token(Token {
            seq: seq as u64,
            input_seq: t.input_seq,
            token_id: t.id,
            draft: t.draft,
            last: t.last,
            draft_cap: t.draft_cap,
            text: t.text,
        })
    }

    /// Checks a `Hidden` against the state machine; accepts, drops or fails it.
    async fn on_hidden(&mut self, input: Input) -> Flow {
        if self.done.is_some() {
            let e = error_frame(ErrorCode::Finished, Some(input.seq), "the generation ended");
            self.send(&Frame::Error(e));
            self.detach_current(CloseStatus::for_error(ErrorCode::Finished));
            return Flow::Continue;
        }
        if input.seq < self.next_hidden_seq {
            return Flow::Continue; // a duplicate (a resuming device resends)
        }
        if let Err(e) = self.check(&input) {
            return self.fail(e).await;
        }
        self.next_hidden_seq += 1;
        self.next_position = u64::from(input.first_position) + input.rows as u64;
        self.shared.metrics.tokens_in_total.add(input.rows as u64);
        if input.complete {
            self.completes_accepted += 1;
            self.prompt_tokens.get_or_insert(self.next_position);
            self.draft_first = (input.drafts > 0).then(|| self.next_position - input.drafts as u64);
        }
        if !self.marked_generating {
            self.marked_generating = true;
            self.update_store(SessionUpdate {
                state: Some(SessionState::Generating),
                ..SessionUpdate::default()
            });
        }
        self.queue.push_back(input);
        self.feed()
    }

    fn check(&self, input: &Input) -> Result<(), ErrorFrame> {
        let seq = Some(input.seq);
        if input.seq > self.next_hidden_seq {
            return Err(error_frame(
                ErrorCode::SequenceOutOfOrder,
                seq,
                format!("expected hidden sequence number {}", self.next_hidden_seq),
            ));
        }
        let device_tokens = self.device_has.max(self.answered);
        if self.completes_accepted > device_tokens {
            return Err(error_frame(
                ErrorCode::UnexpectedFrame,
                seq,
                "a Hidden frame while a token is owed",
            ));
        }
        if input.dtype != self.dtype {
            return Err(error_frame(
                ErrorCode::HiddenShape,
                seq,
                format!("dtype {} differs from Open's {}", input.dtype, self.dtype),
            ));
        }
        let at = u64::from(input.first_position);
        // After an answer with draft tokens, the input may start at any draft row: it drops
        // the rows from there on (the engine checks it against the tokens it sampled).
        let earliest = self.draft_first.unwrap_or(self.next_position);
        if at < earliest || at > self.next_position {
            return Err(error_frame(
                ErrorCode::HiddenShape,
                seq,
                if earliest == self.next_position {
                    format!("expected first position {}", self.next_position)
                } else {
                    format!(
                        "expected a first position from {earliest} to {}",
                        self.next_position
                    )
                },
            ));
        }
        if self.draft_first.is_some() && !input.complete {
            return Err(error_frame(
                ErrorCode::HiddenShape,
                seq,
                "after an answer with draft tokens the next Hidden is a decode step (complete)",
            ));
        }
        if input.drafts > 0 && self.prompt_tokens.is_none() {
            return Err(error_frame(
                ErrorCode::HiddenShape,
                seq,
                "drafts before the prompt is complete",
            ));
        }
        let end = at + input.rows as u64;
        let cfg = &self.shared.cfg;
        if self.prompt_tokens.is_none() && end > cfg.max_prompt_tokens as u64 {
            return Err(error_frame(
                ErrorCode::ContextLengthExceeded,
                seq,
                format!("prompt longer than {} tokens", cfg.max_prompt_tokens),
            ));
        }
        let prompt = self.prompt_tokens.unwrap_or(end);
        if prompt + u64::from(self.max_tokens) > self.shared.served.max_context as u64 {
            return Err(error_frame(
                ErrorCode::ContextLengthExceeded,
                seq,
                format!(
                    "prompt + max tokens exceed the context of {}",
                    self.shared.served.max_context
                ),
            ));
        }
        Ok(())
    }

    /// Hands queued inputs to the engine, stopping after a complete one until its answer
    /// has come.
    fn feed(&mut self) -> Flow {
        while self.completes_fed <= self.answered {
            let Some(input) = self.queue.pop_front() else {
                break;
            };
            let complete = input.complete;
            if complete {
                // The device's verdict on the last answer's draft tokens: the log keeps the
                // ones it accepted (the engine does the same with its rows and output).
                if let Some(first) = self.last_fed_draft_first.take() {
                    let accepted = u64::from(input.first_position).saturating_sub(first) as usize;
                    let keep = (self.answer_start + 1 + accepted).min(self.tokens.len());
                    let accepted = keep.saturating_sub(self.answer_start + 1);
                    self.shared.metrics.tokens_out_total.add(accepted as u64);
                    self.accepted_last = accepted;
                    self.tokens.truncate(keep);
                    self.device_has = self.device_has.min(keep as u64);
                }
                self.answering = input.seq;
                self.answer_start = self.tokens.len();
                self.answer_left = 1 + input.drafts;
                self.last_fed_draft_first = (input.drafts > 0).then(|| {
                    u64::from(input.first_position) + input.rows as u64 - input.drafts as u64
                });
            }
            if let Err(e) = self.shared.engine.push_hidden_at_nowait(
                self.seq,
                input.data,
                input.rows,
                complete,
                input.first_position as usize,
                input.drafts,
            ) {
                // Shape and finiteness were checked by the connection; only a stopped
                // engine gets here. The event loop reports it.
                tracing::error!(session = self.id, error = %e, "engine refused input");
                break;
            }
            if complete {
                self.completes_fed += 1;
            }
        }
        Flow::Continue
    }

    async fn on_event(&mut self, ev: Event) -> Flow {
        match ev {
            Event::Token {
                id,
                text,
                draft,
                last,
                draft_cap,
            } => {
                let seq = self.tokens.len();
                let text = (!text.is_empty()).then_some(text).map(|mut t| {
                    if t.len() > MAX_TEXT_DELTA_LEN {
                        tracing::warn!(session = self.id, "text delta over the wire cap; cut");
                        let mut cut = MAX_TEXT_DELTA_LEN;
                        while !t.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        t.truncate(cut);
                    }
                    t
                });
                self.tokens.push(Logged {
                    id,
                    text,
                    input_seq: self.answering,
                    draft,
                    last,
                    draft_cap,
                });
                self.answer_left = self.answer_left.saturating_sub(1);
                if last {
                    self.answer_left = 0;
                }
                if self.answer_left == 0 && self.answered < self.completes_fed {
                    self.answered += 1;
                }
                let now = Instant::now();
                self.last_activity = now;
                let m = &self.shared.metrics;
                // Tokens that count: a draft token counts when the device's verdict accepts
                // it (`feed`); the time per output token spreads an answer's wait over the
                // tokens that came with it.
                if !draft {
                    m.tokens_out_total.inc();
                    let per = 1 + std::mem::take(&mut self.accepted_last);
                    match self.last_token_at.replace(now) {
                        Some(prev) => {
                            let each = (now - prev) / per as u32;
                            for _ in 0..per {
                                m.tpot_seconds.observe_duration(each);
                            }
                        }
                        None => {
                            m.ttft_seconds.observe_duration(now - self.started);
                            if let Some(g) = &self.generation {
                                g.record("ttft_ms", (now - self.started).as_secs_f64() * 1e3);
                            }
                        }
                    }
                }
                self.first_token_at.get_or_insert(now);
                if seq as u64 >= self.device_has {
                    let frame = self.token_frame(seq);
                    self.send(&frame);
                }
                self.feed()
            }
            Event::Done { reason, .. } => {
                self.end_generation(DoneReason::Finished(reason)).await;
                Flow::Continue
            }
            Event::Error(e) => {
                let (code, msg) = engine_error_code(&e);
                tracing::warn!(session = self.id, code = %code, error = %e, "engine error");
                self.fail(error_frame(code, None, msg)).await
            }
        }
    }

    /// Sends `Done`, frees the engine session and closes the store record; the actor lingers
    /// for the grace period so a device that missed `Done` can still get it by `Resume`.
    async fn end_generation(&mut self, reason: DoneReason) {
        let done = Done {
            reason,
            prompt_tokens: u32::try_from(self.prompt_tokens.unwrap_or(self.next_position))
                .unwrap_or(u32::MAX),
            output_tokens: u32::try_from(self.tokens.len()).unwrap_or(u32::MAX),
        };
        tracing::info!(
            session = self.id,
            reason = done.reason.code(),
            prompt_tokens = done.prompt_tokens,
            output_tokens = done.output_tokens,
            "generation done"
        );
        if let Some(g) = self.generation.take() {
            g.record("prompt_tokens", i64::from(done.prompt_tokens));
            g.record("output_tokens", i64::from(done.output_tokens));
            g.record("finish_reason", done.reason.name());
        }
        self.done = Some(done);
        self.shared
            .metrics
            .generation_duration_seconds
            .observe_duration(self.started.elapsed());
        if let Some(a) = &self.assignment {
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            let result = GenerationResult {
                output: self
                    .tokens
                    .iter()
                    .filter_map(|t| t.text.as_deref())
                    .collect(),
                finish_reason: done.reason.name().to_owned(),
                prompt_tokens: done.prompt_tokens,
                completion_tokens: done.output_tokens,
                ttft_ms: self
                    .first_token_at
                    .map_or(0, |t| ms(t.duration_since(self.started))),
                total_ms: ms(self.started.elapsed()),
            };
            a.finish_later(&self.shared, Ok(result));
        }
        self.running.store(false, Ordering::SeqCst);
        self.slot.release();
        self.send(&Frame::Done(done));
        self.detach_current(CloseStatus::DONE);
        self.queue.clear();
        self.release(true).await;
    }

    /// Answers a fatal error (1xx, 2xx, 5xx), ends the session and the actor.
    async fn fail(&mut self, error: ErrorFrame) -> Flow {
        tracing::info!(session = self.id, code = %error.code, seq = ?error.seq, "session failed");
        if let Some(g) = self.generation.take() {
            g.record("error_code", error.code.as_str());
            g.record("output_tokens", self.tokens.len() as i64);
        }
        if let (Some(a), None) = (&self.assignment, &self.done) {
            a.fail_later(&self.shared, error.code);
        }
        let status = CloseStatus::for_error(error.code);
        self.slot.release();
        self.send(&Frame::Error(error));
        if let Some(conn) = self.conn.take() {
            conn.close(status);
        }
        if self.done.is_none() {
            self.release(true).await;
        }
        Flow::Exit
    }

    /// The drain is over: a running session gets `shutting_down` and stays open in the store
    /// (its device resumes elsewhere and replays).
    async fn on_shutdown(&mut self) {
        if self.done.is_none() {
            let e = error_frame(
                ErrorCode::ShuttingDown,
                None,
                "this replica is shutting down; resume elsewhere",
            );
            self.send(&Frame::Error(e));
            self.release(false).await;
        }
        if let Some(conn) = self.conn.take() {
            conn.close(CloseStatus::for_error(ErrorCode::ShuttingDown));
        }
    }

    /// Frees the engine session; with `close_store`, also closes the store record and forgets
    /// the `Open` parameters.
    async fn release(&mut self, close_store: bool) {
        self.running.store(false, Ordering::SeqCst);
        // Before the engine lets go (its cap has room for every grace session besides), so
        // that a device told the session ended finds the slot free.
        self.slot.release();
        let _ = self.shared.engine.close(self.seq).await;
        if !close_store {
            return;
        }
        let shared = self.shared.clone();
        let id = store::SessionId(self.id);
        let update = SessionUpdate {
            state: Some(SessionState::Done),
            add_tokens_in: self.next_position,
            add_tokens_out: self.tokens.len() as u64,
        };
        // Off the session's path: a slow store never delays the device.
        tokio::spawn(async move {
            let by = &shared.replica;
            if let Err(e) = shared.store.update_session(id, by, update).await {
                tracing::debug!(session = id.0, error = %e, "store update at the end failed");
            }
            if let Err(e) = shared.store.close_session(id, by).await {
                tracing::warn!(session = id.0, error = %e, "store close failed");
            }
            shared.params.remove(id.0).await;
        });
    }

    fn update_store(&self, update: SessionUpdate) {
        let shared = self.shared.clone();
        let id = store::SessionId(self.id);
        tokio::spawn(async move {
            if let Err(e) = shared
                .store
                .update_session(id, &shared.replica, update)
                .await
            {
                tracing::debug!(session = id.0, error = %e, "store update failed");
            }
        });
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The wire code for an error the engine reported on a session's events.
fn engine_error_code(e: &EngineError) -> (ErrorCode, &'static str) {
    match e {
        EngineError::Scheduler(SchedError::Overloaded(_)) => {
            (ErrorCode::Overloaded, "the cloud is at capacity")
        }
        EngineError::Scheduler(SchedError::ContextLength { .. })
        | EngineError::Scheduler(SchedError::TooLarge { .. }) => (
            ErrorCode::ContextLengthExceeded,
            "the sequence does not fit in the cloud's context",
        ),
        EngineError::Scheduler(SchedError::NotReady(_)) => (
            ErrorCode::UnexpectedFrame,
            "a Hidden frame while a token is owed",
        ),
        EngineError::Position { .. }
        | EngineError::Scheduler(SchedError::Drafts { .. })
        | EngineError::Scheduler(SchedError::Truncate { .. }) => (
            ErrorCode::HiddenShape,
            "the Hidden frame does not continue the session there (speculation: at most the \
             draft tokens the cloud sampled may be accepted)",
        ),
        EngineError::Stopped => (ErrorCode::ShuttingDown, "the engine stopped"),
        _ => (ErrorCode::Internal, "internal error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_statuses_follow_the_error_groups() {
        let status = |c: ErrorCode| {
            let s = CloseStatus::for_error(c);
            assert_eq!(s.reason, c.as_str());
            s.code
        };
        assert_eq!(CloseStatus::DONE.code, 1000);
        assert_eq!(status(ErrorCode::ShuttingDown), 1001);
        assert_eq!(status(ErrorCode::Overloaded), 1013);
        assert_eq!(status(ErrorCode::Moved), 1013);
        assert_eq!(status(ErrorCode::Internal), 1011);
        assert_eq!(status(ErrorCode::MalformedFrame), 1008);
        assert_eq!(status(ErrorCode::UnknownSession), 1008);
        assert_eq!(status(ErrorCode::SessionTakenOver), 1008);
        assert_eq!(status(ErrorCode::IdleTimeout), 1008);
        // A reason fits a close frame (123 bytes).
        assert!(ErrorCode::ALL.iter().all(|c| c.as_str().len() <= 123));
    }
}
