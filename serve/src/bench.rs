//! `tandem bench`: throughput of the cloud engine on a real model, with the hidden states made
//! by the real edge part.
//!
//! For each session count N, N simulated devices each send a prompt of `prompt_tokens`
//! (random ids, fixed seed) and then answer every token with its edge hidden state until
//! `gen_tokens` tokens came back. Reported per N: tokens generated, wall time, end-to-end
//! tokens/s, and the engine's own busy time and tokens/s (forward + sampling only). A separate
//! run measures prefill: one session with a `prefill_tokens` prompt.
//!
//! Caveat, stated in the output too: the devices' edge layers run in the driver thread on the
//! same machine, so on a small CPU they take cores from the engine.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tandem_model::kv::ContiguousKv;
use tandem_model::pipeline::LocalSplit;
use tandem_model::{EdgeModel, ForwardCtx};
use tandem_protocol::SamplingParams;

use crate::engine::{Engine, EngineConfig, Event, SessionParams};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub sessions: Vec<usize>,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub prefill_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct DecodeFigure {
    pub sessions: usize,
    pub tokens: u64,
    pub wall_s: f64,
    pub end_to_end_tokens_per_s: f64,
    pub engine_busy_s: f64,
    pub engine_tokens_per_s: f64,
    /// Decode alone: tokens sampled after every session had its first token, over the engine
    /// time spent after that moment (the prompts' prefill excluded).
    pub decode_tokens: u64,
    pub decode_busy_s: f64,
    pub decode_tokens_per_s: f64,
    pub preemptions: u64,
}

#[derive(Debug, Serialize)]
pub struct PrefillFigure {
    pub prompt_tokens: usize,
    pub engine_busy_s: f64,
    pub prefill_tokens_per_s: f64,
}

