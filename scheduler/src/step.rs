//! [`Scheduler::schedule`]: choosing one step's batch.
//!
//! Role: order the ready sessions by policy, give each an item under the token budget and the
//! sequence cap, reserve the item's KV blocks, and preempt by recompute when blocks run out.
//!
//! Invariants of the result: see [`crate::batch`]. In addition, every item starts at its
//! session's `computed` mark and ends at or before `received`, and its positions are reserved
//! in the session's table.
//!
//! Costs: O(S log S) to collect the candidates (S sessions; the admission order is a
//! `BTreeMap`), O(log len) `blocks_needed` calls per item to size it, and O(S) per preemption
//! to find the victim. A step preempts at most S sessions.

use std::collections::HashSet;
use std::ops::Bound;

use tandem_kvcache::BlockTable;

use crate::batch::{Batch, BatchItem};
use crate::config::{Policy, SeqId};
use crate::scheduler::Scheduler;

/// Calls of `schedule` a session must go without an item (waiting for its device) before
/// rule 3 of the preemption rule may take its blocks for another session. The engine calls
/// `schedule` once per step, and every 20 ms while work is blocked on KV blocks, so this is a
/// few seconds at most; decoding sessions get an item every call or two and never qualify.
pub const IDLE_STEPS_BEFORE_EVICTION: u64 = 64;

/// The batch being built.
struct Step {
    batch: Batch,
    /// Positions still allowed in this batch.
    budget: usize,
    /// Sessions preempted during this step: not scheduled again until the next one.
    dropped: HashSet<SeqId>,
}

impl Scheduler {
    /// Chooses the next batch, reserves its KV blocks and returns it. The engine runs it and
    /// then passes it to [`Scheduler::update`].
    ///
    /// A *decode* is a ready session with exactly one position left to compute; a *prefill*
    /// has more (a prompt, or a recomputation after preemption). Each kind is taken oldest
    /// first, by admission order, and each item takes `min(remaining, budget left)` positions,
    /// so a long prompt is split into chunks over several steps. The batch stops growing at
    /// `max_batch_tokens` positions or `max_batch_seqs` items.
    /// - [`Policy::DecodeFirst`]: all decodes, then prefill chunks, at most
    ///   [`Scheduler::prefill_cap`] positions of them when sessions decode; under that cap
    ///   the oldest prompt gets a quarter of it and the prompts with the fewest positions
    ///   left the rest.
    /// - [`Policy::PrefillFirst`]: prefill chunks only if any session has a prefill pending;
    ///   decodes only when there is none, or when no prefill could get KV blocks (otherwise
    ///   older decoding sessions holding the blocks and a newer prompt would wait on each other
    ///   forever).
    ///
    /// **Preemption rule.** Before taking an item the scheduler checks that the pool has the
    /// blocks it needs. If not, it preempts by recompute, one victim at a time, until the item
    /// fits:
    /// 1. the most recently admitted session that holds blocks, is not in this batch (nor
    ///    running an earlier batch), and was admitted *after* the session asking (vLLM's
    ///    rule: the newest loses; a session is never preempted in favour of a newer one, so
    ///    the oldest session with work always progresses and the schedule cannot livelock);
    /// 2. failing that, the most recently admitted *parked* session (its generation finished
    ///    and no input arrived since) that holds blocks, whatever its age: it is not
    ///    generating, and without this a pool filled by finished sessions that the engine keeps
    ///    for a next turn would block every other session;
    /// 3. failing that, the session that has waited for its device the longest, once it has
    ///    had no item for [`IDLE_STEPS_BEFORE_EVICTION`] calls, whatever its age: without this,
    ///    sessions whose devices think for minutes fill the pool and every session admitted
    ///    after them waits forever. Such a victim is *dormant*: it is recomputed only when its
    ///    device sends more, not at once (which would take the blocks straight back).
    ///
    /// The victim's table is emptied and its `computed` mark set to 0 (its received, complete
    /// and sampled marks stay, so it will not produce a token twice); it is listed in
    /// `Batch::preempted` and becomes ready again from the next step. If no victim is left,
    /// the item shrinks to the positions that fit, or is skipped this step.
    pub fn schedule(&mut self) -> Batch {
        self.ticks += 1;
        self.adopt_prefixes();
        let (decodes, mut prefills) = self.candidates();
        let had_work = !(decodes.is_empty() && prefills.is_empty());
        let mut step = Step {
            batch: Batch::default(),
            budget: self.cfg.max_batch_tokens,
            dropped: HashSet::new(),
        };
        match self.cfg.policy {
            Policy::DecodeFirst => {
                self.fill(&mut step, &decodes);
                let d = step.batch.items.len();
                self.recent_decodes = (d as f64).max(self.recent_decodes * 0.8);
                let cap = self.prefill_cap(d);
                step.budget = step.budget.min(cap);
                if cap != usize::MAX && !prefills.is_empty() {
                    // Under the cap, prompts share a thin stream of positions. The prompts
                    // with the fewest positions left go first (stable: oldest first among
                    // equals), or one long document would hold every short chat turn for
                    // many steps; but the oldest prompt always gets at least a quarter of the
                    // stream (and whatever the others leave), so nothing starves.
                    let oldest = prefills.remove(0);
                    let remaining = |id: &SeqId| self.sessions.get(id).map_or(0, |s| s.remaining());
                    prefills.sort_by_key(remaining);
                    let others: usize = prefills.iter().map(remaining).sum();
                    let budget = step.budget;
                    let share = (cap / 4)
                        .max(1)
                        .max(budget.saturating_sub(others))
                        .min(budget);
                    step.budget = share;
                    self.fill(&mut step, &[oldest]);
                    step.budget += budget - share;
                }
                self.fill(&mut step, &prefills);
            }
            Policy::PrefillFirst => {
                self.fill(&mut step, &prefills);
                if step.batch.items.is_empty() {
                    self.fill(&mut step, &decodes);
                }
            }
        }
        self.blocked = had_work && step.batch.is_empty();
        if !step.batch.is_empty() {
            self.totals.steps += 1;
            let used = self.pool.num_used();
            if used > self.totals.peak_used_blocks {
                self.totals.peak_used_blocks = used;
                self.totals.peak_shared_blocks = self.pool.num_shared();
                self.totals.peak_held_positions =
                    self.sessions.values().map(|s| s.table.len()).sum();
            }
        }
        step.batch
    }

