//! The engine: one thread that owns the cloud model, the paged KV cache and the scheduler,
//! and turns the hidden states that devices send into tokens.
//!
//! The loop reads like vLLM's `step()`: drain commands → `schedule()` → copy-on-write copies →
//! one forward pass over the varlen batch (layers `[k, n)` through [`PagedKv`]) → final norm
//! and LM head on the rows that sample only → sample → `update()` → deliver. When nothing is
//! ready the thread blocks on its command channel (or, while work waits for KV blocks, wakes
//! every 20 ms so idle sessions age and yield them); it never waits for a slow device, because
//! a session waiting for its device's next hidden state is simply not in the batch.
//!
//! Two things keep decodes flowing while prompts arrive (stall-free batching):
//! - **Decode-maximal batches.** After a step, the engine waits up to
//!   [`EngineConfig::decode_wait`], or the step's fitted fixed cost when that is longer (at
//!   most 100 ms), for the devices it just sent a token to, but only for those whose last
//!   answer came back within that time (a device with think time is never waited for):
//!   without it a prompt chunk or a few rows that are ready first would run alone, and every
//!   decoder whose input arrived a millisecond later would wait a whole step.
//! - **A capped chunk next to decodes** ([`SchedulerConfig::prefill_slack`]): the engine fits
//!   its step time against the rows computed (`crate::pacing`) and tells the scheduler the
//!   step's fixed cost in rows, from which the scheduler sizes the chunk.
//!
//! Callers talk to it through [`Engine`]: `open_session`, `push_hidden` (validated in the
//! caller's thread: shape, finiteness), the session's own event channel (`Token`, `Done`,
//! `Error`), and `close`. Every hidden state a session sent is kept until its generation ends,
//! so the scheduler can preempt a session and recompute its KV without asking the device
//! again; their bytes are metered ([`Engine::hidden_state_bytes`]) for the server's
//! admission budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::pacing::StepCostFit;
use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use tandem_kvcache::{BlockHash, BlockPool, BlockTable, KvDtype, KvLayout, KvStorage, PagedKv};
use tandem_model::pipeline::StopFilter;
use tandem_model::sampling::Sampler;
use tandem_model::tokenizer::{StreamDecoder, TextTokenizer};
use tandem_model::{CloudModel, ForwardCtx};
use tandem_protocol::{FinishReason, Sampling};
use tandem_scheduler::{
    Batch, SchedError, SchedStats, Scheduler, SchedulerConfig, SeqId, StepOutcome,
};

/// How the engine is sized.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub block_size: usize,
    pub kv_blocks: usize,
    pub kv_dtype: KvDtype,
    /// Share the KV of full blocks whose incoming hidden states are byte-identical between
    /// sessions (a common system prompt sent as its own chunk), through a hash chain.
    pub prefix_sharing: bool,
    /// The longest the engine waits, after a step, for the next inputs of devices that
    /// answered within this time before (decode-maximal batches), unless the step's fitted
    /// fixed cost is longer: then up to that, at most 100 ms (see `wait_cap`). Zero: never
    /// wait.
    pub decode_wait: Duration,
    /// The most drafts the engine asks a device for per decode input (speculation; 0: none,
    /// and drafts a device sends anyway are still computed exactly).
    pub max_draft_tokens: u8,
}

/// The most a step's fitted fixed cost adds to [`EngineConfig::decode_wait`] (see
/// [`wait_cap`]): about a CPU step's fixed cost on a small model; a longer wait would cost
/// the waiting rows more time than it saves.
const MAX_FIXED_COST_WAIT: Duration = Duration::from_millis(100);

/// How long, at most, the engine waits for the devices it just sent a token to: the
/// configured `decode_wait`, or the step's fixed cost `a` from the fitted step time `a +
/// r · rows` when that is longer (up to [`MAX_FIXED_COST_WAIT`]); zero when `decode_wait` is
/// zero (waiting switched off).
///
/// Why the fixed cost: a step started without a device's row occupies the engine for at
/// least `a`, so that row waits about as long anyway, and then costs another step's `a` of
/// its own. Waiting up to `a` for devices that answered within `a` last time therefore
/// costs the rows already present at most one fixed cost, and saves a whole step for the
/// others. On a CPU the fixed cost (streaming every weight once) is tens of milliseconds,
/// and devices whose answers take a few milliseconds (their edge layer, the network) were
/// otherwise never waited for: their rows trickled in and the engine ran steps of 1–5 rows.
fn wait_cap(decode_wait: Duration, fit: Option<(f64, f64)>) -> Duration {
    if decode_wait.is_zero() {
        return Duration::ZERO;
    }
    let fixed = fit
        .map(|(a, _)| a)
        .filter(|a| a.is_finite() && *a > 0.0)
        .map_or(Duration::ZERO, |a| {
            Duration::from_secs_f64(a.min(MAX_FIXED_COST_WAIT.as_secs_f64()))
        });
    decode_wait.max(fixed)
}

/// How often the engine schedules again while work waits for KV blocks.
const BLOCKED_POLL: Duration = Duration::from_millis(20);

/// The default [`EngineConfig::decode_wait`]: long enough for a device on a local network to
/// answer, short against a CPU step.
pub const DEFAULT_DECODE_WAIT: Duration = Duration::from_millis(5);

/// One generation's parameters.
#[derive(Clone, Debug)]
pub struct SessionParams {
    pub sampling: Sampling,
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
    /// Overrides the model's eos ids when set.
    pub eos_ids: Option<Vec<u32>>,
    /// The generation's span, which every engine step computing this session links to.
    pub trace: Option<opentelemetry::trace::SpanContext>,
}

/// What a session hears from the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A sampled token and the text it completes (may be empty mid-character).
    ///
    /// Speculation: `draft` marks a token sampled after one of the device's draft rows (it
    /// counts only if the device accepts the drafts before it, which its next input shows);
    /// `last` a draft token that ends the generation if it counts (`Done` then follows the
    /// device's next input). `draft_cap` is the most drafts the engine wants in the next
    /// input (0: none).
    Token {
        id: u32,
        text: String,
        draft: bool,
        last: bool,
        draft_cap: u8,
    },
    /// The generation ended.
    Done {
        reason: FinishReason,
        output_ids: Vec<u32>,
        text: String,
    },
    /// The session failed inside the engine; it is closed.
    Error(EngineError),
}

