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

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tandem_model::kv::ContiguousKv;
use tandem_model::pipeline::LocalSplit;
use tandem_model::{EdgeModel, ForwardCtx};
use tandem_protocol::SamplingParams;

use tandem_scheduler::Policy;

use crate::{Engine, EngineConfig, Event, SessionParams};

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
    /// KV slots allocated while every session held its KV, and positions held in them.
    pub kv_blocks_used: usize,
    pub kv_positions_held: usize,
    pub kv_waste_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct PrefillFigure {
    pub prompt_tokens: usize,
    pub engine_busy_s: f64,
    pub prefill_tokens_per_s: f64,
}

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

/// How long a round of answers waits for the devices that have not got their token yet
/// (a session preempted for KV space may be a step or more behind the others).
const ROUND_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

fn params(gen_tokens: usize) -> Result<SessionParams> {
    Ok(SessionParams {
        sampling: SamplingParams::default().validate()?,
        max_tokens: gen_tokens,
        stop_strings: Vec::new(),
        eos_ids: Some(Vec::new()), // fixed-length generations: comparable across runs
        trace: None,
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
    let before = engine.stats().wait()?;
    let started = Instant::now();
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let s = engine.open_session(params(plan.gen_tokens)?).wait()?;
        let mut kv = ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings);
        let prompt: Vec<u32> = (0..plan.prompt_tokens)
            .map(|j| ((i * 7919 + j * 104_729) % (cfg.vocab_size - 1)) as u32 + 1)
            .collect();
        let h = edge_rows(edge, &mut kv, 0, &prompt)?;
        engine.push_hidden(s.id, h, prompt.len(), true).wait()?;
        devices.push((s, kv, prompt.len(), false, 0usize));
    }
    // Answer in rounds, as devices that each take the same time would: wait until every
    // device still generating has its next token (or `ROUND_WAIT` has passed since the
    // round's first one), then compute all the answers and send them together, so that they
    // reach the engine between two of its steps. Answering as tokens trickle in made the
    // engine run steps of 1–3 rows between full ones (the stragglers of the last step),
    // each costing a pass over all the weights; that measured the driver, not the engine.
    let mut remaining = n;
    let mut decode_start = None;
    let mut mid_decode = None;
    let mut pending: Vec<(usize, u32)> = Vec::new();
    let mut round_since: Option<Instant> = None;
    while remaining > 0 {
        if decode_start.is_none() && devices.iter().all(|d| d.4 > 0 || d.3) {
            decode_start = Some(engine.stats().wait()?);
        }
        // Halfway through the outputs every session holds its KV, its last block part full.
        if mid_decode.is_none() && devices.iter().all(|d| 2 * d.4 >= plan.gen_tokens || d.3) {
            mid_decode = Some(engine.stats().wait()?.scheduler);
        }
        for (i, (s, _, _, done, got)) in devices.iter_mut().enumerate().filter(|d| !d.1 .3) {
            while let Ok(ev) = s.events.try_recv() {
                match ev {
                    Event::Token { id, .. } => {
                        *got += 1;
                        // The last token needs no reply; the engine then says Done.
                        if *got < plan.gen_tokens {
                            pending.push((i, id));
                            round_since.get_or_insert_with(Instant::now);
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
        // Devices the round still waits for: generating, and with no token in hand.
        let waiting = devices
            .iter()
            .enumerate()
            .filter(|(i, d)| !d.3 && d.4 < plan.gen_tokens && !pending.iter().any(|p| p.0 == *i))
            .count();
        let round_over = round_since.is_some_and(|t| waiting == 0 || t.elapsed() >= ROUND_WAIT);
        if !round_over {
            std::thread::sleep(std::time::Duration::from_micros(100));
            continue;
        }
        let mut answers = Vec::with_capacity(pending.len());
        for (i, id) in pending.drain(..) {
            let (s, kv, pos, ..) = &mut devices[i];
            answers.push((s.id, edge_rows(edge, kv, *pos, &[id])?));
            *pos += 1;
        }
        round_since = None;
        for (id, h) in answers {
            engine.push_hidden_nowait(id, h, 1, true)?;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let held = match mid_decode {
        Some(h) => h,
        None => engine.stats().wait()?.scheduler,
    };
    let kv_blocks_used = held.total_blocks - held.free_blocks;
    let slots = kv_blocks_used * engine.block_size();
    for (s, ..) in &devices {
        engine.close(s.id).wait()?;
    }
    let after = engine.stats().wait()?;
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
        kv_blocks_used,
        kv_positions_held: held.held_positions,
        kv_waste_percent: if slots > 0 {
            100.0 * (1.0 - held.held_positions as f64 / slots as f64)
        } else {
            0.0
        },
    })
}

fn prefill_run(engine: &Engine, edge: &EdgeModel, plan: &BenchPlan) -> Result<PrefillFigure> {
    let cfg = edge.config();
    let mut kv = ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings);
    let prompt: Vec<u32> = (0..plan.prefill_tokens)
        .map(|j| ((j * 104_729) % (cfg.vocab_size - 1)) as u32 + 1)
        .collect();
    let h = edge_rows(edge, &mut kv, 0, &prompt)?;
    let s = engine.open_session(params(1)?).wait()?;
    let before = engine.stats().wait()?;
    engine.push_hidden(s.id, h, prompt.len(), true).wait()?;
    while !matches!(
        s.events.recv().context("engine stopped")?,
        Event::Done { .. }
    ) {}
    let after = engine.stats().wait()?;
    let busy = after.busy_s - before.busy_s;
    engine.close(s.id).wait()?;
    Ok(PrefillFigure {
        prompt_tokens: prompt.len(),
        engine_busy_s: busy,
        prefill_tokens_per_s: prompt.len() as f64 / busy.max(1e-9),
    })
}

/// Percentile `p` (0..=100) of `xs` by nearest rank, within 0.1% (`tandem_report`); 0 for an
/// empty set.
fn percentile(xs: &[f64], p: f64) -> f64 {
    tandem_report::percentiles::percentile(xs, p).unwrap_or(0.0)
}

#[derive(Debug, Serialize)]
pub struct MixedFigure {
    pub policy: String,
    pub max_batch_tokens: usize,
    pub decoders: usize,
    pub prompts: usize,
    pub prompt_tokens: usize,
    /// TPOT of the decoding sessions before the prompts arrive.
    pub decode_only_tpot_p50_ms: f64,
    pub decode_only_tpot_p99_ms: f64,
    /// TPOT of the decoding sessions from the prompts' arrival until the last one's first token.
    pub during_prefill_tpot_p50_ms: f64,
    pub during_prefill_tpot_p99_ms: f64,
    pub during_prefill_tpot_max_ms: f64,
    pub tpot_samples: usize,
    /// Time to first token of the arriving prompts (edge part excluded).
    pub prompt_ttft_p50_ms: f64,
    pub prompt_ttft_max_ms: f64,
    /// p99 during prefill over p50 decode-only.
    pub p99_over_decode_only_p50: f64,
}

/// A decoding device of the mixed and prefix runs (and of `tandem device-check`).
pub(crate) struct BenchDevice {
    session: crate::Session,
    kv: ContiguousKv,
    pos: usize,
    pub(crate) output: Vec<u32>,
    last: Option<Instant>,
    pub(crate) done: bool,
    /// Do not answer tokens (the session then waits, holding its KV).
    hold: bool,
}

impl BenchDevice {
    /// Opens a session and sends `chunks` of the prompt (the last one complete).
    pub(crate) fn start(
        engine: &Engine,
        edge: &EdgeModel,
        chunks: &[&[u32]],
        max_tokens: usize,
    ) -> Result<Self> {
        let cfg = edge.config();
        let session = engine.open_session(params(max_tokens)?).wait()?;
        let mut kv = ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings);
        let mut pos = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            let h = edge_rows(edge, &mut kv, pos, chunk)?;
            engine
                .push_hidden(session.id, h, chunk.len(), i + 1 == chunks.len())
                .wait()?;
            pos += chunk.len();
        }
        Ok(Self {
            session,
            kv,
            pos,
            output: Vec::new(),
            last: None,
            done: false,
            hold: false,
        })
    }

    /// Sends the hidden state of token `id` (after the last token the engine answers Done and
    /// refuses more input, which is fine).
    fn answer(&mut self, engine: &Engine, edge: &EdgeModel, id: u32) -> Result<()> {
        let h = edge_rows(edge, &mut self.kv, self.pos, &[id])?;
        self.pos += 1;
        let _ = engine.push_hidden_nowait(self.session.id, h, 1, true);
        Ok(())
    }

    /// Handles what arrived; answers each token with its hidden state (unless holding). Returns the gaps
    /// between consecutive tokens seen now, in seconds.
    pub(crate) fn poll(
        &mut self,
        engine: &Engine,
        edge: &EdgeModel,
        gaps: &mut Vec<(Instant, f64)>,
    ) -> Result<()> {
        while let Ok(ev) = self.session.events.try_recv() {
            match ev {
                Event::Token { id, .. } => {
                    let now = Instant::now();
                    if let Some(t) = self.last {
                        gaps.push((now, (now - t).as_secs_f64()));
                    }
                    self.last = Some(now);
                    self.output.push(id);
                    if !self.hold {
                        self.answer(engine, edge, id)?;
                    }
                }
                Event::Done { .. } => self.done = true,
                Event::Error(e) => {
                    if !self.done {
                        anyhow::bail!("session failed: {e}")
                    }
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn prompt_ids(vocab: usize, seed: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((seed * 7919 + j * 104_729 + seed * j) % (vocab - 1)) as u32 + 1)
        .collect()
}

/// Decoders run, prompts arrive, TPOT is measured (see the module docs).
fn mixed_run(
    engine: &Engine,
    edge: &EdgeModel,
    cfg: &EngineConfig,
    plan: &BenchPlan,
) -> Result<MixedFigure> {
    let vocab = edge.config().vocab_size;
    let mut decoders = Vec::new();
    for i in 0..plan.mixed_decoders {
        let p = prompt_ids(vocab, i + 1, 16);
        decoders.push(BenchDevice::start(engine, edge, &[&p], 100_000)?);
    }
    // Decode only until every decoder produced 8 gaps' worth of tokens.
    let mut base = Vec::new();
    while decoders.iter().any(|d| d.output.len() < 9) {
        for d in decoders.iter_mut() {
            d.poll(engine, edge, &mut base)?;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    // The prompts arrive (their edge part is computed before the clock starts).
    let mut prompt_hidden = Vec::new();
    for i in 0..plan.mixed_prompts {
        let p = prompt_ids(vocab, 1000 + i, plan.mixed_prompt_tokens);
        let c = edge.config();
        let mut kv = ContiguousKv::new(c.num_hidden_layers, c.max_position_embeddings);
        prompt_hidden.push(edge_rows(edge, &mut kv, 0, &p)?);
    }
    let arrival = Instant::now();
    let mut prompts = Vec::new();
    for h in prompt_hidden {
        let s = engine.open_session(params(1)?).wait()?;
        engine.push_hidden_nowait(s.id, h, plan.mixed_prompt_tokens, true)?;
        prompts.push((s, None::<f64>));
    }
    let mut during = Vec::new();
    while prompts.iter().any(|p| p.1.is_none()) {
        for d in decoders.iter_mut() {
            d.poll(engine, edge, &mut during)?;
        }
        for (s, ttft) in prompts.iter_mut().filter(|p| p.1.is_none()) {
            while let Ok(ev) = s.events.try_recv() {
                match ev {
                    Event::Token { .. } => *ttft = Some(arrival.elapsed().as_secs_f64()),
                    Event::Error(e) => anyhow::bail!("prompt failed: {e}"),
                    Event::Done { .. } => {}
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let end = Instant::now();
    // One more gap per decoder: a token that was due during the prefill may arrive after it.
    let mut tail = Vec::new();
    while decoders.iter().any(|d| d.last.is_some_and(|t| t < end)) {
        for d in decoders
            .iter_mut()
            .filter(|d| d.last.is_some_and(|t| t < end))
        {
            d.poll(engine, edge, &mut tail)?;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    for d in &decoders {
        engine.close(d.session.id).wait()?;
    }
    for (s, _) in &prompts {
        engine.close(s.id).wait()?;
    }
    let base: Vec<f64> = base.into_iter().map(|g| g.1 * 1e3).collect();
    let dur: Vec<f64> = during.into_iter().chain(tail).map(|g| g.1 * 1e3).collect();
    let ttft: Vec<f64> = prompts
        .iter()
        .filter_map(|p| p.1)
        .map(|t| t * 1e3)
        .collect();
    let b50 = percentile(&base, 50.0);
    let d99 = percentile(&dur, 99.0);
    Ok(MixedFigure {
        policy: format!("{:?}", cfg.scheduler.policy),
        max_batch_tokens: cfg.scheduler.max_batch_tokens,
        decoders: plan.mixed_decoders,
        prompts: plan.mixed_prompts,
        prompt_tokens: plan.mixed_prompt_tokens,
        decode_only_tpot_p50_ms: b50,
        decode_only_tpot_p99_ms: percentile(&base, 99.0),
        during_prefill_tpot_p50_ms: percentile(&dur, 50.0),
        during_prefill_tpot_p99_ms: d99,
        during_prefill_tpot_max_ms: percentile(&dur, 100.0),
        tpot_samples: dur.len(),
        prompt_ttft_p50_ms: percentile(&ttft, 50.0),
        prompt_ttft_max_ms: percentile(&ttft, 100.0),
        p99_over_decode_only_p50: if b50 > 0.0 { d99 / b50 } else { 0.0 },
    })
}

#[derive(Debug, Serialize)]
pub struct PrefixFigure {
    pub sessions: usize,
    pub system_prompt_tokens: usize,
    pub user_tokens: usize,
    pub block_size: usize,
    /// KV blocks in use once every session has its prompt's KV and first token.
    pub blocks_used_with_sharing: usize,
    pub blocks_used_without_sharing: usize,
    pub blocks_saved: usize,
    /// Blocks held by more than one session at that moment, in the run with sharing.
    pub shared_blocks: usize,
    /// Positions whose KV was adopted instead of computed.
    pub positions_not_computed: u64,
    /// Every session's greedy output is identical with and without sharing.
    pub outputs_identical: bool,
}

/// Sessions with one system prompt, each sent as its own chunk; returns (blocks used while
/// all hold their KV, stats, outputs).
fn prefix_pass(
    engine: &Engine,
    edge: &EdgeModel,
    plan: &BenchPlan,
) -> Result<(usize, crate::EngineStats, Vec<Vec<u32>>)> {
    let vocab = edge.config().vocab_size;
    let system = prompt_ids(vocab, 424_242, plan.prefix_tokens);
    let before = engine.stats().wait()?;
    let mut devices = Vec::new();
    for i in 0..plan.prefix_sessions {
        let user = prompt_ids(vocab, 5000 + i, 20);
        let mut d = BenchDevice::start(engine, edge, &[&system, &user], 4)?;
        d.hold = true;
        devices.push(d);
    }
    // Every session gets its first token and then waits, holding its KV: the blocks in use
    // now are those of all the prompts at once.
    let mut gaps = Vec::new();
    while devices.iter().any(|d| d.output.is_empty()) {
        for d in devices.iter_mut() {
            d.poll(engine, edge, &mut gaps)?;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let all_held = engine.stats().wait()?.scheduler;
    for d in devices.iter_mut() {
        d.hold = false;
        let first = d.output[0];
        d.answer(engine, edge, first)?;
    }
    while devices.iter().any(|d| !d.done) {
        for d in devices.iter_mut() {
            d.poll(engine, edge, &mut gaps)?;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let after = engine.stats().wait()?;
    let used = all_held.total_blocks - all_held.free_blocks;
    let mut stats = after.clone();
    stats.scheduler.shared_blocks = all_held.shared_blocks;
    stats.scheduler.prefix_hit_tokens -= before.scheduler.prefix_hit_tokens;
    for d in &devices {
        engine.close(d.session.id).wait()?;
    }
    Ok((used, stats, devices.into_iter().map(|d| d.output).collect()))
}

/// Runs the plan; returns a JSON report.
/// A memory figure of this process from `/proc/self/status` (`VmRSS`, `VmHWM`), in MiB.
pub fn memory_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(model: LocalSplit, cfg: EngineConfig, plan: &BenchPlan) -> Result<serde_json::Value> {
    let k = model.edge.split().edge_layers();
    let n = model.edge.split().num_layers();
    let edge = model.edge;
    let cloud = model.cloud;
    let rss_loaded_mib = memory_mib("VmRSS");
    let limits = plan.roofline.then(|| {
        let l = crate::roofline::measure(cloud.weight_dtype() == candle_core::DType::BF16);
        eprintln!(
            "roofline: read bandwidth {:.1} GB/s, {} matmul peak {:.0} GFLOP/s (weights in cache)",
            l.read_bandwidth_gb_per_s, l.kernel_dtype, l.matmul_peak_gflop_per_s
        );
        l
    });
    let engine = Engine::start(cloud.clone(), model.tokenizer.clone(), cfg.clone());
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
    drop(engine);
    let mut mixed = Vec::new();
    if plan.mixed_decoders > 0 {
        for policy in [Policy::DecodeFirst, Policy::PrefillFirst] {
            let mut c = cfg.clone();
            c.scheduler.policy = policy;
            let engine = Engine::start(cloud.clone(), None, c.clone());
            let f = mixed_run(&engine, &edge, &c, plan)?;
            eprintln!(
                "mixed, {policy:?}: TPOT decode-only p50 {:.0} ms; while {} prompts of {} tokens arrive p50 {:.0} ms, p99 {:.0} ms ({:.2}x)",
                f.decode_only_tpot_p50_ms, f.prompts, f.prompt_tokens, f.during_prefill_tpot_p50_ms,
                f.during_prefill_tpot_p99_ms, f.p99_over_decode_only_p50
            );
            mixed.push(f);
        }
    }
    let mut prefix = None;
    if plan.prefix_sessions > 0 {
        let mut runs = Vec::new();
        for sharing in [true, false] {
            let mut c = cfg.clone();
            c.prefix_sharing = sharing;
            let engine = Engine::start(cloud.clone(), None, c);
            runs.push(prefix_pass(&engine, &edge, plan)?);
        }
        let (with, without) = (&runs[0], &runs[1]);
        let f = PrefixFigure {
            sessions: plan.prefix_sessions,
            system_prompt_tokens: plan.prefix_tokens,
            user_tokens: 20,
            block_size: cfg.block_size,
            blocks_used_with_sharing: with.0,
            blocks_used_without_sharing: without.0,
            blocks_saved: without.0.saturating_sub(with.0),
            shared_blocks: with.1.scheduler.shared_blocks,
            positions_not_computed: with.1.scheduler.prefix_hit_tokens,
            outputs_identical: with.2 == without.2,
        };
        eprintln!(
            "prefix sharing, {} sessions x {}-token system prompt: {} blocks instead of {} ({} shared), outputs identical: {}",
            f.sessions, f.system_prompt_tokens, f.blocks_used_with_sharing, f.blocks_used_without_sharing,
            f.shared_blocks, f.outputs_identical
        );
        prefix = Some(f);
    }
    let one = decode
        .iter()
        .find(|f| f.sessions == 1)
        .map(|f| f.decode_tokens_per_s);
    let most = decode.last().map(|f| (f.sessions, f.decode_tokens_per_s));
    let roofline = limits.map(|l| {
        let (bytes, params) = (cloud.weight_bytes(), cloud.matmul_params());
        let frac = |rows, tps| crate::roofline::fraction(&l, bytes, params, rows, tps);
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
        let rows = plan.prefill_tokens.min(cfg.scheduler.max_batch_tokens);
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
    });
    Ok(serde_json::json!({
        "dtype": tandem_model::weights::dtype_user_name(cloud.weight_dtype()),
        "bf16_kernel": (cloud.weight_dtype() == candle_core::DType::BF16)
            .then(|| tandem_kernels::gemm_bf16::Bf16Kernel::selected().ok().map(|k| k.name()))
            .flatten(),
        "cloud_weight_bytes": cloud.weight_bytes(),
        "matmul_params_per_row": cloud.matmul_params(),
        "device": format!("{:?}", cloud.device().location()),
        "rss_after_load_mib": rss_loaded_mib,
        "rss_peak_mib": memory_mib("VmHWM"),
        "roofline": roofline,
        "machine": format!("{} CPU threads", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        "edge_layers": k,
        "num_layers": n,
        "policy": format!("{:?}", cfg.scheduler.policy),
        "max_batch_tokens": cfg.scheduler.max_batch_tokens,
        "decode_wait_ms": cfg.decode_wait.as_secs_f64() * 1000.0,
        "kv_blocks": cfg.kv_blocks,
        "block_size": cfg.block_size,
        "prompt_tokens": plan.prompt_tokens,
        "gen_tokens": plan.gen_tokens,
        "prefill": prefill,
        "decode": decode,
        "mixed": mixed,
        "prefix_sharing": prefix,
        "decode_ratio_most_to_one_session": match (one, most) {
            (Some(a), Some((_, b))) if a > 0.0 => Some(b / a),
            _ => None,
        },
        "note": "devices' edge layers run in the driver thread on the same CPU and compete with the engine",
    }))
}
