//! [`Scheduler`]: the sessions, admission control, and the bookkeeping after each step.
//!
//! Role: the single owner of every session's marks and block table. The engine thread calls
//! it synchronously; nothing here blocks or allocates tensors.
//!
//! Invariants (outside `schedule`/`update`, and checked by the property tests):
//! - `queued` equals the sum over sessions of `received - computed`, and `fresh` the sum of
//!   `received - high_water` (input never computed: what admission limits);
//! - the pool's used blocks are exactly the blocks of the sessions' tables (a removed session's
//!   table is dropped, which frees its blocks);
//! - `order` maps each live session's admission number to its id, one entry per session.
//!
//! Costs: `add`, `push`, `remove`, `table`, `state` are O(log S) for S sessions; `update` is
//! O(items); `stats` is O(S); `schedule` is O(S log S) plus O(S) per preemption (see `step`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tandem_kvcache::{AllocStatus, BlockHash, BlockPool, BlockTable};

use crate::batch::{Batch, StepOutcome};
use crate::config::{SchedError, SchedulerConfig, SeqId};
use crate::session::{SeqProgress, SeqState, Session};

/// Counters and gauges for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// Non-empty batches scheduled.
    pub steps: u64,
    /// Sessions whose KV was dropped to make room, in total.
    pub preemptions: u64,
    /// Positions put in batches, in total.
    pub scheduled_tokens: u64,
    /// Of those, positions computed again after a preemption.
    pub recomputed_tokens: u64,
    /// Positions whose KV was not computed because a session adopted shared prefix blocks.
    pub prefix_hit_tokens: u64,
    /// Blocks currently held by more than one session (prefix sharing).
    pub shared_blocks: usize,
    /// Positions whose KV the sessions' tables hold, summed over sessions (a shared block
    /// counts once per session holding it).
    pub held_positions: usize,
    /// The most blocks in use after any `schedule` so far, with the shared blocks and the
    /// positions the tables held at that moment (their reserved positions included).
    pub peak_used_blocks: usize,
    pub peak_shared_blocks: usize,
    pub peak_held_positions: usize,
    pub sessions_waiting: usize,
    pub sessions_ready: usize,
    pub sessions_running: usize,
    /// Positions received and not yet computed, over all sessions (recomputation included).
    pub queued_tokens: usize,
    /// Positions received and never computed, over all sessions (what admission limits).
    pub fresh_tokens: usize,
    pub free_blocks: usize,
    pub total_blocks: usize,
}

/// Running totals kept between calls (the gauges of [`SchedStats`] are computed on demand).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Totals {
    pub(crate) steps: u64,
    pub(crate) preemptions: u64,
    pub(crate) scheduled_tokens: u64,
    pub(crate) recomputed_tokens: u64,
    pub(crate) prefix_hit_tokens: u64,
    pub(crate) peak_used_blocks: usize,
    pub(crate) peak_shared_blocks: usize,
    pub(crate) peak_held_positions: usize,
}

/// The continuous-batching scheduler. See the crate docs for the step protocol.
#[derive(Debug)]
pub struct Scheduler {
    pub(crate) cfg: SchedulerConfig,
    pub(crate) pool: BlockPool,
    pub(crate) sessions: HashMap<SeqId, Session>,
    /// Admission number -> session, oldest first.
    pub(crate) order: BTreeMap<u64, SeqId>,
    /// Sessions that may have work, by admission number: every session that is ready,
    /// running, or may adopt a prefix is here (others may be too; `schedule` drops them as it
    /// meets them). Input (`push`), hashes and preemption put a session here; so a step costs
    /// O(sessions with work), not O(live sessions), however many wait for their device.
    pub(crate) pending: BTreeSet<(u64, SeqId)>,
    next_order: u64,
    pub(crate) queued: usize,
    pub(crate) fresh: usize,
    pub(crate) totals: Totals,
    /// The step's fixed cost in rows, for the prefill cap ([`SchedulerConfig::prefill_slack`]).
    pub(crate) overhead_rows: f64,
    /// Decodes per step lately: the last step's count, or more recent peaks fading by 20% a
    /// step. A step whose decoders are all still at their devices is capped as if they
    /// were there (they will wait for it).
    pub(crate) recent_decodes: f64,
    /// Calls of `schedule` so far: the clock that idle sessions age by.
    pub(crate) ticks: u64,
    /// The last `schedule` had work but placed none of it (KV blocks ran out).
    pub(crate) blocked: bool,
}

