//! The prefix run of `tandem bench`: `prefix_sessions` sessions whose prompts start with the
//! same `prefix_tokens`-token system prompt, sent as its own chunk, then a 20-token user part
//! of their own; one pass with prefix sharing and one without, each on its own engine.
//!
//! The blocks are counted while every session holds its prompt's KV and first token (the
//! devices hold their answer until all have it), so both passes are counted at the same point.

use anyhow::Result;
use serde::Serialize;
use tandem_model::EdgeModel;

use super::device::BenchDevice;
use super::{prompt_ids, BenchPlan, POLL_SLEEP};
use crate::{Engine, EngineStats};

/// Tokens of each session's own user part, after the shared system prompt.
const USER_TOKENS: usize = 20;

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

impl PrefixFigure {
    /// The figure of a pass `with` prefix sharing and one `without`.
    pub(super) fn new(
        plan: &BenchPlan,
        block_size: usize,
        with: &PrefixPass,
        without: &PrefixPass,
    ) -> Self {
        PrefixFigure {
            sessions: plan.prefix_sessions,
            system_prompt_tokens: plan.prefix_tokens,
            user_tokens: USER_TOKENS,
            block_size,
            blocks_used_with_sharing: with.blocks_used,
            blocks_used_without_sharing: without.blocks_used,
            blocks_saved: without.blocks_used.saturating_sub(with.blocks_used),
            shared_blocks: with.stats.scheduler.shared_blocks,
            positions_not_computed: with.stats.scheduler.prefix_hit_tokens,
            outputs_identical: with.outputs == without.outputs,
        }
    }
}

/// What one pass of the prefix run measured.
pub(super) struct PrefixPass {
    /// Blocks in use while every session held its KV.
    blocks_used: usize,
    /// The engine's stats after the pass, with `shared_blocks` taken while every session held
    /// its KV and `prefix_hit_tokens` counted over the pass alone.
    stats: EngineStats,
    /// Every session's output, in session order.
    outputs: Vec<Vec<u32>>,
}

/// Sessions with one system prompt, each sent as its own chunk.
pub(super) fn prefix_pass(
    engine: &Engine,
    edge: &EdgeModel,
    plan: &BenchPlan,
) -> Result<PrefixPass> {
    let vocab = edge.config().vocab_size;
    let system = prompt_ids(vocab, 424_242, plan.prefix_tokens);
    let before = engine.stats().wait()?;
    let mut devices = Vec::new();
    for i in 0..plan.prefix_sessions {
        let user = prompt_ids(vocab, 5000 + i, USER_TOKENS);
        let mut d = BenchDevice::start(engine, edge, &[&system, &user], 4)?;
        d.hold = true;
        devices.push(d);
    }
    // Every session gets its first token and then waits, holding its KV: the blocks in use
    // now are those of all the prompts at once.
    let mut gaps = Vec::new();
    poll_while(engine, edge, &mut devices, &mut gaps, |d| {
        d.output.is_empty()
    })?;
    let all_held = engine.stats().wait()?.scheduler;
    for d in devices.iter_mut() {
        d.hold = false;
        let first = d.output[0];
        d.answer(engine, edge, first)?;
    }
    poll_while(engine, edge, &mut devices, &mut gaps, |d| !d.done)?;
    let after = engine.stats().wait()?;
    let blocks_used = all_held.total_blocks - all_held.free_blocks;
    let mut stats = after.clone();
    stats.scheduler.shared_blocks = all_held.shared_blocks;
    stats.scheduler.prefix_hit_tokens -= before.scheduler.prefix_hit_tokens;
    for d in &devices {
        engine.close(d.session.id).wait()?;
    }
    Ok(PrefixPass {
        blocks_used,
        stats,
        outputs: devices.into_iter().map(|d| d.output).collect(),
    })
}

/// Polls every device while any is `pending`.
fn poll_while(
    engine: &Engine,
    edge: &EdgeModel,
    devices: &mut [BenchDevice],
    gaps: &mut Vec<(std::time::Instant, f64)>,
    pending: impl Fn(&BenchDevice) -> bool,
) -> Result<()> {
    while devices.iter().any(&pending) {
        for d in devices.iter_mut() {
            d.poll(engine, edge, gaps)?;
        }
        std::thread::sleep(POLL_SLEEP);
    }
    Ok(())
}
