//! One session's bookkeeping: four position marks, its block table and two flags.
//!
//! Marks, all counted in positions from the start of the session:
//! - `received`: positions whose hidden states the server holds;
//! - `computed`: positions whose KV is in the session's blocks;
//! - `complete_upto`: the end of the last complete input (a whole prompt or a decode input);
//! - `sampled_upto`: the end of the last input whose token was produced;
//! - `sample_from`: where the last complete input's sampled rows start: `complete_upto - 1`,
//!   or earlier by its drafts (speculation: the cloud samples after the row before the drafts
//!   and after every draft row). An item never ends inside those rows, so they are sampled in
//!   one step.
//!
//! Invariants, for a session that is not running:
//! - `computed <= received`, `sampled_upto <= complete_upto <= received`;
//! - the table holds exactly `computed` positions (while running it holds `computed + len`
//!   of its item);
//! - if `complete_upto > sampled_upto` (a token is owed) then `received == complete_upto`:
//!   [`crate::Scheduler::push`] refuses input until the token is produced, so the owed
//!   input is always the last one.
//!
//! Every method is O(1) (the table's `blocks_needed` takes the pool's lock once).

use tandem_kvcache::{BlockHash, BlockTable};

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqState {
    /// Nothing to compute: everything received is computed and any token owed was produced
    /// (or the session's generation finished and no new input arrived).
    WaitingForInput,
    /// Positions are waiting to be computed (including after a preemption).
    Ready,
    /// In the batch last scheduled, until [`crate::Scheduler::update`].
    Running,
}

/// A snapshot of a session's marks (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqProgress {
    pub received: usize,
    pub computed: usize,
    pub complete_upto: usize,
    pub sampled_upto: usize,
    /// Its generation finished and no input arrived since: not scheduled.
    pub parked: bool,
}

#[derive(Debug)]
pub(crate) struct Session {
    /// Admission order: smaller is older. Unique over the scheduler's life.
    pub(crate) order: u64,
    pub(crate) table: BlockTable,
    pub(crate) received: usize,
    pub(crate) computed: usize,
    pub(crate) complete_upto: usize,
    pub(crate) sampled_upto: usize,
    pub(crate) sample_from: usize,
    /// The most positions ever computed; what lies below it and is computed again is
    /// recomputation (a statistic).
    pub(crate) high_water: usize,
    pub(crate) running: bool,
    pub(crate) parked: bool,
    /// Hash chain of the received full blocks' input (see [`crate::Scheduler::add_block_hashes`]).
    pub(crate) hashes: Vec<BlockHash>,
    /// The table is empty and hashes are known: `schedule` tries to adopt shared blocks.
    pub(crate) try_adopt: bool,
    /// The scheduler's tick (calls of `schedule`) when this session was admitted or last given
    /// an item.
    pub(crate) last_step: u64,
    /// Preempted while it waited for its device: not recomputed until its device sends more
    /// (which clears this), so that the blocks it gave up serve the session that needed them.
    pub(crate) dormant: bool,
}

impl Session {
    pub(crate) fn new(order: u64, table: BlockTable) -> Self {
        Self {
            order,
            table,
            received: 0,
            computed: 0,
            complete_upto: 0,
            sampled_upto: 0,
            sample_from: 0,
            high_water: 0,
            running: false,
            parked: false,
            hashes: Vec::new(),
            try_adopt: false,
            last_step: 0,
            dormant: false,
        }
    }

    /// Positions received and not computed.
    pub(crate) fn remaining(&self) -> usize {
        self.received.saturating_sub(self.computed)
    }

    /// A complete input's token has not been produced yet.
    pub(crate) fn owes_token(&self) -> bool {
        self.complete_upto > self.sampled_upto
    }

    /// Whether `schedule` may give this session an item.
    pub(crate) fn is_schedulable(&self) -> bool {
        !self.parked && !self.dormant && !self.running && self.received > self.computed
    }

    /// Whether an item ending at `end` must produce a token.
    pub(crate) fn samples_at(&self, end: usize) -> bool {
        end == self.complete_upto && self.owes_token()
    }

