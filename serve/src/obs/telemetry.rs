//! Logs, traces and metrics of the `tandem` process.
//!
//! # What goes where
//! - **Logs**: always to stderr, filtered by `RUST_LOG` (default `warn`), plain text or one
//!   JSON object per line with `TANDEM_LOG_FORMAT=json`.
//! - **Traces**: exported over OTLP when the standard variables ask for it:
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, and neither
//!   `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`. The transport is
//!   `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or
//!   `http/protobuf` (the default). An `https://` endpoint is reached over rustls with either
//!   transport, trusting the web roots plus the PEM bundle `OTEL_EXPORTER_OTLP_CERTIFICATE`
//!   (the standard variable) for a private CA; `http://` is plain (HTTP/1.1, or h2c for
//!   `grpc`). The service is `OTEL_SERVICE_NAME` (default `tandem`),
//!   with `OTEL_RESOURCE_ATTRIBUTES`; sampling follows `OTEL_TRACES_SAMPLER`. Only the
//!   server's own spans (targets `tandem_*`, level INFO and above) are exported, whatever
//!   `RUST_LOG` says.
//! - **Metrics**: always on `GET /metrics` (Prometheus text); also exported over OTLP under
//!   the same rules with `OTEL_METRICS_EXPORTER` and the `..._METRICS_...` variables, every
//!   `OTEL_METRIC_EXPORT_INTERVAL` ms (default 60000), with the same names, units and
//!   buckets ([`crate::metrics`]).
//!
//! # Spans
//! - `session`: one per session on the replica that holds it, from `Open` (or the
//!   `Resume` that rebuilt it) to its end; its parent is the device's trace when `Open`
//!   carries a W3C `traceparent`.
//! - `generation`: the part of the session that produces tokens (to `Done` or the error),
//!   with token counts, time to first token and the finish reason.
//! - `engine.step`: one per engine step, a root span linked (span links) to the
//!   `generation` spans of the sessions it computed.
//! - `http.request`: one per REST request, with the route template and the status; its
//!   parent is the partner's trace when the request carries `traceparent`.
//! - `redis`: one per Redis call.
//!
//! No span or attribute holds prompt text, profile data, activations, output text, resume
//! tokens or keys: only sizes, counts, durations, codes and ids.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, Result};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// How spans and metrics leave the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl OtlpProtocol {
    fn parse(v: &str) -> Result<Self> {
        match v.trim() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => anyhow::bail!(
                "unsupported OTLP protocol {other:?}: use \"grpc\" or \"http/protobuf\""
            ),
        }
    }
}

/// Whether and how one signal (traces or metrics) is exported, from the `OTEL_*` variables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalExport {
    pub protocol: OtlpProtocol,
    /// The signal's endpoint is `https://`.
    pub tls: bool,
}

/// The export settings of both signals, read from the environment by [`ExportPlan::from_env`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportPlan {
    pub traces: Option<SignalExport>,
    pub metrics: Option<SignalExport>,
}

impl ExportPlan {
    /// Reads the standard variables through `var` (the process environment in production).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(Self::default());
        }
        let signal = |upper: &str, exporter_var: &str| -> Result<Option<SignalExport>> {
            let exporter = var(exporter_var).unwrap_or_default();
            if exporter.trim().eq_ignore_ascii_case("none") {
                return Ok(None);
            }
            if !exporter.trim().is_empty() && !exporter.trim().eq_ignore_ascii_case("otlp") {
                anyhow::bail!(
                    "{exporter_var}={exporter:?}: only \"otlp\" and \"none\" are supported"
                );
            }
            let signal_endpoint = format!("OTEL_EXPORTER_OTLP_{upper}_ENDPOINT");
            let endpoint = if set(&signal_endpoint) {
                var(&signal_endpoint)
            } else if set("OTEL_EXPORTER_OTLP_ENDPOINT") {
                var("OTEL_EXPORTER_OTLP_ENDPOINT")
            } else {
                return Ok(None);
            };
            let tls = endpoint.is_some_and(|e| {
                e.trim()
                    .get(..8)
                    .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
            });
            let protocol = var(&format!("OTEL_EXPORTER_OTLP_{upper}_PROTOCOL"))
                .filter(|v| !v.trim().is_empty())
                .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL").filter(|v| !v.trim().is_empty()))
                .map(|v| OtlpProtocol::parse(&v))
                .transpose()?
                .unwrap_or(OtlpProtocol::HttpProtobuf);
            Ok(Some(SignalExport { protocol, tls }))
        };
        Ok(Self {
            traces: signal("TRACES", "OTEL_TRACES_EXPORTER")?,
            metrics: signal("METRICS", "OTEL_METRICS_EXPORTER")?,
        })
    }

    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }
}

/// The installed providers; [`Telemetry::shutdown`] (or dropping it) flushes what is
/// buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

