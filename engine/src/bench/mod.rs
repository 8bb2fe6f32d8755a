//! `tandem bench`: throughput of the cloud engine on a real model, with the hidden states made
//! by the real edge part.
//!
//! For each session count N, N simulated devices each send a prompt of `prompt_tokens`
//! (random ids, fixed seed) and then answer every token with its edge hidden state until
//! `gen_tokens` tokens came back. Reported per N: tokens generated, wall time, end-to-end
//! tokens/s, and the engine's own busy time and tokens/s (forward + sampling only). A separate
//! run measures prefill: one session with a `prefill_tokens` prompt.
//!
//! Two more runs, each on engines of their own:
//! - **mixed**: `mixed_decoders` sessions decode while `mixed_prompts` new prompts of
//!   `mixed_prompt_tokens` arrive, once under `decode-first` and once under `prefill-first`
//!   with the same token budget. Reported: the decoding sessions' time per output token
//!   (TPOT, the gap between two tokens as the device sees it) p50/p99 before the prompts
//!   arrive (decode only) and while they are prefilled, and each prompt's time to first token.
//! - **prefix**: `prefix_sessions` sessions whose prompts start with the same
//!   `prefix_tokens`-token system prompt, sent as its own chunk, then a short user part of
//!   their own; once with prefix sharing and once without. Reported: KV blocks used, blocks
//!   shared, positions not computed, and whether every session's greedy output is the same
//!   with and without sharing.
//!
//! KV waste (in the decode figures): `1 - positions held / (blocks used x block size)` when
//! every session has received half its output tokens (all of them then hold their KV).
//!
//! Caveat, stated in the output too: the devices' edge layers run in the driver thread on the
//! same machine, so on a small CPU they take cores from the engine.
//!
//! # Layout
//!
//! - this file: the plan, [`run`] (the runs in their fixed order, their progress lines, the
//!   roofline fractions and the JSON report) and the helpers the runs share;
//! - `decode`: the prefill run and the decode run of N sessions answered in rounds;
//! - `mixed`: decoders whose TPOT is measured while new prompts arrive;
//! - `prefix`: sessions sharing a system prompt, with and without prefix sharing;
//! - `device`: `BenchDevice`, the simulated device of the mixed and prefix runs (and of
//!   `tandem device-check`).

mod decode;
mod device;
mod mixed;
mod prefix;

use anyhow::Result;
use tandem_model::kv::ContiguousKv;
use tandem_model::pipeline::LocalSplit;
use tandem_model::tokenizer::TextTokenizer;
use tandem_model::{CloudModel, EdgeModel, ForwardCtx};
use tandem_protocol::SamplingParams;
use tandem_scheduler::Policy;

use crate::roofline::Limits;
use crate::{Engine, EngineConfig, SessionParams};

pub use decode::{DecodeFigure, PrefillFigure};
pub(crate) use device::BenchDevice;
pub use mixed::MixedFigure;
pub use prefix::PrefixFigure;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub sessions: Vec<usize>,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub prefill_tokens: usize,
    /// Mixed run (0 decoders: skipped).
    pub mixed_decoders: usize,
    pub mixed_prompts: usize,
    pub mixed_prompt_tokens: usize,
    /// Prefix run (0 sessions: skipped).
    pub prefix_sessions: usize,
    pub prefix_tokens: usize,
    /// Measure the machine's limits and report each figure as a fraction of its roofline.
    pub roofline: bool,
}

/// The edge part's hidden states of `tokens` at positions `pos..`, as f32 rows.
pub(crate) fn edge_rows(
    edge: &EdgeModel,
    kv: &mut ContiguousKv,
    pos: usize,
    tokens: &[u32],
) -> Result<Vec<f32>> {
    let h = edge.forward(tokens, &ForwardCtx::single(pos, tokens.len()), kv)?;
    Ok(h.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// A fresh edge KV cache for `edge`'s layers and context length.
fn edge_kv(edge: &EdgeModel) -> ContiguousKv {
    let cfg = edge.config();
    ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings)
}

fn params(gen_tokens: usize) -> Result<SessionParams> {
    Ok(SessionParams {
        sampling: SamplingParams::default().validate()?,
        max_tokens: gen_tokens,
        stop_strings: Vec::new(),
        eos_ids: Some(Vec::new()), // fixed-length generations: comparable across runs
        trace: None,
    })
}

pub(crate) fn prompt_ids(vocab: usize, seed: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((seed * 7919 + j * 104_729 + seed * j) % (vocab - 1)) as u32 + 1)
        .collect()
}

/// Percentile `p` (0..=100) of `xs` by nearest rank, within 0.1% (`tandem_report`); 0 for an
/// empty set.
fn percentile(xs: &[f64], p: f64) -> f64 {
    tandem_report::percentiles::percentile(xs, p).unwrap_or(0.0)
}

