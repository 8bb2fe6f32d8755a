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
//! - **A capped chunk next to decodes** ([`tandem_scheduler::SchedulerConfig::prefill_slack`]): the engine fits
//!   its step time against the rows computed ([`pacing`]) and tells the scheduler the
//!   step's fixed cost in rows, from which the scheduler sizes the chunk.
//!
//! Callers talk to it through [`Engine`]: `open_session`, `push_hidden` (validated in the
//! caller's thread: shape, finiteness), the session's own event channel (`Token`, `Done`,
//! `Error`), and `close`. Every hidden state a session sent is kept until its generation ends,
//! so the scheduler can preempt a session and recompute its KV without asking the device
//! again; their bytes are metered ([`Engine::hidden_state_bytes`]) for the server's
//! admission budget.
//!
//! # Layout
//! - `types`: [`SessionParams`], [`Event`], [`EngineError`], [`EngineStats`]: what goes in and
//!   out; [`api`]: the [`Engine`] handle and its [`Reply`].
//! - `command`: what the handle sends the thread; `step`: the thread's loop and the step;
//!   `session`: a session's state and how sampled rows become its events; [`cache`]: the
//!   paged KV storage (host or GPU).
//! - [`observe`]: the [`Observer`] a server implements to export step metrics and trace links
//!   (this crate knows no metrics or tracing exporter).
//! - [`pacing`]: the fit of the step cost that sizes the prompt chunk next to decodes.
//! - [`bench`] and [`roofline`]: `tandem bench`; [`devcheck`]: `tandem device-check`.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

pub mod api;
pub mod bench;
pub mod cache;
mod command;
mod config;
pub mod devcheck;
pub mod observe;
pub mod pacing;
pub mod roofline;
mod session;
mod step;
mod types;

pub use api::{Engine, EngineError, EngineStats, Event, Reply, Session, SessionParams};
pub use cache::Cache;
pub use config::{kv_dtype_for, EngineConfig, DEFAULT_DECODE_WAIT, MAX_DRAFT_CAP};
pub use observe::{Observer, StepFigures, TraceParent};
pub use tandem_scheduler::SeqId;
