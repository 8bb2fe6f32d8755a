//! The actor's state and its event loop: one task per session waits on the connection's
//! commands, the engine's events, the grace and idle deadlines and the shutdown, and owns
//! every field below. This file also holds the connection's side of the session: attaching
//! a connection (and resending what the device missed), detaching it, and its frame errors.
//!
//! The other files of the module add `impl Actor` blocks: `input.rs` (each `Hidden`),
//! `output.rs` (the engine's events), `end.rs` (the ends of a generation and a session).
//! Costs: one task and a queue of 64 commands per session; the loop wakes once per command,
//! event or deadline.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tandem_protocol::wire::{
    Done, DoneReason, ErrorCode, Frame, HiddenDtype, Opened, ResumeToken, SessionId,
};
use tandem_scheduler::SeqId;
use tokio::sync::mpsc;

use super::{error_frame, CloseStatus, Conn, Input, Logged, SessionCmd, Setup};
use crate::ws::admission::SessionSlot;
use crate::ws::assignment::AssignmentRef;
use crate::ws::{stopped, Shared};
use tandem_engine::Event;

/// A session's protocol state; see the module doc of `session` for its invariants.
pub(super) struct Actor {
    pub(super) shared: Arc<Shared>,
    pub(super) id: SessionId,
    pub(super) seq: SeqId,
    events: mpsc::UnboundedReceiver<Event>,
    cmds: mpsc::Receiver<SessionCmd>,
    pub(super) running: Arc<AtomicBool>,
    pub(super) conn: Option<Conn>,
    pub(super) dtype: HiddenDtype,
    pub(super) max_tokens: u32,
    pub(super) next_hidden_seq: u64,
    pub(super) next_position: u64,
    /// Positions of the prompt, once its complete chunk arrived.
    pub(super) prompt_tokens: Option<u64>,
    pub(super) completes_accepted: u64,
    pub(super) completes_fed: u64,
    pub(super) queue: VecDeque<Input>,
    pub(super) tokens: Vec<Logged>,
    pub(super) device_has: u64,
    /// Complete inputs whose answer has fully arrived (its token, and a token per draft
    /// row up to the first that would end the generation).
    pub(super) answered: u64,
    /// Tokens still due for the last complete input fed.
    pub(super) answer_left: usize,
    /// The `Hidden` sequence number of the last complete input fed, and where its answer
    /// starts in `tokens`.
    pub(super) answering: u64,
    pub(super) answer_start: usize,
    /// Position of the first draft row of the last complete input accepted, when it had
    /// drafts: the next input may start anywhere from there to `next_position`.
    pub(super) draft_first: Option<u64>,
    /// The same for the last complete input fed to the engine (the log's truncation point
    /// is known when the next one is fed).
    pub(super) last_fed_draft_first: Option<u64>,
    /// Draft tokens the last verdict accepted (they share the next answer's wait in TPOT).
    pub(super) accepted_last: usize,
    pub(super) done: Option<Done>,
    /// When the session gives up waiting for a `Resume`.
    grace: Option<Instant>,
    pub(super) marked_generating: bool,
    pub(super) assignment: Option<AssignmentRef>,
    pub(super) slot: SessionSlot,
    pub(super) started: Instant,
    pub(super) first_token_at: Option<Instant>,
    pub(super) last_token_at: Option<Instant>,
    /// The last time the device moved the session on (attached, sent a frame) or was sent a
    /// token: the idle timeout counts from here.
    pub(super) last_activity: Instant,
    /// Held (not entered) for the actor's life; closing it exports it.
    #[allow(dead_code)]
    span: tracing::Span,
    /// `None` once the generation ended.
    pub(super) generation: Option<tracing::Span>,
}

/// Whether the actor goes on.
#[derive(PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    Exit,
}

impl Actor {
    /// The actor of a session that starts as `setup` says, reading `cmds`.
    pub(super) fn new(
        shared: Arc<Shared>,
        setup: Setup,
        cmds: mpsc::Receiver<SessionCmd>,
        running: Arc<AtomicBool>,
    ) -> Self {
        Self {
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
        }
    }

    pub(super) async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        tracing::debug!(session = self.id.0, "session started");
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
                        tracing::info!(session = self.id.0, "no resume within the grace period; closing");
                        self.release(true).await;
                    }
                    Flow::Exit
                }
                _ = sleep_until_opt(idle), if idle.is_some() => {
                    tracing::info!(session = self.id.0, "the device went idle; closing");
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
        tracing::debug!(session = self.id.0, "session left the table");
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
                    tracing::info!(session = self.id.0, "cancelled by the device");
                    self.end_generation(DoneReason::Cancelled).await;
                }
                Flow::Continue
            }
            SessionCmd::Fail { conn, error } if self.is_current(conn) => {
                if error.code.is_retryable() {
                    tracing::info!(session = self.id.0, code = %error.code, "dropping the connection");
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
                    session = self.id.0,
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
    pub(super) fn send(&mut self, frame: &Frame) {
        if let Frame::Error(e) = frame {
            self.shared.metrics.errors_total.with(e.code.as_str()).inc();
        }
        let Some(conn) = &self.conn else { return };
        if !conn.send(frame) {
            tracing::warn!(
                session = self.id.0,
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
                session = self.id.0,
                "too many sessions wait for a resume; ending this one"
            );
            now
        });
    }

    /// Closes the current connection (after what was queued) and waits for a `Resume`.
    pub(super) fn detach_current(&mut self, status: CloseStatus) {
        if let Some(conn) = self.conn.take() {
            conn.close(status);
        }
        self.enter_grace();
    }

    fn attach(&mut self, conn: Conn, token: [u8; 32], last_token_seq: Option<u64>) {
        if let Some(old) = self.conn.take() {
            // Tell the connection that loses the session why, before it closes.
            tracing::info!(
                session = self.id.0,
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
            session = self.id.0,
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
            session: self.id,
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
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
