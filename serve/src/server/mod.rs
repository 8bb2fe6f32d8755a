//! `tandem serve`: the cloud server as a whole, started and stopped (docs/protocol.md, DESIGN.md §5, §6, §8).
//!
//! # Layout
//! - this module: [`start`] (load the cloud model, open the session and tenant stores, bind,
//!   spawn), [`ServerHandle`] (addresses, graceful [`ServerHandle::shutdown`]), the two
//!   routers and the replica heartbeat.
//!
//! # Two listeners
//! The public listener (`listen`) serves the WebSocket route, the REST routes
//! ([`crate::rest::router`]) and `/healthz`; there `/metrics` and `/readyz` answer only a
//! caller with the admin key (401 without it; 404 when no admin key is configured), so the
//! per-tenant counters are not readable from the internet. The operator listener
//! (`admin_listen`, loopback by default) serves `/metrics` and `/readyz` without credentials,
//! `/healthz`, and the `/v1/admin/...` routes ([`crate::rest::operator_router`], which still
//! need the admin key). It stays up through the drain, so probes see `/readyz` turn 503.
//! It speaks plain HTTP even when the public listener has TLS (`tandem admin`, probes and
//! scrapes reach it on loopback or the pod network).
//! - [`config`]: [`ServerConfig`], its defaults, its TOML form and its layers, and
//!   [`ValidConfig`], the checked configuration the server runs on.
//! - `http_serve`: the HTTP/1.1 accept loop of both listeners (hyper with a deadline on
//!   request heads, `http_header_timeout_ms`).
//! - `health`: the operator routes (`/metrics`, `/readyz`, `/healthz`), which read the
//!   server's state; `conn_limit` and `tls`: what each listener adds around its router.
//!
//! The WebSocket side (the upgrade, admission, one task per connection, one actor per session)
//! is [`crate::ws`]; this module starts it and routes to it.
//!
//! # Threads and channels
//! The engine thread never waits for a device: it hands events to an unbounded tokio channel
//! per session (a session gets at most one token per input it sent, so that queue stays
//! short). The session actor forwards frames to its connection's bounded outbound queue with
//! `try_send`; a device that stops reading fills it and loses its connection (its session
//! waits for a `Resume` for the grace period), so nothing buffers without bound. Blocking
//! engine calls (`open`, `close`) run on the blocking pool.

pub mod config;
mod conn_limit;
mod health;
use health::operator_routes;
mod http_serve;
mod startup;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::rest::auth::AdminAuth;
use crate::rest::error::ApiError;
use crate::rest::RestState;

pub use config::{
    default_io_threads, AdminListen, CredentialMode, PolicyName, ServerConfig, ValidConfig,
};
pub use startup::start;
// The WebSocket side's public constants, at the paths they had when it lived here.
use crate::ws::{upgrade, Shared};
pub use crate::ws::{FRAME_LIMIT_SLACK, MAX_PRE_OPEN_MESSAGE_BYTES, WS_PATH};

/// A running server. Dropping it without [`ServerHandle::shutdown`] leaves the tasks running
/// until the runtime ends.
pub struct ServerHandle {
    addr: SocketAddr,
    /// The operator listener's bound address, when there is one.
    admin_addr: Option<SocketAddr>,
    replica: String,
    shared: Arc<Shared>,
    /// Tells axum to stop accepting.
    accept_stop: watch::Sender<bool>,
    serve: JoinHandle<()>,
    /// Tells the operator listener to stop (after the drain).
    admin_stop: watch::Sender<bool>,
    admin_serve: Option<JoinHandle<()>>,
    heartbeat: JoinHandle<()>,
    /// The REST routes' state ([`ServerHandle::router`]).
    rest: Arc<RestState>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("admin_addr", &self.admin_addr)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Holds the engine loop for `d` as a step that does not end would (tests of `/readyz`).
    #[doc(hidden)]
    pub fn stall_engine_for_tests(&self, d: Duration) {
        self.shared.engine.stall_for_tests(d);
    }

