//! The JSON report of a run and the statistics in it.
//!
//! # Percentiles
//! Nearest rank: the `p`-th percentile of `n` sorted samples is the sample of rank
//! `ceil(p / 100 × n)` (1-based), read from an HDR histogram (`tandem_report::percentiles`,
//! the same for `tandem bench`) to within 0.1%; the count, mean and max are exact.
//!
//! # What is counted where
//! - Latencies (milliseconds) come from completed generations only (those that got `Done`):
//!   TTFT per generation, TPOT per gap between two consecutive tokens (all gaps of all
//!   generations pooled, so long outputs weigh more), end to end per generation. The
//!   connection handshake comes before `Open` and is in none of them; it has its own
//!   summary, over every generation that connected.
//! - Throughput is every `Token` frame received during the run (cut generations included)
//!   over the run's wall time, from the first device's start to the end.
//! - Errors are counted by name: the protocol's code name for `Error` frames
//!   (`ErrorCode::as_str`), or a local name (see [`crate::device::Failure::name`]).
//! - Reconnections: `resume` counts every reconnection attempt, resume and replay of the run
//!   (cut generations included) and the generations lost after every attempt. A token resent
//!   after a reconnection is counted once; the gap between two new tokens holds any outage
//!   between them, so outages show in TPOT (and TTFT, E2E) as the user would feel them.
//!
//! Every float is rounded to 3 decimals (microseconds for milliseconds), so the JSON stays
//! readable and parses back to the same value.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Arrival, DeviceCompute, LengthDist};
use crate::device::{GenerationRecord, Outcome};
use crate::live::TimelineSample;
use crate::replay::ReplayStats;
use crate::scrape::ServerMetrics;

/// Nearest-rank percentile of `samples`, within 0.1% (one HDR histogram for every report of
/// the project: `tandem_report::percentiles`); `None` when empty.
pub use tandem_report::percentiles::percentile;

/// Summary of a latency distribution, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// The summary of `samples` (any order; NaNs are dropped); `None` when there are none.
    pub fn of(samples: Vec<f64>) -> Option<Self> {
        let l = tandem_report::percentiles::Latencies::of(samples);
        let at = |p| l.percentile_ms(p).map(round3);
        Some(Self {
            count: l.count() as usize,
            mean: round3(l.mean_ms()?),
            p50: at(50.0)?,
            p90: at(90.0)?,
            p99: at(99.0)?,
            max: round3(l.max_ms()?),
        })
    }
}

pub use crate::timing::round3;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The run's settings, as given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub server: String,
    pub edge: String,
    pub devices: usize,
    pub arrival: Arrival,
    pub prompt_tokens: LengthDist,
    pub output_tokens: LengthDist,
    pub think_ms: u64,
    /// `--step-delay-ms` (0 when absent from an older report).
    #[serde(default)]
    pub step_delay_ms: u64,
    pub generations_per_device: u32,
    pub duration_s: f64,
    pub dtype: String,
    pub prompt_pool: usize,
    pub seed: u64,
    pub metrics_url: Option<String>,
    /// `--trace`: the file and its record count (then `prompt_tokens`, `output_tokens` and
    /// `think_ms` are the fallbacks the records did not override).
    pub trace: Option<String>,
    pub trace_records: Option<usize>,
    pub device_compute: DeviceCompute,
    pub max_reconnects: u32,
    /// `--silence-timeout-s` (60 when absent from an older report).
    #[serde(default = "default_silence_timeout_s")]
    pub silence_timeout_s: f64,
    /// The network conditions between devices and server (`--rtt-ms` …), if any.
    #[serde(default)]
    pub network: Option<String>,
    /// The prompts given (`--prompt-file`), if any, instead of drawn ones.
    #[serde(default)]
    pub prompts: Option<String>,
    /// `--max-draft-tokens` (0: no speculation, and when absent from an older report).
    #[serde(default)]
    pub max_draft_tokens: usize,
}

fn default_silence_timeout_s() -> f64 {
    crate::timing::DEFAULT_SILENCE_TIMEOUT.as_secs_f64()
}

