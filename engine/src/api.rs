//! The engine's in-process API: [`Engine`], the handle to its thread, and what goes in and
//! out of it. Every call that needs the engine's answer returns a [`Reply`]: `.await` it in
//! async code (the engine thread answers over a `tokio::sync::oneshot`, whose `send` never
//! blocks it), or `.wait()` for it in a thread that may block.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, Sender};
use tandem_model::tokenizer::TextTokenizer;
use tandem_model::CloudModel;
use tandem_scheduler::SeqId;
use tokio::sync::oneshot;

use crate::command::{Ack, Command, EventSink};
use crate::observe::Observer;
pub use crate::types::{EngineError, EngineStats, Event, SessionParams};
use crate::EngineConfig;

/// Handle to a running engine thread. Dropping it stops the thread.
pub struct Engine {
    tx: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    hidden_size: usize,
    block_size: usize,
    next_id: AtomicU64,
    /// Bytes of hidden states the sessions hold for recompute (metered by the sessions).
    hidden_bytes: Arc<AtomicU64>,
}

/// A session's id and its event stream.
#[derive(Debug)]
pub struct Session {
    pub id: SeqId,
    pub events: Receiver<Event>,
}

impl Engine {
    /// Starts the engine thread over `cloud`.
    pub fn start(cloud: CloudModel, tokenizer: Option<TextTokenizer>, cfg: EngineConfig) -> Self {
        Self::start_observed(cloud, tokenizer, cfg, None)
    }

