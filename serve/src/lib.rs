//! `tandem-serve`: the cloud side of Tandem.
//!
//! # Layout
//! - [`engine`]: the engine thread (cloud model + paged KV cache + scheduler) and its
//!   in-process API (`Engine::open_session`, `push_hidden`, token events, `close`).
//! - [`bench`]: `tandem bench`, engine throughput on a real model.
//!
//! The WebSocket and REST front ends come with the next issues; `main.rs` holds the CLI.

pub mod bench;
pub mod engine;
pub mod store;