impl Scheduler {
    /// A scheduler over `pool`, which it uses for every session's block table.
    /// `max_batch_tokens` and `max_batch_seqs` below 1 are raised to 1 so that every step
    /// can make progress.
    pub fn new(mut cfg: SchedulerConfig, pool: BlockPool) -> Self {
        cfg.max_batch_tokens = cfg.max_batch_tokens.max(1);
        cfg.max_batch_seqs = cfg.max_batch_seqs.max(1);
        Self {
            cfg,
            pool,
            sessions: HashMap::new(),
            order: BTreeMap::new(),
            pending: BTreeSet::new(),
            next_order: 0,
            queued: 0,
            fresh: 0,
            totals: Totals::default(),
            overhead_rows: 0.0,
            recent_decodes: 0.0,
            ticks: 0,
            blocked: false,
        }
    }

    /// Whether the last [`Scheduler::schedule`] found work but could place none of it for want
    /// of KV blocks. The engine then calls `schedule` again after a short wait rather than
    /// sleeping until new input: each call ages the sessions idle at their devices, until
    /// preemption rule 3 frees their blocks.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// Sets the step's fixed cost, in rows: a step computing `n` rows takes about
    /// `(overhead_rows + n)` times the cost of one row. The engine measures it from its step
    /// times; it sizes the prompt chunk that rides along with decodes
    /// ([`SchedulerConfig::prefill_slack`]). Negative or non-finite values are taken as 0.
    pub fn set_overhead_rows(&mut self, rows: f64) {
        self.overhead_rows = if rows.is_finite() { rows.max(0.0) } else { 0.0 };
    }

    /// The most prompt positions a step with `decodes` decodes may take under
    /// [`SchedulerConfig::prefill_slack`] (`usize::MAX`: no cap). The decoders counted are
    /// the larger of `decodes` and the recent decodes per step, so a step taken while every
    /// decoder's next input is still on its way is capped too; with no decoder lately (under
    /// half a decode per step) it is not.
    pub fn prefill_cap(&self, decodes: usize) -> usize {
        let decoders = (decodes as f64).max(self.recent_decodes);
        match self.cfg.prefill_slack {
            Some(slack) if decoders >= 0.5 && slack.is_finite() => {
                let cap = (slack.max(0.0) * (decoders + self.overhead_rows)).floor();
                (cap as usize).max(1)
            }
            _ => usize::MAX,
        }
    }

    /// Admits a session with nothing received yet.
    ///
    /// Errors: [`SchedError::DuplicateSession`]; [`SchedError::Overloaded`] at
    /// `max_sessions` live sessions.
    pub fn add(&mut self, id: SeqId) -> Result<(), SchedError> {
        if self.sessions.contains_key(&id) {
            return Err(SchedError::DuplicateSession(id));
        }
        if self.sessions.len() >= self.cfg.max_sessions {
            return Err(SchedError::Overloaded(format!(
                "{} live sessions, the limit",
                self.sessions.len()
            )));
        }
        let order = self.next_order;
        self.next_order += 1;
        self.order.insert(order, id);
        let mut s = Session::new(order, self.pool.new_table());
        s.last_step = self.ticks;
        self.sessions.insert(id, s);
        Ok(())
    }

    /// The server received hidden states for `n` more positions of `id`, right after those
    /// already received. `complete` says whether, once they are computed, the model must
    /// produce a token: true for the last chunk of a prompt and for every decode input.
    /// New input also ends a finished generation's pause. `n == 0` changes nothing (there is
    /// no position to sample from).
    ///
    /// Errors, checked in this order; on error nothing changes:
    /// [`SchedError::UnknownSession`]; [`SchedError::NotReady`] while the session owes a
    /// token; [`SchedError::ContextLength`] past `max_context`; [`SchedError::TooLarge`] if
    /// the session's positions could never fit in the pool; [`SchedError::Overloaded`] if the
    /// positions received and never computed, over all sessions, would exceed
    /// `max_queued_tokens` ([`Scheduler::num_fresh_tokens`]).
    pub fn push(&mut self, id: SeqId, n: usize, complete: bool) -> Result<(), SchedError> {
        self.push_drafts(id, n, complete, 0)
    }

