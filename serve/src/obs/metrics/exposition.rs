//! The text exposition of `GET /metrics`, encoded by prometheus-client: OpenMetrics 1.0 for
//! scrapers that ask for it (Prometheus does), the Prometheus text format 0.0.4 otherwise
//! (curl, the load generator's scraper, the tests). Both carry the same samples under the
//! same names; they differ in the `TYPE`/`HELP` name of a counter (OpenMetrics names the
//! family without `_total`), in how a histogram's `le` bounds are written (`1.0` against Go's
//! `1`) and in OpenMetrics' final `# EOF`.
//!
//! The registry is built per scrape: handles on this server's metrics and on the process's
//! Redis metrics (clones that share their values), and the figures read at scrape time (the
//! engine's [`Snapshot`], `/proc`) as constants. That costs a few dozen small allocations a
//! scrape and keeps those figures out of shared state.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};

use super::{redis, thread_cpu, Described, Metrics, Snapshot};
use super::{
    DRAFTS, DRAFTS_ACCEPTED, DRAFT_CAP, ENGINE_SECONDS, GAUGES, PREEMPTIONS, REDIS_DURATION,
    REDIS_ERRORS, STEPS, THREAD_CPU, TOKENS_IN, TOKENS_OUT,
};

/// The text format of one scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the `Accept` header names it (among others or not: whoever names it
    /// reads it), else the Prometheus text format.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Seconds by one label, read at scrape time.
type Seconds = Family<[(&'static str, &'static str); 1], Counter<f64, AtomicU64>>;

/// A counter family of `values` under `label`; empty (and so left out of the exposition)
/// when `values` is.
fn seconds(label: &'static str, values: &[(&'static str, f64)]) -> Seconds {
    let family = Seconds::default();
    for (value, secs) in values {
        family.get_or_create(&[(label, *value)]).inc_by(*secs);
    }
    family
}

/// Registers `metric` so that it comes out as `d` names and describes it: prometheus-client
/// appends `_total` to a counter's samples and a full stop to every help text, so both come
/// off first.
fn register(registry: &mut Registry, d: Described, metric: impl Metric) {
    let name = match metric.metric_type() {
        MetricType::Counter => d.name.strip_suffix("_total").unwrap_or(d.name),
        _ => d.name,
    };
    let help = d.help.strip_suffix('.').unwrap_or(d.help);
    registry.register(name, help, metric);
}

impl Metrics {
    /// Everything `/metrics` shows, in its order.
    fn registry(&self, snap: &Snapshot) -> Registry {
        let mut r = Registry::default();
        for (d, field) in GAUGES {
            register(&mut r, d, ConstGauge::new(field(snap)));
        }
        register(
            &mut r,
            PREEMPTIONS,
            ConstCounter::new(snap.preemptions_total),
        );
        register(&mut r, STEPS, ConstCounter::new(snap.engine_steps_total));
        let counters = [
            (TOKENS_IN, &self.tokens_in_total),
            (TOKENS_OUT, &self.tokens_out_total),
            (DRAFTS, &self.draft_tokens_total),
            (DRAFTS_ACCEPTED, &self.draft_tokens_accepted_total),
        ];
        for (d, c) in counters {
            register(&mut r, d, c.clone());
        }
        register(&mut r, DRAFT_CAP, self.draft_cap.clone());
        register(
            &mut r,
            ENGINE_SECONDS,
            seconds("phase", &snap.engine_phases()),
        );
        register(&mut r, THREAD_CPU, seconds("threads", &thread_cpu()));
        for (d, h) in self.histograms() {
            register(&mut r, d, h.handle());
        }
        for (d, f) in self.families() {
            register(&mut r, d, f.handle());
        }
        let redis = redis();
        register(&mut r, REDIS_DURATION, redis.duration_seconds.handle());
        register(&mut r, REDIS_ERRORS, redis.errors_total.clone());
        r
    }

    /// The text exposition of everything, with the engine's figures of `snap`.
    pub fn render(&self, snap: &Snapshot, format: Format) -> Result<String, std::fmt::Error> {
        let registry = self.registry(snap);
        let mut out = String::with_capacity(16 * 1024);
        match format {
            Format::Prometheus => prometheus_text::encode(&mut out, &registry)?,
            Format::OpenMetrics => text::encode(&mut out, &registry)?,
        }
        Ok(out)
    }
}