static METER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// The process's OTLP meter provider, if metrics are exported.
pub fn meter_provider() -> Option<&'static SdkMeterProvider> {
    METER.get()
}

impl Telemetry {
    /// Sends what is buffered and stops the exporters.
    pub fn shutdown(&mut self) {
        if let Some(t) = self.tracer.take() {
            if let Err(e) = t.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("warning: flushing traces failed: {e}");
            }
        }
        if let Some(m) = self.meter.take() {
            if let Err(e) = m.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("warning: flushing metrics failed: {e}");
            }
        }
    }

    /// Whether spans are exported.
    pub fn traces_on(&self) -> bool {
        self.tracer.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn resource() -> Resource {
    let mut b = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.trim().is_empty()) {
        b = b.with_service_name("tandem");
    }
    b.with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ))
    .build()
}

/// Logs only (every subcommand but `serve`).
pub fn init_logs() {
    let _ = tracing_subscriber::registry().with(log_layer()).try_init();
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

fn log_layer() -> BoxedLayer {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if std::env::var("TANDEM_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")) {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    }
}

/// Logs, and OTLP traces and metrics as `plan` says. Call it inside the tokio runtime that
/// will run the server (the gRPC transport spawns its connection task there).
pub fn init(plan: ExportPlan) -> Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut telemetry = Telemetry::default();
    let mut layers = vec![log_layer()];
    if let Some(t) = plan.traces {
        let exporter = match t.protocol {
            OtlpProtocol::Grpc => {
                let b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                match t.tls {
                    true => b.with_tls_config(grpc_tls()?).build(),
                    false => b.build(),
                }
            }
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(RuntimeHttpClient::current()?)
                .build(),
        }
        .context("building the OTLP span exporter")?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            .build();
        let tracer = provider.tracer("tandem");
        let ours = tracing_subscriber::filter::Targets::new()
            .with_target("tandem_serve", tracing::Level::INFO)
            .with_target("tandem", tracing::Level::INFO);
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_filter(ours)
                .boxed(),
        );
        telemetry.tracer = Some(provider);
    }
    if let Some(m) = plan.metrics {
        let exporter = match m.protocol {
            OtlpProtocol::Grpc => {
                let b = opentelemetry_otlp::MetricExporter::builder().with_tonic();
                match m.tls {
                    true => b.with_tls_config(grpc_tls()?).build(),
                    false => b.build(),
                }
            }
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(RuntimeHttpClient::current()?)
                .build(),
        }
        .context("building the OTLP metric exporter")?;
        let provider = SdkMeterProvider::builder()
            .with_periodic_exporter(exporter)
            .with_resource(resource())
            .build();
        // One provider per process; a second `init` keeps the first.
        let _ = METER.set(provider.clone());
        telemetry.meter = Some(provider);
    }
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .context("installing the log subscriber")?;
    Ok(telemetry)
}