    /// [`Scheduler::push`] of a speculative input: its last `drafts` positions are tokens
    /// the device drafted, and the model samples after each of the last `drafts + 1`
    /// positions (in one step). `drafts > 0` needs `complete` and `n == drafts + 1`, and no
    /// more than `max_batch_tokens` positions, else [`SchedError::Drafts`].
    pub fn push_drafts(
        &mut self,
        id: SeqId,
        n: usize,
        complete: bool,
        drafts: usize,
    ) -> Result<(), SchedError> {
        let s = self
            .sessions
            .get(&id)
            .ok_or(SchedError::UnknownSession(id))?;
        if drafts > 0 && (!complete || n != drafts + 1 || n > self.cfg.max_batch_tokens) {
            return Err(SchedError::Drafts { drafts, rows: n });
        }
        if s.owes_token() {
            return Err(SchedError::NotReady(id));
        }
        if n == 0 {
            return Ok(());
        }
        let len = s.received.saturating_add(n);
        if len > self.cfg.max_context {
            return Err(SchedError::ContextLength {
                len,
                max: self.cfg.max_context,
            });
        }
        let needed = len.div_ceil(self.pool.block_size());
        if self.pool.can_allocate(needed) == AllocStatus::Never {
            return Err(SchedError::TooLarge {
                needed,
                total: self.pool.num_blocks(),
            });
        }
        let fresh = self.fresh.saturating_add(n);
        if fresh > self.cfg.max_queued_tokens {
            return Err(SchedError::Overloaded(format!(
                "{} positions of input waiting to be computed, the limit is {}",
                self.fresh, self.cfg.max_queued_tokens
            )));
        }
        self.fresh = fresh;
        self.queued = self.queued.saturating_add(n);
        if let Some(s) = self.sessions.get_mut(&id) {
            s.received = len;
            if complete {
                s.complete_upto = len;
                s.sample_from = len - 1 - drafts;
            }
            s.parked = false;
            s.dormant = false;
            self.pending.insert((s.order, id));
        }
        Ok(())
    }