    /// [`Engine::start`], telling `observer` about every step (batch sizes, step duration,
    /// the step in progress, speculation) so a server can export them.
    pub fn start_observed(
        cloud: CloudModel,
        tokenizer: Option<TextTokenizer>,
        cfg: EngineConfig,
        observer: Option<Arc<dyn Observer>>,
    ) -> Self {
        let hidden_size = cloud.config().hidden_size;
        let block_size = cfg.block_size;
        let (tx, rx) = unbounded();
        let hidden_bytes = Arc::new(AtomicU64::new(0));
        let meter = hidden_bytes.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || crate::step::run(cloud, tokenizer, cfg, rx, observer, meter))
            .ok();
        Self {
            tx: Some(tx),
            thread,
            hidden_size,
            block_size,
            next_id: AtomicU64::new(1),
            hidden_bytes,
        }
    }

    /// Sends a command whose answer is a value.
    fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Command,
    ) -> Reply<T> {
        let (ack, answer) = oneshot::channel();
        match self.send(make(ack)) {
            Ok(()) => Reply(ReplyState::Value(answer)),
            Err(e) => Reply::ready(Err(e)),
        }
    }

    /// Sends a command the engine accepts or refuses; `value` is the caller's on acceptance.
    fn command<T>(&self, make: impl FnOnce(Ack) -> Command, value: T) -> Reply<T> {
        let (ack, answer) = oneshot::channel();
        match self.send(make(ack)) {
            Ok(()) => Reply(ReplyState::Ack(answer, Some(value))),
            Err(e) => Reply::ready(Err(e)),
        }
    }

    /// Sends a command that wants no answer.
    fn send(&self, cmd: Command) -> Result<(), EngineError> {
        let tx = self.tx.as_ref().ok_or(EngineError::Stopped)?;
        tx.send(cmd).map_err(|_| EngineError::Stopped)
    }

    fn next_id(&self) -> SeqId {
        SeqId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Opens a session whose events arrive on a channel a thread can block on (tests,
    /// `tandem bench`); admission control may answer `Overloaded`.
    pub fn open_session(&self, params: SessionParams) -> Reply<Session> {
        let id = self.next_id();
        let (events, rx) = unbounded();
        self.command(
            |ack| Command::Open {
                id,
                params,
                events: EventSink::Sync(events),
                ack,
            },
            Session { id, events: rx },
        )
    }

    /// Opens a session whose events go to an async consumer (the WebSocket server).
    ///
    /// Unlike [`Self::open_session`], every sampled token is an [`Event::Token`], the
    /// end-of-sequence one included (with the text the decoder still held, or none), and the
    /// text held back until the end (a partial character, a possible stop-string prefix) rides
    /// on the last `Token`, so concatenating the token texts gives `Done`'s text exactly. The
    /// engine answers between two steps.
    pub fn open_session_with(
        &self,
        params: SessionParams,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> Reply<SeqId> {
        let id = self.next_id();
        self.command(
            |ack| Command::Open {
                id,
                params,
                events: EventSink::Async(events),
                ack,
            },
            id,
        )
    }

    /// Hidden-state columns this engine's model expects.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Bytes of hidden states the engine's sessions hold for recompute (allocated, not
    /// just used), as of the engine's last change. Read without asking the engine thread.
    pub fn hidden_state_bytes(&self) -> u64 {
        self.hidden_bytes.load(Ordering::Relaxed)
    }

    /// Hands the engine `rows` hidden states (`rows * hidden_size` f32 values, row-major) for
    /// the session's next positions. `complete` marks the end of an input that wants a token:
    /// the last chunk of a prompt, or each decode step. The reply comes once the engine has
    /// accepted them (between two steps), so scheduler refusals come back typed; shape and
    /// finiteness are checked in the caller's thread first.
    pub fn push_hidden(&self, id: SeqId, data: Vec<f32>, rows: usize, complete: bool) -> Reply<()> {
        self.hidden(id, data, rows, complete, None, 0)
    }

    /// [`Self::push_hidden`] of an input at `first_position` whose last `drafts` rows are
    /// tokens the device drafted (speculation across the split; docs/protocol.md §6). The
    /// engine samples after the row before the drafts and after every draft row, in one
    /// step; those after drafts are `Event::Token { draft: true, .. }`. The next input's
    /// `first_position` says how many drafts the device accepted: the engine drops the rows
    /// (and KV) after it and commits the accepted tokens.
    pub fn push_hidden_at(
        &self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        first_position: usize,
        drafts: usize,
    ) -> Reply<()> {
        self.hidden(id, data, rows, true, Some(first_position), drafts)
    }

    /// [`Self::push_hidden_at`] without an answer (as [`Self::push_hidden_nowait`]); any
    /// input, complete or not, at its `first_position`.
    pub fn push_hidden_at_nowait(
        &self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
        first_position: usize,
        drafts: usize,
    ) -> Result<(), EngineError> {
        self.hidden_nowait(id, data, rows, complete, Some(first_position), drafts)
    }

    /// Like [`Self::push_hidden`] but returns as soon as the input is validated and queued:
    /// a refusal by the scheduler then arrives as [`Event::Error`] on the session's events.
    /// One thread serving many sessions uses this, so that their inputs reach the same step.
    pub fn push_hidden_nowait(
        &self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
    ) -> Result<(), EngineError> {
        self.hidden_nowait(id, data, rows, complete, None, 0)
    }

    /// Checks an input in the caller's thread, then hands it over; the engine answers.
    fn hidden(
        &self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
        first_position: Option<usize>,
        drafts: usize,
    ) -> Reply<()> {
        if let Err(e) = self.check_hidden(&data, rows) {
            return Reply::ready(Err(e));
        }
        self.command(
            |ack| Command::Hidden {
                id,
                data,
                rows,
                complete,
                first_position,
                drafts,
                ack: Some(ack),
            },
            (),
        )
    }

    /// [`Self::hidden`] without an answer: a refusal goes to the session's events.
    fn hidden_nowait(
        &self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
        first_position: Option<usize>,
        drafts: usize,
    ) -> Result<(), EngineError> {
        self.check_hidden(&data, rows)?;
        self.send(Command::Hidden {
            id,
            data,
            rows,
            complete,
            first_position,
            drafts,
            ack: None,
        })
    }

    fn check_hidden(&self, data: &[f32], rows: usize) -> Result<(), EngineError> {
        if rows == 0 || data.len() != rows * self.hidden_size {
            return Err(EngineError::HiddenShape {
                rows,
                len: data.len(),
                hidden: self.hidden_size,
            });
        }
        if data.iter().any(|x| !x.is_finite()) {
            return Err(EngineError::NonFinite);
        }
        Ok(())
    }

    /// Holds the engine loop for `d`, as a step that does not end would: for tests of the
    /// readiness check only.
    #[doc(hidden)]
    pub fn stall_for_tests(&self, d: Duration) {
        let _ = self.send(Command::Stall(d));
    }

    /// Positions per KV block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The engine's counters (answered between two steps).
    pub fn stats(&self) -> Reply<EngineStats> {
        self.request(|reply| Command::Stats { reply })
    }

    /// Ends a session and releases its KV blocks.
    pub fn close(&self, id: SeqId) -> Reply<()> {
        self.command(|ack| Command::Close { id, ack }, ())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.tx.take(); // closes the channel: the loop ends after its current step
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("hidden_size", &self.hidden_size)
            .finish()
    }
}

/// The engine's answer to one command, on its way: `.await` it, or [`Reply::wait`] in a
/// thread that may block (not from inside an async runtime: that panics, as
/// `oneshot::Receiver::blocking_recv` does).
#[must_use = "a reply does nothing unless awaited or waited for"]
#[derive(Debug)]
pub struct Reply<T>(ReplyState<T>);

#[derive(Debug)]
enum ReplyState<T> {
    /// Answered before reaching the engine (a validation error, a stopped engine), or taken.
    Ready(Option<Result<T, EngineError>>),
    /// The engine answers whether it accepted; the value is the caller's on acceptance.
    Ack(oneshot::Receiver<Result<(), EngineError>>, Option<T>),
    /// The engine answers with the value.
    Value(oneshot::Receiver<Result<T, EngineError>>),
}

impl<T> Reply<T> {
    fn ready(r: Result<T, EngineError>) -> Self {
        Self(ReplyState::Ready(Some(r)))
    }

    /// Blocks the calling thread until the engine answers (between two steps).
    pub fn wait(self) -> Result<T, EngineError> {
        match self.0 {
            ReplyState::Ready(r) => r.unwrap_or(Err(EngineError::Stopped)),
            ReplyState::Ack(rx, value) => {
                answered(rx.blocking_recv())?;
                value.ok_or(EngineError::Stopped)
            }
            ReplyState::Value(rx) => rx.blocking_recv().unwrap_or(Err(EngineError::Stopped)),
        }
    }
}

/// The engine's answer; a dropped sender means the engine thread ended without answering.
fn answered<T>(
    r: Result<Result<T, EngineError>, oneshot::error::RecvError>,
) -> Result<T, EngineError> {
    r.unwrap_or(Err(EngineError::Stopped))
}

impl<T: Unpin> Future for Reply<T> {
    type Output = Result<T, EngineError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            ReplyState::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(EngineError::Stopped))),
            ReplyState::Ack(rx, value) => Pin::new(rx).poll(cx).map(|r| {
                answered(r)?;
                value.take().ok_or(EngineError::Stopped)
            }),
            ReplyState::Value(rx) => Pin::new(rx).poll(cx).map(answered),
        }
    }
}
