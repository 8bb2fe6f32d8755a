//! Session ids, the batching policy, the scheduler's limits and its error type.
//!
//! Everything here is plain data: no invariants beyond those stated on the fields.

/// A session (one device connection, possibly carrying several generations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// How a batch is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Decodes first, then prompt chunks in what is left of the token budget (chunked
    /// prefill, Sarathi-style "stall-free" batching).
    DecodeFirst,
    /// Prompt chunks only while any prompt is pending, decodes otherwise (the classic
    /// baseline, which stalls generation while prompts are processed).
    PrefillFirst,
}

/// The scheduler's limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub policy: Policy,
    /// Positions computed per step, over all sequences of a batch (e.g. 256). Values below 1
    /// are taken as 1.
    pub max_batch_tokens: usize,
    /// Sequences per batch (e.g. 64). Values below 1 are taken as 1.
    pub max_batch_seqs: usize,
    /// Live sessions; [`crate::Scheduler::add`] refuses more.
    pub max_sessions: usize,
    /// Positions received and never computed yet, summed over all sessions;
    /// [`crate::Scheduler::push`] refuses input that would go beyond. Positions waiting to be
    /// recomputed after a preemption do not count: that backlog is the server's own doing,
    /// and counting it would refuse the next decode input of every session after one large
    /// preemption (see [`crate::Scheduler::num_fresh_tokens`]).
    pub max_queued_tokens: usize,
    /// Positions per session: the model's context length.
    pub max_context: usize,
    /// Stall-free batching under [`Policy::DecodeFirst`]: a step that carries `d` decodes
    /// takes at most `max(1, floor(slack * (d + overhead_rows)))` prompt positions, so the
    /// prompt chunk lengthens a decode-only step by about `slack` (e.g. 0.25: a quarter) and
    /// the decoders' time per output token stays within `1 + slack` of their decode-only one
    /// while long prompts arrive. `overhead_rows` is the step's fixed cost expressed in rows,
    /// which the engine measures ([`crate::Scheduler::set_overhead_rows`]). The bound assumes
    /// a prompt position costs no more than a decode row (it skips the LM head). `None`: no
    /// cap beyond `max_batch_tokens` (prompts go as fast as the budget allows, and decodes
    /// stall for a whole chunk). `d` is the larger of the step's decodes and the recent decodes
    /// per step ([`crate::Scheduler::prefill_cap`]), so only when no session has decoded
    /// lately are prompts uncapped.
    pub prefill_slack: Option<f64>,
}

/// Why the scheduler refused a request. A refused request changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    /// An admission limit is reached; the client may retry later (HTTP 429).
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("unknown session {0:?}")]
    UnknownSession(SeqId),
    #[error("{blocks} block hashes for {received} positions received")]
    Hashes { blocks: usize, received: usize },
    #[error("session {0:?} already exists")]
    DuplicateSession(SeqId),
    #[error("context length exceeded: {len} > {max}")]
    ContextLength { len: usize, max: usize },
    /// The session owes a token for its last complete input; it takes no input until then.
    #[error("session {0:?} is waiting for a token and cannot take more input yet")]
    NotReady(SeqId),
    /// The session's positions would not fit in the KV pool even if it were alone.
    #[error("the request needs {needed} KV blocks but the cache has only {total}")]
    TooLarge { needed: usize, total: usize },
    /// A speculative input that is not the token before its drafts and the drafts, or is
    /// longer than a step.
    #[error("{drafts} drafts in an input of {rows} positions")]
    Drafts { drafts: usize, rows: usize },
    /// A truncation below the tokens that count.
    #[error("cannot drop positions from {len}: the first {min} count")]
    Truncate { len: usize, min: usize },
}
