//! `tandem-loadtest`: many simulated devices against one Tandem server, in one process.
//!
//! Each simulated device speaks the binary WebSocket protocol (docs/protocol.md) itself:
//! `Open`, the prompt's `Hidden` frames, one `Hidden` per `Token` received, until `Done`.
//! It times what a user would feel (time to first token, time between tokens, end to end)
//! and counts what went wrong by error code. [`run`] drives a whole run and returns a
//! [`Report`]; the `tandem-loadtest run` command wraps it.
//!
//! # Replayed device compute
//! A real device runs the embedding and the first `k` layers on every token. Doing that for
//! a thousand devices in one process would measure the load generator, not the server. The
//! hidden states are therefore computed with the real edge model, but once per distinct
//! token history: prompts come from a small seeded pool, sampling is greedy, so devices on
//! the same prompt get the same tokens and share one continuation tree ([`replay`]). What
//! goes on the wire is exactly what a real device would send; only the device-side compute
//! time is missing from the latencies (it is usually a cache hit).
//!
//! With `--device-compute real` every device runs the edge layers itself instead
//! ([`compute`]), for small device counts.
//!
//! # Layout
//! - [`config`]: [`LoadConfig`], [`Arrival`], [`LengthDist`], [`Trace`], [`DeviceCompute`]
//!   and their parsing.
//! - [`workload`]: the prompt pool and every device's plan, drawn from the seed up front.
//! - [`replay`]: the continuation tree of encoded `Hidden` frames.
//! - [`compute`]: replayed or real edge compute behind one cursor per generation.
//! - [`device`]: one generation over the raw protocol, timed, with resume and replay after
//!   a lost connection.
//! - [`live`]: shared counters and the progress line.
//! - [`scrape`]: fetching and diffing the server's `/metrics`.
//! - [`report`]: nearest-rank percentiles and the JSON [`Report`].
//! - [`plot`]: the PNG of the latency distributions and throughput over time.
//! - [`netem`]: a TCP proxy that adds round trips, jitter and rate caps (issue 22), behind
//!   `tandem-loadtest proxy`.
//! - `runner`: [`run`], [`run_detailed`], [`run_until`].
//!
//! This is a tool: errors are `anyhow` errors, and what fails during a run is counted in the
//! report rather than returned. It only connects to the server URL and the metrics URL it is
//! given.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

pub mod compute;
pub mod config;
pub mod device;
pub mod live;
pub mod netem;
pub mod plot;
pub mod replay;
pub mod report;
mod runner;
pub mod scrape;
pub mod timing;
pub mod workload;

pub use config::{
    parse_dtype, Arrival, DeviceCompute, FixedPrompts, LengthDist, LoadConfig, Rate, Trace,
    TraceRecord,
};
pub use report::{Percentiles, Report, StopReason};
pub use runner::{run, run_detailed, run_until, RunOutput};
