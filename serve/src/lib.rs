//! `tandem-serve`: the cloud side of Tandem.
//!
//! # Layout
//! - [`engine`]: the engine thread (cloud model + paged KV cache + scheduler) and its
//!   in-process API (`Engine::open_session`, `push_hidden`, token events, `close`).
//! - [`bench`]: `tandem bench`, engine throughput on a real model.
//! - [`store`]: the session store (in memory or Redis).
//! - [`server`]: `tandem serve`, the WebSocket front end devices connect to.
//!
//! The REST front end comes with a later issue; `main.rs` holds the CLI.

pub mod bench;
pub mod engine;
pub mod server;
pub mod store;