    /// The bound address (the real port when listening on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn tls(&self) -> bool {
        self.shared.cfg.tls_cert.is_some()
    }

    /// The operator listener's bound address (`/metrics`, `/readyz`, `/v1/admin/...`);
    /// `None` when `admin_listen` is `off`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// `http(s)://{admin_addr}`: the base of the operator routes, when that listener is on.
    pub fn admin_url(&self) -> Option<String> {
        let scheme = if self.shared.cfg.admin_tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        self.admin_addr.map(|a| format!("{scheme}://{a}"))
    }

    /// `http://{addr}` (`https://` with TLS): the base of the REST routes.
    pub fn http_url(&self) -> String {
        let s = if self.tls() { "https" } else { "http" };
        format!("{s}://{}", self.addr)
    }

    /// `ws://{addr}/v1/edge/ws` (`wss://` with TLS).
    pub fn ws_url(&self) -> String {
        let s = if self.tls() { "wss" } else { "ws" };
        format!("{s}://{}{WS_PATH}", self.addr)
    }

    /// The public listener's routes as a [`Router`], for driving the server in process,
    /// without a socket: the same routes, handlers and state as the listener serves (the
    /// WebSocket route included, though upgrading needs a real connection). What the
    /// listener adds around it is not in it: TLS, the connection caps and the request-head
    /// deadline.
    pub fn router(&self) -> Router {
        app(self.shared.clone(), self.rest.clone())
    }

    /// The operator listener's routes (`/metrics`, `/readyz`, `/healthz`, `/v1/admin/...`)
    /// as a [`Router`], as [`ServerHandle::router`] is for the public ones.
    pub fn admin_router(&self) -> Router {
        admin_app(self.shared.clone(), self.rest.clone())
    }

    /// This process's replica id in the session store.
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// Graceful shutdown: stop accepting connections, refuse new sessions, let running
    /// generations finish for up to `drain_timeout_ms`, then send `Error(shutting_down)` to
    /// the sessions still running (they may `Resume` on another replica, which replays
    /// them), drop this replica's heartbeat so that one can claim them at once, and stop the
    /// engine.
    pub async fn shutdown(self) {
        let shared = self.shared;
        shared.draining.store(true, Ordering::SeqCst);
        let _ = self.accept_stop.send(true);
        let deadline = Instant::now() + shared.cfg.drain_timeout();
        let running = |s: &Shared| s.sessions.iter().filter(|e| e.value().is_running()).count();
        while running(&shared) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = running(&shared);
        tracing::info!(
            replica = %shared.replica,
            sessions_left = left,
            "drain over; ending remaining sessions"
        );
        let _ = shared.stop.send(true);
        let gone_by = Instant::now() + Duration::from_secs(5);
        while !shared.sessions.is_empty() && Instant::now() < gone_by {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.heartbeat.abort();
        // Expire the heartbeat now (1 ms), so another replica may claim our sessions.
        if let Err(e) = shared
            .store
            .heartbeat(&shared.replica, Duration::from_millis(1))
            .await
        {
            tracing::warn!(error = %e, "could not expire the heartbeat");
        }
        if tokio::time::timeout(Duration::from_secs(2), self.serve)
            .await
            .is_err()
        {
            tracing::warn!("the listener did not stop in time");
        }
        let _ = self.admin_stop.send(true);
        if let Some(admin) = self.admin_serve {
            if tokio::time::timeout(Duration::from_secs(2), admin)
                .await
                .is_err()
            {
                tracing::warn!("the operator listener did not stop in time");
            }
        }
        // The engine thread is joined when the last reference goes; do that off the runtime.
        let _ = tokio::task::spawn_blocking(move || drop(shared)).await;
    }
}

/// The longest advertised URL (it travels in an error frame's message).
pub const MAX_ADVERTISE_URL_LEN: usize = 200;

/// How a listener serves: its connection caps, TLS, and the request-head deadline.
struct ListenerSetup {
    limits: conn_limit::ConnLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    header_timeout: Duration,
    what: &'static str,
}

/// Serves `app` on `listener` until `stop` turns `true`.
async fn serve_until(
    listener: tokio::net::TcpListener,
    setup: ListenerSetup,
    app: Router,
    stop: watch::Receiver<bool>,
) {
    let listener = conn_limit::CappedListener::new(listener, setup.limits);
    match setup.tls {
        None => http_serve::serve(listener, app, setup.header_timeout, stop).await,
        Some(cfg) => match tls::TlsListener::new(listener, cfg) {
            Ok(l) => http_serve::serve(l, app, setup.header_timeout, stop).await,
            Err(e) => tracing::error!(error = %e, "{} failed", setup.what),
        },
    }
}

/// The public listener: the WebSocket route, the REST routes (which include `/healthz` and
/// the JSON fallbacks for unknown routes), and `/metrics` and `/readyz` for a caller with
/// the admin key only.
fn app(shared: Arc<Shared>, rest: Arc<RestState>) -> Router {
    let guarded = operator_routes(shared.clone()).layer(middleware::from_fn_with_state(
        rest.clone(),
        require_admin_key,
    ));
    Router::new()
        .route(WS_PATH, get(upgrade::ws_upgrade))
        .with_state(shared)
        .merge(guarded)
        .merge(crate::rest::router(rest))
}

/// The operator listener: `/metrics`, `/readyz`, `/healthz` and the admin routes.
fn admin_app(shared: Arc<Shared>, rest: Arc<RestState>) -> Router {
    operator_routes(shared).merge(crate::rest::operator_router(rest))
}

/// Lets a request through only with the admin key: 401 with a wrong or missing one, 404
/// (as for any unknown route) when no admin key is configured.
async fn require_admin_key(
    State(rest): State<Arc<RestState>>,
    auth: Result<AdminAuth, ApiError>,
    req: Request,
    next: Next,
) -> Response {
    if rest.admin_key.is_none() {
        return ApiError::not_found("no such route").into_response();
    }
    match auth {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn heartbeat_loop(shared: Arc<Shared>) {
    let ttl = shared.cfg.heartbeat_ttl();
    loop {
        if let Err(e) = shared.store.heartbeat(&shared.replica, ttl).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        if let Err(e) = shared
            .store
            .advertise(&shared.replica, &shared.advertise_url, ttl)
            .await
        {
            tracing::warn!(error = %e, "advertising the replica's URL failed");
        }
        tokio::time::sleep(ttl / 3).await;
    }
}

pub use tandem_engine::kv_dtype_for;
