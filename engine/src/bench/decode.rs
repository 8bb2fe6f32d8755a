//! The throughput runs of `tandem bench`: prefill (one session with a long prompt) and decode
//! (N sessions whose devices answer every token, in rounds).
//!
//! Both run on the same engine, one after the other; every figure is a difference of the
//! engine's stats taken around the run, so earlier runs on that engine do not count.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tandem_model::kv::ContiguousKv;
use tandem_model::EdgeModel;
use tandem_scheduler::SchedStats;

use super::{edge_kv, edge_rows, params, BenchPlan};
use crate::{Engine, EngineStats, Event, Session};

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

/// How long a round of answers waits for the devices that have not got their token yet
/// (a session preempted for KV space may be a step or more behind the others).
const ROUND_WAIT: Duration = Duration::from_millis(50);

/// How long the driver sleeps between two polls while a round is not over.
const ROUND_POLL: Duration = Duration::from_micros(100);

/// One session with a `prefill_tokens` prompt (its edge part computed before the clock
/// starts) and a single output token.
pub(super) fn prefill_run(
    engine: &Engine,
    edge: &EdgeModel,
    plan: &BenchPlan,
) -> Result<PrefillFigure> {
    let vocab = edge.config().vocab_size;
    let mut kv = edge_kv(edge);
    let prompt: Vec<u32> = (0..plan.prefill_tokens)
        .map(|j| ((j * 104_729) % (vocab - 1)) as u32 + 1)
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

/// N devices decoding at once; returns the figure.
pub(super) fn decode_run(
    engine: &Engine,
    edge: &EdgeModel,
    n: usize,
    plan: &BenchPlan,
) -> Result<DecodeFigure> {
    let before = engine.stats().wait()?;
    let started = Instant::now();
    let mut run = DecodeRun::start(engine, edge, n, plan)?;
    run.answer_until_done()?;
    let wall = started.elapsed().as_secs_f64();
    run.finish(&before, wall)
}

/// A simulated device of the decode run.
struct DecodeDevice {
    session: Session,
    kv: ContiguousKv,
    /// Position of the next token to answer.
    pos: usize,
    done: bool,
    /// Tokens received so far.
    got: usize,
}

/// The decode run under way: its devices, the round being collected, and the engine stats
/// taken at the moments the figures are measured from.
struct DecodeRun<'a> {
    engine: &'a Engine,
    edge: &'a EdgeModel,
    gen_tokens: usize,
    devices: Vec<DecodeDevice>,
    /// Devices whose session is not done yet.
    remaining: usize,
    /// The engine's stats once every session had its first token (decode alone starts).
    decode_start: Option<EngineStats>,
    /// The scheduler's stats once every session had half its output tokens.
    mid_decode: Option<SchedStats>,
    /// Tokens of this round not answered yet: (device index, token id).
    pending: Vec<(usize, u32)>,
    /// When this round's first token came.
    round_since: Option<Instant>,
}

impl<'a> DecodeRun<'a> {
    /// Opens `n` sessions and sends each its prompt (random ids, fixed seed).
    fn start(engine: &'a Engine, edge: &'a EdgeModel, n: usize, plan: &BenchPlan) -> Result<Self> {
        let vocab = edge.config().vocab_size;
        let mut devices = Vec::with_capacity(n);
        for i in 0..n {
            let session = engine.open_session(params(plan.gen_tokens)?).wait()?;
            let mut kv = edge_kv(edge);
            let prompt: Vec<u32> = (0..plan.prompt_tokens)
                .map(|j| ((i * 7919 + j * 104_729) % (vocab - 1)) as u32 + 1)
                .collect();
            let h = edge_rows(edge, &mut kv, 0, &prompt)?;
            engine
                .push_hidden(session.id, h, prompt.len(), true)
                .wait()?;
            devices.push(DecodeDevice {
                session,
                kv,
                pos: prompt.len(),
                done: false,
                got: 0,
            });
        }
        Ok(Self {
            engine,
            edge,
            gen_tokens: plan.gen_tokens,
            devices,
            remaining: n,
            decode_start: None,
            mid_decode: None,
            pending: Vec::new(),
            round_since: None,
        })
    }

