//! The WebSocket side of the server: where devices connect (docs/protocol.md, DESIGN.md §5,
//! §6, §8).
//!
//! # Layout
//! - this module: `Shared`, the state the connection and session tasks share (the engine,
//!   the stores, the live sessions, admission), and the route's constants.
//! - `upgrade`: the WebSocket upgrade: the device token, and the 64 KiB limit on messages
//!   before `Open`/`Resume`.
//! - `admission`: who may open a session and how many each holds (attached, in the resume
//!   grace, per user).
//! - `connection`: one task per WebSocket connection: reads and validates frames (size, rate,
//!   decoding) and forwards them to the session.
//! - `handshake`: the `Open` and `Resume` handshakes (admission, the store, takeover and
//!   Replay).
//! - `session`: one actor task per session: owns the session's protocol state (sequence
//!   numbers, positions, the token owed, the tokens sent), feeds the engine, turns engine
//!   events into frames, survives reconnections (Resume) and rebuilds lost state (Replay).
//! - `assignment`: where a partner prompt's result goes.
//!
//! [`crate::server`] builds `Shared` at start-up and mounts [`WS_PATH`]; nothing here
//! imports the server back, except its checked configuration ([`ValidConfig`]).

pub(crate) mod admission;
pub(crate) mod assignment;
mod connection;
mod handshake;
pub(crate) mod session;
pub(crate) mod upgrade;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use dashmap::DashMap;
use tandem_engine::Engine;
use tandem_protocol::SessionId;
use tokio::sync::watch;

use crate::rest::device::DeviceKey;
use crate::server::config::ValidConfig;
use crate::store::{ReplicaId, SessionStore};

pub use upgrade::MAX_PRE_OPEN_MESSAGE_BYTES;

/// The WebSocket route.
pub const WS_PATH: &str = "/v1/edge/ws";

/// What the cloud serves, from its manifest: what every `Open` must match.
#[derive(Clone, Debug)]
pub(crate) struct Served {
    pub(crate) pair_id: String,
    pub(crate) split: u32,
    pub(crate) hidden_size: usize,
    /// Positions per session (the model's context length).
    pub(crate) max_context: usize,
}

/// State shared by the connection and session tasks.
pub(crate) struct Shared {
    pub(crate) cfg: ValidConfig,
    pub(crate) served: Served,
    pub(crate) engine: Arc<Engine>,
    pub(crate) store: Arc<dyn SessionStore>,
    /// Where devices reach this replica (told to devices that resume elsewhere).
    pub(crate) advertise_url: String,
    /// What `/metrics` exposes.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// The last engine snapshot `/metrics` read (shown again if the engine does not answer).
    pub(crate) last_snapshot: Arc<std::sync::Mutex<crate::metrics::Snapshot>>,
    /// Where generations tied to a partner prompt claim their ticket and leave their result.
    pub(crate) prompts: Arc<dyn crate::rest::store::PromptStore>,
    /// Sends the partners' completion webhooks.
    pub(crate) webhooks: crate::rest::webhook::Webhooks,
    /// Where each session's `Open` is kept so another replica can replay it.
    pub(crate) params: tandem_store::OpenParams,
    pub(crate) replica: ReplicaId,
    /// Sessions held by this process, by wire session id.
    pub(crate) sessions: DashMap<SessionId, session::SessionHandle>,
    /// Set when shutdown starts: new `Open`/`Resume` get `shutting_down`.
    pub(crate) draining: AtomicBool,
    /// Flips to `true` when the drain is over: sessions still running end.
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) next_conn: AtomicU64,
    /// Verifies the device tokens presented on the WebSocket upgrade.
    pub(crate) device_key: DeviceKey,
    /// Who may open a session, and how many each holds.
    pub(crate) admission: Arc<admission::Admission>,
}

/// Resolves once `stop` is `true` (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// Bytes over `max_frame_bytes` that the WebSocket layer still hands to the decoder (which
/// answers them with `frame_too_large`); anything longer is dropped at its header.
pub const FRAME_LIMIT_SLACK: usize = 4 << 10;
