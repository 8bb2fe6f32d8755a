//! What crosses between the scheduler and the engine each step.
//!
//! A [`Batch`] is built by [`crate::Scheduler::schedule`] and handed back, unchanged, to
//! [`crate::Scheduler::update`] together with the engine's [`StepOutcome`]. Invariants of
//! every batch the scheduler builds: no item has `len == 0`; a session appears in at most one
//! item; the items' lengths sum to at most `max_batch_tokens` and there are at most
//! `max_batch_seqs` of them; no session in `preempted` has an item.

use tandem_kvcache::CopyOp;

use crate::config::SeqId;

/// One sequence's share of a batch: compute positions `[start, start + len)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchItem {
    pub id: SeqId,
    /// The session's computed positions before this step (its KV covers `[0, start)`).
    pub start: usize,
    pub len: usize,
    /// Sample a token from the logits of the item's last position.
    pub sample: bool,
    /// Rows, at the end of the item, whose logits are each sampled: 1 for a plain decode step
    /// or a prompt's end, `1 + drafts` for a speculative step, 0 when `sample` is false.
    pub sample_rows: usize,
}

impl BatchItem {
    /// One past the item's last position.
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

/// The work of one engine step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// In the order the engine must lay out rows: all of an item's positions are contiguous,
    /// items follow each other.
    pub items: Vec<BatchItem>,
    /// Copy-on-write copies the storage must perform before the forward pass.
    pub copies: Vec<CopyOp>,
    /// Sessions whose KV was dropped this step; they will be recomputed from position 0.
    pub preempted: Vec<SeqId>,
}

impl Batch {
    /// Whether there is nothing to run (a batch may still report preemptions).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Positions to compute in this step.
    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|i| i.len).sum()
    }

    /// Items that end in a sampled position.
    pub fn num_samples(&self) -> usize {
        self.items.iter().filter(|i| i.sample).count()
    }

    /// Rows whose logits are sampled (a speculative item samples several).
    pub fn num_sampled_rows(&self) -> usize {
        self.items.iter().map(|i| i.sample_rows).sum()
    }
}

/// What the engine reports after running a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Sessions whose generation ended this step (end of sequence, token limit, stop
    /// sequence, or cancelled). They are not scheduled again until they receive new input.
    pub finished: Vec<SeqId>,
}
