//! `tandem-scheduler`: the continuous-batching state machine (`schedule()` / `update()`,
//! decode-first with chunked prefill, preemption by recompute).
//!
//! **Not built yet.** The engine issue fills this crate; it exports nothing until then.