    /// Drops `id`'s positions from `len` on (speculation: the device's drafts the model did
    /// not confirm), with their KV; the blocks no longer needed go back to the pool. Allowed
    /// only while the session is not running and owes no token, and only down to its last
    /// complete input's sampled rows (`len >= sample_from + 1`: the token before the drafts
    /// always counts); `len` at or past `received` changes nothing.
    ///
    /// Errors: [`SchedError::UnknownSession`]; [`SchedError::NotReady`] while running or
    /// owing a token; [`SchedError::Truncate`] below the bound.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<(), SchedError> {
        let bs = self.pool.block_size();
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(SchedError::UnknownSession(id))?;
        if s.running || s.owes_token() {
            return Err(SchedError::NotReady(id));
        }
        if len >= s.received {
            return Ok(());
        }
        if len <= s.sample_from {
            return Err(SchedError::Truncate {
                len,
                min: s.sample_from + 1,
            });
        }
        let old_queued = s.received - s.computed;
        let old_fresh = s.received.saturating_sub(s.high_water);
        s.received = len;
        s.computed = s.computed.min(len);
        s.complete_upto = s.complete_upto.min(len);
        s.sampled_upto = s.sampled_upto.min(len);
        s.high_water = s.high_water.min(len);
        s.table.truncate(s.computed);
        s.hashes.truncate(len / bs);
        let new_queued = s.received - s.computed;
        self.queued = self.queued.saturating_sub(old_queued) + new_queued;
        self.fresh = self.fresh.saturating_sub(old_fresh) + (s.received - s.high_water);
        Ok(())
    }

    /// Records the hash chain of `id`'s received full blocks, continuing those given before
    /// ([`BlockHash::chain`] over each block's input bytes, as the engine received them). A
    /// session whose leading blocks match blocks another session registered adopts them
    /// instead of computing them (prefix sharing); its own full blocks are registered once
    /// computed. Sessions that never call this share nothing.
    ///
    /// Errors: [`SchedError::UnknownSession`]; [`SchedError::Hashes`] if the hashes would
    /// cover more full blocks than the positions received.
    pub fn add_block_hashes(&mut self, id: SeqId, hashes: &[BlockHash]) -> Result<(), SchedError> {
        let bs = self.pool.block_size();
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(SchedError::UnknownSession(id))?;
        let total = s.hashes.len() + hashes.len();
        if total > s.received / bs {
            return Err(SchedError::Hashes {
                blocks: total,
                received: s.received,
            });
        }
        s.hashes.extend_from_slice(hashes);
        s.try_adopt = s.computed == 0 && !s.hashes.is_empty();
        if s.try_adopt {
            self.pending.insert((s.order, id));
        }
        Ok(())
    }

    /// Lets sessions with an empty table take over registered blocks matching their hash
    /// chain. Called at the start of each `schedule`.
    pub(crate) fn adopt_prefixes(&mut self) {
        let bs = self.pool.block_size();
        for &(_, id) in &self.pending {
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            if !std::mem::take(&mut s.try_adopt) || s.running || s.computed != 0 {
                continue;
            }
            let hashes = s.adoptable(bs).to_vec();
            if hashes.is_empty() || !s.table.is_empty() {
                continue;
            }
            let Ok(adopted) = s.table.adopt_prefix(&hashes) else {
                continue;
            };
            if adopted == 0 {
                continue;
            }
            s.computed = adopted;
            self.queued = self.queued.saturating_sub(adopted);
            self.fresh = self
                .fresh
                .saturating_sub(adopted.saturating_sub(s.high_water));
            s.high_water = s.high_water.max(adopted);
            if s.sampled_upto < s.complete_upto && s.complete_upto <= adopted {
                // Not reached: `adoptable` keeps the owed position out of the adoption.
                s.sampled_upto = s.complete_upto;
            }
            self.totals.prefix_hit_tokens += adopted as u64;
        }
    }

    /// Removes a session and releases its blocks. If it is in the batch being run, that
    /// batch's item for it is ignored by [`Scheduler::update`].
    pub fn remove(&mut self, id: SeqId) -> Result<(), SchedError> {
        let s = self
            .sessions
            .remove(&id)
            .ok_or(SchedError::UnknownSession(id))?;
        self.order.remove(&s.order);
        self.pending.remove(&(s.order, id));
        self.queued = self.queued.saturating_sub(s.remaining());
        self.fresh = self
            .fresh
            .saturating_sub(s.received.saturating_sub(s.high_water));
        Ok(())
    }

    /// Records that the engine ran `batch` (the last one [`Scheduler::schedule`] returned):
    /// each item's positions are computed, and items with `sample` produced their token.
    /// Sessions in `outcome.finished` are parked: they owe no token and are not scheduled
    /// until [`Scheduler::push`] gives them new input.
    ///
    /// Every scheduled batch must be passed here exactly once. Items of sessions removed in
    /// between, or that do not match a session's marks, are ignored.
    pub fn update(&mut self, batch: &Batch, outcome: &StepOutcome) {
        for item in &batch.items {
            let Some(s) = self.sessions.get_mut(&item.id) else {
                continue;
            };
            if !s.running {
                continue;
            }
            s.running = false;
            let end = item.start.saturating_add(item.len);
            if item.start == s.computed && end <= s.table.len() && end <= s.received {
                s.computed = end;
                self.fresh = self.fresh.saturating_sub(end.saturating_sub(s.high_water));
                s.high_water = s.high_water.max(end);
                self.queued = self.queued.saturating_sub(item.len);
                if item.sample {
                    s.sampled_upto = s.sampled_upto.max(end);
                }
            }
            // Keeps `table.len() == computed` even for an item that did not match.
            s.table.truncate(s.computed);
            // Full blocks now computed become adoptable by other sessions.
            let bs = self.pool.block_size();
            let full = (s.computed / bs).min(s.hashes.len());
            for i in s.table.hashes().len()..full {
                if s.table.register_full_block(i, s.hashes[i]).is_err() {
                    break;
                }
            }
        }
        for id in &outcome.finished {
            if let Some(s) = self.sessions.get_mut(id) {
                s.parked = true;
                s.sampled_upto = s.sampled_upto.max(s.complete_upto);
            }
        }
    }

    /// The session's block table, for the engine's paged view of the cache.
    pub fn table(&self, id: SeqId) -> Option<&BlockTable> {
        self.sessions.get(&id).map(|s| &s.table)
    }

    pub fn state(&self, id: SeqId) -> Option<SeqState> {
        self.sessions.get(&id).map(Session::state)
    }

    /// The session's position marks.
    pub fn progress(&self, id: SeqId) -> Option<SeqProgress> {
        self.sessions.get(&id).map(Session::progress)
    }

    pub fn num_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Positions received and not yet computed, over all sessions (recomputation after a
    /// preemption included).
    pub fn num_queued_tokens(&self) -> usize {
        self.queued
    }

    /// Positions received and never computed, over all sessions: the input still owed to the
    /// devices, which `max_queued_tokens` limits. Equal to [`Scheduler::num_queued_tokens`]
    /// minus the positions waiting to be recomputed after preemptions.
    pub fn num_fresh_tokens(&self) -> usize {
        self.fresh
    }

    /// Live session ids, oldest first.
    pub fn session_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.order.values().copied()
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn stats(&self) -> SchedStats {
        let mut st = SchedStats {
            steps: self.totals.steps,
            preemptions: self.totals.preemptions,
            scheduled_tokens: self.totals.scheduled_tokens,
            recomputed_tokens: self.totals.recomputed_tokens,
            prefix_hit_tokens: self.totals.prefix_hit_tokens,
            peak_used_blocks: self.totals.peak_used_blocks,
            peak_shared_blocks: self.totals.peak_shared_blocks,
            peak_held_positions: self.totals.peak_held_positions,
            shared_blocks: self.pool.num_shared(),
            queued_tokens: self.queued,
            fresh_tokens: self.fresh,
            free_blocks: self.pool.num_free(),
            total_blocks: self.pool.num_blocks(),
            ..SchedStats::default()
        };
        for s in self.sessions.values() {
            st.held_positions += s.table.len();
            match s.state() {
                SeqState::WaitingForInput => st.sessions_waiting += 1,
                SeqState::Ready => st.sessions_ready += 1,
                SeqState::Running => st.sessions_running += 1,
            }
        }
        st
    }
}
