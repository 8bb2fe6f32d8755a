//! `tandem-serve`: the cloud side of Tandem.
//!
//! # Layout
//! The engine thread and `tandem bench` live in `tandem-engine`, the privacy audit in
//! `tandem-privacy`; this crate serves the engine.
//! - [`store`]: the session store (in memory or Redis).
//! - [`server`]: `tandem serve`, the WebSocket front end devices connect to; it also serves
//!   the REST routes.
//! - [`rest`]: the REST API (tenants, API keys, the error shape, OpenAPI).
//! - [`metrics`] and [`telemetry`]: `/metrics`, logs, and OTLP traces and metrics.
//!
//! The `tandem` command (`tandem serve` and the other subcommands) is the `tandem-cli` crate.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

pub mod metrics;
pub mod rest;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod threads;
