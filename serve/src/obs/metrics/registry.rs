//! The hand-written metric primitives behind `/metrics`: [`Counter`], [`Gauge`],
//! [`Histogram`] (fixed buckets, also recorded into an OpenTelemetry histogram once the
//! exporter is on) and [`Family`] (a counter per label value, with a cap on distinct
//! values), each rendering itself in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::Described;

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds (plus `+Inf`).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last is `+Inf`.
    counts: Vec<AtomicU64>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
    /// The same observations, to the OTLP exporter (when metrics are exported).
    otel: OnceLock<opentelemetry::metrics::Histogram<f64>>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
            otel: OnceLock::new(),
        }
    }

    pub fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
        if let Some(h) = self.otel.get() {
            h.record(v, &[]);
        }
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

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub(super) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format_float(*b),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", format_float(sum));
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

fn format_float(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Counters by one label whose values are a bounded set.
#[derive(Debug)]
pub struct Family {
    pub(super) label: &'static str,
    cap: usize,
    values: Mutex<BTreeMap<String, &'static Counter>>,
}

impl Family {
    pub fn new(label: &'static str, cap: usize) -> Self {
        Self {
            label,
            cap,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    /// The counter of `value` (of `other` once the cap is reached).
    pub fn with(&self, value: &str) -> &'static Counter {
        let mut map = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = map.get(value) {
            return c;
        }
        let key = if map.len() >= self.cap {
            "other"
        } else {
            value
        };
        // Leaked once per distinct label value: bounded by the cap (and the fixed code sets).
        map.entry(key.to_owned())
            .or_insert_with(|| Box::leak(Box::new(Counter::default())))
    }

    pub fn get(&self, value: &str) -> u64 {
        let map = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(value).map_or(0, |c| c.get())
    }

    /// Each label value and its count.
    pub(super) fn values(&self) -> Vec<(String, u64)> {
        let map = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter().map(|(v, c)| (v.clone(), c.get())).collect()
    }

    pub(super) fn render(&self, out: &mut String, name: &str) {
        let map = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (v, c) in map.iter() {
            let _ = writeln!(
                out,
                "{name}{{{}=\"{}\"}} {}",
                self.label,
                escape(v),
                c.get()
            );
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
