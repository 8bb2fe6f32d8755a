//! `tandem serve`: the cloud's WebSocket front end (docs/protocol.md, DESIGN.md §5, §6, §8).
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
//! - [`config`]: [`ServerConfig`], its defaults and its TOML form.
//! - `http_serve`: the HTTP/1.1 accept loop of both listeners (hyper with a deadline on
//!   request heads, `http_header_timeout_ms`).
//! - `upgrade`: the WebSocket upgrade: the device token, and the 64 KiB limit on messages
//!   before `Open`/`Resume`.
//! - `admission`: who may open a session and how many each holds (attached, in the resume
//!   grace, per user).
//! - `ws`: one task per WebSocket connection: reads and validates frames (size, rate,
//!   decoding, `Open`/`Resume` handshakes) and forwards them to the session.
//! - `session`: one actor task per session: owns the session's protocol state (sequence
//!   numbers, positions, the token owed, the tokens sent), feeds the engine, turns engine
//!   events into frames, survives reconnections (Resume) and rebuilds lost state (Replay).
//! - `params`: where a session's `Open` is kept so another replica can replay it.
//!
//! # Threads and channels
//! The engine thread never waits for a device: it hands events to an unbounded tokio channel
//! per session (a session gets at most one token per input it sent, so that queue stays
//! short). The session actor forwards frames to its connection's bounded outbound queue with
//! `try_send`; a device that stops reading fills it and loses its connection (its session
//! waits for a `Resume` for the grace period), so nothing buffers without bound. Blocking
//! engine calls (`open`, `close`) run on the blocking pool.

mod admission;
mod assignment;
pub mod config;
mod conn_limit;
mod http_serve;
mod params;
mod session;
pub mod tls;
mod upgrade;
mod ws;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use candle_core::DType;
use dashmap::DashMap;
use tandem_kvcache::KvLayout;
use tandem_model::checkpoint::Checkpoint;
use tandem_model::manifest::{Part, MANIFEST_FILE};
use tandem_model::split::LoadOptions;
use tandem_model::{CloudModel, SplitPoint};
use tandem_scheduler::SchedulerConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::rest::auth::{AdminAuth, AdminKey};
use crate::rest::device::DeviceKey;
use crate::rest::error::ApiError;
use crate::rest::store::{self as tenant_store, RedisTenantStoreConfig, TenantStoreConfig};
use crate::rest::RestState;
use crate::store::{self, RedisStoreConfig, ReplicaId, SessionExpiry, SessionStore, StoreConfig};
use tandem_engine::{Engine, EngineConfig};

pub use config::{default_io_threads, AdminListen, CredentialMode, PolicyName, ServerConfig};
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
    pub(crate) cfg: ServerConfig,
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
    pub(crate) params: params::OpenParams,
    pub(crate) replica: ReplicaId,
    /// Sessions held by this process, by wire session id.
    pub(crate) sessions: DashMap<u128, session::SessionHandle>,
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

