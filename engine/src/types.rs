//! What goes into the engine and what comes out of it: a generation's [`SessionParams`], the
//! [`Event`]s a session hears, the [`EngineError`]s and the [`EngineStats`] counters. The
//! handle ([`crate::api`]), the command channel and the loop all build on these.

use tandem_protocol::{FinishReason, Sampling};
use tandem_scheduler::{SchedError, SchedStats};

use crate::observe::TraceParent;

/// One generation's parameters.
#[derive(Clone, Debug)]
pub struct SessionParams {
    pub sampling: Sampling,
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
    /// Overrides the model's eos ids when set.
    pub eos_ids: Option<Vec<u32>>,
    /// The generation's span, which every engine step computing this session links to.
    pub trace: Option<TraceParent>,
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