fn edge_rows(
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

fn params(gen_tokens: usize) -> Result<SessionParams> {
    Ok(SessionParams {
        sampling: SamplingParams::default().validate()?,
        max_tokens: gen_tokens,
        stop_strings: Vec::new(),
        eos_ids: Some(Vec::new()), // fixed-length generations: comparable across runs
    })
}

/// N devices decoding at once; returns the figure.
fn decode_run(
    engine: &Engine,
    edge: &EdgeModel,
    n: usize,
    plan: &BenchPlan,
) -> Result<DecodeFigure> {
    let cfg = edge.config();
    let before = engine.stats()?;
    let started = Instant::now();
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let s = engine.open_session(params(plan.gen_tokens)?)?;
        let mut kv = ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings);
        let prompt: Vec<u32> = (0..plan.prompt_tokens)
            .map(|j| ((i * 7919 + j * 104_729) % (cfg.vocab_size - 1)) as u32 + 1)
            .collect();
        let h = edge_rows(edge, &mut kv, 0, &prompt)?;
        engine.push_hidden(s.id, h, prompt.len(), true)?;
        devices.push((s, kv, prompt.len(), false, 0usize));
    }
    // Poll every device and send all the answers together, so that they reach the engine
    // between two of its steps (as concurrent devices would), not one device at a time.
    let mut remaining = n;
    let mut decode_start = None;
    while remaining > 0 {
        if decode_start.is_none() && devices.iter().all(|d| d.4 > 0 || d.3) {
            decode_start = Some(engine.stats()?);
        }
        let mut answers = Vec::new();
        for (s, kv, pos, done, got) in devices.iter_mut().filter(|d| !d.3) {
            while let Ok(ev) = s.events.try_recv() {
                match ev {
                    Event::Token { id, .. } => {
                        *got += 1;
                        // The last token needs no reply; the engine then says Done.
                        if *got < plan.gen_tokens {
                            answers.push((s.id, edge_rows(edge, kv, *pos, &[id])?));
                            *pos += 1;
                        }
                    }
                    Event::Done { .. } => {
                        *done = true;
                        remaining -= 1;
                    }
                    Event::Error(e) => anyhow::bail!("session failed: {e}"),
                }
            }
        }
        if answers.is_empty() {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        for (id, h) in answers {
            engine.push_hidden_nowait(id, h, 1, true)?;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    for (s, ..) in &devices {
        engine.close(s.id)?;
    }
    let after = engine.stats()?;
    let tokens = after.tokens_sampled - before.tokens_sampled;
    let busy = after.busy_s - before.busy_s;
    let mid = decode_start.unwrap_or_else(|| after.clone());
    let decode_tokens = after.tokens_sampled - mid.tokens_sampled;
    let decode_busy = after.busy_s - mid.busy_s;
    Ok(DecodeFigure {
        sessions: n,
        tokens,
        wall_s: wall,
        end_to_end_tokens_per_s: tokens as f64 / wall,
        engine_busy_s: busy,
        engine_tokens_per_s: tokens as f64 / busy.max(1e-9),
        decode_tokens,
        decode_busy_s: decode_busy,
        decode_tokens_per_s: decode_tokens as f64 / decode_busy.max(1e-9),
        preemptions: after.scheduler.preemptions - before.scheduler.preemptions,
    })
}

fn prefill_run(engine: &Engine, edge: &EdgeModel, plan: &BenchPlan) -> Result<PrefillFigure> {
    let cfg = edge.config();
    let mut kv = ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings);
    let prompt: Vec<u32> = (0..plan.prefill_tokens)
        .map(|j| ((j * 104_729) % (cfg.vocab_size - 1)) as u32 + 1)
        .collect();
    let h = edge_rows(edge, &mut kv, 0, &prompt)?;
    let s = engine.open_session(params(1)?)?;
    let before = engine.stats()?;
    engine.push_hidden(s.id, h, prompt.len(), true)?;
    while !matches!(
        s.events.recv().context("engine stopped")?,
        Event::Done { .. }
    ) {}
    let after = engine.stats()?;
    let busy = after.busy_s - before.busy_s;
    engine.close(s.id)?;
    Ok(PrefillFigure {
        prompt_tokens: prompt.len(),
        engine_busy_s: busy,
        prefill_tokens_per_s: prompt.len() as f64 / busy.max(1e-9),
    })
}

/// Runs the plan; returns a JSON report.
pub fn run(model: LocalSplit, cfg: EngineConfig, plan: &BenchPlan) -> Result<serde_json::Value> {
    let k = model.edge.split().edge_layers();
    let n = model.edge.split().num_layers();
    let edge = model.edge;
    let engine = Engine::start(model.cloud, model.tokenizer, cfg.clone());
    let prefill = prefill_run(&engine, &edge, plan)?;
    eprintln!("prefill: {:.0} tokens/s", prefill.prefill_tokens_per_s);
    let mut decode = Vec::new();
    for &s in &plan.sessions {
        let f = decode_run(&engine, &edge, s, plan)?;
        eprintln!(
            "{s:>4} sessions: decode {:.1} tokens/s; with prefill {:.1} tokens/s in the engine, {:.1} end to end",
            f.decode_tokens_per_s, f.engine_tokens_per_s, f.end_to_end_tokens_per_s
        );
        decode.push(f);
    }
    let one = decode
        .iter()
        .find(|f| f.sessions == 1)
        .map(|f| f.engine_tokens_per_s);
    let most = decode.last().map(|f| (f.sessions, f.engine_tokens_per_s));
    Ok(serde_json::json!({
        "machine": format!("{} CPU threads", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        "edge_layers": k,
        "num_layers": n,
        "policy": format!("{:?}", cfg.scheduler.policy),
        "max_batch_tokens": cfg.scheduler.max_batch_tokens,
        "kv_blocks": cfg.kv_blocks,
        "block_size": cfg.block_size,
        "prompt_tokens": plan.prompt_tokens,
        "gen_tokens": plan.gen_tokens,
        "prefill": prefill,
        "decode": decode,
        "ratio_most_to_one_session": match (one, most) {
            (Some(a), Some((_, b))) if a > 0.0 => Some(b / a),
            _ => None,
        },
        "note": "devices' edge layers run in the driver thread on the same CPU and compete with the engine",
    }))
}
