//! Observability: what SREs read. [`metrics`] (the registry behind `GET /metrics` and its
//! OTLP export), [`telemetry`] (logs, OTLP traces and metrics, trace-context propagation),
//! [`threads`] (CPU seconds by thread group from `/proc`). The operator routes that
//! serve them (`/metrics`, `/readyz`) are the server's (`server/health.rs`): they read its state.

pub mod metrics;
pub mod telemetry;
pub mod threads;
