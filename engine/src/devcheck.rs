//! `tandem device-check`: the cloud part on an accelerator checked against the CPU, on one
//! model, without a network. What `scripts/gpu-check.sh` runs first on a lent GPU machine.
//!
//! Three checks, each reported in one JSON object:
//! 1. **Logits.** A varlen batch of prompts (prefill in one step, then `steps` decode steps of
//!    every sequence together) through the cloud layers on the CPU in f32 (the reference) and
//!    on the device, over each one's paged KV cache, fed the same layer-`k` hidden states (the
//!    reference's greedy tokens, through the CPU edge). Reports the largest logit difference
//!    and whether every step's greedy token agrees.
//! 2. **Batched equals solo** on the device: the same steps with each sequence alone.
//! 3. **The engine end to end** on the device (scheduler, chunked prefill, sampling) against
//!    solo generation on the CPU: identical greedy outputs.
//!
//! The pass mark: with f32 on the device, logits within `tolerance` and every greedy token
//! identical; with bf16 the differences are reported, and tokens must agree for at least
//! `min_agreement` of the steps (rounding to bf16 moves near-ties).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tandem_kvcache::{BlockPool, BlockTable, KvLayout};
use tandem_model::device::DeviceName;
use tandem_model::kv::ContiguousKv;
use tandem_model::layers::ForwardCtx;
use tandem_model::pipeline::{GenerateRequest, LocalSplit, LocalSplitOptions};
use tandem_model::split::{CloudModel, EdgeModel};
use tandem_protocol::SamplingParams;

use crate::bench::{edge_rows, prompt_ids, BenchDevice};
use crate::{Cache, Engine, EngineConfig};

/// What to check.
#[derive(Clone, Debug)]
pub struct CheckPlan {
    pub device: DeviceName,
    /// The device's weights and KV dtype (the reference is always f32 on the CPU).
    pub dtype: DType,
    pub sessions: usize,
    pub steps: usize,
    /// Largest logit difference allowed with f32 on the device.
    pub tolerance: f32,
    /// Share of greedy tokens that must agree with bf16 on the device.
    pub min_agreement: f64,
}

const BLOCK: usize = 16;
const PROMPT_LENS: [usize; 8] = [1, 5, 17, 33, 64, 100, 7, 48];

/// Runs the checks; `Ok` carries the report, which says whether they passed.
pub fn run(
    model: &Path,
    edge_layers: Option<usize>,
    plan: &CheckPlan,
) -> Result<serde_json::Value> {
    let load = |dtype: DType, device: Device| {
        LocalSplit::load(
            model,
            &LocalSplitOptions {
                edge_layers,
                dtype: Some(dtype),
                device,
            },
        )
        .with_context(|| format!("loading {}", model.display()))
    };
    let reference = load(DType::F32, Device::Cpu)?;
    let device = plan.device.open()?;
    let candidate = load(plan.dtype, device.clone())?;
    let vocab = reference.cloud.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..plan.sessions)
        .map(|i| prompt_ids(vocab, i + 1, PROMPT_LENS[i % PROMPT_LENS.len()]))
        .collect();

    // (1) The reference's steps and the hidden states they feed.
    let started = Instant::now();
    let inputs = Inputs::record(&reference.edge, &reference.cloud, &prompts, plan.steps)?;
    let reference_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let batched = replay(&candidate.cloud, &inputs, None)?;
    let device_s = started.elapsed().as_secs_f64();
    let vs_cpu = compare(&inputs.logits, &batched);

    // (2) Batched against solo on the device.
    let mut solo: Vec<Vec<Vec<f32>>> = vec![Vec::new(); inputs.logits.len()];
    for s in 0..prompts.len() {
        let one = replay(&candidate.cloud, &inputs, Some(s))?;
        for (step, rows) in one.into_iter().enumerate() {
            solo[step].extend(rows);
        }
    }
    let vs_solo = compare(&batched, &solo);

    // (3) The engine on the device against solo generation on the CPU.
    let engine_check = engine_end_to_end(&reference, candidate, &prompts, plan.steps)?;

    let f32_run = plan.dtype == DType::F32;
    let passed = if f32_run {
        vs_cpu.max_abs_diff <= plan.tolerance && vs_cpu.disagreements == 0
    } else {
        vs_cpu.agreement() >= plan.min_agreement
    } && vs_solo.disagreements == 0
        && (engine_check.mismatched == 0 || !f32_run);
    Ok(json!({
        "device": plan.device.to_string(),
        "dtype": tandem_model::weights::dtype_user_name(plan.dtype),
        "sessions": plan.sessions,
        "steps": plan.steps,
        "tolerance": plan.tolerance,
        "device_vs_cpu": vs_cpu.to_json(),
        "batched_vs_solo_on_device": vs_solo.to_json(),
        "engine_vs_cpu_solo": {
            "sessions": engine_check.sessions,
            "identical": engine_check.sessions - engine_check.mismatched,
            "token_agreement": engine_check.agreement,
            "seconds": engine_check.seconds,
        },
        "reference_s": reference_s,
        "device_s": device_s,
        "passed": passed,
    }))
}