    /// Schedulable sessions, oldest first: (decodes, prefills). Sessions of the pending set
    /// that have no work left and are not running leave it (new input brings them back).
    fn candidates(&mut self) -> (Vec<SeqId>, Vec<SeqId>) {
        let mut decodes = Vec::new();
        let mut prefills = Vec::new();
        let mut idle = Vec::new();
        for &(order, id) in &self.pending {
            let Some(s) = self.sessions.get(&id) else {
                idle.push((order, id));
                continue;
            };
            if !s.is_schedulable() {
                if !s.running && !s.try_adopt {
                    idle.push((order, id));
                }
                continue;
            }
            if s.is_decode() {
                decodes.push(id);
            } else {
                prefills.push(id);
            }
        }
        for key in idle {
            self.pending.remove(&key);
        }
        (decodes, prefills)
    }

    /// Gives an item to each of `ids` in turn while budget and cap allow.
    fn fill(&mut self, step: &mut Step, ids: &[SeqId]) {
        for &id in ids {
            if step.budget == 0 || step.batch.items.len() >= self.cfg.max_batch_seqs {
                return;
            }
            if step.dropped.contains(&id) {
                continue;
            }
            let Some(want) = self
                .sessions
                .get(&id)
                .map(|s| s.clip_to_window(s.remaining().min(step.budget)))
            else {
                continue;
            };
            if want == 0 {
                // The speculative rows do not fit the budget left: next step.
                continue;
            }
            let placed = self.place(id, want, step);
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            // Fewer blocks than wanted may have cut into the sampled rows.
            let len = s.clip_to_window(placed);
            if len < placed {
                s.table.truncate(s.computed + len);
            }
            if len == 0 {
                continue;
            }
            let start = s.computed;
            let end = start + len;
            let sample = s.samples_at(end);
            let sample_rows = s.sample_rows_at(end);
            s.running = true;
            s.last_step = self.ticks;
            let recomputed = s.high_water.min(end).saturating_sub(start);
            self.totals.recomputed_tokens += recomputed as u64;
            self.totals.scheduled_tokens += len as u64;
            step.budget -= len;
            step.batch.items.push(BatchItem {
                id,
                start,
                len,
                sample,
                sample_rows,
            });
        }
    }

