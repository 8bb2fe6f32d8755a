//! The server's metrics, kept in prometheus-client's types, and their text exposition
//! (`GET /metrics`, `exposition`: OpenMetrics or the Prometheus text format, encoded by
//! prometheus-client), mirrored into OpenTelemetry for the OTLP exporter (`otel`).
//!
//! # What is measured, and where
//! - Per engine step (the engine thread): batch size in positions and in sequences, step
//!   duration; the step in progress, for `/readyz`'s wedge check.
//! - Per session (the session actors): time to first token, time per output token,
//!   end-to-end generation time, tokens out.
//! - Per connection (the WebSocket tasks): hidden-state positions in, wire bytes by
//!   direction, error frames by code.
//! - Per REST answer: error answers by code; prompts submitted per tenant.
//! - Per Redis call (both stores): latency and errors ([`redis`], process-wide: one process
//!   has one set of Redis clients whatever the number of servers in it).
//! - At scrape time, from the engine's own counters: live sessions, sessions waiting for
//!   their device, queued positions, KV blocks used/free/shared, preemptions, steps, and the
//!   engine thread's seconds by phase (`forward`: the model and sampling; `bookkeeping`:
//!   commands, choosing steps, recording outcomes; `decode_wait`: waiting for expected
//!   devices).
//! - At scrape time, from `/proc` ([`crate::threads`]): the process's CPU seconds by thread
//!   group (`engine`, `matmul`, `io`, `other`). With the engine's phases these give the
//!   serving overhead (transport + scheduling) against the step's compute in one run.
//!
//! # Rules
//! Names carry their unit (`_seconds`, `_tokens`, `_total`, `_bytes`); histograms have
//! buckets fitted to the values they take on a CPU or a GPU; label sets are bounded: error
//! codes and directions are fixed sets, and tenants are capped at [`MAX_TENANT_LABELS`]
//! distinct values (the rest count under `tenant="other"`). No label or value ever holds a
//! session id, prompt text, profile data or activations.
//!
//! Counting is a relaxed atomic add; a histogram observation locks its own mutex for a few
//! adds; a labelled counter is looked up under a read lock (`instruments` says more).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;

mod exposition;
mod instruments;
mod otel;

pub use exposition::Format;
pub use instruments::{Family, Histogram};
pub use prometheus_client::metrics::counter::Counter;

/// Distinct tenants that get their own label value.
pub const MAX_TENANT_LABELS: usize = 1000;

/// Positions per step: 1 to the largest token budgets.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];
/// Sequences per step.
const SEQ_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// One engine step: a GPU decode step (ms) to a long CPU prefill (seconds).
const STEP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Time to first token: includes the prompt's prefill and the device's upload.
const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Time per output token, device round trip included.
const TPOT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12,
];
/// A whole generation.
const GENERATION_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// One Redis call on a LAN.
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Redis calls of this process (both stores).
#[derive(Debug)]
pub struct RedisMetrics {
    pub duration_seconds: Histogram,
    pub errors_total: Counter,
}

/// The process's Redis metrics.
pub fn redis() -> &'static RedisMetrics {
    static REDIS: LazyLock<RedisMetrics> = LazyLock::new(|| RedisMetrics {
        duration_seconds: Histogram::new(REDIS_BUCKETS),
        errors_total: Counter::default(),
    });
    &REDIS
}

/// Records one Redis call's duration and whether it failed.
pub fn record_redis(elapsed: Duration, failed: bool) {
    let m = redis();
    m.duration_seconds.observe_duration(elapsed);
    if failed {
        m.errors_total.inc();
    }
}