/// Reconnections over the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeCounts {
    /// Reconnection attempts after a lost connection (successful or not).
    pub reconnects: u64,
    /// `Resume`s answered with the session's state kept.
    pub resumes: u64,
    /// Sessions rebuilt from the device's kept frames: `Resume` answered with next hidden
    /// sequence number 0, or a new `Open` after `unknown_session` (`reopens`).
    pub replays: u64,
    pub reopens: u64,
    /// Generations that failed after every reconnection attempt (in `counts.failed` too).
    pub lost: u64,
    /// Generations that needed at least one reconnection and completed.
    pub recovered: u64,
}

/// Where the devices' hidden states came from and what that cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeCompute {
    pub mode: DeviceCompute,
    /// Prompts run through the edge (replay: once per pool prompt, before the run; real:
    /// once per generation).
    pub prompts: u64,
    /// Decode rows asked for by devices and actually computed (equal in real mode).
    pub rows_requested: u64,
    pub rows_computed: u64,
    /// Seconds spent in the edge layers, prompts included (real mode: summed over devices).
    pub edge_compute_s: f64,
}

/// Speculation across the split, over completed generations (all zero without drafting,
/// but `round_trips` and `tokens_per_round_trip`, which are then one token per answer).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Speculation {
    /// Drafts the devices sent, and those the cloud's answers confirmed.
    pub drafted_tokens: u64,
    pub accepted_drafts: u64,
    /// `accepted_drafts / drafted_tokens` (0 without drafts).
    pub acceptance: f64,
    /// Answers the devices took: one per round trip (the prompt's, then one per decode
    /// frame).
    pub round_trips: u64,
    /// Output tokens of the completed generations over their round trips.
    pub tokens_per_round_trip: f64,
}

/// The model the devices ran (its edge part).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub pair_id: String,
    pub edge_layers: usize,
    pub hidden_size: usize,
    pub max_position_embeddings: usize,
}

/// Why the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every device ran all its generations.
    AllFinished,
    /// `--duration-s` passed first.
    Deadline,
    /// Stopped early (`SIGINT` or `SIGTERM` to the command, or the stop future given to
    /// [`crate::run_until`]); what still ran is counted as at the deadline.
    Interrupted,
}

/// Generations by fate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub devices: usize,
    pub generations_planned: u64,
    pub started: u64,
    /// Ended with `Done` (any finish reason).
    pub completed: u64,
    /// Ended with an error.
    pub failed: u64,
    /// Still running at the deadline (or when the run was interrupted).
    pub cut_by_deadline: u64,
    /// Never started (the deadline or the interrupt came first).
    pub not_started: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// `Token` frames received, over every generation.
    pub output_tokens: u64,
    /// Sum of `Done`'s output tokens over completed generations.
    pub output_tokens_done: u64,
    /// `Token` frames received by completed generations (equals `output_tokens_done` when
    /// the server counts as the device does).
    pub output_tokens_received_done: u64,
    /// Prompt tokens of completed generations.
    pub prompt_tokens_done: u64,
    /// `output_tokens` over `wall_s`.
    pub output_tokens_per_s: f64,
    pub completed_per_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// TCP + WebSocket handshake, every generation that connected.
    pub connect: Option<Percentiles>,
    pub ttft: Option<Percentiles>,
    pub tpot: Option<Percentiles>,
    pub e2e: Option<Percentiles>,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub settings: RunSettings,
    pub model: ModelSummary,
    pub stopped_by: StopReason,
    pub wall_s: f64,
    pub counts: Counts,
    /// Completed generations by `Done`'s reason (`eos`, `stop_string`, `length`,
    /// `cancelled`).
    pub finish_reasons: BTreeMap<String, u64>,
    /// Failed generations by error name.
    pub errors: BTreeMap<String, u64>,
    /// The first message seen for each error name.
    pub error_examples: BTreeMap<String, String>,
    pub throughput: Throughput,
    /// Milliseconds.
    pub latency_ms: Latency,
    pub resume: ResumeCounts,
    /// Drafted and accepted tokens, tokens per round trip (absent from older reports).
    #[serde(default)]
    pub speculation: Speculation,
    pub edge: EdgeCompute,
    /// With `--metrics-url`: the server's counters over the run and its gauges at the end.
    pub server_metrics: Option<ServerMetrics>,
    /// The live counters once a second.
    pub timeline: Vec<TimelineSample>,
}