/// How long the driver sleeps between two polls of its devices.
const POLL_SLEEP: std::time::Duration = std::time::Duration::from_micros(200);

/// A memory figure of this process from `/proc/self/status` (`VmRSS`, `VmHWM`), in MiB.
pub fn memory_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs the plan; returns a JSON report.
pub fn run(model: LocalSplit, cfg: EngineConfig, plan: &BenchPlan) -> Result<serde_json::Value> {
    let edge_layers = model.edge.split().edge_layers();
    let num_layers = model.edge.split().num_layers();
    let rss_after_load_mib = memory_mib("VmRSS");
    let bench = Bench {
        edge: model.edge,
        cloud: model.cloud,
        cfg,
        plan,
    };
    let limits = plan.roofline.then(|| bench.measure_limits());
    let (prefill, decode) = bench.throughput(model.tokenizer.clone())?;
    let mixed = bench.mixed()?;
    let prefix = bench.prefix()?;
    let roofline = limits.map(|l| bench.roofline(&l, &prefill, &decode));
    Ok(bench.report(Figures {
        edge_layers,
        num_layers,
        rss_after_load_mib,
        roofline,
        prefill,
        decode,
        mixed,
        prefix,
    }))
}

/// One run of the plan: the model's two parts and the configuration every engine starts from.
struct Bench<'a> {
    edge: EdgeModel,
    cloud: CloudModel,
    cfg: EngineConfig,
    plan: &'a BenchPlan,
}

/// What [`Bench::report`] puts in the JSON report besides the configuration.
struct Figures {
    edge_layers: usize,
    num_layers: usize,
    rss_after_load_mib: Option<f64>,
    roofline: Option<serde_json::Value>,
    prefill: PrefillFigure,
    decode: Vec<DecodeFigure>,
    mixed: Vec<MixedFigure>,
    prefix: Option<PrefixFigure>,
}

