//! The OTLP side of the metrics: every figure of `/metrics` registered with an OpenTelemetry
//! meter under the same name, unit and buckets. Histograms record each observation; gauges
//! and counters are observable instruments read at export time.

use std::sync::Arc;

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;

use super::{redis, thread_cpu, Described, Metrics, Snapshot};
use super::{
    DRAFTS, DRAFTS_ACCEPTED, DRAFT_CAP, ENGINE_SECONDS, GAUGES, PREEMPTIONS, REDIS_DURATION,
    REDIS_ERRORS, STEPS, THREAD_CPU, TOKENS_IN, TOKENS_OUT,
};

/// The engine's last known counters, read at export time.
type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// Reads one counter at export time. The callbacks hold the metrics (not the server): the
/// final export, after the server stopped, still reports every counter.
type Read = Box<dyn Fn(&Metrics) -> u64 + Send + Sync>;

impl Metrics {
    /// Exports every metric through `meter` (the OTLP exporter) as well, under the same
    /// names, units and buckets as `/metrics`: histograms record each observation, and the
    /// gauges and counters are read at export time (`snapshot` gives the engine's last
    /// known counters). Call once per server; the process's Redis metrics join once.
    pub fn export_otel(self: &Arc<Self>, meter: &Meter, snapshot: SnapshotFn) {
        for (d, h) in self.histograms() {
            h.export_to(meter, &d);
        }
        export_gauges(meter, &snapshot);
        export_seconds(meter, snapshot.clone());
        self.export_counters(meter, snapshot);
        self.export_families(meter);
        export_redis(meter);
    }

    fn export_counters(self: &Arc<Self>, meter: &Meter, snapshot: SnapshotFn) {
        let m = self.clone();
        let _ = meter
            .u64_observable_gauge(DRAFT_CAP.name)
            .with_description(DRAFT_CAP.help)
            .with_unit(DRAFT_CAP.unit)
            .with_callback(move |o| o.observe(m.draft_cap.get(), &[]))
            .build();
        let steps_snapshot = snapshot.clone();
        let counters: [(Described, Read); 6] = [
            (PREEMPTIONS, Box::new(move |_| snapshot().preemptions_total)),
            (
                STEPS,
                Box::new(move |_| steps_snapshot().engine_steps_total),
            ),
            (TOKENS_IN, Box::new(|m| m.tokens_in_total.get())),
            (TOKENS_OUT, Box::new(|m| m.tokens_out_total.get())),
            (DRAFTS, Box::new(|m| m.draft_tokens_total.get())),
            (
                DRAFTS_ACCEPTED,
                Box::new(|m| m.draft_tokens_accepted_total.get()),
            ),
        ];
        for (d, read) in counters {
            let m = self.clone();
            let _ = meter
                .u64_observable_counter(d.name)
                .with_description(d.help)
                .with_unit(d.unit)
                .with_callback(move |o| o.observe(read(&m), &[]))
                .build();
        }
    }

    fn export_families(self: &Arc<Self>, meter: &Meter) {
        for (i, (d, _)) in self.families().into_iter().enumerate() {
            let m = self.clone();
            let _ = meter
                .u64_observable_counter(d.name)
                .with_description(d.help)
                .with_unit(d.unit)
                .with_callback(move |o| {
                    let (_, f) = m.families()[i];
                    for (label, value) in f.values() {
                        o.observe(value, &[KeyValue::new(f.label(), label)]);
                    }
                })
                .build();
        }
    }
}

/// The engine's gauges (sessions, queued positions, KV blocks), from its last snapshot.
fn export_gauges(meter: &Meter, snapshot: &SnapshotFn) {
    for (d, field) in GAUGES {
        let snapshot = snapshot.clone();
        let _ = meter
            .u64_observable_gauge(d.name)
            .with_description(d.help)
            .with_unit(d.unit)
            .with_callback(move |o| o.observe(field(&snapshot()), &[]))
            .build();
    }
}

/// The engine thread's seconds by phase and the process's CPU seconds by thread group.
fn export_seconds(meter: &Meter, snapshot: SnapshotFn) {
    let _ = meter
        .f64_observable_counter(ENGINE_SECONDS.name)
        .with_description(ENGINE_SECONDS.help)
        .with_unit(ENGINE_SECONDS.unit)
        .with_callback(move |o| {
            for (phase, secs) in snapshot().engine_phases() {
                o.observe(secs, &[KeyValue::new("phase", phase)]);
            }
        })
        .build();
    let _ = meter
        .f64_observable_counter(THREAD_CPU.name)
        .with_description(THREAD_CPU.help)
        .with_unit(THREAD_CPU.unit)
        .with_callback(|o| {
            for (group, secs) in thread_cpu() {
                o.observe(secs, &[KeyValue::new("threads", group)]);
            }
        })
        .build();
}

/// The process's Redis metrics, registered once whatever the number of servers.
fn export_redis(meter: &Meter) {
    static REDIS_EXPORTED: std::sync::Once = std::sync::Once::new();
    REDIS_EXPORTED.call_once(|| {
        let r = redis();
        r.duration_seconds.export_to(meter, &REDIS_DURATION);
        let _ = meter
            .u64_observable_counter(REDIS_ERRORS.name)
            .with_description(REDIS_ERRORS.help)
            .with_unit(REDIS_ERRORS.unit)
            .with_callback(|o| o.observe(redis().errors_total.get(), &[]))
            .build();
    });
}
