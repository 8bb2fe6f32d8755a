//! What the [`crate::Engine`] handle sends its thread, and where a session's events go.

use std::time::Duration;

use crossbeam_channel::Sender;
use tandem_scheduler::SeqId;
use tokio::sync::oneshot;

use crate::types::{EngineError, EngineStats, Event, SessionParams};

/// The engine thread's answer to one command.
pub(crate) type Ack<T = ()> = oneshot::Sender<Result<T, EngineError>>;

/// Where a session's events go: the crossbeam channel of [`crate::Engine::open_session`] or the
/// tokio channel of [`crate::Engine::open_session_with`]. Both are unbounded, so the engine thread
/// never blocks on a slow consumer (a session produces at most one token per input it
/// received, so the backlog is bounded by the session's own inputs).
pub(crate) enum EventSink {
    Sync(Sender<Event>),
    /// Also hears the end-of-sequence token as an `Event::Token` (the wire sends every
    /// sampled token), and the text held back until the end rides on the last token.
    Async(tokio::sync::mpsc::UnboundedSender<Event>),
}

impl EventSink {
    pub(crate) fn send(&self, ev: Event) {
        match self {
            Self::Sync(tx) => {
                let _ = tx.send(ev);
            }
            Self::Async(tx) => {
                let _ = tx.send(ev);
            }
        }
    }

    pub(crate) fn is_async(&self) -> bool {
        matches!(self, Self::Async(_))
    }
}

pub(crate) enum Command {
    Open {
        id: SeqId,
        params: SessionParams,
        events: EventSink,
        ack: Ack,
    },
    Hidden {
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
        /// Where the input starts (`None`: right after what was received). Before the end of
        /// what was received, it drops the draft rows from there on (speculation).
        first_position: Option<usize>,
        /// The input's last rows that are device drafts.
        drafts: usize,
        /// `None`: the caller does not wait; an error goes to the session's events instead.
        ack: Option<Ack>,
    },
    Close {
        id: SeqId,
        ack: Ack,
    },
    Stats {
        reply: Ack<EngineStats>,
    },
    /// Holds the loop as a step that never ends would (for the readiness tests).
    Stall(Duration),
}