/// What the runner knows besides the records.
#[derive(Debug)]
pub struct RunFacts {
    pub settings: RunSettings,
    pub model: ModelSummary,
    pub stopped_by: StopReason,
    pub wall: Duration,
    pub timeline: Vec<TimelineSample>,
    pub devices: usize,
    pub planned: u64,
    pub started: u64,
    /// Every `Token` received (the live counter).
    pub tokens: u64,
    /// Reconnections, resumes and replays (the live counters; `lost` and `recovered` come
    /// from the records).
    pub resume: ResumeCounts,
    pub device_compute: DeviceCompute,
    pub replay: ReplayStats,
    pub server_metrics: Option<ServerMetrics>,
}

/// What [`Report::build`] gathers from the records, one at a time.
#[derive(Default)]
struct Tally {
    counts: Counts,
    throughput: Throughput,
    finish_reasons: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    error_examples: BTreeMap<String, String>,
    /// Latency samples, in milliseconds.
    connect: Vec<f64>,
    ttft: Vec<f64>,
    tpot: Vec<f64>,
    e2e: Vec<f64>,
    speculation: Speculation,
    resume: ResumeCounts,
}

impl Tally {
    /// Starts from what the runner counted live.
    fn new(facts: &RunFacts) -> Self {
        Self {
            counts: Counts {
                devices: facts.devices,
                generations_planned: facts.planned,
                started: facts.started,
                ..Counts::default()
            },
            throughput: Throughput {
                output_tokens: facts.tokens,
                ..Throughput::default()
            },
            resume: ResumeCounts {
                lost: 0,
                recovered: 0,
                ..facts.resume
            },
            ..Self::default()
        }
    }

    fn add(&mut self, r: &GenerationRecord) {
        self.connect.extend(r.connect.map(ms));
        if r.lost {
            self.resume.lost += 1;
        }
        if r.reconnects > 0 && matches!(r.outcome, Outcome::Done { .. }) {
            self.resume.recovered += 1;
        }
        match &r.outcome {
            Outcome::Done {
                reason,
                output_tokens,
            } => {
                self.counts.completed += 1;
                *self
                    .finish_reasons
                    .entry(reason.name().to_owned())
                    .or_insert(0) += 1;
                let t = &mut self.throughput;
                t.output_tokens_done += u64::from(*output_tokens);
                t.output_tokens_received_done += u64::from(r.tokens_received);
                t.prompt_tokens_done += u64::from(r.prompt_tokens);
                let sp = &mut self.speculation;
                sp.drafted_tokens += u64::from(r.drafted);
                sp.accepted_drafts += u64::from(r.accepted);
                sp.round_trips += u64::from(r.rounds);
                self.ttft.extend(r.ttft.map(ms));
                self.tpot.extend(r.gaps.iter().copied().map(ms));
                self.e2e.push(ms(r.e2e));
            }
            Outcome::Failed(f) => {
                self.counts.failed += 1;
                *self.errors.entry(f.name().to_owned()).or_insert(0) += 1;
                self.error_examples
                    .entry(f.name().to_owned())
                    .or_insert_with(|| f.detail());
            }
        }
    }

    /// The counts and rates that follow from the sums, over the run's `facts`.
    fn finish(&mut self, facts: &RunFacts) {
        let counts = &mut self.counts;
        let ended = counts.completed + counts.failed;
        counts.cut_by_deadline = facts.started.saturating_sub(ended);
        counts.not_started = facts.planned.saturating_sub(facts.started);
        let wall_s = facts.wall.as_secs_f64().max(1e-9);
        let throughput = &mut self.throughput;
        throughput.output_tokens_per_s = round3(facts.tokens as f64 / wall_s);
        throughput.completed_per_s = round3(counts.completed as f64 / wall_s);
        let speculation = &mut self.speculation;
        if speculation.drafted_tokens > 0 {
            speculation.acceptance =
                round3(speculation.accepted_drafts as f64 / speculation.drafted_tokens as f64);
        }
        if speculation.round_trips > 0 {
            speculation.tokens_per_round_trip = round3(
                throughput.output_tokens_received_done as f64 / speculation.round_trips as f64,
            );
        }
    }
}

