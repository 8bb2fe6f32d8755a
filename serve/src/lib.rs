//! `tandem-serve`: the cloud side of Tandem.
//!
//! # Layout
//! - [`engine`]: the engine thread (cloud model + paged KV cache + scheduler) and its
//!   in-process API (`Engine::open_session`, `push_hidden`, token events, `close`).
//! - [`bench`]: `tandem bench`, engine throughput on a real model.
//! - [`store`]: the session store (in memory or Redis).
//! - [`server`]: `tandem serve`, the WebSocket front end devices connect to; it also serves
//!   the REST routes.
//! - [`rest`]: the REST API (tenants, API keys, the error shape, OpenAPI).
//!
//! `main.rs` holds the CLI.

pub mod admin_cli;
pub mod bench;
pub mod engine;
pub mod metrics;
pub mod rest;
pub mod server;
pub mod store;
