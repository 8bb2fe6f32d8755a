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
//!
//! Layout: this file holds what the rest of the server sees (the commands, the connection's
//! handle, the live table's entry, [`spawn`]); `actor.rs` the actor's state, its event loop
//! and the connection's commands (attach, detach, errors); `input.rs` the checks of each
//! `Hidden` and the feeding of the engine; `output.rs` the token log and the `Token` frames
//! it sends; `end.rs` how a generation or the session ends, and what the store is told.

mod actor;
mod end;
mod input;
mod output;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tandem_protocol::wire::{ErrorCode, ErrorFrame, Frame, HiddenDtype, MAX_ERROR_MESSAGE_LEN};
use tandem_protocol::SessionId;
use tandem_scheduler::SeqId;
use tokio::sync::{mpsc, oneshot, Notify};

use super::admission::SessionSlot;
use super::Shared;
use actor::Actor;
use tandem_engine::Event;

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
    pub(crate) id: SessionId,
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
    pub(crate) id: SessionId,
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
    let actor = Actor::new(shared, setup, cmds, running);
    tokio::spawn(actor.run(stop));
    handle
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