/// Loads the model, opens the session store, binds `cfg.listen` and serves until
/// [`ServerHandle::shutdown`].
pub async fn start(cfg: ServerConfig) -> anyhow::Result<ServerHandle> {
    cfg.check()?;
    let cloud_dir = cloud_dir(&cfg.cloud);
    let dtype = cfg.device.resolve_dtype(cfg.dtype);
    let device = cfg.device;
    let (served, model, tokenizer) =
        tokio::task::spawn_blocking(move || load_cloud(&cloud_dir, dtype, device))
            .await
            .context("loading the cloud model")??;
    let engine_cfg = engine_config(&cfg, &model);
    let expiry = SessionExpiry::default();
    let store_cfg = match &cfg.redis {
        None => StoreConfig::Memory { expiry },
        Some(url) => StoreConfig::Redis(RedisStoreConfig {
            key_prefix: cfg.redis_key_prefix.clone(),
            expiry,
            ..RedisStoreConfig::new(url.clone())
        }),
    };
    let store = store::open(&store_cfg)
        .await
        .context("opening the session store")?;
    let tenant_cfg = match &cfg.redis {
        None => TenantStoreConfig::Memory,
        Some(url) => TenantStoreConfig::Redis(RedisTenantStoreConfig {
            key_prefix: cfg.redis_key_prefix.clone(),
            ..RedisTenantStoreConfig::new(url.clone())
        }),
    };
    let stores = tenant_store::open(&tenant_cfg)
        .await
        .context("opening the tenant store")?;
    let device_key = match &cfg.device_token_key {
        Some(k) => DeviceKey::from_secret(k.expose()),
        None => {
            tracing::warn!(
                "no device-token key configured: device tokens issued now work on this process only"
            );
            DeviceKey::random()
        }
    };
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let webhooks = crate::rest::webhook::Webhooks::new(
        stores.prompts.clone(),
        stores.tenants.clone(),
        cfg.webhook_policy()?,
        tls::client_config(cfg.webhook_ca_cert.as_deref())?,
    );
    let rest = Arc::new(RestState {
        webhooks: webhooks.clone(),
        metrics: metrics.clone(),
        store: stores.tenants,
        prompts: stores.prompts.clone(),
        admin_key: cfg.admin_key.as_ref().map(|k| AdminKey::new(k.expose())),
        device_key: device_key.clone(),
        system_prompt: cfg.system_prompt.clone(),
        max_tokens_cap: cfg.max_tokens_cap,
        partner_requests_per_minute: cfg.partner_requests_per_minute,
        device_requests_per_minute: cfg.device_requests_per_minute,
        body_timeout: cfg.http_body_timeout(),
    });
    let params = match &cfg.redis {
        None => params::OpenParams::memory(),
        Some(url) => params::OpenParams::redis(url, &cfg.redis_key_prefix, expiry.idle_ttl)?,
    };
    let replica = ReplicaId::unique(cfg.replica_id.as_deref().unwrap_or("tandem"))?;
    store
        .heartbeat(&replica, cfg.heartbeat_ttl())
        .await
        .context("first heartbeat")?;
    let tls = match cfg.tls_files() {
        Some(files) => Some(tls::server_config(&files)?),
        None => None,
    };
    let admin_tls = match cfg.admin_tls_files() {
        Some(files) => Some(tls::server_config(&files)?),
        None => None,
    };
    let listener = bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let admin_listener = match cfg.admin_listen.addr() {
        None => None,
        Some(a) => Some(bind(a).with_context(|| format!("binding the admin listener {a}"))?),
    };
    let admin_addr = match &admin_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    if let Some(a) = admin_addr.filter(|a| !a.ip().is_loopback() && admin_tls.is_none()) {
        tracing::warn!(
            admin_addr = %a,
            "the operator listener is not on loopback and has no TLS: the admin key travels \
             in clear; give --admin-tls-cert/--admin-tls-key"
        );
    }
    if let Some(a) = admin_addr.filter(|a| !a.ip().is_loopback()) {
        tracing::warn!(
            admin_addr = %a,
            "the operator listener is not on loopback: /metrics and /readyz there need no \
             credentials; keep this port off the internet"
        );
    }
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "serving WITHOUT TLS on a non-loopback address: device tokens, hidden states and \
             output text travel in clear; give --tls-cert/--tls-key, or terminate TLS in front"
        );
    }
    let engine = Arc::new(Engine::start_observed(
        model,
        tokenizer,
        engine_cfg,
        Some(metrics.clone() as Arc<dyn tandem_engine::Observer>),
    ));
    let (stop, _) = watch::channel(false);
    let advertise_url = cfg.advertise_url.clone().unwrap_or_else(|| {
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{addr}{WS_PATH}")
    });
    let admission = admission::Admission::new(admission::AdmissionLimits {
        attached: cfg.max_sessions,
        grace: cfg.max_resume_grace_sessions,
        per_user: cfg.max_sessions_per_user,
        hidden_state_bytes: (cfg.hidden_state_budget_mib * f64::from(1u32 << 20)) as u64,
    });
    if !cfg.credential_required() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "opening a session needs no credential (no device_token_key, or \
             open_requires_credential = never): anyone who reaches the listener can use the cloud"
        );
    }
    let shared = Arc::new(Shared {
        cfg,
        served,
        engine,
        store,
        prompts: stores.prompts,
        webhooks,
        advertise_url,
        metrics,
        last_snapshot: Arc::default(),
        params,
        replica: replica.clone(),
        sessions: DashMap::new(),
        draining: AtomicBool::new(false),
        stop,
        next_conn: AtomicU64::new(1),
        device_key,
        admission,
    });
    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone()));
    if let Some(provider) = crate::telemetry::meter_provider() {
        use opentelemetry::metrics::MeterProvider as _;
        // The last known engine counters, also after the server stopped (the final export
        // comes after the shutdown; a counter must not fall back to 0).
        let last = shared.last_snapshot.clone();
        shared.metrics.export_otel(
            &provider.meter("tandem"),
            Arc::new(move || {
                *last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            }),
        );
        tokio::spawn(refresh_snapshots(
            Arc::downgrade(&shared),
            Duration::from_secs(5),
        ));
    }
    let (accept_stop, accept_rx) = watch::channel(false);
    let (admin_stop, admin_rx) = watch::channel(false);
    let admin_serve = admin_listener.map(|l| {
        // The operator listener is on loopback or a private network: no caps.
        let unlimited = conn_limit::ConnLimits {
            per_ip: usize::MAX,
            total: usize::MAX,
        };
        let setup = ListenerSetup {
            limits: unlimited,
            tls: admin_tls,
            header_timeout: shared.cfg.http_header_timeout(),
            what: "the operator listener",
        };
        tokio::spawn(serve_until(
            l,
            setup,
            admin_app(shared.clone(), rest.clone()),
            admin_rx,
        ))
    });
    let app = app(shared.clone(), rest);
    let limits = conn_limit::ConnLimits {
        per_ip: shared.cfg.max_connections_per_ip,
        total: shared.cfg.max_connections,
    };
    let setup = ListenerSetup {
        limits,
        tls,
        header_timeout: shared.cfg.http_header_timeout(),
        what: "the listener",
    };
    let serve = tokio::spawn(serve_until(listener, setup, app, accept_rx));
    tracing::info!(%addr, admin_addr = ?admin_addr, replica = %replica, "serving");
    Ok(ServerHandle {
        addr,
        admin_addr,
        admin_stop,
        admin_serve,
        replica: replica.to_string(),
        shared,
        accept_stop,
        serve,
        heartbeat,
    })
}

