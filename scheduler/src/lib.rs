//! `tandem-scheduler`: the cloud's continuous-batching scheduler.
//!
//! The engine loop is vLLM's: [`Scheduler::schedule`] picks the next varlen batch, the engine
//! runs layers `[k, n)` over it and samples, then [`Scheduler::update`] records what was
//! computed and sampled. Between steps the engine feeds the scheduler what arrived from the
//! devices ([`Scheduler::push`]) and opens and closes sessions ([`Scheduler::add`],
//! [`Scheduler::remove`]).
//!
//! The scheduler is synchronous and tensor-free. It sees counts of positions, never hidden
//! states, and it owns each session's [`tandem_kvcache::BlockTable`] (the engine borrows them
//! through [`Scheduler::table`] to build its paged view of the cache). A batch item says
//! "compute positions `[start, start + len)` of this session": the engine holds the hidden
//! states of every position it received, so any range, including a recomputation after
//! preemption, can be run without asking the device again.
//!
//! # Policies
//!
//! - [`Policy::DecodeFirst`] (Sarathi-style "stall-free"): every ready decode goes in first,
//!   then prompt chunks fill what is left of the token budget, so a long prompt never stalls
//!   the sessions that are generating.
//! - [`Policy::PrefillFirst`] (the classic baseline): while any prompt is pending, batches hold
//!   prompt chunks only.
//!
//! # Preemption
//!
//! When the pool runs out of blocks, the scheduler preempts by recompute: it drops the KV of
//! the most recently admitted session that holds blocks and is not in the batch being built,
//! provided that session is newer than the one asking (vLLM's rule: the newest loses). The
//! oldest session with work therefore always progresses. See [`Scheduler::schedule`].
//!
//! # Layout
//!
//! - [`config`]: ids, the policy, [`SchedulerConfig`] and the crate's error, [`SchedError`].
//! - [`batch`]: what crosses the boundary with the engine each step: [`Batch`],
//!   [`BatchItem`], [`StepOutcome`].
//! - [`session`]: one session's position counters and its state, [`SeqState`].
//! - [`scheduler`]: [`Scheduler`] itself: admission (`add`, `push`), `remove`, `update`, and
//!   the read-only views; [`SchedStats`].
//! - `step` (private): `schedule()`: candidate order, the token budget, block reservation and
//!   preemption.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

pub mod batch;
pub mod config;
pub mod scheduler;
pub mod session;
mod step;

pub use batch::{Batch, BatchItem, StepOutcome};
pub use config::{Policy, SchedError, SchedulerConfig, SeqId};
pub use scheduler::{SchedStats, Scheduler};
pub use session::{SeqProgress, SeqState};
pub use step::IDLE_STEPS_BEFORE_EVICTION;