impl Report {
    /// Aggregates the records of ended generations.
    pub fn build(facts: RunFacts, records: &[GenerationRecord]) -> Self {
        let mut tally = Tally::new(&facts);
        for r in records {
            tally.add(r);
        }
        tally.finish(&facts);
        Self {
            settings: facts.settings,
            model: facts.model,
            stopped_by: facts.stopped_by,
            wall_s: round3(facts.wall.as_secs_f64()),
            counts: tally.counts,
            finish_reasons: tally.finish_reasons,
            errors: tally.errors,
            error_examples: tally.error_examples,
            throughput: tally.throughput,
            latency_ms: Latency {
                connect: Percentiles::of(tally.connect),
                ttft: Percentiles::of(tally.ttft),
                tpot: Percentiles::of(tally.tpot),
                e2e: Percentiles::of(tally.e2e),
            },
            resume: tally.resume,
            speculation: tally.speculation,
            edge: EdgeCompute {
                mode: facts.device_compute,
                prompts: facts.replay.prompts,
                rows_requested: facts.replay.rows_requested,
                rows_computed: facts.replay.rows_computed,
                edge_compute_s: round3(facts.replay.edge_compute_s),
            },
            server_metrics: facts.server_metrics,
            timeline: facts.timeline,
        }
    }

