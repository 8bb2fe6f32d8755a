//! The operator routes: `GET /metrics` (the text exposition, OpenMetrics or Prometheus as
//! the scraper asks, with the engine's counters read at scrape time) and `GET /readyz`
//! (whether this replica should get traffic), and the engine snapshots they and the OTLP
//! export read.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::rest::error::ApiError;
use crate::ws::Shared;

/// `/metrics` and `/readyz`, without authentication.
pub(super) fn operator_routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(shared)
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
pub(super) async fn refresh_snapshots(shared: std::sync::Weak<Shared>, every: Duration) {
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

/// `GET /metrics`: the text exposition, in OpenMetrics when the `Accept` header names it (as
/// Prometheus's does), else in the Prometheus text format 0.0.4.
async fn metrics_text(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let snap = current_snapshot(&shared).await;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Format::from_accept(accept);
    match shared.metrics.render(&snap, format) {
        Ok(text) => ([(header::CONTENT_TYPE, format.content_type())], text).into_response(),
        Err(_) => {
            tracing::error!("the metrics exposition failed to encode");
            ApiError::internal().into_response()
        }
    }
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
            [(header::CONTENT_TYPE, "application/json")],
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