/// The reference's run: per step, each sequence's hidden-state rows and logits.
struct Inputs {
    /// `rows[step][seq]`: layer-`k` hidden states (f32) fed at that step.
    rows: Vec<Vec<Vec<f32>>>,
    /// `lens[step][seq]`: positions fed at that step.
    lens: Vec<Vec<usize>>,
    /// `logits[step][seq]`: the reference's logits after that step.
    logits: Vec<Vec<Vec<f32>>>,
}

impl Inputs {
    fn record(
        edge: &EdgeModel,
        cloud: &CloudModel,
        prompts: &[Vec<u32>],
        steps: usize,
    ) -> Result<Self> {
        let cfg = edge.config();
        let mut edge_kv: Vec<ContiguousKv> = prompts
            .iter()
            .map(|_| ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings))
            .collect();
        let mut me = Self {
            rows: Vec::new(),
            lens: Vec::new(),
            logits: Vec::new(),
        };
        let mut pos: Vec<usize> = vec![0; prompts.len()];
        let mut cache = Stepper::new(cloud, prompts, steps)?;
        let mut next: Vec<Vec<u32>> = prompts.to_vec();
        for _ in 0..=steps {
            let mut rows = Vec::with_capacity(prompts.len());
            for (s, tokens) in next.iter().enumerate() {
                rows.push(edge_rows(edge, &mut edge_kv[s], pos[s], tokens)?);
                pos[s] += tokens.len();
            }
            let lens: Vec<usize> = next.iter().map(Vec::len).collect();
            let logits = cache.step(cloud, &rows, &lens, None)?;
            next = logits.iter().map(|l| vec![argmax(l)]).collect();
            me.rows.push(rows);
            me.lens.push(lens);
            me.logits.push(logits);
        }
        Ok(me)
    }
}

/// A paged cache and block tables for a fixed set of sequences, stepped together.
struct Stepper {
    cache: Cache,
    tables: Vec<BlockTable>,
    past: Vec<usize>,
}

impl Stepper {
    fn new(cloud: &CloudModel, prompts: &[Vec<u32>], steps: usize) -> Result<Self> {
        let c = cloud.config();
        let range = cloud.split().cloud_range();
        let blocks: usize = prompts
            .iter()
            .map(|p| (p.len() + steps + 1).div_ceil(BLOCK))
            .sum();
        let layout = KvLayout {
            first_layer: range.start,
            num_layers: range.len(),
            num_blocks: blocks,
            block_size: BLOCK,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            dtype: crate::kv_dtype_for(cloud.weight_dtype()),
        };
        let pool = BlockPool::new(blocks, BLOCK);
        Ok(Self {
            cache: Cache::new(layout, cloud.device())?,
            tables: prompts.iter().map(|_| pool.new_table()).collect(),
            past: vec![0; prompts.len()],
        })
    }

    /// One step of every sequence (or of `only`): returns each stepped sequence's logits.
    fn step(
        &mut self,
        cloud: &CloudModel,
        rows: &[Vec<f32>],
        lens: &[usize],
        only: Option<usize>,
    ) -> Result<Vec<Vec<f32>>> {
        let h = cloud.config().hidden_size;
        let chosen: Vec<usize> = match only {
            Some(s) => vec![s],
            None => (0..rows.len()).collect(),
        };
        let mut flat = Vec::new();
        let mut spans = Vec::new();
        for &s in &chosen {
            self.tables[s].reserve(lens[s])?;
            flat.extend_from_slice(&rows[s]);
            spans.push((self.past[s], lens[s]));
        }
        let ctx = ForwardCtx::varlen(&spans);
        let x = Tensor::from_vec(flat, (ctx.num_tokens(), h), &Device::Cpu)?;
        let tables: Vec<&BlockTable> = chosen.iter().map(|&s| &self.tables[s]).collect();
        let out = self.cache.forward(cloud, &x, &ctx, &tables)?;
        let last = ctx.last_rows();
        let idx = Tensor::from_slice(&last, last.len(), out.device())?;
        let logits = cloud.logits(&out.index_select(&idx, 0)?)?;
        for &s in &chosen {
            self.past[s] += lens[s];
        }
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }
}

/// Replays the reference's inputs through `cloud` (all sequences batched, or `only` one).
fn replay(cloud: &CloudModel, inputs: &Inputs, only: Option<usize>) -> Result<Vec<Vec<Vec<f32>>>> {
    let prompts: Vec<Vec<u32>> = inputs.lens[0].iter().map(|&n| vec![0; n]).collect();
    let mut st = Stepper::new(cloud, &prompts, inputs.lens.len())?;
    inputs
        .rows
        .iter()
        .zip(&inputs.lens)
        .map(|(rows, lens)| st.step(cloud, rows, lens, only))
        .collect()
}