    /// Reserves blocks for up to `want` positions of `id`, preempting as the rule allows.
    /// Returns the positions reserved (0: skip the session this step).
    fn place(&mut self, id: SeqId, want: usize, step: &mut Step) -> usize {
        let Some(order) = self.sessions.get(&id).map(|s| s.order) else {
            return 0;
        };
        while self
            .sessions
            .get(&id)
            .is_some_and(|s| s.table.blocks_needed(want) > self.pool.num_free())
        {
            let Some((victim, idle)) = self.pick_victim(order) else {
                break;
            };
            self.preempt(victim, idle, step);
        }
        let free = self.pool.num_free();
        let Some(s) = self.sessions.get_mut(&id) else {
            return 0;
        };
        let len = largest_fit(&s.table, want, free);
        if len == 0 {
            return 0;
        }
        match s.table.reserve(len) {
            Ok(copies) => {
                step.batch.copies.extend(copies);
                len
            }
            // Not reached: `len` was sized to the free blocks, and nothing else allocates.
            Err(_) => 0,
        }
    }

    /// The victim for a session admitted as `requester`, by the rule in `schedule`'s docs, and
    /// whether rule 3 chose it (it then goes dormant).
    fn pick_victim(&self, requester: u64) -> Option<(SeqId, bool)> {
        let evictable = |id: &SeqId| {
            self.sessions
                .get(id)
                .is_some_and(|s| !s.running && s.holds_blocks())
        };
        let newer = (Bound::Excluded(requester), Bound::Unbounded);
        self.order
            .range(newer)
            .rev()
            .map(|(_, id)| *id)
            .find(|id| evictable(id))
            .or_else(|| {
                self.order
                    .iter()
                    .rev()
                    .filter(|(o, _)| **o != requester)
                    .map(|(_, id)| *id)
                    .find(|id| evictable(id) && self.sessions.get(id).is_some_and(|s| s.parked))
            })
            .map(|id| (id, false))
            .or_else(|| {
                // Rule 3: the session idle at its device the longest, once idle long enough.
                let now = self.ticks;
                self.sessions
                    .iter()
                    .filter(|(_, s)| {
                        s.order != requester
                            && !s.running
                            && s.holds_blocks()
                            && s.remaining() == 0
                            && now.saturating_sub(s.last_step) >= IDLE_STEPS_BEFORE_EVICTION
                    })
                    .min_by_key(|(id, s)| (s.last_step, **id))
                    .map(|(id, _)| (*id, true))
            })
    }

    fn preempt(&mut self, id: SeqId, dormant: bool, step: &mut Step) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        // Taken for being idle at its device: it waits for its device again, not for a
        // recomputation.
        s.dormant = dormant;
        self.queued += s.drop_kv();
        self.pending.insert((s.order, id));
        self.totals.preemptions += 1;
        step.batch.preempted.push(id);
        step.dropped.insert(id);
    }
}

/// The most positions, up to `want`, that `table` can take with `free` blocks.
/// `blocks_needed` grows with the length, so a binary search finds it.
fn largest_fit(table: &BlockTable, want: usize, free: usize) -> usize {
    if table.blocks_needed(want) <= free {
        return want;
    }
    // fits(lo) and !fits(hi)
    let (mut lo, mut hi) = (0, want);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if table.blocks_needed(mid) <= free {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use tandem_kvcache::BlockPool;

    use super::largest_fit;

    #[test]
    fn largest_fit_fills_the_partial_block_then_whole_free_blocks() {
        let pool = BlockPool::new(3, 4);
        let mut t = pool.new_table();
        t.reserve(5).expect("fits"); // 2 blocks, 3 free slots in the second
        assert_eq!(largest_fit(&t, 100, 0), 3);
        assert_eq!(largest_fit(&t, 100, 1), 7);
        assert_eq!(largest_fit(&t, 6, 1), 6);
        assert_eq!(largest_fit(&t, 2, 0), 2);
        let empty = pool.new_table();
        assert_eq!(largest_fit(&empty, 9, 0), 0);
        assert_eq!(largest_fit(&empty, 9, 2), 8);
        assert_eq!(largest_fit(&empty, 0, 0), 0);
    }
}