/// The longest advertised URL (it travels in an error frame's message).
pub const MAX_ADVERTISE_URL_LEN: usize = 200;

/// Pending connections the kernel queues before `accept`: thousands of devices reconnect
/// at once after a network blip, and the default of 128 made a burst of 200 wait a second
/// for a TCP retransmit (seen by the load test).
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves once `stop` is `true` (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

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

/// `/metrics` and `/readyz`, without authentication.
fn operator_routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(shared)
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

/// The engine's counters, or `None` if it does not answer within `wait`.
async fn engine_stats(shared: &Arc<Shared>, wait: Duration) -> Option<tandem_engine::EngineStats> {
    tokio::time::timeout(wait, shared.engine.stats())
        .await
        .ok()?
        .ok()
}

/// How long `/metrics` and `/readyz` wait for the engine loop.
const ENGINE_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// The engine's counters for `/metrics` and the OTLP export; the last known ones (kept in
/// `last_snapshot`) when the engine does not answer in time.
async fn current_snapshot(shared: &Arc<Shared>) -> crate::metrics::Snapshot {
    match engine_stats(shared, ENGINE_ANSWER_WAIT).await {
        Some(st) => {
            let s = &st.scheduler;
            let snap = crate::metrics::Snapshot {
                sessions_active: (s.sessions_waiting + s.sessions_ready + s.sessions_running)
                    as u64,
                sessions_waiting_for_device: s.sessions_waiting as u64,
                queue_depth_tokens: s.queued_tokens as u64,
                kv_blocks_used: s.total_blocks.saturating_sub(s.free_blocks) as u64,
                kv_blocks_free: s.free_blocks as u64,
                kv_blocks_shared: s.shared_blocks as u64,
                hidden_state_bytes: shared.engine.hidden_state_bytes(),
                preemptions_total: s.preemptions,
                engine_steps_total: st.steps,
                engine_forward_s: st.busy_s,
                engine_bookkeeping_s: st.bookkeeping_s,
                engine_decode_wait_s: st.decode_wait_s,
            };
            *shared
                .last_snapshot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = snap;
            snap
        }
        None => *shared
            .last_snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    }
}

/// Keeps `last_snapshot` fresh for the OTLP export's gauges (it reads it from its own
/// thread): every `every`, until the server is gone.
async fn refresh_snapshots(shared: std::sync::Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if *shared.stop.borrow() {
            return;
        }
        current_snapshot(&shared).await;
    }
}

/// `GET /metrics`: the Prometheus text exposition.
async fn metrics_text(State(shared): State<Arc<Shared>>) -> Response {
    let snap = current_snapshot(&shared).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(&snap),
    )
        .into_response()
}

