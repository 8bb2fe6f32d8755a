//! The two instruments that need a little more than prometheus-client's own types:
//! [`Histogram`] (its histogram, skipping non-finite values and mirroring each observation
//! into an OpenTelemetry histogram once the exporter is on) and [`Family`] (its family of
//! counters by one label, capped at a number of distinct label values, the rest counted
//! under `other`).
//!
//! Costs: an observation locks the histogram's mutex (prometheus-client's) for a few adds;
//! [`Family::with`] builds the label set (one small allocation) and takes the family's read
//! lock; only the first sighting of a label value takes the write locks.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::MetricType;

use super::Described;

/// A histogram with fixed upper bounds (plus `+Inf`).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: prometheus_client::metrics::histogram::Histogram,
    /// The same observations, to the OTLP exporter (when metrics are exported).
    otel: OnceLock<opentelemetry::metrics::Histogram<f64>>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: prometheus_client::metrics::histogram::Histogram::new(bounds.iter().copied()),
            otel: OnceLock::new(),
        }
    }

    /// Records `v`; a NaN or infinite value is dropped (it would poison the sum).
    pub fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        self.buckets.observe(v);
        if let Some(h) = self.otel.get() {
            h.record(v, &[]);
        }
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// A handle on the buckets, to register (it shares them).
    pub(super) fn handle(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.buckets.clone()
    }

    /// Also records into an OpenTelemetry histogram of the same name, unit and buckets.
    pub(super) fn export_to(&self, meter: &opentelemetry::metrics::Meter, d: &Described) {
        let h = meter
            .f64_histogram(d.name)
            .with_description(d.help)
            .with_unit(d.unit)
            .with_boundaries(self.bounds.to_vec())
            .build();
        let _ = self.otel.set(h);
    }
}

/// One label and its value.
type Labels = [(&'static str, String); 1];
/// prometheus-client's counters by one label.
type Counters = prometheus_client::metrics::family::Family<Labels, Counter>;

/// Counters by one label whose values are a bounded set.
#[derive(Debug)]
pub struct Family {
    label: &'static str,
    cap: usize,
    counters: Counters,
    /// The label values that have a counter (`other` included once used): the cap counts
    /// them and the OTLP export lists them (prometheus-client's family shows neither).
    values: Mutex<BTreeSet<String>>,
}

impl Family {
    pub fn new(label: &'static str, cap: usize) -> Self {
        Self {
            label,
            cap,
            counters: Counters::default(),
            values: Mutex::new(BTreeSet::new()),
        }
    }

    fn labels(&self, value: &str) -> Labels {
        [(self.label, value.to_owned())]
    }

    /// The counter of `value` (of `other` once the cap is reached).
    pub fn with(&self, value: &str) -> Counter {
        if let Some(c) = self.counters.get(&self.labels(value)) {
            return c.clone();
        }
        let mut values = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        let key = if values.contains(value) || values.len() < self.cap {
            value
        } else {
            "other"
        };
        if !values.contains(key) {
            values.insert(key.to_owned());
        }
        self.counters.get_or_create_owned(&self.labels(key))
    }

    /// The count of `value` (0 when it has no counter).
    pub fn get(&self, value: &str) -> u64 {
        self.counters
            .get(&self.labels(value))
            .map_or(0, |c| c.get())
    }

    pub(super) fn label(&self) -> &'static str {
        self.label
    }

    /// Each label value and its count.
    pub(super) fn values(&self) -> Vec<(String, u64)> {
        let values = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        values.iter().map(|v| (v.clone(), self.get(v))).collect()
    }

    /// A handle on the counters, to register (it shares them).
    pub(super) fn handle(&self) -> Declared {
        Declared(self.counters.clone())
    }
}

/// A family registered so that its `HELP` and `TYPE` lines come out before its first sample
/// too, as they always did: prometheus-client leaves an empty family out, and dashboards and
/// tests look for every name in the first scrape.
#[derive(Debug)]
pub(super) struct Declared(Counters);

impl EncodeMetric for Declared {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}