impl Bench<'_> {
    fn is_bf16(&self) -> bool {
        self.cloud.weight_dtype() == candle_core::DType::BF16
    }

    /// The machine's limits, measured before any engine starts.
    fn measure_limits(&self) -> Limits {
        let l = crate::roofline::measure(self.is_bf16());
        eprintln!(
            "roofline: read bandwidth {:.1} GB/s, {} matmul peak {:.0} GFLOP/s (weights in cache)",
            l.read_bandwidth_gb_per_s, l.kernel_dtype, l.matmul_peak_gflop_per_s
        );
        l
    }

    /// Prefill, then decode at each session count, all on one engine with the plan's config.
    fn throughput(
        &self,
        tokenizer: Option<TextTokenizer>,
    ) -> Result<(PrefillFigure, Vec<DecodeFigure>)> {
        let engine = Engine::start(self.cloud.clone(), tokenizer, self.cfg.clone());
        let prefill = decode::prefill_run(&engine, &self.edge, self.plan)?;
        eprintln!("prefill: {:.0} tokens/s", prefill.prefill_tokens_per_s);
        let mut figures = Vec::new();
        for &s in &self.plan.sessions {
            let f = decode::decode_run(&engine, &self.edge, s, self.plan)?;
            eprintln!(
                "{s:>4} sessions: decode {:.1} tokens/s; with prefill {:.1} tokens/s in the engine, {:.1} end to end",
                f.decode_tokens_per_s, f.engine_tokens_per_s, f.end_to_end_tokens_per_s
            );
            figures.push(f);
        }
        Ok((prefill, figures))
    }

    /// The mixed run under each policy, each on an engine of its own (none if no decoders).
    fn mixed(&self) -> Result<Vec<MixedFigure>> {
        let mut figures = Vec::new();
        if self.plan.mixed_decoders == 0 {
            return Ok(figures);
        }
        for policy in [Policy::DecodeFirst, Policy::PrefillFirst] {
            let mut c = self.cfg.clone();
            c.scheduler.policy = policy;
            let engine = Engine::start(self.cloud.clone(), None, c.clone());
            let f = mixed::mixed_run(&engine, &self.edge, &c, self.plan)?;
            eprintln!(
                "mixed, {policy:?}: TPOT decode-only p50 {:.0} ms; while {} prompts of {} tokens arrive p50 {:.0} ms, p99 {:.0} ms ({:.2}x)",
                f.decode_only_tpot_p50_ms, f.prompts, f.prompt_tokens, f.during_prefill_tpot_p50_ms,
                f.during_prefill_tpot_p99_ms, f.p99_over_decode_only_p50
            );
            figures.push(f);
        }
        Ok(figures)
    }

    /// The prefix run with sharing and without, each on an engine of its own (none if no
    /// sessions).
    fn prefix(&self) -> Result<Option<PrefixFigure>> {
        if self.plan.prefix_sessions == 0 {
            return Ok(None);
        }
        let mut passes = Vec::new();
        for sharing in [true, false] {
            let mut c = self.cfg.clone();
            c.prefix_sharing = sharing;
            let engine = Engine::start(self.cloud.clone(), None, c);
            passes.push(prefix::prefix_pass(&engine, &self.edge, self.plan)?);
        }
        let f = PrefixFigure::new(self.plan, self.cfg.block_size, &passes[0], &passes[1]);
        eprintln!(
            "prefix sharing, {} sessions x {}-token system prompt: {} blocks instead of {} ({} shared), outputs identical: {}",
            f.sessions, f.system_prompt_tokens, f.blocks_used_with_sharing, f.blocks_used_without_sharing,
            f.shared_blocks, f.outputs_identical
        );
        Ok(Some(f))
    }

    /// Each decode figure and the prefill figure as a fraction of the roofline of `l`.
    fn roofline(
        &self,
        l: &Limits,
        prefill: &PrefillFigure,
        decode: &[DecodeFigure],
    ) -> serde_json::Value {
        let (bytes, params) = (self.cloud.weight_bytes(), self.cloud.matmul_params());
        let frac = |rows, tps| crate::roofline::fraction(l, bytes, params, rows, tps);
        let decode: Vec<_> = decode
            .iter()
            .map(|f| frac(f.sessions, f.decode_tokens_per_s))
            .collect();
        for f in &decode {
            eprintln!(
                "{:>4} sessions: {:.1} tokens/s is {:.0}% of the {}-bound {:.1}",
                f.rows,
                f.tokens_per_s,
                100.0 * f.fraction_of_bound,
                f.bound_by,
                f.bound_tokens_per_s
            );
        }
        let rows = self
            .plan
            .prefill_tokens
            .min(self.cfg.scheduler.max_batch_tokens);
        let prefill = frac(rows, prefill.prefill_tokens_per_s);
        eprintln!(
            "prefill ({rows}-row steps): {:.0} tokens/s is {:.0}% of the {}-bound {:.0}",
            prefill.tokens_per_s,
            100.0 * prefill.fraction_of_bound,
            prefill.bound_by,
            prefill.bound_tokens_per_s
        );
        serde_json::json!({
            "limits": l,
            "weight_bytes_per_step": bytes,
            "matmul_params_per_row": params,
            "decode": decode,
            "prefill": prefill,
        })
    }

    /// The JSON report: the machine, the configuration and the figures.
    fn report(&self, f: Figures) -> serde_json::Value {
        let (cloud, cfg, plan) = (&self.cloud, &self.cfg, self.plan);
        let decode_ratio = decode_ratio_most_to_one_session(&f.decode);
        serde_json::json!({
            "dtype": tandem_model::weights::dtype_user_name(cloud.weight_dtype()),
            "bf16_kernel": self.is_bf16()
                .then(|| tandem_kernels::gemm_bf16::Bf16Kernel::selected().ok().map(|k| k.name()))
                .flatten(),
            "cloud_weight_bytes": cloud.weight_bytes(),
            "matmul_params_per_row": cloud.matmul_params(),
            "device": format!("{:?}", cloud.device().location()),
            "rss_after_load_mib": f.rss_after_load_mib,
            "rss_peak_mib": memory_mib("VmHWM"),
            "roofline": f.roofline,
            "machine": format!("{} CPU threads", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
            "edge_layers": f.edge_layers,
            "num_layers": f.num_layers,
            "policy": format!("{:?}", cfg.scheduler.policy),
            "max_batch_tokens": cfg.scheduler.max_batch_tokens,
            "decode_wait_ms": cfg.decode_wait.as_secs_f64() * 1000.0,
            "kv_blocks": cfg.kv_blocks,
            "block_size": cfg.block_size,
            "prompt_tokens": plan.prompt_tokens,
            "gen_tokens": plan.gen_tokens,
            "prefill": f.prefill,
            "decode": f.decode,
            "mixed": f.mixed,
            "prefix_sharing": f.prefix,
            "decode_ratio_most_to_one_session": decode_ratio,
            "note": "devices' edge layers run in the driver thread on the same CPU and compete with the engine",
        })
    }
}

/// Decode tokens/s at the last (largest) session count over that of one session, if both
/// were measured.
fn decode_ratio_most_to_one_session(decode: &[DecodeFigure]) -> Option<f64> {
    let one = decode
        .iter()
        .find(|f| f.sessions == 1)
        .map(|f| f.decode_tokens_per_s);
    let most = decode.last().map(|f| f.decode_tokens_per_s);
    match (one, most) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    }
}
