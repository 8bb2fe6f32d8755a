//! Counting what the attacks got right in one cell of the audit, and the per-attack summaries
//! a [`super::Cell`] carries. Pure bookkeeping: no tensors, no model.

use serde::Serialize;

use crate::exhaustive::PositionOutcome;
use crate::pairs::PairsRecovery;

/// What the exhaustive attack found in one cell, and what it cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExhaustiveSummary {
    pub recovery: f64,
    pub sensitive_recovery: f64,
    /// `exact_match` (noise-free: stops at a row within the tolerance) or `nearest`.
    pub stop: String,
    /// Candidates per position at most (`None`: every non-special token).
    pub budget: Option<usize>,
    pub positions: usize,
    /// Positions where a row matched within the tolerance.
    pub matched: usize,
    /// Positions that went through the whole vocabulary or the budget.
    pub exhausted: usize,
    pub mean_candidates: f64,
    pub max_candidates: usize,
    /// Largest relative distance of a matched pick (round-off plus wire rounding).
    pub max_match_distance: f64,
    /// Smallest relative distance of a runner-up at a matched position, among the
    /// candidates evaluated there: the margin the tolerance must stay under (`None`: no
    /// runner-up evaluated).
    pub min_runner_up: Option<f64>,
    /// Edge-layer FLOPs spent on candidates (attention at each candidate's position).
    pub tflops: f64,
    pub seconds: f64,
}

/// Running counts of one cell.
#[derive(Default)]
pub struct Tally {
    pub tokens: usize,
    pub sensitive: usize,
    pub nn: usize,
    pub nn_sensitive: usize,
    pub learned: usize,
    pub learned_sensitive: usize,
    pub steps: usize,
    pub agree: usize,
    pub drift: f64,
    /// Sum over steps of each step's largest drift.
    pub drift_sum: f64,
    pub rows: usize,
    pub exhaustive: ExhaustiveTally,
    /// One per number of pairs: (centroid, centroid sensitive, linear, linear sensitive).
    pub pairs: Vec<[usize; 4]>,
}

impl Tally {
    pub fn count(&mut self, sensitive: bool, nn: bool, learned: bool) {
        self.tokens += 1;
        self.nn += usize::from(nn);
        self.learned += usize::from(learned);
        if sensitive {
            self.sensitive += 1;
            self.nn_sensitive += usize::from(nn);
            self.learned_sensitive += usize::from(learned);
        }
    }

    /// Counts the `i`-th pairs attacker's two guesses on one token.
    pub fn count_pairs(&mut self, i: usize, sensitive: bool, centroid: bool, linear: bool) {
        if self.pairs.len() <= i {
            self.pairs.resize(i + 1, [0; 4]);
        }
        let c = &mut self.pairs[i];
        c[0] += usize::from(centroid);
        c[2] += usize::from(linear);
        if sensitive {
            c[1] += usize::from(centroid);
            c[3] += usize::from(linear);
        }
    }

    /// The pairs attackers' recovery, given each one's (pairs, distinct tokens).
    pub fn pairs_recovery(&self, sizes: &[(usize, usize)]) -> Vec<PairsRecovery> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &(pairs, distinct))| {
                let c = self.pairs.get(i).copied().unwrap_or([0; 4]);
                PairsRecovery {
                    pairs,
                    distinct_tokens: distinct,
                    centroid_recovery: ratio(c[0], self.tokens),
                    centroid_sensitive_recovery: ratio(c[1], self.sensitive),
                    linear_recovery: ratio(c[2], self.tokens),
                    linear_sensitive_recovery: ratio(c[3], self.sensitive),
                }
            })
            .collect()
    }
}

/// Running counts of the exhaustive attack.
#[derive(Default)]
pub struct ExhaustiveTally {
    pub right: usize,
    pub right_sensitive: usize,
    pub positions: usize,
    pub matched: usize,
    pub exhausted: usize,
    pub candidates: usize,
    pub max_candidates: usize,
    pub max_match_distance: f64,
    pub min_runner_up: Option<f64>,
    pub flops: f64,
    pub seconds: f64,
}

impl ExhaustiveTally {
    /// Counts one scored position; `limit` is the most candidates the search could try there,
    /// `flops_per_candidate` the cost of one candidate row at this position.
    pub fn count(
        &mut self,
        o: &PositionOutcome,
        right: bool,
        sensitive: bool,
        limit: usize,
        flops_per_candidate: f64,
    ) {
        self.positions += 1;
        self.right += usize::from(right);
        self.right_sensitive += usize::from(right && sensitive);
        self.candidates += o.candidates;
        self.max_candidates = self.max_candidates.max(o.candidates);
        self.flops += o.candidates as f64 * flops_per_candidate;
        if o.matched {
            self.matched += 1;
            self.max_match_distance = self.max_match_distance.max(o.relative_distance);
            if o.runner_up.is_finite() {
                let m = self
                    .min_runner_up
                    .map_or(o.runner_up, |m| m.min(o.runner_up));
                self.min_runner_up = Some(m);
            }
        }
        if !o.matched && o.candidates >= limit {
            self.exhausted += 1;
        }
    }

    /// The summary, given the tokens and sensitive tokens scored.
    pub fn summary(
        &self,
        tokens: usize,
        sensitive: usize,
        stop: &str,
        budget: Option<usize>,
    ) -> ExhaustiveSummary {
        ExhaustiveSummary {
            recovery: ratio(self.right, tokens),
            sensitive_recovery: ratio(self.right_sensitive, sensitive),
            stop: stop.to_owned(),
            budget,
            positions: self.positions,
            matched: self.matched,
            exhausted: self.exhausted,
            mean_candidates: ratio(self.candidates, self.positions),
            max_candidates: self.max_candidates,
            max_match_distance: self.max_match_distance,
            min_runner_up: self.min_runner_up,
            tflops: self.flops / 1e12,
            seconds: self.seconds,
        }
    }
}

pub fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