/// One server's metrics.
#[derive(Debug)]
pub struct Metrics {
    pub batch_tokens: Histogram,
    pub batch_sequences: Histogram,
    pub step_duration_seconds: Histogram,
    pub ttft_seconds: Histogram,
    pub tpot_seconds: Histogram,
    pub generation_duration_seconds: Histogram,
    pub tokens_in_total: Counter,
    pub tokens_out_total: Counter,
    /// `direction` = `in` (device to cloud) or `out`.
    pub wire_bytes_total: Family,
    /// `code` = a wire or REST error code name.
    pub errors_total: Family,
    /// `tenant` = a tenant id (capped).
    pub prompts_submitted_total: Family,
    /// Unix ms when the step in progress started; 0 between steps.
    pub step_started_ms: AtomicU64,
    /// Draft rows devices sent (speculation), and of those the tokens they accepted.
    pub draft_tokens_total: Counter,
    pub draft_tokens_accepted_total: Counter,
    /// The most drafts the engine asked for in its last step's answers.
    pub draft_cap: Gauge<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            batch_tokens: Histogram::new(TOKEN_BUCKETS),
            batch_sequences: Histogram::new(SEQ_BUCKETS),
            step_duration_seconds: Histogram::new(STEP_BUCKETS),
            ttft_seconds: Histogram::new(TTFT_BUCKETS),
            tpot_seconds: Histogram::new(TPOT_BUCKETS),
            generation_duration_seconds: Histogram::new(GENERATION_BUCKETS),
            tokens_in_total: Counter::default(),
            tokens_out_total: Counter::default(),
            wire_bytes_total: Family::new("direction", 2),
            errors_total: Family::new("code", 256),
            prompts_submitted_total: Family::new("tenant", MAX_TENANT_LABELS),
            step_started_ms: AtomicU64::new(0),
            draft_tokens_total: Counter::default(),
            draft_tokens_accepted_total: Counter::default(),
            draft_cap: Gauge::default(),
        }
    }
}

/// The engine's steps, as these metrics count them (and the trace links of each step).
impl tandem_engine::Observer for Metrics {
    fn step_started(&self) {
        self.step_started_ms
            .store(crate::store::now_ms().max(1), Ordering::Relaxed);
    }

    fn step_ended(&self, step: Option<&tandem_engine::StepFigures>) {
        self.step_started_ms.store(0, Ordering::Relaxed);
        if let Some(step) = step {
            self.step_duration_seconds.observe_duration(step.took);
            self.batch_tokens.observe(step.tokens as f64);
            self.batch_sequences.observe(step.sequences as f64);
        }
    }

    fn draft_tokens(&self, n: usize) {
        self.draft_tokens_total.inc_by(n as u64);
    }

    fn draft_tokens_accepted(&self, n: usize) {
        self.draft_tokens_accepted_total.inc_by(n as u64);
    }

    fn draft_cap(&self, cap: u8) {
        self.draft_cap.set(u64::from(cap));
    }

    fn link_step(
        &self,
        step: &tracing::Span,
        parents: &mut dyn Iterator<Item = &tandem_engine::TraceParent>,
    ) {
        crate::telemetry::link(
            step,
            parents.filter_map(|p| p.get::<opentelemetry::trace::SpanContext>().cloned()),
        );
    }
}

/// What the engine and the server know at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub sessions_active: u64,
    pub sessions_waiting_for_device: u64,
    pub queue_depth_tokens: u64,
    pub kv_blocks_used: u64,
    pub kv_blocks_free: u64,
    pub kv_blocks_shared: u64,
    /// Bytes of hidden states the engine holds for recompute.
    pub hidden_state_bytes: u64,
    pub preemptions_total: u64,
    pub engine_steps_total: u64,
    /// Engine thread seconds in forward passes and sampling.
    pub engine_forward_s: f64,
    /// Engine thread seconds in commands, scheduling and outcomes.
    pub engine_bookkeeping_s: f64,
    /// Engine thread seconds waiting for expected devices.
    pub engine_decode_wait_s: f64,
}