/// Greedy's choice, the sampler's own argmax (lowest index on ties).
fn argmax(xs: &[f32]) -> u32 {
    tandem_model::sampling::argmax(xs)
}

#[derive(Debug, Default)]
struct Comparison {
    max_abs_diff: f32,
    compared: usize,
    disagreements: usize,
    first_disagreement: Option<(usize, usize)>,
}

impl Comparison {
    fn agreement(&self) -> f64 {
        1.0 - self.disagreements as f64 / self.compared.max(1) as f64
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "max_abs_logit_diff": self.max_abs_diff,
            "greedy_steps_compared": self.compared,
            "greedy_disagreements": self.disagreements,
            "greedy_agreement": self.agreement(),
            "first_disagreement_step_seq": self.first_disagreement,
        })
    }
}

/// Compares `[step][seq][vocab]` logits: the largest difference, and argmax agreement.
fn compare(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> Comparison {
    let mut c = Comparison::default();
    for (step, (xa, xb)) in a.iter().zip(b).enumerate() {
        for (seq, (la, lb)) in xa.iter().zip(xb).enumerate() {
            for (p, q) in la.iter().zip(lb) {
                let d = (p - q).abs();
                c.max_abs_diff = if d.is_nan() {
                    f32::INFINITY
                } else {
                    c.max_abs_diff.max(d)
                };
            }
            c.compared += 1;
            if argmax(la) != argmax(lb) {
                c.disagreements += 1;
                c.first_disagreement.get_or_insert((step, seq));
            }
        }
    }
    c
}

struct EngineCheck {
    sessions: usize,
    mismatched: usize,
    agreement: f64,
    seconds: f64,
}

/// All prompts through an engine on the candidate's device at once, against solo generation
/// on the CPU reference.
fn engine_end_to_end(
    reference: &LocalSplit,
    candidate: LocalSplit,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Result<EngineCheck> {
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let req = GenerateRequest {
                prompt_ids: p.clone(),
                max_tokens: steps,
                sampling: SamplingParams::default().validate()?,
                stop_strings: Vec::new(),
                eos_ids: Some(Vec::new()),
            };
            Ok(reference.generate(&req, &mut |_| {})?.output_ids)
        })
        .collect::<Result<_>>()?;
    let c = candidate.cloud.config().clone();
    let kv_dtype = crate::kv_dtype_for(candidate.cloud.weight_dtype());
    let blocks: usize = prompts
        .iter()
        .map(|p| (p.len() + steps + 1).div_ceil(BLOCK))
        .sum::<usize>()
        * 2;
    let cfg = EngineConfig {
        scheduler: tandem_scheduler::SchedulerConfig {
            policy: tandem_scheduler::Policy::DecodeFirst,
            max_batch_tokens: 64,
            max_batch_seqs: 256,
            max_sessions: 4096,
            max_queued_tokens: 1 << 20,
            max_context: c.max_position_embeddings,
            prefill_slack: None,
        },
        block_size: BLOCK,
        kv_blocks: blocks,
        kv_dtype,
        prefix_sharing: true,
        decode_wait: Duration::ZERO,
        max_draft_tokens: crate::MAX_DRAFT_CAP,
    };
    let edge = candidate.edge;
    let engine = Engine::start(candidate.cloud, candidate.tokenizer, cfg);
    let started = Instant::now();
    let mut devices = prompts
        .iter()
        .map(|p| {
            let chunks: Vec<&[u32]> = p.chunks(24).collect();
            BenchDevice::start(&engine, &edge, &chunks, steps)
        })
        .collect::<Result<Vec<_>>>()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut gaps = Vec::new();
    while devices.iter().any(|d| !d.done) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the engine made no progress in 600 s"
        );
        for d in devices.iter_mut() {
            d.poll(&engine, &edge, &mut gaps)?;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let seconds = started.elapsed().as_secs_f64();
    let (mut same, mut total, mut mismatched) = (0usize, 0usize, 0usize);
    for (d, want) in devices.iter().zip(&expected) {
        mismatched += usize::from(&d.output != want);
        total += want.len();
        same += d.output.iter().zip(want).filter(|(a, b)| a == b).count();
    }
    Ok(EngineCheck {
        sessions: prompts.len(),
        mismatched,
        agreement: same as f64 / total.max(1) as f64,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_counts_disagreements_and_the_largest_difference() {
        let a = vec![vec![vec![0.0, 1.0, 0.5], vec![2.0, 0.0, 0.0]]];
        let b = vec![vec![vec![0.0, 1.25, 0.5], vec![0.0, 3.0, 0.0]]];
        let c = compare(&a, &b);
        assert_eq!(c.compared, 2);
        assert_eq!(c.disagreements, 1);
        assert_eq!(c.first_disagreement, Some((0, 1)));
        assert!((c.max_abs_diff - 3.0).abs() < 1e-6);
        let nan = vec![vec![vec![f32::NAN, 0.0]]];
        assert!(compare(&nan, &nan).max_abs_diff.is_infinite());
    }
}
