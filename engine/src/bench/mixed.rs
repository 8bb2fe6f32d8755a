//! The mixed run of `tandem bench`: `mixed_decoders` sessions decode, then `mixed_prompts`
//! prompts arrive at once; the decoders' time per output token (TPOT) is measured before the
//! prompts arrive and while they are prefilled, and each prompt's time to first token.
//!
//! The arriving prompts' edge part is computed before the clock starts, so their TTFT is the
//! engine's alone. A TPOT sample is the gap between two tokens as the device sees it, so it
//! includes the device's own edge forward of one position.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tandem_model::EdgeModel;

use super::device::BenchDevice;
use super::{edge_kv, edge_rows, params, percentile, prompt_ids, BenchPlan, POLL_SLEEP};
use crate::{Engine, EngineConfig, Event, Session};

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

/// Decoders run, prompts arrive, TPOT is measured (see the module docs).
pub(super) fn mixed_run(
    engine: &Engine,
    edge: &EdgeModel,
    cfg: &EngineConfig,
    plan: &BenchPlan,
) -> Result<MixedFigure> {
    let mut run = MixedRun::start(engine, edge, plan.mixed_decoders)?;
    let base = run.decode_only()?;
    // The prompts arrive (their edge part is computed before the clock starts).
    let hidden = arriving_hidden(edge, plan)?;
    let arrival = Instant::now();
    let mut prompts = run.send_prompts(hidden, plan.mixed_prompt_tokens)?;
    let mut during = run.until_first_tokens(&mut prompts, arrival)?;
    let end = Instant::now();
    during.extend(run.gaps_after(end)?);
    run.close(&prompts)?;
    Ok(MixedFigure::new(cfg, plan, &base, &during, &prompts))
}

/// The edge part's hidden states of each arriving prompt.
fn arriving_hidden(edge: &EdgeModel, plan: &BenchPlan) -> Result<Vec<Vec<f32>>> {
    let vocab = edge.config().vocab_size;
    let mut hidden = Vec::new();
    for i in 0..plan.mixed_prompts {
        let p = prompt_ids(vocab, 1000 + i, plan.mixed_prompt_tokens);
        hidden.push(edge_rows(edge, &mut edge_kv(edge), 0, &p)?);
    }
    Ok(hidden)
}

/// A prompt that arrives while the decoders run; it asks for one token.
struct ArrivingPrompt {
    session: Session,
    /// Seconds from the arrival to its first token, once that came.
    ttft_s: Option<f64>,
}

impl ArrivingPrompt {
    /// Takes in what the session sent; the first token sets the TTFT.
    fn poll(&mut self, arrival: Instant) -> Result<()> {
        while let Ok(ev) = self.session.events.try_recv() {
            match ev {
                Event::Token { .. } => self.ttft_s = Some(arrival.elapsed().as_secs_f64()),
                Event::Error(e) => anyhow::bail!("prompt failed: {e}"),
                Event::Done { .. } => {}
            }
        }
        Ok(())
    }
}

/// The decoders of a mixed run on their engine.
struct MixedRun<'a> {
    engine: &'a Engine,
    edge: &'a EdgeModel,
    decoders: Vec<BenchDevice>,
}

impl<'a> MixedRun<'a> {
    /// Starts `n` decoders with 16-token prompts and (practically) unbounded outputs.
    fn start(engine: &'a Engine, edge: &'a EdgeModel, n: usize) -> Result<Self> {
        let vocab = edge.config().vocab_size;
        let mut decoders = Vec::new();
        for i in 0..n {
            let p = prompt_ids(vocab, i + 1, 16);
            decoders.push(BenchDevice::start(engine, edge, &[&p], 100_000)?);
        }
        Ok(Self {
            engine,
            edge,
            decoders,
        })
    }

    /// Polls every decoder once, pushing their token gaps onto `gaps`: (arrival of the later
    /// token, seconds).
    fn poll_decoders(&mut self, gaps: &mut Vec<(Instant, f64)>) -> Result<()> {
        for d in self.decoders.iter_mut() {
            d.poll(self.engine, self.edge, gaps)?;
        }
        Ok(())
    }

    /// Decode only until every decoder produced 8 gaps' worth of tokens; returns the gaps.
    fn decode_only(&mut self) -> Result<Vec<(Instant, f64)>> {
        let mut base = Vec::new();
        while self.decoders.iter().any(|d| d.output.len() < 9) {
            self.poll_decoders(&mut base)?;
            std::thread::sleep(POLL_SLEEP);
        }
        Ok(base)
    }

    /// Opens a session per prompt and sends its hidden states, without waiting for replies.
    fn send_prompts(&self, hidden: Vec<Vec<f32>>, tokens: usize) -> Result<Vec<ArrivingPrompt>> {
        let mut prompts = Vec::new();
        for h in hidden {
            let session = self.engine.open_session(params(1)?).wait()?;
            self.engine
                .push_hidden_nowait(session.id, h, tokens, true)?;
            prompts.push(ArrivingPrompt {
                session,
                ttft_s: None,
            });
        }
        Ok(prompts)
    }

    /// Decodes until every prompt has its first token; returns the decoders' gaps meanwhile.
    fn until_first_tokens(
        &mut self,
        prompts: &mut [ArrivingPrompt],
        arrival: Instant,
    ) -> Result<Vec<(Instant, f64)>> {
        let mut during = Vec::new();
        while prompts.iter().any(|p| p.ttft_s.is_none()) {
            self.poll_decoders(&mut during)?;
            for p in prompts.iter_mut().filter(|p| p.ttft_s.is_none()) {
                p.poll(arrival)?;
            }
            std::thread::sleep(POLL_SLEEP);
        }
        Ok(during)
    }

    /// One more gap per decoder: a token that was due before `end` may arrive after it.
    fn gaps_after(&mut self, end: Instant) -> Result<Vec<(Instant, f64)>> {
        let mut tail = Vec::new();
        let behind = |d: &BenchDevice| d.last.is_some_and(|t| t < end);
        while self.decoders.iter().any(behind) {
            for d in self.decoders.iter_mut().filter(|d| behind(d)) {
                d.poll(self.engine, self.edge, &mut tail)?;
            }
            std::thread::sleep(POLL_SLEEP);
        }
        Ok(tail)
    }

    /// Closes the decoders' sessions, then the prompts'.
    fn close(&self, prompts: &[ArrivingPrompt]) -> Result<()> {
        for d in &self.decoders {
            self.engine.close(d.session.id).wait()?;
        }
        for p in prompts {
            self.engine.close(p.session.id).wait()?;
        }
        Ok(())
    }
}

impl MixedFigure {
    /// The figure of gaps `base` (decode only) and `during` (while the prompts were
    /// prefilled) and of the prompts' TTFTs.
    fn new(
        cfg: &EngineConfig,
        plan: &BenchPlan,
        base: &[(Instant, f64)],
        during: &[(Instant, f64)],
        prompts: &[ArrivingPrompt],
    ) -> Self {
        let ms = |gaps: &[(Instant, f64)]| -> Vec<f64> { gaps.iter().map(|g| g.1 * 1e3).collect() };
        let (base, dur) = (ms(base), ms(during));
        let ttft: Vec<f64> = prompts
            .iter()
            .filter_map(|p| p.ttft_s)
            .map(|t| t * 1e3)
            .collect();
        let b50 = percentile(&base, 50.0);
        let d99 = percentile(&dur, 99.0);
        MixedFigure {
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
        }
    }
}