impl Snapshot {
    /// The engine's seconds by phase, as labelled in the exposition.
    fn engine_phases(&self) -> [(&'static str, f64); 3] {
        [
            ("forward", self.engine_forward_s),
            ("bookkeeping", self.engine_bookkeeping_s),
            ("decode_wait", self.engine_decode_wait_s),
        ]
    }
}

/// A metric's name (with its unit), help text and OpenTelemetry unit.
#[derive(Clone, Copy, Debug)]
struct Described {
    name: &'static str,
    help: &'static str,
    unit: &'static str,
}

const fn described(name: &'static str, help: &'static str, unit: &'static str) -> Described {
    Described { name, help, unit }
}

/// The gauges read from the engine at scrape (or export) time, with their field in
/// [`Snapshot`].
/// Reads one gauge from a snapshot.
type SnapshotField = fn(&Snapshot) -> u64;

const GAUGES: [(Described, SnapshotField); 7] = [
    (
        described(
            "tandem_sessions_active",
            "Sessions held by the engine.",
            "{session}",
        ),
        |s| s.sessions_active,
    ),
    (
        described(
            "tandem_sessions_waiting_for_device",
            "Sessions waiting for their device's next hidden state.",
            "{session}",
        ),
        |s| s.sessions_waiting_for_device,
    ),
    (
        described(
            "tandem_queue_depth_tokens",
            "Positions received and not yet computed.",
            "{token}",
        ),
        |s| s.queue_depth_tokens,
    ),
    (
        described("tandem_kv_blocks_used", "KV blocks in use.", "{block}"),
        |s| s.kv_blocks_used,
    ),
    (
        described("tandem_kv_blocks_free", "KV blocks free.", "{block}"),
        |s| s.kv_blocks_free,
    ),
    (
        described(
            "tandem_kv_blocks_shared",
            "KV blocks held by more than one session (prefix sharing).",
            "{block}",
        ),
        |s| s.kv_blocks_shared,
    ),
    (
        described(
            "tandem_hidden_state_bytes",
            "Bytes of hidden states held for recompute (admission budget: hidden_state_budget_mib).",
            "By",
        ),
        |s| s.hidden_state_bytes,
    ),
];

const PREEMPTIONS: Described = described(
    "tandem_preemptions_total",
    "Sessions whose KV was dropped to make room (recomputed later).",
    "{preemption}",
);
const STEPS: Described = described(
    "tandem_engine_steps_total",
    "Engine steps (forward passes) run.",
    "{step}",
);
const ENGINE_SECONDS: Described = described(
    "tandem_engine_seconds_total",
    "Engine thread seconds by phase: forward (model and sampling), bookkeeping (commands, \
     scheduling, outcomes), decode_wait (waiting for expected devices).",
    "s",
);
const THREAD_CPU: Described = described(
    "tandem_thread_cpu_seconds_total",
    "CPU seconds of this process's live threads by group: engine, matmul (its compute \
     team), io (sockets and session tasks), other.",
    "s",
);
const TOKENS_IN: Described = described(
    "tandem_tokens_in_total",
    "Hidden-state positions received from devices.",
    "{token}",
);
const TOKENS_OUT: Described = described(
    "tandem_tokens_out_total",
    "Tokens generated and sent to devices.",
    "{token}",
);
const DRAFTS: Described = described(
    "tandem_draft_tokens_total",
    "Draft rows devices sent with their decode inputs (speculation across the split).",
    "{token}",
);
const DRAFTS_ACCEPTED: Described = described(
    "tandem_draft_tokens_accepted_total",
    "Draft tokens the devices accepted (the cloud's token after each matched the draft).",
    "{token}",
);
const DRAFT_CAP: Described = described(
    "tandem_draft_cap",
    "The most drafts the engine asked for in its last step's answers (0: none).",
    "{token}",
);
const WIRE_BYTES: Described = described(
    "tandem_wire_bytes_total",
    "WebSocket payload bytes by direction (in: device to cloud).",
    "By",
);
const ERRORS: Described = described(
    "tandem_errors_total",
    "Error answers by stable code (wire frames and REST).",
    "{error}",
);
const PROMPTS: Described = described(
    "tandem_prompts_submitted_total",
    "Partner prompts accepted, by tenant id.",
    "{prompt}",
);
const REDIS_DURATION: Described = described(
    "tandem_redis_duration_seconds",
    "Duration of one Redis call (this process).",
    "s",
);
const REDIS_ERRORS: Described = described(
    "tandem_redis_errors_total",
    "Redis calls that failed or timed out (this process).",
    "{error}",
);

/// The process's CPU seconds by thread group (empty where `/proc` cannot be read).
fn thread_cpu() -> Vec<(&'static str, f64)> {
    crate::threads::cpu_seconds_by_group()
        .map(|v| crate::threads::GROUPS.into_iter().zip(v).collect())
        .unwrap_or_default()
}

impl Metrics {
    fn histograms(&self) -> [(Described, &Histogram); 6] {
        [
            (
                described(
                    "tandem_batch_tokens",
                    "Positions computed per engine step.",
                    "{token}",
                ),
                &self.batch_tokens,
            ),
            (
                described(
                    "tandem_batch_sequences",
                    "Sessions per engine step.",
                    "{session}",
                ),
                &self.batch_sequences,
            ),
            (
                described(
                    "tandem_step_duration_seconds",
                    "Duration of one engine step (forward and sampling).",
                    "s",
                ),
                &self.step_duration_seconds,
            ),
            (
                described(
                    "tandem_ttft_seconds",
                    "From a session's open to its first token.",
                    "s",
                ),
                &self.ttft_seconds,
            ),
            (
                described(
                    "tandem_tpot_seconds",
                    "Between consecutive output tokens of a session.",
                    "s",
                ),
                &self.tpot_seconds,
            ),
            (
                described(
                    "tandem_generation_duration_seconds",
                    "From a session's open to its end.",
                    "s",
                ),
                &self.generation_duration_seconds,
            ),
        ]
    }

