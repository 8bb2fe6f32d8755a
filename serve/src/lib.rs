//! `tandem-serve`: the cloud side of Tandem.
//!
//! # Layout
//! - [`engine`]: the engine thread (cloud model + paged KV cache + scheduler) and its
//!   in-process API (`Engine::open_session`, `push_hidden`, token events, `close`).
//! - [`bench`]: `tandem bench`, engine throughput on a real model.
//! - [`audit`]: `tandem audit-privacy`, the privacy audit (prompt recovery vs utility).
//! - [`store`]: the session store (in memory or Redis).
//! - [`server`]: `tandem serve`, the WebSocket front end devices connect to; it also serves
//!   the REST routes.
//! - [`rest`]: the REST API (tenants, API keys, the error shape, OpenAPI).
//! - `pacing`: the engine's fit of its step cost (sizes the prompt chunk next to decodes).
//! - [`metrics`] and [`telemetry`]: `/metrics`, logs, and OTLP traces and metrics.
//!
//! `main.rs` holds the CLI.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

pub mod admin_cli;
pub mod audit;
pub mod bench;
pub mod devcheck;
pub mod engine;
pub mod metrics;
mod pacing;
pub mod rest;
pub mod roofline;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod threads;