/// Errors of the in-process API.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("unknown session {0}")]
    UnknownSession(u64),
    #[error("hidden states: {len} values are not {rows} rows of {hidden}")]
    HiddenShape {
        rows: usize,
        len: usize,
        hidden: usize,
    },
    #[error("hidden states contain NaN or infinite values")]
    NonFinite,
    #[error("session {0} has finished its generation")]
    Finished(u64),
    /// An input that does not continue the session: not at its next position, nor inside
    /// the draft tokens of its last answer (speculation).
    #[error("input at position {got}: expected {expected}")]
    Position { got: usize, expected: String },
    #[error(transparent)]
    Scheduler(#[from] SchedError),
    #[error("model: {0}")]
    Model(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// Where a session's events go: the crossbeam channel of [`Engine::open_session`] or the
/// tokio channel of [`Engine::open_session_with`]. Both are unbounded, so the engine thread
/// never blocks on a slow consumer (a session produces at most one token per input it
/// received, so the backlog is bounded by the session's own inputs).
enum EventSink {
    Sync(Sender<Event>),
    /// Also hears the end-of-sequence token as an `Event::Token` (the wire sends every
    /// sampled token), and the text held back until the end rides on the last token.
    Async(tokio::sync::mpsc::UnboundedSender<Event>),
}

impl EventSink {
    fn send(&self, ev: Event) {
        match self {
            Self::Sync(tx) => {
                let _ = tx.send(ev);
            }
            Self::Async(tx) => {
                let _ = tx.send(ev);
            }
        }
    }

    fn is_async(&self) -> bool {
        matches!(self, Self::Async(_))
    }
}

enum Command {
    Open {
        id: SeqId,
        params: SessionParams,
        events: EventSink,
        ack: Sender<Result<(), EngineError>>,
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
        ack: Option<Sender<Result<(), EngineError>>>,
    },
    Close {
        id: SeqId,
        ack: Sender<Result<(), EngineError>>,
    },
    Stats {
        reply: Sender<EngineStats>,
    },
    /// Holds the loop as a step that never ends would (for the readiness tests).
    Stall(Duration),
}

/// Counters of the engine since it started.
#[derive(Clone, Debug)]
pub struct EngineStats {
    pub scheduler: SchedStats,
    /// Seconds spent in forward passes and sampling (not waiting for input).
    pub busy_s: f64,
    /// Tokens sampled.
    pub tokens_sampled: u64,
    /// Positions of the cloud's layers computed (prefill and decode, recomputation included).
    pub positions_computed: u64,
    /// Seconds spent waiting for expected decode inputs ([`EngineConfig::decode_wait`]).
    pub decode_wait_s: f64,
    /// Seconds of the engine thread's own bookkeeping: handling commands (taking in hidden
    /// states, opening and closing sessions), choosing each step and recording its outcome.
    /// With the transport's threads, this is the serving overhead around `busy_s`.
    pub bookkeeping_s: f64,
    /// Engine steps run.
    pub steps: u64,
    /// The step's fixed cost in rows as last measured (0 until measured).
    pub overhead_rows: f64,
}

/// Handle to a running engine thread. Dropping it stops the thread.
pub struct Engine {
    tx: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    hidden_size: usize,
    block_size: usize,
    next_id: AtomicU64,
    /// Bytes of hidden states the sessions hold for recompute (see [`HiddenRows`]).
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

    /// [`Engine::start`], recording every step into `metrics` (batch sizes, step duration,
    /// the step in progress).
    pub fn start_observed(
        cloud: CloudModel,
        tokenizer: Option<TextTokenizer>,
        cfg: EngineConfig,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Self {
        let hidden_size = cloud.config().hidden_size;
        let block_size = cfg.block_size;
        let (tx, rx) = unbounded();
        let hidden_bytes = Arc::new(AtomicU64::new(0));
        let meter = hidden_bytes.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || run(cloud, tokenizer, cfg, rx, metrics, meter))
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

    /// Sends a command carrying a reply channel and waits for the engine's answer.
    fn request<T>(&self, make: impl FnOnce(Sender<T>) -> Command) -> Result<T, EngineError> {
        let (reply, answer) = bounded(1);
        let tx = self.tx.as_ref().ok_or(EngineError::Stopped)?;
        tx.send(make(reply)).map_err(|_| EngineError::Stopped)?;
        answer.recv().map_err(|_| EngineError::Stopped)
    }

    fn call(
        &self,
        make: impl FnOnce(Sender<Result<(), EngineError>>) -> Command,
    ) -> Result<(), EngineError> {
        self.request(make)?
    }

    /// Opens a session (admission control may answer `Overloaded`).
    pub fn open_session(&self, params: SessionParams) -> Result<Session, EngineError> {
        let id = SeqId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (events, rx) = unbounded();
        self.call(|ack| Command::Open {
            id,
            params,
            events: EventSink::Sync(events),
            ack,
        })?;
        Ok(Session { id, events: rx })
    }

    /// Opens a session whose events go to an async consumer (the WebSocket server).
    ///
    /// Unlike [`Self::open_session`], every sampled token is an [`Event::Token`], the
    /// end-of-sequence one included (with the text the decoder still held, or none), and the
    /// text held back until the end (a partial character, a possible stop-string prefix) rides
    /// on the last `Token`, so concatenating the token texts gives `Done`'s text exactly. Blocks
    /// until the engine answers (between two steps): call it from a blocking context.
    pub fn open_session_with(
        &self,
        params: SessionParams,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> Result<SeqId, EngineError> {
        let id = SeqId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.call(|ack| Command::Open {
            id,
            params,
            events: EventSink::Async(events),
            ack,
        })?;
        Ok(id)
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
    /// the last chunk of a prompt, or each decode step. Waits until the engine has accepted
    /// them (between two steps), so scheduler refusals come back here, typed.
    pub fn push_hidden(
        &self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
    ) -> Result<(), EngineError> {
        self.check_hidden(&data, rows)?;
        self.call(|ack| Command::Hidden {
            id,
            data,
            rows,
            complete,
            first_position: None,
            drafts: 0,
            ack: Some(ack),
        })
    }

    /// [`Self::push_hidden`] of an input at `first_position` whose last `drafts` rows are
    /// tokens the device drafted (speculation across the split; docs/protocol.md §6). The
    /// engine samples after the row before the drafts and after every draft row, in one
    /// step; those after drafts are `Event::Token { draft: true, .. }`. The next input's
    /// `first_position` says how many drafts the device accepted: the engine drops the rows
    /// (and KV) after it and commits the accepted tokens. Waits for the engine's answer.
    pub fn push_hidden_at(
        &self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        first_position: usize,
        drafts: usize,
    ) -> Result<(), EngineError> {
        self.check_hidden(&data, rows)?;
        self.call(|ack| Command::Hidden {
            id,
            data,
            rows,
            complete: true,
            first_position: Some(first_position),
            drafts,
            ack: Some(ack),
        })
    }

    /// [`Self::push_hidden_at`] without waiting (as [`Self::push_hidden_nowait`]); any input,
    /// complete or not, at its `first_position`.
    pub fn push_hidden_at_nowait(
        &self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
        first_position: usize,
        drafts: usize,
    ) -> Result<(), EngineError> {
        self.check_hidden(&data, rows)?;
        let tx = self.tx.as_ref().ok_or(EngineError::Stopped)?;
        tx.send(Command::Hidden {
            id,
            data,
            rows,
            complete,
            first_position: Some(first_position),
            drafts,
            ack: None,
        })
        .map_err(|_| EngineError::Stopped)
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
        self.check_hidden(&data, rows)?;
        let tx = self.tx.as_ref().ok_or(EngineError::Stopped)?;
        tx.send(Command::Hidden {
            id,
            data,
            rows,
            complete,
            first_position: None,
            drafts: 0,
            ack: None,
        })
        .map_err(|_| EngineError::Stopped)
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

    /// Positions per KV block.
    /// Holds the engine loop for `d`, as a step that does not end would: for tests of the
    /// readiness check only.
    #[doc(hidden)]
    pub fn stall_for_tests(&self, d: Duration) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Command::Stall(d));
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The engine's counters (answered between two steps).
    pub fn stats(&self) -> Result<EngineStats, EngineError> {
        self.request(|reply| Command::Stats { reply })
    }

    /// Ends a session and releases its KV blocks.
    pub fn close(&self, id: SeqId) -> Result<(), EngineError> {
        self.call(|ack| Command::Close { id, ack })
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

/// The draft tokens of a speculative answer, until the device's next input says how many
/// count.
struct Pending<'t> {
    /// Position of the first draft row: the next input starts at `first + accepted`.
    first: usize,
    /// The tokens sampled after the draft rows, in order (the last may end the generation).
    tokens: Vec<u32>,
    /// How the last of `tokens` ends the generation, if it counts.
    ended: Option<FinishReason>,
    /// The session's text state before the first of `tokens`.
    output_len: usize,
    decoder: Option<StreamDecoder<'t>>,
    stop: StopFilter,
}

/// A sampled token applied to a session's output and text state.
struct Advanced {
    token: u32,
    /// The text for its `Token` event (`None`: no event, as for the end-of-sequence token of
    /// an in-process session).
    text: Option<String>,
    end: Option<FinishReason>,
}

/// The default [`EngineConfig::max_draft_tokens`] (protocol cap: `MAX_DRAFTS`).
pub const MAX_DRAFT_CAP: u8 = 8;

/// A session's hidden states (row-major, `hidden_size` values a position), kept for
/// recompute, whose allocation is counted in a meter shared with the [`Engine`] handle: every
/// change adds or takes away the change in capacity, and dropping takes away the rest.
struct HiddenRows {
    rows: Vec<f32>,
    meter: Arc<AtomicU64>,
}

impl HiddenRows {
    fn new(meter: Arc<AtomicU64>) -> Self {
        Self {
            rows: Vec::new(),
            meter,
        }
    }

    fn bytes(&self) -> u64 {
        (self.rows.capacity() * std::mem::size_of::<f32>()) as u64
    }

    /// Runs `change` on the rows and moves the meter by the change in allocated bytes.
    fn metered(&mut self, change: impl FnOnce(&mut Vec<f32>)) {
        let before = self.bytes();
        change(&mut self.rows);
        let after = self.bytes();
        if after > before {
            self.meter.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.meter.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    fn extend_from_slice(&mut self, data: &[f32]) {
        self.metered(|r| r.extend_from_slice(data));
    }

    fn truncate(&mut self, len: usize) {
        self.metered(|r| r.truncate(len));
    }

    /// Gives the memory back (the generation ended: nothing will be recomputed).
    fn release(&mut self) {
        self.metered(|r| *r = Vec::new());
    }
}

impl std::ops::Deref for HiddenRows {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.rows
    }
}

impl Drop for HiddenRows {
    fn drop(&mut self) {
        self.release();
    }
}

struct SessionState<'t> {
    events: EventSink,
    hidden: HiddenRows,
    sampler: Sampler,
    max_tokens: usize,
    eos: Vec<u32>,
    output: Vec<u32>,
    decoder: Option<StreamDecoder<'t>>,
    stop: StopFilter,
    finished: bool,
    /// The hash chain of `hidden`'s full blocks so far (prefix sharing).
    chain: Vec<BlockHash>,
    /// Position of the first draft row of the input being computed (speculation).
    draft_first: usize,
    /// Tokens sampled after draft rows, waiting for the device's verdict.
    pending: Option<Pending<'t>>,
    /// The generation span steps link to.
    trace: Option<opentelemetry::trace::SpanContext>,
    /// When the last token went out, until the device's next input arrives.
    token_sent_at: Option<Instant>,
    /// How long the device took to answer its last token.
    reply_latency: Option<Duration>,
}

/// The paged KV blocks, where the cloud model computes.
pub(crate) enum Cache {
    Cpu(KvStorage),
    #[cfg(feature = "cuda")]
    Cuda(tandem_kvcache::cuda::CudaKvStorage),
}

impl Cache {
    /// The cache for `layout` on `device` (the model's).
    pub(crate) fn new(layout: KvLayout, device: &Device) -> Result<Self, EngineError> {
        match device {
            Device::Cpu => Ok(Self::Cpu(KvStorage::new(layout))),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => tandem_kvcache::cuda::CudaKvStorage::new(layout, device)
                .map(Self::Cuda)
                .map_err(|e| EngineError::Model(e.to_string())),
            #[allow(unreachable_patterns)]
            other => Err(EngineError::Model(format!(
                "no paged KV cache for the device {other:?} in this build"
            ))),
        }
    }

    fn copy(&mut self, op: tandem_kvcache::CopyOp) -> Result<(), EngineError> {
        match self {
            Self::Cpu(s) => s.copy(op),
            #[cfg(feature = "cuda")]
            Self::Cuda(s) => s.copy(op).map_err(|e| EngineError::Model(e.to_string()))?,
        }
        Ok(())
    }

    pub(crate) fn forward(
        &mut self,
        cloud: &CloudModel,
        x: &Tensor,
        ctx: &ForwardCtx,
        tables: &[&BlockTable],
    ) -> Result<Tensor, tandem_model::ModelError> {
        self.forward_timed(cloud, x, ctx, tables, false)
            .map(|(t, _)| t)
    }

    /// [`Self::forward`]; with `time_attention` on a GPU, also the seconds its attention
    /// calls took (each synchronised: a diagnosis that slows the step).
    fn forward_timed(
        &mut self,
        cloud: &CloudModel,
        x: &Tensor,
        ctx: &ForwardCtx,
        tables: &[&BlockTable],
        time_attention: bool,
    ) -> Result<(Tensor, Option<f64>), tandem_model::ModelError> {
        let _ = time_attention;
        match self {
            Self::Cpu(s) => Ok((
                cloud.forward_layers(x, ctx, &mut PagedKv::new(s, tables))?,
                None,
            )),
            #[cfg(feature = "cuda")]
            Self::Cuda(s) => {
                use tandem_kvcache::cuda::CudaPagedKv;
                let mut kv = if time_attention {
                    CudaPagedKv::timed(s, tables)
                } else {
                    CudaPagedKv::new(s, tables)
                };
                let out = cloud.forward_layers(x, ctx, &mut kv)?;
                Ok((out, kv.attend_seconds()))
            }
        }
    }
}

struct Loop<'t> {
    cloud: CloudModel,
    tokenizer: Option<&'t TextTokenizer>,
    sched: Scheduler,
    storage: Cache,
    sessions: HashMap<SeqId, SessionState<'t>>,
    busy_s: f64,
    tokens_sampled: u64,
    positions_computed: u64,
    block_size: usize,
    prefix_sharing: bool,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// Sessions that were just sent a token and answered fast last time, with the time until
    /// which the engine waits for them. Small: only prompt devices are here.
    expecting: HashMap<SeqId, Instant>,
    decode_wait: Duration,
    decode_wait_s: f64,
    bookkeeping_s: f64,
    steps: u64,
    cost: StepCostFit,
    /// The share of wall time spent in steps lately (an average over about 20 steps).
    busy_share: f64,
    last_step_end: Option<Instant>,
    /// [`EngineConfig::max_draft_tokens`].
    max_draft: u8,
    /// The sessions' [`HiddenRows`] meter, shared with the [`Engine`] handle.
    hidden_meter: Arc<AtomicU64>,
}

fn run(
    cloud: CloudModel,
    tokenizer: Option<TextTokenizer>,
    cfg: EngineConfig,
    rx: Receiver<Command>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    hidden_meter: Arc<AtomicU64>,
) {
    let ccfg = cloud.config().clone();
    let range = cloud.split().cloud_range();
    let layout = KvLayout {
        first_layer: range.start,
        num_layers: range.len(),
        num_blocks: cfg.kv_blocks,
        block_size: cfg.block_size,
        kv_heads: ccfg.num_key_value_heads,
        head_dim: ccfg.head_dim,
        dtype: cfg.kv_dtype,
    };
    let storage = match Cache::new(layout, cloud.device()) {
        Ok(c) => c,
        Err(e) => {
            // Every request then answers `EngineError::Stopped`.
            tracing::error!(error = %e, "the engine could not allocate its KV cache; stopping");
            return;
        }
    };
    let pool = BlockPool::new(cfg.kv_blocks, cfg.block_size);
    let mut lp = Loop {
        cloud,
        tokenizer: tokenizer.as_ref(),
        sched: Scheduler::new(cfg.scheduler.clone(), pool),
        storage,
        sessions: HashMap::new(),
        busy_s: 0.0,
        tokens_sampled: 0,
        positions_computed: 0,
        block_size: cfg.block_size,
        prefix_sharing: cfg.prefix_sharing,
        metrics,
        expecting: HashMap::new(),
        decode_wait: cfg.decode_wait,
        decode_wait_s: 0.0,
        bookkeeping_s: 0.0,
        steps: 0,
        cost: StepCostFit::new(0.98),
        busy_share: 0.0,
        last_step_end: None,
        max_draft: cfg.max_draft_tokens.min(tandem_protocol::wire::MAX_DRAFTS),
        hidden_meter,
    };
    loop {
        while let Ok(cmd) = rx.try_recv() {
            lp.handle(cmd);
        }
        lp.wait_for_expected(&rx);
        let chosen = Instant::now();
        let batch = lp.sched.schedule();
        lp.bookkeeping_s += chosen.elapsed().as_secs_f64();
        if batch.is_empty() {
            if lp.sched.blocked() {
                // Work waits for KV blocks held by sessions idle at their devices: schedule
                // again soon, so they age and yield them (preemption rule 3).
                match rx.recv_timeout(BLOCKED_POLL) {
                    Ok(cmd) => lp.handle(cmd),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                }
                continue;
            }
            match rx.recv() {
                Ok(cmd) => lp.handle(cmd),
                Err(_) => return,
            }
            continue;
        }
        lp.step(batch);
    }
}

impl<'t> Loop<'t> {
    /// Handles commands until every expected device has answered or the last of their
    /// deadlines passes, then forgets them (they are waited for once per token).
    fn wait_for_expected(&mut self, rx: &Receiver<Command>) {
        let Some(&deadline) = self.expecting.values().max() else {
            return;
        };
        let started = Instant::now();
        while !self.expecting.is_empty() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match rx.recv_timeout(left) {
                Ok(cmd) => self.handle(cmd),
                Err(_) => break, // timed out, or the engine is closing: run what is ready
            }
        }
        self.expecting.clear();
        self.decode_wait_s += started.elapsed().as_secs_f64();
    }

    /// Handles one command; its time counts as bookkeeping (a stall's sleep does not).
    fn handle(&mut self, cmd: Command) {
        if let Command::Stall(d) = cmd {
            self.stall(d);
            return;
        }
        let started = Instant::now();
        self.handle_timed(cmd);
        self.bookkeeping_s += started.elapsed().as_secs_f64();
    }

    /// Sleeps `d` as if a step took that long (tests of `/readyz`'s wedge check).
    fn stall(&self, d: Duration) {
        if let Some(m) = &self.metrics {
            m.step_started_ms
                .store(crate::store::now_ms().max(1), Ordering::Relaxed);
        }
        std::thread::sleep(d);
        if let Some(m) = &self.metrics {
            m.step_started_ms.store(0, Ordering::Relaxed);
        }
    }

    fn handle_timed(&mut self, cmd: Command) {
        match cmd {
            Command::Stall(d) => self.stall(d),
            Command::Open {
                id,
                params,
                events,
                ack,
            } => {
                let r = self.sched.add(id).map_err(EngineError::from);
                if r.is_ok() {
                    let eos = params
                        .eos_ids
                        .unwrap_or_else(|| self.cloud.config().eos_token_ids.clone());
                    self.sessions.insert(
                        id,
                        SessionState {
                            events,
                            hidden: HiddenRows::new(self.hidden_meter.clone()),
                            sampler: Sampler::new(params.sampling),
                            max_tokens: params.max_tokens,
                            eos,
                            output: Vec::new(),
                            decoder: self.tokenizer.map(StreamDecoder::new),
                            stop: StopFilter::new(params.stop_strings),
                            finished: false,
                            chain: Vec::new(),
                            draft_first: 0,
                            pending: None,
                            trace: params.trace,
                            token_sent_at: None,
                            reply_latency: None,
                        },
                    );
                }
                let _ = ack.send(r);
            }
            Command::Hidden {
                id,
                data,
                rows,
                complete,
                first_position,
                drafts,
                ack,
            } => {
                let r = self.take_input(id, data, rows, complete, first_position, drafts);
                if r.is_ok() {
                    if let Some(s) = self.sessions.get_mut(&id) {
                        if let Some(t) = s.token_sent_at.take() {
                            s.reply_latency = Some(t.elapsed());
                        }
                    }
                    self.expecting.remove(&id);
                }
                match ack {
                    Some(ack) => {
                        let _ = ack.send(r);
                    }
                    None => {
                        if let (Err(e), Some(s)) = (r, self.sessions.get(&id)) {
                            s.events.send(Event::Error(e));
                        }
                    }
                }
            }
            Command::Stats { reply } => {
                let _ = reply.send(EngineStats {
                    scheduler: self.sched.stats(),
                    busy_s: self.busy_s,
                    tokens_sampled: self.tokens_sampled,
                    positions_computed: self.positions_computed,
                    decode_wait_s: self.decode_wait_s,
                    bookkeeping_s: self.bookkeeping_s,
                    steps: self.steps,
                    overhead_rows: self.cost.overhead_rows().unwrap_or(0.0),
                });
            }
            Command::Close { id, ack } => {
                self.expecting.remove(&id);
                let r = match self.sessions.remove(&id) {
                    None => Err(EngineError::UnknownSession(id.0)),
                    Some(s) => {
                        if !s.finished {
                            let _ = self.sched.remove(id);
                        }
                        Ok(())
                    }
                };
                let _ = ack.send(r);
            }
        }
    }

    /// Takes one input: checks where it starts, applies the device's verdict on the draft
    /// tokens of the last answer (drops the rejected rows and their KV, commits the accepted
    /// tokens, ends the generation when one of them ends it), then queues the rows.
    fn take_input(
        &mut self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
        first_position: Option<usize>,
        drafts: usize,
    ) -> Result<(), EngineError> {
        let h = self.cloud.config().hidden_size;
        let bs = self.block_size;
        let s = match self.sessions.get_mut(&id) {
            None => return Err(EngineError::UnknownSession(id.0)),
            Some(s) if s.finished => return Err(EngineError::Finished(id.0)),
            Some(s) => s,
        };
        let received = self
            .sched
            .progress(id)
            .map(|p| p.received)
            .ok_or(EngineError::UnknownSession(id.0))?;
        let at = first_position.unwrap_or(received);
        // The tokens of the last answer the device accepted (drafts before `at`).
        let accepted = match &s.pending {
            Some(p) if at >= p.first && at <= p.first + p.tokens.len() => Some(at - p.first),
            _ if at == received => None,
            p => {
                return Err(EngineError::Position {
                    got: at,
                    expected: match p {
                        Some(p) => format!("{} to {}", p.first, p.first + p.tokens.len()),
                        None => received.to_string(),
                    },
                })
            }
        };
        if let Some(accepted) = accepted {
            if at < received {
                self.sched.truncate(id, at)?;
                s.hidden.truncate(at * h);
                s.chain.truncate(at / bs);
            }
            if let Some(m) = &self.metrics {
                m.draft_tokens_accepted_total.add(accepted as u64);
            }
            if let Some(reason) = s.commit(accepted)? {
                // A draft token that ended the generation counts: the rows that came with
                // the verdict are not needed.
                s.finish(reason);
                let _ = self.sched.remove(id);
                return Ok(());
            }
        }
        self.sched.push_drafts(id, rows, complete, drafts)?;
        s.hidden.extend_from_slice(&data);
        s.draft_first = at + rows - drafts;
        if drafts > 0 {
            if let Some(m) = &self.metrics {
                m.draft_tokens_total.add(drafts as u64);
            }
        }
        if self.prefix_sharing {
            self.hash_new_blocks(id);
        }
        Ok(())
    }

    /// The most drafts to ask for in the next inputs: the configured cap
    /// ([`EngineConfig::max_draft_tokens`]) while the engine
    /// mostly waits for its devices (drafts then ride in steps that would run anyway), else
    /// as many as the step's fixed cost covers per decoder (speculating sessions at most
    /// double a compute-bound step). `decoders`: the sessions sampled in this step.
    fn draft_cap(&self, decoders: usize) -> u8 {
        let max = self.max_draft;
        if self.busy_share < 0.5 {
            return max;
        }
        let per = self.cost.overhead_rows().unwrap_or(f64::from(max)) / decoders.max(1) as f64;
        (per.floor().clamp(0.0, f64::from(max))) as u8
    }

    /// Extends `id`'s hash chain over the full blocks it received since the last call and
    /// hands the new hashes to the scheduler (prefix sharing).
    fn hash_new_blocks(&mut self, id: SeqId) {
        let h = self.cloud.config().hidden_size;
        let bs = self.block_size;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let full = s.hidden.len() / (h * bs);
        let done = s.chain.len();
        if full <= done {
            return;
        }
        let mut bytes = Vec::with_capacity(h * bs * 4);
        for b in done..full {
            bytes.clear();
            for x in &s.hidden[b * bs * h..(b + 1) * bs * h] {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
            let hash = BlockHash::chain(s.chain.last().copied(), &bytes);
            s.chain.push(hash);
        }
        let new = &s.chain[done..];
        // Cannot fail: the session is known and the positions were just received.
        let _ = self.sched.add_block_hashes(id, new);
    }

    /// Runs one batch; a failure fails the batch's sessions, not the engine.
    fn step(&mut self, batch: Batch) {
        let started = Instant::now();
        // A root span per step, linked to the generations it computed (a step serves many
        // traces at once, so it is no one's child).
        let span = tracing::info_span!(
            parent: None,
            "engine.step",
            batch_tokens = batch.num_tokens() as i64,
            batch_sequences = batch.items.len() as i64,
            sampled = batch.items.iter().filter(|i| i.sample).count() as i64,
            copies = batch.copies.len() as i64,
        );
        crate::telemetry::link(
            &span,
            batch
                .items
                .iter()
                .filter_map(|i| self.sessions.get(&i.id)?.trace.clone()),
        );
        let _in_step = span.enter();
        if let Some(m) = &self.metrics {
            m.step_started_ms
                .store(crate::store::now_ms().max(1), Ordering::Relaxed);
        }
        let result = self.forward_and_sample(&batch);
        let forwarded = Instant::now();
        let took = forwarded - started;
        if let Some(prev) = self.last_step_end.replace(forwarded) {
            let wall = (forwarded - prev).as_secs_f64();
            if wall > 0.0 {
                let share = (took.as_secs_f64() / wall).min(1.0);
                self.busy_share += 0.05 * (share - self.busy_share);
            }
        }
        self.busy_s += took.as_secs_f64();
        self.steps += 1;
        self.cost.observe(batch.num_tokens(), took.as_secs_f64());
        if let Some(rows) = self.cost.overhead_rows() {
            self.sched.set_overhead_rows(rows);
        }
        tracing::debug!(
            rows = batch.num_tokens(),
            one_row_items = batch.items.iter().filter(|i| i.len == 1).count(),
            seqs = batch.items.len(),
            ms = took.as_secs_f64() * 1e3,
            overhead_rows = self.cost.overhead_rows().unwrap_or(0.0),
            "engine step"
        );
        if let Some(m) = &self.metrics {
            m.step_started_ms.store(0, Ordering::Relaxed);
            m.step_duration_seconds.observe_duration(started.elapsed());
            m.batch_tokens.observe(batch.num_tokens() as f64);
            m.batch_sequences.observe(batch.items.len() as f64);
        }
        self.positions_computed += batch.num_tokens() as u64;
        self.tokens_sampled += batch.items.iter().filter(|i| i.sample).count() as u64;
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                for item in &batch.items {
                    if let Some(s) = self.sessions.get_mut(&item.id) {
                        s.events.send(Event::Error(e.clone()));
                        s.finished = true;
                    }
                }
                StepOutcome {
                    finished: batch.items.iter().map(|i| i.id).collect(),
                }
            }
        };
        self.sched.update(&batch, &outcome);
        for id in &outcome.finished {
            let _ = self.sched.remove(*id);
        }
        self.expect_answers(&batch);
        self.bookkeeping_s += forwarded.elapsed().as_secs_f64();
    }

    /// Notes the time each sampled session was sent its token, and expects back within
    /// [`wait_cap`] those whose devices answered that fast last time.
    fn expect_answers(&mut self, batch: &Batch) {
        let now = Instant::now();
        let cap = wait_cap(self.decode_wait, self.cost.line());
        for item in batch.items.iter().filter(|i| i.sample) {
            let Some(s) = self.sessions.get_mut(&item.id) else {
                continue;
            };
            if s.finished {
                continue;
            }
            s.token_sent_at = Some(now);
            match s.reply_latency {
                Some(lat) if !cap.is_zero() && lat <= cap => {
                    // Up to the cap, not a multiple of the last answer time: answers come
                    // back in bursts whose order changes from step to step (the devices of
                    // one host, one network queue), so a device's next answer may take
                    // several times its last, and the wait ends when the last expected
                    // device has answered anyway.
                    self.expecting.insert(item.id, now + cap);
                }
                _ => {}
            }
        }
    }

    fn forward_and_sample(&mut self, batch: &Batch) -> Result<StepOutcome, EngineError> {
        let model_err = |e: tandem_model::ModelError| EngineError::Model(e.to_string());
        for op in &batch.copies {
            self.storage.copy(*op)?;
        }
        let h = self.cloud.config().hidden_size;
        let mut rows = Vec::with_capacity(batch.num_tokens() * h);
        let mut spans = Vec::with_capacity(batch.items.len());
        let mut sample_rows = Vec::new();
        for item in &batch.items {
            let s = self
                .sessions
                .get(&item.id)
                .ok_or(EngineError::UnknownSession(item.id.0))?;
            rows.extend_from_slice(&s.hidden[item.start * h..(item.start + item.len) * h]);
            if item.sample {
                // The item's last rows, just appended: one, or the token before the drafts
                // and the drafts.
                let end = rows.len() / h;
                for r in end - item.sample_rows.clamp(1, item.len)..end {
                    sample_rows.push((r as u32, item.id));
                }
            }
            spans.push((item.start, item.len));
        }
        let ctx = ForwardCtx::varlen(&spans);
        let x = Tensor::from_vec(rows, (ctx.num_tokens(), h), &Device::Cpu)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let tables: Vec<&BlockTable> = batch
            .items
            .iter()
            .map(|i| {
                self.sched
                    .table(i.id)
                    .ok_or(EngineError::UnknownSession(i.id.0))
            })
            .collect::<Result<_, _>>()?;
        // Phase times for `RUST_LOG=tandem_serve::engine=debug`: only then is the device
        // synchronised after the layers (on a GPU the launches are asynchronous).
        let phases = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
        // Attention timed on its own too at trace level (each call synchronised).
        let time_attention = tracing::enabled!(tracing::Level::TRACE);
        let (out, attention_s) = self
            .storage
            .forward_timed(&self.cloud, &x, &ctx, &tables, time_attention)
            .map_err(model_err)?;
        let layers_done = phases.map(|t0| {
            let _ = out.device().synchronize();
            (t0, Instant::now())
        });
        let mut finished = Vec::new();
        if sample_rows.is_empty() {
            return Ok(StepOutcome { finished });
        }
        let idx: Vec<u32> = sample_rows.iter().map(|&(r, _)| r).collect();
        let idx = Tensor::from_vec(idx, sample_rows.len(), out.device())
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let picked = out
            .index_select(&idx, 0)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let logits = self.cloud.logits(&picked).map_err(model_err)?;
        let vocab = logits
            .dim(1)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let logits_done = Instant::now();
        let cap = self.draft_cap(batch.num_samples());
        if let Some(m) = &self.metrics {
            m.draft_cap.store(u64::from(cap), Ordering::Relaxed);
        }
        let sessions = &mut self.sessions;
        if logits.device().is_cpu() && logits.dtype() == DType::F32 {
            // Read in place (a decode step of 64 sessions would copy 64 vocabulary rows).
            finished.extend(
                tandem_model::cpu::with_f32(&logits, |l| {
                    deliver_rows(sessions, &sample_rows, l, vocab, cap)
                })
                .map_err(|e| EngineError::Model(e.to_string()))?,
            );
        } else {
            // One flat copy to the host (not a `Vec` per row).
            let logits: Vec<f32> = logits
                .to_dtype(DType::F32)
                .and_then(|l| l.flatten_all())
                .and_then(|l| l.to_vec1())
                .map_err(|e| EngineError::Model(e.to_string()))?;
            finished.extend(deliver_rows(sessions, &sample_rows, &logits, vocab, cap));
        }
        if let Some((t0, t1)) = layers_done {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            tracing::debug!(
                rows = ctx.num_tokens(),
                sampled = sample_rows.len(),
                layers_ms = ms(t0, t1),
                attention_ms = attention_s.unwrap_or(f64::NAN) * 1e3,
                head_and_copy_ms = ms(t1, logits_done),
                sample_and_deliver_ms = ms(logits_done, Instant::now()),
                "engine step phases"
            );
        }
        Ok(StepOutcome { finished })
    }
}

/// Samples and delivers each sampled row's token to its session (`rows[i]` owns the `i`-th
/// `vocab`-long slice of `logits`; a session's rows are consecutive: one, or the token before
/// its drafts and the drafts); returns the sessions that ended. A session whose sampling or
/// detokenizing fails (NaN logits, a decoding error) gets its own `Event::Error` and ends;
/// the other sessions of the step get their tokens.
fn deliver_rows(
    sessions: &mut HashMap<SeqId, SessionState<'_>>,
    rows: &[(u32, SeqId)],
    logits: &[f32],
    vocab: usize,
    draft_cap: u8,
) -> Vec<SeqId> {
    let mut finished = Vec::new();
    let slices: Vec<&[f32]> = logits.chunks_exact(vocab.max(1)).collect();
    let mut i = 0;
    while i < rows.len().min(slices.len()) {
        let id = rows[i].1;
        let n = rows[i..].iter().take_while(|(_, r)| *r == id).count();
        let window = &slices[i..(i + n).min(slices.len())];
        i += n;
        let Some(s) = sessions.get_mut(&id) else {
            continue;
        };
        match s.deliver_window(window, draft_cap) {
            Ok(true) => finished.push(id),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(session = id.0, error = %e, "sampling failed; ending this session only");
                s.events.send(Event::Error(e));
                s.finished = true;
                s.hidden.release();
                finished.push(id);
            }
        }
    }
    finished
}

impl SessionState<'_> {
    /// Samples one token from `logits` and applies it to the output and the text state:
    /// what the token's event says, and whether it ends the generation. Changes nothing
    /// else (no event is sent).
    fn advance(&mut self, logits: &[f32]) -> Result<Advanced, EngineError> {
        let token = self
            .sampler
            .sample(logits, &self.output)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let mut end = None;
        let mut text = None;
        if self.eos.contains(&token) {
            end = Some(FinishReason::Eos);
            if self.events.is_async() {
                text = Some(String::new());
            }
        } else {
            self.output.push(token);
            let piece = match self.decoder.as_mut() {
                Some(d) => d
                    .push(token)
                    .map_err(|e| EngineError::Model(e.to_string()))?,
                None => String::new(),
            };
            let mut shown = String::new();
            if self.stop.push(&piece, &mut |p| shown.push_str(p)) {
                end = Some(FinishReason::StopString);
            }
            text = Some(shown);
            if end.is_none() && self.output.len() >= self.max_tokens {
                end = Some(FinishReason::Length);
            }
        }
        if end.is_some() && end != Some(FinishReason::StopString) {
            if let Some(d) = self.decoder.as_mut() {
                let rest = d.finish().map_err(|e| EngineError::Model(e.to_string()))?;
                let mut tail = String::new();
                self.stop.push(&rest, &mut |p| tail.push_str(p));
                self.stop.flush(&mut |p| tail.push_str(p));
                // The held-back tail rides on the last token (async sinks only).
                if let (true, Some(t)) = (self.events.is_async(), text.as_mut()) {
                    t.push_str(&tail);
                }
            }
        }
        Ok(Advanced { token, text, end })
    }

    /// Ends the generation: `Done` with the output so far.
    fn finish(&mut self, reason: FinishReason) {
        self.finished = true;
        self.pending = None;
        self.hidden.release();
        self.events.send(Event::Done {
            reason,
            output_ids: self.output.clone(),
            text: self.stop.text().to_string(),
        });
    }

    /// Samples and delivers one answer: the token after the first row, which counts, then,
    /// after each draft row, a draft token (sampled as if the drafts before it were
    /// accepted, so that it is the token a step without speculation would give if they are),
    /// up to the first that would end the generation. Returns whether the generation ended.
    fn deliver_window(&mut self, rows: &[&[f32]], draft_cap: u8) -> Result<bool, EngineError> {
        let Some((first, drafts)) = rows.split_first() else {
            return Ok(false);
        };
        let a = self.advance(first)?;
        if let Some(text) = a.text {
            self.events.send(Event::Token {
                id: a.token,
                text,
                draft: false,
                last: false,
                draft_cap,
            });
        }
        if let Some(reason) = a.end {
            self.finish(reason);
            return Ok(true);
        }
        if drafts.is_empty() {
            return Ok(false);
        }
        let mut pending = Pending {
            first: self.draft_first,
            tokens: Vec::with_capacity(drafts.len()),
            ended: None,
            output_len: self.output.len(),
            decoder: self.decoder.clone(),
            stop: self.stop.clone(),
        };
        for row in drafts {
            let a = self.advance(row)?;
            pending.tokens.push(a.token);
            self.events.send(Event::Token {
                id: a.token,
                text: a.text.unwrap_or_default(),
                draft: true,
                last: a.end.is_some(),
                draft_cap,
            });
            if a.end.is_some() {
                pending.ended = a.end;
                break;
            }
        }
        self.pending = Some(pending);
        Ok(false)
    }

    /// Applies the device's verdict on the pending draft tokens: the first `accepted` count
    /// (the caller checked `accepted <= tokens.len()`). Returns how the generation ends when
    /// an accepted token ends it.
    fn commit(&mut self, accepted: usize) -> Result<Option<FinishReason>, EngineError> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        if accepted == p.tokens.len() {
            // The state already follows every draft token.
            return Ok(p.ended);
        }
        self.output.truncate(p.output_len);
        self.decoder = p.decoder;
        self.stop = p.stop;
        // None of these ends the generation (the answer stopped at the first that would).
        for &token in &p.tokens[..accepted] {
            self.output.push(token);
            let piece = match self.decoder.as_mut() {
                Some(d) => d
                    .push(token)
                    .map_err(|e| EngineError::Model(e.to_string()))?,
                None => String::new(),
            };
            self.stop.push(&piece, &mut |_| {});
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(events: Sender<Event>) -> SessionState<'static> {
        SessionState {
            events: EventSink::Sync(events),
            hidden: HiddenRows::new(Arc::default()),
            sampler: Sampler::new(
                tandem_protocol::SamplingParams::default()
                    .validate()
                    .expect("greedy"),
            ),
            max_tokens: 10,
            eos: Vec::new(),
            output: Vec::new(),
            decoder: None,
            stop: StopFilter::new(Vec::new()),
            finished: false,
            chain: Vec::new(),
            draft_first: 0,
            pending: None,
            trace: None,
            token_sent_at: None,
            reply_latency: None,
        }
    }

    #[test]
    fn a_session_whose_sampling_fails_ends_alone() {
        let (tx_a, rx_a) = unbounded();
        let (tx_b, rx_b) = unbounded();
        let (a, b) = (SeqId(1), SeqId(2));
        let mut sessions = HashMap::new();
        sessions.insert(a, session(tx_a));
        sessions.insert(b, session(tx_b));
        // One step, two sampled rows of a 4-token vocabulary: a's logits hold a NaN.
        let logits = [0.1, f32::NAN, 0.3, 0.2, 0.0, 0.5, 2.0, 1.0];
        let ended = deliver_rows(&mut sessions, &[(0, a), (1, b)], &logits, 4, 0);
        assert_eq!(ended, vec![a]);
        assert!(matches!(rx_a.try_recv(), Ok(Event::Error(_))), "a is told");
        assert!(sessions[&a].finished);
        match rx_b.try_recv() {
            Ok(Event::Token { id, .. }) => assert_eq!(id, 2, "b gets its greedy token"),
            other => panic!("b: {other:?}"),
        }
        assert!(!sessions[&b].finished);
        // b goes on in the next step.
        let ended = deliver_rows(&mut sessions, &[(0, b)], &[0.0, 0.0, 0.0, 1.0], 4, 0);
        assert!(ended.is_empty());
        assert!(matches!(rx_b.try_recv(), Ok(Event::Token { id: 3, .. })));
    }

    #[test]
    fn the_wait_cap_is_the_configured_wait_or_the_fixed_cost_when_longer() {
        let ms = Duration::from_millis;
        // Zero switches waiting off, whatever the fit.
        assert_eq!(
            wait_cap(Duration::ZERO, Some((0.050, 0.002))),
            Duration::ZERO
        );
        // No fit yet, or a fixed cost below the configured wait: the configured wait.
        assert_eq!(wait_cap(ms(5), None), ms(5));
        assert_eq!(wait_cap(ms(5), Some((0.001, 0.002))), ms(5));
        // A CPU step's fixed cost of 40 ms: wait up to that.
        assert_eq!(wait_cap(ms(5), Some((0.040, 0.002))), ms(40));
        // Capped at 100 ms, and nonsense fits are ignored.
        assert_eq!(wait_cap(ms(5), Some((3.0, 0.002))), MAX_FIXED_COST_WAIT);
        assert_eq!(wait_cap(ms(5), Some((f64::NAN, 0.002))), ms(5));
        assert_eq!(wait_cap(ms(5), Some((-0.2, 0.002))), ms(5));
        // A configured wait above the cap stays as configured.
        assert_eq!(wait_cap(ms(300), Some((0.040, 0.002))), ms(300));
    }
}
