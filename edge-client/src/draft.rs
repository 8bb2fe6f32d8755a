//! Drafting for speculation across the split: guesses of the next tokens that the device
//! makes on its own, so that one round trip can confirm several tokens.
//!
//! [`PromptLookup`] finds the longest recent n-gram that ends the context and occurred
//! before, and proposes the tokens that followed it then (extraction-style outputs repeat
//! spans of the prompt). It needs no model and costs O(context × n) per call. The drafts
//! never leave the device as ids: the cloud sees their hidden rows only (see
//! docs/protocol.md §6). A small on-device draft model would implement [`Drafter`] too.

/// Proposes up to `max` tokens to follow `context` (the prompt and the output so far).
pub trait Drafter: Send {
    fn draft(&mut self, context: &[u32], max: usize) -> Vec<u32>;
}

/// Prompt lookup: the longest n-gram (from `max_ngram` down to `min_ngram` tokens) ending
/// the context that also occurs earlier; the tokens after its latest earlier occurrence.
#[derive(Clone, Debug)]
pub struct PromptLookup {
    pub max_ngram: usize,
    pub min_ngram: usize,
}

impl Default for PromptLookup {
    fn default() -> Self {
        Self {
            max_ngram: 3,
            min_ngram: 1,
        }
    }
}

impl Drafter for PromptLookup {
    fn draft(&mut self, context: &[u32], max: usize) -> Vec<u32> {
        if max == 0 {
            return Vec::new();
        }
        let len = context.len();
        for n in (self.min_ngram.max(1)..=self.max_ngram).rev() {
            if n >= len {
                continue;
            }
            let tail = &context[len - n..];
            // Latest earlier occurrence first: the most recent span is the likeliest.
            for start in (0..len - n).rev() {
                if &context[start..start + n] == tail {
                    let from = start + n;
                    let to = (from + max).min(len);
                    if from < to {
                        return context[from..to].to_vec();
                    }
                }
            }
        }
        Vec::new()
    }
}

/// How many drafts to send next: follows the acceptance of the last answers (all accepted:
/// one more; none: half as many; some: one more than were accepted), within `[1, max]`.
#[derive(Clone, Debug)]
pub struct DraftLength {
    max: usize,
    current: usize,
}

impl DraftLength {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            current: max.min(4),
        }
    }

    /// The draft length to use now (0 when speculation is off).
    pub fn get(&self) -> usize {
        self.current.min(self.max)
    }

    /// Records an answer to `sent` drafts of which `accepted` counted.
    pub fn update(&mut self, sent: usize, accepted: usize) {
        if sent == 0 || self.max == 0 {
            return;
        }
        self.current = if accepted == sent {
            self.current + 1
        } else if accepted == 0 {
            self.current / 2
        } else {
            accepted + 1
        }
        .clamp(1, self.max);
    }
}

/// The device's verdict on a whole answer to `drafts` (docs/protocol.md §6): `answer` holds
/// the cloud's tokens in order (the one that counts, then one per draft row it sampled
/// after), and the result is how many drafts count: the longest run `drafts[i] ==
/// answer[i]` that still has a token after it. The tokens that count are
/// `answer[..=result]`. Used by `tandem-edge`'s driver and the load generator's devices.
pub fn accepted_drafts(drafts: &[u32], answer: &[u32]) -> usize {
    let mut accepted = 0;
    while accepted < drafts.len()
        && accepted + 1 < answer.len()
        && drafts[accepted] == answer[accepted]
    {
        accepted += 1;
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_drafts_is_the_matching_prefix_with_a_token_after_it() {
        // All three drafts right, and a token after the last: three count (four tokens).
        assert_eq!(accepted_drafts(&[5, 6, 7], &[5, 6, 7, 8]), 3);
        // The second draft is wrong: one counts (tokens 5 and 9).
        assert_eq!(accepted_drafts(&[5, 6, 7], &[5, 9, 1, 2]), 1);
        // The first is wrong: none.
        assert_eq!(accepted_drafts(&[4, 6], &[5, 6, 7]), 0);
        // The answer stopped early (a draft token that ends the generation): a draft counts
        // only with a token after it.
        assert_eq!(accepted_drafts(&[5, 6, 7], &[5, 6]), 1);
        assert_eq!(accepted_drafts(&[], &[3]), 0);
    }

    #[test]
    fn prompt_lookup_continues_the_latest_match_of_the_longest_ngram() {
        let mut d = PromptLookup::default();
        // "… 7 8 9 10 11 … 7 8 9" → propose "10 11".
        let ctx = [1, 7, 8, 9, 10, 11, 2, 3, 7, 8, 9];
        assert_eq!(d.draft(&ctx, 2), vec![10, 11]);
        assert_eq!(d.draft(&ctx, 5), vec![10, 11, 2, 3, 7]);
        // Only a 1-gram matches: its latest occurrence.
        assert_eq!(d.draft(&[5, 6, 5, 9, 5], 2), vec![9, 5]);
        // Nothing to continue.
        assert!(d.draft(&[1, 2, 3], 4).is_empty());
        assert!(d.draft(&ctx, 0).is_empty());
        assert!(d.draft(&[], 3).is_empty());
    }

    #[test]
    fn draft_length_follows_acceptance() {
        let mut l = DraftLength::new(6);
        assert_eq!(l.get(), 4);
        l.update(4, 4);
        assert_eq!(l.get(), 5);
        l.update(5, 5);
        l.update(6, 6);
        assert_eq!(l.get(), 6, "capped");
        l.update(6, 0);
        assert_eq!(l.get(), 3);
        l.update(3, 1);
        assert_eq!(l.get(), 2);
        l.update(2, 0);
        l.update(1, 0);
        assert_eq!(l.get(), 1, "never below one while on");
        assert_eq!(DraftLength::new(0).get(), 0, "off");
    }
}