    /// Answers in rounds, as devices that each take the same time would: waits until every
    /// device still generating has its next token (or `ROUND_WAIT` has passed since the
    /// round's first one), then computes all the answers and sends them together, so that
    /// they reach the engine between two of its steps. Answering as tokens trickle in made
    /// the engine run steps of 1–3 rows between full ones (the stragglers of the last step),
    /// each costing a pass over all the weights; that measured the driver, not the engine.
    fn answer_until_done(&mut self) -> Result<()> {
        while self.remaining > 0 {
            self.take_snapshots()?;
            self.collect_tokens()?;
            if !self.round_over() {
                std::thread::sleep(ROUND_POLL);
                continue;
            }
            self.answer_round()?;
        }
        Ok(())
    }

    /// Takes the stats the figures are measured from, at the first poll where they apply.
    fn take_snapshots(&mut self) -> Result<()> {
        if self.decode_start.is_none() && self.devices.iter().all(|d| d.got > 0 || d.done) {
            self.decode_start = Some(self.engine.stats().wait()?);
        }
        // Halfway through the outputs every session holds its KV, its last block part full.
        let half = |d: &DecodeDevice| 2 * d.got >= self.gen_tokens || d.done;
        if self.mid_decode.is_none() && self.devices.iter().all(half) {
            self.mid_decode = Some(self.engine.stats().wait()?.scheduler);
        }
        Ok(())
    }

    /// Takes in what the sessions sent; each token still to be answered joins the round.
    fn collect_tokens(&mut self) -> Result<()> {
        for (i, d) in self.devices.iter_mut().enumerate().filter(|d| !d.1.done) {
            while let Ok(ev) = d.session.events.try_recv() {
                match ev {
                    Event::Token { id, .. } => {
                        d.got += 1;
                        // The last token needs no reply; the engine then says Done.
                        if d.got < self.gen_tokens {
                            self.pending.push((i, id));
                            self.round_since.get_or_insert_with(Instant::now);
                        }
                    }
                    Event::Done { .. } => {
                        d.done = true;
                        self.remaining -= 1;
                    }
                    Event::Error(e) => anyhow::bail!("session failed: {e}"),
                }
            }
        }
        Ok(())
    }

    /// Whether the round has started and either no device is left to wait for or
    /// `ROUND_WAIT` has passed.
    fn round_over(&self) -> bool {
        // Devices the round still waits for: generating, and with no token in hand.
        let waiting = self
            .devices
            .iter()
            .enumerate()
            .filter(|(i, d)| {
                !d.done && d.got < self.gen_tokens && !self.pending.iter().any(|p| p.0 == *i)
            })
            .count();
        self.round_since
            .is_some_and(|t| waiting == 0 || t.elapsed() >= ROUND_WAIT)
    }

    /// Computes the answers of the round's tokens, then sends them all.
    fn answer_round(&mut self) -> Result<()> {
        let mut answers = Vec::with_capacity(self.pending.len());
        for (i, id) in self.pending.drain(..) {
            let d = &mut self.devices[i];
            answers.push((d.session.id, edge_rows(self.edge, &mut d.kv, d.pos, &[id])?));
            d.pos += 1;
        }
        self.round_since = None;
        for (id, h) in answers {
            self.engine.push_hidden_nowait(id, h, 1, true)?;
        }
        Ok(())
    }

    /// Closes the sessions and computes the figure from the stats taken `before` the run.
    fn finish(self, before: &EngineStats, wall: f64) -> Result<DecodeFigure> {
        let engine = self.engine;
        let held = match self.mid_decode {
            Some(h) => h,
            None => engine.stats().wait()?.scheduler,
        };
        let kv_blocks_used = held.total_blocks - held.free_blocks;
        let slots = kv_blocks_used * engine.block_size();
        for d in &self.devices {
            engine.close(d.session.id).wait()?;
        }
        let after = engine.stats().wait()?;
        let tokens = after.tokens_sampled - before.tokens_sampled;
        let busy = after.busy_s - before.busy_s;
        let mid = self.decode_start.unwrap_or_else(|| after.clone());
        let decode_tokens = after.tokens_sampled - mid.tokens_sampled;
        let decode_busy = after.busy_s - mid.busy_s;
        Ok(DecodeFigure {
            sessions: self.devices.len(),
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
}