    fn families(&self) -> [(Described, &Family); 3] {
        [
            (WIRE_BYTES, &self.wire_bytes_total),
            (ERRORS, &self.errors_total),
            (PROMPTS, &self.prompts_submitted_total),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` (no `#` lines).
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn histograms_are_cumulative_sum_and_skip_non_finite_values() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0, f64::NAN, f64::INFINITY] {
            h.observe(v);
        }
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("x", "X", h.handle());
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("encoded");
        assert_eq!(
            samples(&text),
            [
                "x_bucket{le=\"1\"} 2",
                "x_bucket{le=\"2\"} 3",
                "x_bucket{le=\"+Inf\"} 4",
                "x_sum 6.0",
                "x_count 4"
            ]
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
        assert_eq!(
            samples(&text),
            [
                "x_sum 6.0",
                "x_count 4",
                "x_bucket{le=\"1.0\"} 2",
                "x_bucket{le=\"2.0\"} 3",
                "x_bucket{le=\"+Inf\"} 4"
            ]
        );
    }

    #[test]
    fn families_cap_their_labels() {
        let f = Family::new("tenant", 2);
        f.with("a").inc();
        f.with("b").inc_by(2);
        f.with("c").inc_by(3);
        f.with("d").inc();
        assert_eq!((f.get("a"), f.get("b"), f.get("other")), (1, 2, 4));
        assert_eq!(f.get("c"), 0);
        assert_eq!(f.values().len(), 3);
    }

    #[test]
    fn exposition_names_every_metric_once() {
        let m = Metrics::default();
        let text = m
            .render(&Snapshot::default(), Format::Prometheus)
            .expect("encoded");
        for name in [
            "tandem_sessions_active",
            "tandem_batch_tokens",
            "tandem_redis_duration_seconds",
            "tandem_prompts_submitted_total",
            "tandem_engine_seconds_total",
            "tandem_engine_steps_total",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
        // The help texts as written (prometheus-client's full stop is not doubled).
        assert!(text.contains("# HELP tandem_sessions_active Sessions held by the engine.\n"));
        assert!(!text.contains("..\n"));
    }

    #[test]
    fn both_formats_carry_the_same_samples() {
        let m = Metrics::default();
        m.tokens_out_total.inc_by(3);
        m.errors_total.with("unauthorized").inc();
        m.ttft_seconds.observe(0.3);
        let snap = Snapshot {
            engine_forward_s: 1.5,
            ..Snapshot::default()
        };
        let prometheus = m.render(&snap, Format::Prometheus).expect("encoded");
        let openmetrics = m.render(&snap, Format::OpenMetrics).expect("encoded");
        // Series names, with the `le` bound read as a number.
        let series = |text: &str| -> std::collections::BTreeSet<String> {
            samples(text)
                .into_iter()
                .map(|l| {
                    let (series, _) = l.rsplit_once(' ').expect("a value");
                    match series.split_once("le=\"") {
                        Some((head, rest)) => {
                            let (le, tail) = rest.split_once('"').expect("closed");
                            let le: f64 = le.parse().expect("a bound");
                            format!("{head}le=\"{le}\"{tail}")
                        }
                        None => series.to_owned(),
                    }
                })
                .collect()
        };
        assert_eq!(series(&prometheus), series(&openmetrics));
        assert!(prometheus.contains("\ntandem_tokens_out_total 3\n"));
        assert!(prometheus.contains("# TYPE tandem_tokens_out_total counter\n"));
        assert!(openmetrics.contains("# TYPE tandem_tokens_out counter\n"));
        assert!(openmetrics.contains("\ntandem_errors_total{code=\"unauthorized\"} 1\n"));
        assert!(openmetrics.ends_with("# EOF\n") && !prometheus.contains("# EOF"));
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }
}
