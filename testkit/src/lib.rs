//! What the workspace's tests share (never shipped: `publish = false`).
//!
//! - [`tiny`]: tiny random-weight Llama checkpoints written on the spot (no network), the demo
//!   model's path, a greedy reference run, and the split tiny model the server tests serve.
//! - [`redis`]: a real `redis-server` on a free port, stopped, restarted and paused on demand.
//! - [`http`]: a minimal HTTP/1.1 client over a raw socket (one request a connection), so the
//!   REST tests see exactly the bytes a server sends, and a dump of every Redis key.
//!
//! Test files bring a module in by name, e.g. `use tandem_testkit::tiny as common;`.

#![forbid(unsafe_code)]

pub mod http;
pub mod redis;
pub mod tiny;
