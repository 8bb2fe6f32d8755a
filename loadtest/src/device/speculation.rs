//! A drafting device's bookkeeping (see *Speculation* in [`crate::device`]): the adaptive draft
//! length, the answer waited for as its tokens arrive, and the ruling on it once whole.
//!
//! Synchronous and socket-free: the generation ([`super::run`]) feeds it the tokens received
//! and sends the frames it asks for; this module only says which tokens count, where the
//! next frame starts and what it drafts.

use tandem_edge::draft::{accepted_drafts, DraftLength, Drafter, PromptLookup};
use tandem_protocol::Token;

use super::Failure;

/// A drafting device's state.
pub(super) struct Speculation {
    drafter: PromptLookup,
    length: DraftLength,
    /// The `draft_cap` of the last token that counted (0 before the first answer).
    cloud_cap: usize,
    /// The answer waited for, from the frame sent last until it is whole.
    awaiting: Option<Awaiting>,
    /// Where the next decode frame starts, when the last one's drafts did not all count.
    next_at: Option<usize>,
    /// Positions the edge holds after the last frame (the next frame's first, but for a cut).
    edge_position: usize,
    /// The last token that counts is a draft token that ends the generation: its frame goes
    /// at once (that frame is the verdict the server waits for before `Done`).
    final_by_draft: bool,
    pub(super) drafted: u32,
    pub(super) accepted: u32,
}

/// The answer to one frame, as it arrives.
struct Awaiting {
    input_seq: u64,
    drafts: Vec<u32>,
    /// Position of the first draft.
    draft_first: usize,
    /// `(token id, last)` in order: the one that counts, then one per draft row.
    got: Vec<(u32, bool, u8)>,
}

impl Awaiting {
    fn is_whole(&self) -> bool {
        self.got.len() > self.drafts.len() || self.got.last().is_some_and(|g| g.1)
    }
}

/// What a `Token` did to the answer waited for.
pub(super) enum Receipt {
    /// Not part of it: resent after a resume (already here or already ruled on), or for
    /// another frame.
    Ignored,
    /// Added; more tokens of the answer are to come.
    Partial,
    /// Added, and the answer is whole: rule on it ([`Speculation::rule`]).
    Whole,
}

impl Speculation {
    pub(super) fn new(max: usize) -> Self {
        Self {
            drafter: PromptLookup::default(),
            length: DraftLength::new(max.min(usize::from(tandem_protocol::wire::MAX_DRAFTS))),
            cloud_cap: 0,
            awaiting: None,
            next_at: None,
            edge_position: 0,
            final_by_draft: false,
            drafted: 0,
            accepted: 0,
        }
    }

    /// The prompt's frames are made (the last is `input_seq`) for a prompt of `prompt_len`
    /// positions: their answer is the first one waited for.
    pub(super) fn expect_prompt_answer(&mut self, prompt_len: usize, input_seq: u64) {
        self.edge_position = prompt_len;
        self.awaiting = Some(Awaiting {
            input_seq,
            drafts: Vec::new(),
            draft_first: prompt_len,
            got: Vec::new(),
        });
    }

    /// Where the next decode frame starts, when the last ruling cut the edge's drafts (taken:
    /// the frame about to be made starts there).
    pub(super) fn take_restart(&mut self) -> Option<usize> {
        self.next_at.take()
    }

    /// A decode frame is made (`input_seq`, starting at `at` when the edge was cut back,
    /// carrying `drafts`): its answer is the one waited for now.
    pub(super) fn expect_answer(&mut self, input_seq: u64, at: Option<usize>, drafts: Vec<u32>) {
        let position = at.unwrap_or(self.edge_position);
        self.edge_position = position + 1 + drafts.len();
        self.awaiting = Some(Awaiting {
            input_seq,
            draft_first: position + 1,
            drafts,
            got: Vec::new(),
        });
    }

    /// Whether no answer is waited for (the last one was ruled on).
    pub(super) fn ruled(&self) -> bool {
        self.awaiting.is_none()
    }

    /// Tokens of the answer under way, before the device rules on it.
    pub(super) fn answer_so_far(&self) -> usize {
        self.awaiting.as_ref().map_or(0, |a| a.got.len())
    }

    /// Whether the last token that counts is a draft token ending the generation.
    pub(super) fn final_by_draft(&self) -> bool {
        self.final_by_draft
    }

    /// A `Token` of the answer waited for, after `have` tokens that count.
    pub(super) fn receive(&mut self, t: &Token, have: usize) -> Result<Receipt, Failure> {
        let Some(aw) = self.awaiting.as_mut() else {
            return Ok(Receipt::Ignored); // resent after a resume: already ruled on
        };
        if t.input_seq != aw.input_seq {
            return Ok(Receipt::Ignored);
        }
        let have = (have + aw.got.len()) as u64;
        if t.seq < have {
            return Ok(Receipt::Ignored); // resent after a resume: already here
        }
        if t.seq > have || t.draft == aw.got.is_empty() || aw.got.len() > aw.drafts.len() {
            return Err(Failure::Protocol(format!(
                "token {} (draft: {}) does not continue the answer to {} drafts after {have} tokens",
                t.seq,
                t.draft,
                aw.drafts.len()
            )));
        }
        aw.got.push((t.token_id, t.last, t.draft_cap));
        Ok(if aw.is_whole() {
            Receipt::Whole
        } else {
            Receipt::Partial
        })
    }

    /// Rules on the answer waited for: the ids of the tokens that count (`None` when no
    /// answer was waited for).
    pub(super) fn rule(&mut self) -> Option<Vec<u32>> {
        let aw = self.awaiting.take()?;
        let answer: Vec<u32> = aw.got.iter().map(|g| g.0).collect();
        let accepted = accepted_drafts(&aw.drafts, &answer);
        if aw.drafts.is_empty() {
            self.next_at = None;
        } else {
            self.drafted += aw.drafts.len() as u32;
            self.accepted += accepted as u32;
            self.length.update(aw.drafts.len(), accepted);
            self.next_at = Some(aw.draft_first + accepted);
        }
        let counted = &aw.got[..=accepted.min(aw.got.len().saturating_sub(1))];
        self.final_by_draft = counted.last().is_some_and(|g| g.1);
        if let Some(g) = counted.last() {
            self.cloud_cap = usize::from(g.2);
        }
        Some(counted.iter().map(|g| g.0).collect())
    }

    /// Drafts for the next decode step (as `tandem-edge`'s driver makes them): at most
    /// `left` (the tokens the generation may still take), none when the last token `ends`
    /// it. `context` (the prompt and the output so far) is asked for only when drafting.
    pub(super) fn drafts(
        &mut self,
        left: usize,
        ends: bool,
        context: impl FnOnce() -> Vec<u32>,
    ) -> Vec<u32> {
        if ends || self.final_by_draft {
            return Vec::new();
        }
        let max = self.length.get().min(self.cloud_cap).min(left);
        if max == 0 {
            return Vec::new();
        }
        let mut drafts = self.drafter.draft(&context(), max);
        drafts.truncate(max);
        drafts
    }
}
