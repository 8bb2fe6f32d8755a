//! `tandem-serve`: the cloud side of Tandem.
//!
//! # Layout
//! The engine thread and `tandem bench` live in `tandem-engine`, the privacy audit in
//! `tandem-privacy`; this crate serves the engine.
//! - [`store`]: the session store (in memory or Redis): `tandem-store`'s
//!   [`tandem_store::session`], at the path it had when it lived here (the tenant and prompt
//!   stores are [`rest::store`], the saved `Open` frames [`tandem_store::opens`]).
//! - [`server`]: `tandem serve` as a whole: configuration, start-up, the two listeners and
//!   their routers, drain and shutdown.
//! - [`ws`]: the WebSocket side devices connect to: upgrade, admission, connections, the
//!   `Open`/`Resume` handshakes, session actors.
//! - [`rest`]: the REST API (tenants, API keys, the error shape, OpenAPI).
//! - [`obs`]: [`metrics`], [`telemetry`] (logs, OTLP traces and metrics), [`threads`], and the
//!   operator routes (`/metrics`, `/readyz`).
//!
//! The `tandem` command (`tandem serve` and the other subcommands) is the `tandem-cli` crate.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

pub mod obs;
pub mod rest;
pub mod server;
pub mod ws;

// The stores are the `tandem-store` crate; they keep their paths from before they moved.
pub use tandem_store::session as store;

// The observability modules keep their paths from before they moved under `obs/`.
pub use obs::{metrics, telemetry, threads};