/// `GET /readyz`: 200 when this replica should get traffic: not draining, the engine loop
/// answers and no step has run longer than `engine_stall_ms`, and the session store answers.
/// Otherwise 503 (`unavailable`, with `Retry-After`) naming what is wrong.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let mut problems: Vec<&str> = Vec::new();
    if shared.draining.load(Ordering::SeqCst) {
        problems.push("draining");
    }
    let started = shared.metrics.step_started_ms.load(Ordering::Relaxed);
    let stalled =
        started != 0 && crate::store::now_ms().saturating_sub(started) > shared.cfg.engine_stall_ms;
    if stalled {
        problems.push("the engine step has run longer than engine_stall_ms");
    } else if engine_stats(&shared, ENGINE_ANSWER_WAIT).await.is_none() {
        problems.push("the engine loop does not answer");
    }
    let store = tokio::time::timeout(
        ENGINE_ANSWER_WAIT,
        shared.store.replica_alive(&shared.replica),
    )
    .await;
    if !matches!(store, Ok(Ok(_))) {
        problems.push("the session store does not answer");
    }
    if problems.is_empty() {
        return (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            "{\"status\":\"ready\"}",
        )
            .into_response();
    }
    ApiError::unavailable(
        format!("not ready: {}", problems.join("; ")),
        Duration::from_secs(1),
    )
    .into_response()
}

/// Bytes over `max_frame_bytes` that the WebSocket layer still hands to the decoder (which
/// answers them with `frame_too_large`); anything longer is dropped at its header.
pub const FRAME_LIMIT_SLACK: usize = 4 << 10;

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

/// `dir` itself if it holds a manifest, else `dir/cloud` (a whole split directory).
fn cloud_dir(dir: &Path) -> PathBuf {
    if dir.join(MANIFEST_FILE).is_file() {
        dir.to_path_buf()
    } else {
        dir.join("cloud")
    }
}

type Loaded = (
    Served,
    CloudModel,
    Option<tandem_model::tokenizer::TextTokenizer>,
);

fn load_cloud(
    dir: &Path,
    dtype: DType,
    name: tandem_model::device::DeviceName,
) -> anyhow::Result<Loaded> {
    let ck = Checkpoint::open_part(dir, Part::Cloud)
        .with_context(|| format!("opening the cloud checkpoint {}", dir.display()))?;
    let manifest = ck
        .manifest
        .clone()
        .context("the cloud checkpoint has no manifest")?;
    let split = SplitPoint::new(manifest.edge_layers, manifest.num_layers)?;
    // The weights are converted to the configured dtype whatever the stored one (bf16 and
    // f32 run on the model's own CPU kernels, with f32 activations).
    let device = name.open()?;
    let opts = LoadOptions {
        dtype,
        device: &device,
    };
    let started = std::time::Instant::now();
    let model = CloudModel::load(ck.tensors.as_ref(), &ck.config, split, opts)?;
    tracing::info!(
        device = %name,
        dtype = tandem_model::weights::dtype_user_name(dtype),
        bf16_kernel = (dtype == DType::BF16)
            .then(|| tandem_kernels::gemm_bf16::Bf16Kernel::selected().ok())
            .flatten()
            .map(|k| k.name()),
        load_s = started.elapsed().as_secs_f64(),
        "cloud model loaded"
    );
    let served = Served {
        pair_id: manifest.pair_id.clone(),
        split: u32::try_from(manifest.edge_layers)?,
        hidden_size: manifest.hidden_size,
        max_context: ck.config.max_position_embeddings,
    };
    Ok((served, model, ck.tokenizer))
}

pub use tandem_engine::kv_dtype_for;

fn engine_config(cfg: &ServerConfig, model: &CloudModel) -> EngineConfig {
    let c = model.config();
    let range = model.split().cloud_range();
    let layout = KvLayout {
        first_layer: range.start,
        num_layers: range.len(),
        num_blocks: 0,
        block_size: cfg.block_size,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        dtype: kv_dtype_for(model.weight_dtype()),
    };
    let bytes = (cfg.kv_cache_gib * (1u64 << 30) as f64) as usize;
    EngineConfig {
        scheduler: SchedulerConfig {
            policy: cfg.policy.policy(),
            max_batch_tokens: cfg.max_batch_tokens,
            max_batch_seqs: cfg.max_batch_seqs,
            // Attached sessions and those waiting for a Resume have separate caps
            // (`admission`); the engine holds both.
            max_sessions: cfg
                .max_sessions
                .saturating_add(cfg.max_resume_grace_sessions),
            max_queued_tokens: cfg.max_queued_tokens,
            max_context: c.max_position_embeddings,
            prefill_slack: Some(cfg.prefill_slack),
        },
        block_size: cfg.block_size,
        kv_blocks: cfg
            .kv_blocks
            .unwrap_or_else(|| layout.blocks_for_budget(bytes).max(1)),
        kv_dtype: layout.dtype,
        prefix_sharing: cfg.prefix_sharing,
        decode_wait: Duration::from_secs_f64(cfg.decode_wait_ms / 1000.0),
        max_draft_tokens: cfg.max_draft_tokens,
    }
}