    /// A few lines for people.
    pub fn summary(&self) -> String {
        let c = &self.counts;
        let fmt = |p: &Option<Percentiles>| match p {
            Some(p) => format!(
                "p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1} ms (n={})",
                p.p50, p.p90, p.p99, p.max, p.count
            ),
            None => "no samples".to_owned(),
        };
        let mut s = format!(
            "{} devices, {:.1}s ({:?}): {} completed, {} failed, {} cut by the deadline, {} not started\n\
             output: {} tokens, {:.1} tok/s\n\
             connect {}\nTTFT  {}\nTPOT  {}\nE2E   {}\n\
             edge ({}): {} rows requested, {} computed, {:.3}s\n\
             reconnects {}, resumed {}, replayed {} ({} reopened), recovered {}, lost {}\n",
            c.devices,
            self.wall_s,
            self.stopped_by,
            c.completed,
            c.failed,
            c.cut_by_deadline,
            c.not_started,
            self.throughput.output_tokens,
            self.throughput.output_tokens_per_s,
            fmt(&self.latency_ms.connect),
            fmt(&self.latency_ms.ttft),
            fmt(&self.latency_ms.tpot),
            fmt(&self.latency_ms.e2e),
            self.edge.mode,
            self.edge.rows_requested,
            self.edge.rows_computed,
            self.edge.edge_compute_s,
            self.resume.reconnects,
            self.resume.resumes,
            self.resume.replays,
            self.resume.reopens,
            self.resume.recovered,
            self.resume.lost,
        );
        let sp = &self.speculation;
        s.push_str(&format!(
            "speculation (max {} drafts): {} drafted, {} accepted ({:.1}%), {:.2} tokens per round trip over {} round trips\n",
            self.settings.max_draft_tokens,
            sp.drafted_tokens,
            sp.accepted_drafts,
            sp.acceptance * 100.0,
            sp.tokens_per_round_trip,
            sp.round_trips,
        ));
        if let Some(o) = self
            .server_metrics
            .as_ref()
            .and_then(|m| m.overhead.as_ref())
        {
            s.push_str(&format!(
                "server: {:.0} steps, forward {:.2}s, bookkeeping {:.3}s ({:.3} ms/step), io CPU {:.2}s: overhead {:.2}% of forward\n",
                o.steps,
                o.forward_s,
                o.bookkeeping_s,
                o.bookkeeping_ms_per_step,
                o.cpu_s.get("io").copied().unwrap_or(0.0),
                o.overhead_share * 100.0,
            ));
        }
        for (name, n) in &self.errors {
            s.push_str(&format!("error {name}: {n}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use tandem_protocol::{DoneReason, ErrorCode, FinishReason, HiddenDtype};

    use super::*;
    use crate::device::Failure;

    #[test]
    fn summaries_sort_and_round() {
        let p = Percentiles::of(vec![3.0, 1.0, 2.0, 4.0, 1.0004]).expect("some");
        assert_eq!(p.count, 5);
        assert_eq!((p.p50, p.p90, p.p99, p.max), (2.0, 4.0, 4.0, 4.0));
        assert_eq!(p.mean, 2.2);
        assert!(Percentiles::of(Vec::new()).is_none());
        assert_eq!(round3(1.23456), 1.235);
    }

    fn record(outcome: Outcome, tokens: u32, gaps_ms: &[u64]) -> GenerationRecord {
        GenerationRecord {
            device: 0,
            generation: 0,
            prompt_tokens: 8,
            max_tokens: 4,
            outcome,
            tokens_received: tokens,
            tokens: (0..tokens).collect(),
            ttft: (tokens > 0).then(|| Duration::from_millis(100)),
            gaps: gaps_ms.iter().map(|&g| Duration::from_millis(g)).collect(),
            e2e: Duration::from_millis(100 + gaps_ms.iter().sum::<u64>()),
            connect: Some(Duration::from_millis(2)),
            reconnects: 0,
            resumes: 0,
            replays: 0,
            reopens: 0,
            lost: false,
            drafted: 0,
            accepted: 0,
            rounds: tokens,
        }
    }

    fn sample_report() -> Report {
        let done = |n| Outcome::Done {
            reason: DoneReason::Finished(FinishReason::Length),
            output_tokens: n,
        };
        let records = vec![
            record(done(4), 4, &[10, 20, 30]),
            record(done(4), 4, &[11, 21, 31]),
            record(
                Outcome::Done {
                    reason: DoneReason::Finished(FinishReason::Eos),
                    output_tokens: 2,
                },
                2,
                &[12],
            ),
            record(
                Outcome::Failed(Failure::Server {
                    code: ErrorCode::Overloaded,
                    message: "at capacity".into(),
                }),
                0,
                &[],
            ),
            GenerationRecord {
                reconnects: 6,
                lost: true,
                ..record(
                    Outcome::Failed(Failure::Timeout(Duration::from_secs(60))),
                    1,
                    &[],
                )
            },
            GenerationRecord {
                reconnects: 2,
                resumes: 1,
                replays: 1,
                reopens: 1,
                drafted: 5,
                accepted: 2,
                rounds: 2,
                ..record(done(4), 4, &[10, 900, 10])
            },
        ];
        let settings = RunSettings {
            server: "ws://127.0.0.1:9/v1/edge/ws".into(),
            edge: "models/x/edge".into(),
            devices: 3,
            arrival: "poisson:2.5".parse().expect("arrival"),
            prompt_tokens: "fixed:8".parse().expect("p"),
            output_tokens: "uniform:2-4".parse().expect("o"),
            think_ms: 0,
            step_delay_ms: 0,
            generations_per_device: 2,
            duration_s: 60.0,
            dtype: HiddenDtype::F16.as_str().into(),
            prompt_pool: 8,
            seed: 1,
            metrics_url: None,
            trace: None,
            trace_records: None,
            device_compute: DeviceCompute::Replay,
            max_reconnects: 6,
            silence_timeout_s: 60.0,
            network: None,
            prompts: None,
            max_draft_tokens: 4,
        };
        let facts = RunFacts {
            settings,
            model: ModelSummary {
                pair_id: "abc".into(),
                edge_layers: 2,
                hidden_size: 64,
                max_position_embeddings: 512,
            },
            stopped_by: StopReason::Deadline,
            wall: Duration::from_millis(2_000),
            timeline: vec![TimelineSample {
                t_s: 1.001,
                active: 3,
                completed: 1,
                failed: 0,
                output_tokens: 7,
                output_tokens_per_s: 6.993,
            }],
            devices: 3,
            planned: 7,
            started: 7,
            tokens: 16,
            resume: ResumeCounts {
                reconnects: 8,
                resumes: 1,
                replays: 1,
                reopens: 1,
                lost: 99, // ignored: counted from the records
                recovered: 99,
            },
            device_compute: DeviceCompute::Replay,
            replay: ReplayStats {
                prompts: 8,
                rows_requested: 7,
                rows_computed: 3,
                edge_compute_s: 0.0123456,
            },
            server_metrics: Some(ServerMetrics {
                counters_delta: [("tandem_tokens_out_total".to_owned(), 10.0)].into(),
                gauges: [("tandem_sessions_active".to_owned(), 0.0)].into(),
                error: None,
                overhead: None,
            }),
        };
        Report::build(facts, &records)
    }

    #[test]
    fn aggregates_records() {
        let r = sample_report();
        assert_eq!(r.counts.completed, 4);
        assert_eq!(r.counts.failed, 2);
        assert_eq!(r.counts.cut_by_deadline, 1);
        assert_eq!(r.counts.not_started, 0);
        assert_eq!(r.finish_reasons["length"], 3);
        assert_eq!(r.finish_reasons["eos"], 1);
        assert_eq!(r.errors["overloaded"], 1);
        assert_eq!(r.errors["timeout"], 1);
        assert!(r.error_examples["overloaded"].contains("301"));
        assert_eq!(r.throughput.output_tokens, 16);
        assert_eq!(r.throughput.output_tokens_done, 14);
        assert_eq!(r.throughput.output_tokens_received_done, 14);
        assert_eq!(r.throughput.output_tokens_per_s, 8.0);
        assert_eq!(r.throughput.completed_per_s, 2.0);
        let ttft = r.latency_ms.ttft.as_ref().expect("ttft");
        assert_eq!((ttft.count, ttft.p50), (4, 100.0));
        // Every gap of the completed generations, the one across an outage included.
        let tpot = r.latency_ms.tpot.as_ref().expect("tpot");
        assert_eq!(tpot.count, 10);
        assert_eq!((tpot.p50, tpot.max), (12.0, 900.0));
        let e2e = r.latency_ms.e2e.as_ref().expect("e2e");
        assert_eq!((e2e.p50, e2e.max), (160.0, 1020.0));
        assert_eq!(r.edge.edge_compute_s, 0.012);
        assert_eq!(r.edge.mode, DeviceCompute::Replay);
        // Attempts, resumes and replays from the live counters; lost and recovered from the
        // records.
        assert_eq!(
            r.resume,
            ResumeCounts {
                reconnects: 8,
                resumes: 1,
                replays: 1,
                reopens: 1,
                lost: 1,
                recovered: 1,
            }
        );
        // Completed generations only: 4 + 4 + 2 one token per round trip, then 4 tokens in 2
        // round trips with 2 of 5 drafts accepted.
        assert_eq!(
            r.speculation,
            Speculation {
                drafted_tokens: 5,
                accepted_drafts: 2,
                acceptance: 0.4,
                round_trips: 12,
                tokens_per_round_trip: 1.167,
            }
        );
        let summary = r.summary();
        assert!(
            summary.contains("5 drafted, 2 accepted (40.0%), 1.17 tokens per round trip"),
            "{summary}"
        );
        assert!(summary.contains("error overloaded: 1"), "{summary}");
        assert!(summary.contains("recovered 1, lost 1"), "{summary}");
    }

    #[test]
    fn report_round_trips_through_json() {
        let r = sample_report();
        let json = serde_json::to_string_pretty(&r).expect("json");
        let back: Report = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, r);
        let v: serde_json::Value = serde_json::from_str(&json).expect("value");
        assert_eq!(v["settings"]["arrival"], "poisson:2.5");
        assert_eq!(v["settings"]["output_tokens"], "uniform:2-4");
        assert_eq!(v["stopped_by"], "deadline");
        assert_eq!(v["latency_ms"]["tpot"]["p99"], 900.0);
        assert_eq!(v["resume"]["lost"], 1);
        assert_eq!(v["edge"]["mode"], "replay");
        assert_eq!(v["settings"]["max_reconnects"], 6);
        assert_eq!(
            v["server_metrics"]["counters_delta"]["tandem_tokens_out_total"],
            10.0
        );
    }
}