/// The W3C trace context in `traceparent` (and `tracestate`), as a parent context; `None`
/// when absent or malformed (a bad header starts a new trace, it never fails a request).
pub fn remote_parent(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Option<opentelemetry::Context> {
    let traceparent = traceparent?;
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(s) = tracestate {
        carrier.insert("tracestate".to_owned(), s.to_owned());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span`'s parent the remote context, if any.
pub fn adopt_parent(span: &tracing::Span, parent: Option<opentelemetry::Context>) {
    if let Some(cx) = parent {
        let _ = span.set_parent(cx);
    }
}

/// The OpenTelemetry identity of `span`, to link other spans to it; `None` when spans are
/// not exported.
pub fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    if span.is_disabled() {
        return None;
    }
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Links `span` to each of `links` (an engine step to the generations it served).
pub fn link(span: &tracing::Span, links: impl IntoIterator<Item = SpanContext>) {
    if span.is_disabled() {
        return;
    }
    for sc in links {
        span.add_link(sc);
    }
}

/// TLS for an `https://` gRPC endpoint: the web roots plus the PEM bundle in
/// `OTEL_EXPORTER_OTLP_CERTIFICATE` (tonic's rustls, with ring, as the rest of the process).
fn grpc_tls() -> Result<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig> {
    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
    let tls = ClientTlsConfig::new().with_webpki_roots();
    Ok(match std::env::var_os("OTEL_EXPORTER_OTLP_CERTIFICATE") {
        None => tls,
        Some(path) => {
            let pem = std::fs::read(&path).with_context(|| {
                format!(
                    "OTEL_EXPORTER_OTLP_CERTIFICATE: reading {}",
                    std::path::Path::new(&path).display()
                )
            })?;
            tls.ca_certificate(Certificate::from_pem(pem))
        }
    })
}

/// The OTLP/HTTP transport of opentelemetry-otlp's own exporter, sending through
/// `tandem-http` (the project's one client) on the server's tokio runtime (the SDK's batch
/// processors call from threads of their own, which have no reactor).
#[derive(Debug, Clone)]
struct RuntimeHttpClient {
    rt: tokio::runtime::Handle,
    /// For `https://` endpoints: the web roots plus `OTEL_EXPORTER_OTLP_CERTIFICATE`.
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl RuntimeHttpClient {
    fn current() -> Result<Self> {
        let ca = std::env::var_os("OTEL_EXPORTER_OTLP_CERTIFICATE").map(std::path::PathBuf::from);
        Ok(Self {
            rt: tokio::runtime::Handle::try_current()
                .context("telemetry must start inside the tokio runtime")?,
            tls: crate::server::tls::client_config(ca.as_deref())
                .context("OTEL_EXPORTER_OTLP_CERTIFICATE")?,
        })
    }
}

/// Longest wait for one OTLP answer.
const OTLP_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

impl opentelemetry_http::HttpClient for RuntimeHttpClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: http::Request<bytes::Bytes>,
    ) -> Pin<
        Box<
            dyn Future<Output = Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError>>
                + Send
                + 'b,
        >,
    >
    where
        'a: 'b,
        Self: 'b,
    {
        let tls_config = self.tls.clone();
        let task = self.rt.spawn(async move {
            let uri = request.uri().clone();
            let auth = uri
                .authority()
                .ok_or_else(|| anyhow::anyhow!("OTLP endpoint {uri} has no host"))?;
            let scheme = uri.scheme_str().unwrap_or("");
            let base = tandem_http::BaseUrl::parse(&format!("{scheme}://{auth}"))
                .map_err(|e| anyhow::anyhow!("OTLP endpoint: {e}"))?;
            let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let (parts, body) = request.into_parts();
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/x-protobuf")
                .to_owned();
            let mut req = tandem_http::Request::new(parts.method.clone(), &path);
            req.headers = parts
                .headers
                .iter()
                .filter(|(k, _)| {
                    ![
                        http::header::CONTENT_TYPE,
                        http::header::CONTENT_LENGTH,
                        http::header::HOST,
                    ]
                    .contains(k)
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            req.body = Some((body, &content_type));
            req.timeout = OTLP_HTTP_TIMEOUT;
            req.tls = Some(tls_config);
            let reply = tandem_http::send(&base, req).await?;
            let response = http::Response::builder()
                .status(reply.status)
                .body(reply.body)?;
            Ok::<_, anyhow::Error>(response)
        });
        Box::pin(async move {
            match task.await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(Box::new(e) as opentelemetry_http::HttpError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(vars: &[(&str, &str)]) -> Result<ExportPlan> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ExportPlan::from_vars(|k| vars.get(k).cloned())
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        assert_eq!(plan(&[]).expect("plan"), ExportPlan::default());
        assert_eq!(
            plan(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).expect("plan"),
            ExportPlan::default()
        );
    }

    #[test]
    fn the_endpoint_turns_both_signals_on_with_http_by_default() {
        let p = plan(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]).expect("plan");
        let http = Some(SignalExport {
            protocol: OtlpProtocol::HttpProtobuf,
            tls: false,
        });
        assert_eq!((p.traces, p.metrics), (http, http));
    }

    #[test]
    fn an_https_endpoint_asks_for_tls_per_signal() {
        let p = plan(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "HTTPS://collector:4317"),
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "http://collector:4317",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .expect("plan");
        let (t, m) = (p.traces.expect("traces"), p.metrics.expect("metrics"));
        assert!(t.tls && !m.tls, "{t:?} {m:?}");
        assert_eq!(t.protocol, OtlpProtocol::Grpc);
    }

    #[test]
    fn signal_variables_beat_the_general_ones() {
        let p = plan(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ])
        .expect("plan");
        assert_eq!(
            p.traces,
            Some(SignalExport {
                protocol: OtlpProtocol::Grpc,
                tls: false,
            })
        );
        assert_eq!(p.metrics, None, "no endpoint for metrics");
    }

    #[test]
    fn exporters_can_be_switched_off() {
        let p = plan(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ])
        .expect("plan");
        assert!(p.traces.is_some() && p.metrics.is_none());
        let p = plan(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ])
        .expect("plan");
        assert_eq!(p, ExportPlan::default());
    }

    #[test]
    fn unknown_protocols_and_exporters_are_refused() {
        let e = plan(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ])
        .expect_err("json is not built");
        assert!(e.to_string().contains("http/json"), "{e}");
        assert!(plan(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
        ])
        .is_err());
    }

    #[test]
    fn traceparent_is_read_and_bad_ones_are_ignored() {
        let cx = remote_parent(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None,
        )
        .expect("valid");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote() && sc.is_sampled());
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-zzzz-01",
            "garbage",
        ] {
            assert!(remote_parent(Some(bad), None).is_none(), "{bad:?}");
        }
        assert!(remote_parent(None, None).is_none());
    }
}