    /// Rows an item ending at `end` samples after (its last ones): the owed input's sampled
    /// rows when it ends that input, else 0.
    pub(crate) fn sample_rows_at(&self, end: usize) -> usize {
        if self.samples_at(end) {
            self.complete_upto - self.sample_from
        } else {
            0
        }
    }

    /// The longest item from `computed` of at most `want` positions that does not end inside
    /// the owed input's sampled rows (0 when even the shortest would).
    pub(crate) fn clip_to_window(&self, want: usize) -> usize {
        let end = self.computed + want;
        if self.owes_token() && end > self.sample_from && end < self.complete_upto {
            self.sample_from.saturating_sub(self.computed)
        } else {
            want
        }
    }

    /// A decode: the next item is one step of generation (one position, or the token before
    /// the drafts and the drafts), not a prompt chunk.
    pub(crate) fn is_decode(&self) -> bool {
        self.remaining() == 1
            || (self.owes_token()
                && self.computed == self.sample_from
                && self.received == self.complete_upto
                && self.complete_upto - self.sample_from > 1)
    }

    pub(crate) fn holds_blocks(&self) -> bool {
        !self.table.blocks().is_empty()
    }

    pub(crate) fn state(&self) -> SeqState {
        if self.running {
            SeqState::Running
        } else if !self.parked && !self.dormant && self.received > self.computed {
            SeqState::Ready
        } else {
            SeqState::WaitingForInput
        }
    }

    pub(crate) fn progress(&self) -> SeqProgress {
        SeqProgress {
            received: self.received,
            computed: self.computed,
            complete_upto: self.complete_upto,
            sampled_upto: self.sampled_upto,
            parked: self.parked,
        }
    }

    /// Drops the session's KV: it will be recomputed from position 0. Its received, complete
    /// and sampled marks stay, so a token already produced is not produced again. Returns the
    /// positions that went back to the queue.
    pub(crate) fn drop_kv(&mut self) -> usize {
        self.table.truncate(0);
        self.try_adopt = !self.hashes.is_empty();
        std::mem::take(&mut self.computed)
    }

    /// The registered-block hashes this session may adopt now: its leading full blocks,
    /// minus the last one when adopting it would leave a token owed with no position left to
    /// compute (the logits of that position are needed).
    pub(crate) fn adoptable(&self, block_size: usize) -> &[BlockHash] {
        let mut n = self.hashes.len().min(self.received / block_size);
        if n > 0 && n * block_size == self.received && self.owes_token() {
            n -= 1;
        }
        &self.hashes[..n]
    }
}

#[cfg(test)]
mod tests {
    use tandem_kvcache::BlockPool;

    use super::*;

    #[test]
    fn state_and_sampling_follow_the_marks() {
        let pool = BlockPool::new(4, 4);
        let mut s = Session::new(0, pool.new_table());
        assert_eq!(s.state(), SeqState::WaitingForInput);
        s.received = 6;
        s.complete_upto = 6;
        assert_eq!(s.state(), SeqState::Ready);
        assert!(s.is_schedulable());
        assert!(
            !s.samples_at(4),
            "a chunk short of the input's end does not sample"
        );
        assert!(s.samples_at(6));
        s.sampled_upto = 6;
        assert!(
            !s.samples_at(6),
            "a token already produced is not produced again"
        );
        s.running = true;
        assert_eq!(s.state(), SeqState::Running);
        assert!(!s.is_schedulable());
        s.running = false;
        s.parked = true;
        assert_eq!(s.state(), SeqState::WaitingForInput);
        assert!(!s.is_schedulable());
    }

    #[test]
    fn drop_kv_releases_blocks_and_keeps_marks() {
        let pool = BlockPool::new(4, 4);
        let mut s = Session::new(0, pool.new_table());
        s.received = 7;
        s.complete_upto = 7;
        s.sampled_upto = 7;
        s.table.reserve(7).expect("fits");
        s.computed = 7;
        assert!(s.holds_blocks());
        assert_eq!(s.drop_kv(), 7);
        assert!(!s.holds_blocks());
        assert_eq!(pool.num_free(), 4);
        assert_eq!(s.remaining(), 7);
        assert_eq!(s.sampled_upto, 7);
    }
}
