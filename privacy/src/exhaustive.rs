//! Exhaustive inversion: the nearest-neighbour attack of [`crate::attack`] without its
//! shortlist. The server holds the weights; a decoder-only transformer's map from tokens to
//! hidden states is injective (Nikolaou et al., ICLR 2026), so it can read the prompt back
//! exactly by trying every token at every position.
//!
//! # The search
//! Left to right, given the prefix recovered so far (its K/V cached in a [`CandidateKv`]),
//! every non-special vocabulary token is a candidate for the position. Candidates are pushed
//! through the edge layers in batches that share the prefix (one batched forward of one-token
//! sequences per batch), clipped as the device clips, and compared with the received row in
//! L2. The candidates are visited in a *guided order*: by the best of each token's cheap
//! ranks (cosine with the raw embedding, and the hints the caller gives: in the audit, the
//! cosine of the learned decoder's output and of the output-pairs decoder's), ties by the
//! embedding-cosine rank, i.e. first the shortlist attack's candidates, then everything else.
//! The order is a permutation of the whole vocabulary: it changes when the search finds the
//! token, never whether it can.
//!
//! # When it stops ([`StopRule`])
//! - **Noise-free** observations ([`StopRule::ExactMatch`]): the true token's row differs
//!   from the received one only by float round-off (the device ran the prompt as one
//!   sequence, the attacker one position at a time) and the wire encoding's rounding, whose
//!   bound is known per row ([`wire_error_bound`]). The search stops at the first batch whose
//!   best row lies within `tolerance = relative · ‖row‖ + wire bound` and keeps the nearest
//!   candidate seen. It returns the true token unless another token's row also lies within
//!   the tolerance, which injectivity with a margin rules out; the margin (the runner-up's
//!   distance on a full sweep) is measured on the demo model in docs/privacy.md. When no row
//!   matches, the search runs through the whole vocabulary (or the budget) and the nearest
//!   wins, as a full search would.
//! - **Noisy** observations ([`StopRule::Nearest`]): no distance identifies the token, so
//!   the search evaluates the candidates up to the budget (whole vocabulary by default) and
//!   the nearest wins. With a budget below the vocabulary the figure is a lower bound.
//!
//! # Costs
//! Per position: two `[V, d]` matrix-vector products and three sorts of `V` for the order,
//! then one edge-layer forward row per candidate evaluated (about `2 × k ×` the layer's
//! matrix parameters FLOPs each, plus attention over the prefix), and one row to extend the
//! prefix. A full sweep of the demo model's 49,152 tokens at `k = 1` is about 0.35 TFLOP per
//! position; the exact-match stop makes the noise-free search cost what the guided order
//! needs (measured in docs/privacy.md).

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use tandem_model::EdgeModel;
use tandem_protocol::HiddenDtype;

use crate::attack::{candidate_distances, AttackerView, CandidateKv, EmbeddingIndex};

/// When the search may stop before the end of its order (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StopRule {
    /// Stop at a row within `relative · ‖row‖ +` the wire's rounding bound.
    ExactMatch { relative: f64 },
    /// Evaluate every candidate up to the budget; the nearest wins.
    Nearest,
}

/// The exhaustive attack's settings and what it needs.
#[derive(Debug)]
pub struct Exhaustive<'a> {
    pub edge: &'a EdgeModel,
    /// The embedding index: the first half of the guided order, and the excluded tokens.
    pub index: &'a EmbeddingIndex,
    pub view: AttackerView,
    pub stop: StopRule,
    /// Most candidates evaluated per position; `None`: every non-special token.
    pub budget: Option<usize>,
}

/// What the search did at one position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PositionOutcome {
    pub token: u32,
    /// Candidates pushed through the edge layers (0 for a known BOS).
    pub candidates: usize,
    /// Whether a row matched within the tolerance ([`StopRule::ExactMatch`] only).
    pub matched: bool,
    /// The pick's distance to the received row, relative to the row's norm.
    pub relative_distance: f64,
    /// The second-nearest candidate's relative distance among those evaluated (infinite when
    /// only one was).
    pub runner_up: f64,
}

/// First batch of a position (about the shortlist attack's candidates), then doubling.
const FIRST_BATCH: usize = 128;
/// Largest batch: big enough for efficient matrix products, small enough for the cache.
const MAX_BATCH: usize = 1024;

impl Exhaustive<'_> {
    /// Recovers the tokens of `received` (`[n, d]`, flat); position 0 is `known_first` when
    /// given. `hints` are more per-position token scores (`[n][V]`, higher is likelier: the
    /// learned decoders' cosines) that join the embedding cosine in the guided order.
    pub fn invert(
        &self,
        received: &[f32],
        known_first: Option<u32>,
        hints: &[Vec<Vec<f32>>],
    ) -> Result<Vec<PositionOutcome>> {
        let d = self.edge.config().hidden_size;
        ensure!(
            received.len().is_multiple_of(d),
            "received rows are not [n, {d}]"
        );
        let n = received.len() / d;
        let rows = Tensor::from_slice(received, (n, d), &Device::Cpu)?;
        let cos = self.index.cosine(&rows)?;
        ensure!(
            hints.iter().all(|h| h.len() == n),
            "a hint without one score row per position"
        );
        let mut kv = CandidateKv::new(self.edge.config().num_hidden_layers);
        let mut out = Vec::with_capacity(n);
        for (i, target) in received.chunks_exact(d).enumerate() {
            let outcome = match (i, known_first) {
                (0, Some(t)) => PositionOutcome {
                    token: t,
                    candidates: 0,
                    matched: true,
                    relative_distance: 0.0,
                    runner_up: f64::INFINITY,
                },
                _ => {
                    let mut sources = vec![cos[i].as_slice()];
                    sources.extend(hints.iter().map(|h| h[i].as_slice()));
                    let order = guided_order(&sources, self.index.excluded());
                    self.search(&mut kv, i, &order, target)?
                }
            };
            kv.extend(self.edge, outcome.token, i)?;
            out.push(outcome);
        }
        Ok(out)
    }

    /// Walks `order` in growing batches until the stop rule or the budget ends it.
    fn search(
        &self,
        kv: &mut CandidateKv,
        position: usize,
        order: &[u32],
        target: &[f32],
    ) -> Result<PositionOutcome> {
        let limit = self.budget.map_or(order.len(), |b| b.min(order.len()));
        ensure!(limit > 0, "no candidate to try at position {position}");
        let norm = target
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        let tolerance = match self.stop {
            StopRule::ExactMatch { relative } => {
                Some(relative * norm + wire_error_bound(target, self.view.wire))
            }
            StopRule::Nearest => None,
        };
        // (squared distance, token) of the nearest and the runner-up.
        let mut best = (f64::INFINITY, order[0]);
        let mut second = f64::INFINITY;
        let (mut tried, mut batch) = (0, FIRST_BATCH);
        let mut matched = false;
        while tried < limit {
            let end = (tried + batch).min(limit);
            let cands = &order[tried..end];
            let dists =
                candidate_distances(self.edge, kv, position, cands, target, self.view.clip)?;
            for (&dist, &t) in dists.iter().zip(cands) {
                if dist < best.0 {
                    second = best.0;
                    best = (dist, t);
                } else if dist < second {
                    second = dist;
                }
            }
            tried = end;
            batch = (batch * 2).min(MAX_BATCH);
            if tolerance.is_some_and(|tol| best.0.sqrt() <= tol) {
                matched = true;
                break;
            }
        }
        let rel = |sq: f64| sq.sqrt() / norm.max(f64::MIN_POSITIVE);
        Ok(PositionOutcome {
            token: best.1,
            candidates: tried,
            matched,
            relative_distance: rel(best.0),
            runner_up: rel(second),
        })
    }
}

/// Every token not in `excluded`, best first by its best rank over the score `sources`
/// (each `[V]`, higher is better; rows of another length are ignored), ties by the rank in
/// the first source, then the id, so the order is total and reproducible.
pub fn guided_order(sources: &[&[f32]], excluded: &[u32]) -> Vec<u32> {
    let Some(first) = sources.first() else {
        return Vec::new();
    };
    let v = first.len();
    let mut skip = vec![false; v];
    for &t in excluded {
        if let Some(s) = skip.get_mut(t as usize) {
            *s = true;
        }
    }
    let all: Vec<Vec<u32>> = sources
        .iter()
        .filter(|s| s.len() == v)
        .map(|s| ranks(s))
        .collect();
    let mut order: Vec<u32> = (0..v as u32).filter(|&t| !skip[t as usize]).collect();
    order.sort_unstable_by_key(|&t| {
        let t_ = t as usize;
        let best = all.iter().map(|r| r[t_]).min().unwrap_or(0);
        (best, all[0][t_], t)
    });
    order
}

/// `ranks(s)[t]`: the place of token `t` when `s` is sorted best first (NaN last).
fn ranks(scores: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    idx.sort_unstable_by(|&a, &b| {
        let (x, y) = (scores[a as usize], scores[b as usize]);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => a.cmp(&b),
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => y.total_cmp(&x).then(a.cmp(&b)),
        }
    });
    let mut rank = vec![0u32; scores.len()];
    for (r, &t) in idx.iter().enumerate() {
        rank[t as usize] = r as u32;
    }
    rank
}

/// An upper bound on the L2 distance between a row and its round trip through `wire`,
/// computed from the received row: f32 is exact; f16 and bf16 round each value to nearest
/// (relative error at most 2⁻¹¹ and 2⁻⁸; f16's subnormals add at most 2⁻²⁵ absolute); int8
/// moves each value by at most half its row's scale `max|x| / 127`, which the received row
/// reproduces (its largest value decodes to `±127 · scale`); int4 is bounded per value, see
/// [`int4_error_bound`].
pub fn wire_error_bound(received: &[f32], wire: HiddenDtype) -> f64 {
    let norm = || {
        received
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let sqrt_d = (received.len() as f64).sqrt();
    match wire {
        HiddenDtype::F32 => 0.0,
        // The bound on the original row, divided by (1 - u) to hold on the received one.
        HiddenDtype::F16 => {
            norm() * 2f64.powi(-11) / (1.0 - 2f64.powi(-11)) + sqrt_d * 2f64.powi(-25)
        }
        HiddenDtype::Bf16 => norm() * 2f64.powi(-8) / (1.0 - 2f64.powi(-8)),
        HiddenDtype::Int8 => {
            let max = received
                .iter()
                .fold(0f64, |m, &x| m.max(f64::from(x).abs()));
            sqrt_d * max / 127.0 / 2.0
        }
        HiddenDtype::Int4 => int4_error_bound(received),
    }
}

/// The int4 bound of [`wire_error_bound`], from the received row only (it does not say which
/// values were outliers, so each value gets the larger of the two bounds in
/// `tandem_protocol::f32_to_hidden`'s docs):
///
/// * an outlier moved by at most `|x| · 2⁻¹¹ + 2⁻²⁵`, i.e. `|x̂| · 2⁻¹¹ / (1 − 2⁻¹¹) + 2⁻²⁵`;
/// * any other value by at most `s_g · (1/2 + 7 · 2⁻²⁴)`, where the group's scale `s_g` is at
///   most `max_g |x̂| / 7` (its largest non-outlier decodes to `±7 · s_g`) and at most
///   `(1 + 2⁻¹⁰) · R / 7 + 2⁻²⁴`, with `R = R̂ / (1 − 2⁻¹¹)` and `R̂` the row's `(K+1)`-th
///   largest `|x̂|`: the `K` outliers and the largest non-outlier all come back at least
///   `(1 − 2⁻¹¹)` times that non-outlier's magnitude, which bounds every group's `m_g`.
///   (Both hold while `m_g / 7` is an f16 normal; below that `s_g < 2⁻¹⁴ · (1 + 2⁻¹⁰)`.)
fn int4_error_bound(received: &[f32]) -> f64 {
    use tandem_protocol::wire::{INT4_GROUP, INT4_OUTLIERS};
    let u = 2f64.powi(-11);
    let mut mags: Vec<f64> = received.iter().map(|&x| f64::from(x).abs()).collect();
    let k = INT4_OUTLIERS.min(mags.len());
    let r_hat = if mags.len() > k {
        mags.sort_unstable_by(|a, b| b.total_cmp(a));
        mags[k]
    } else {
        0.0
    };
    let row_scale = (1.0 + 2f64.powi(-10)) * r_hat / (1.0 - u) / 7.0 + 2f64.powi(-24);
    let per_step = 0.5 + 7.0 * 2f64.powi(-24);
    let mut sum = 0.0;
    for group in received.chunks(INT4_GROUP) {
        let group_max = group.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
        // Below f16's normal range (2⁻¹⁴) the rounded-up scale may exceed `m_g / 7` by up to
        // 2⁻²⁴, so the largest non-outlier need not decode to ±7: floor the bound there.
        let scale = (group_max / 7.0)
            .min(row_scale)
            .max(2f64.powi(-14) * (1.0 + 2f64.powi(-10)));
        let inlier = scale * per_step;
        for &x in group {
            let outlier = f64::from(x).abs() * u / (1.0 - u) + 2f64.powi(-25);
            sum += inlier.max(outlier).powi(2);
        }
    }
    sum.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocol::{f32_to_hidden, hidden_to_f32};

    #[test]
    fn guided_order_is_a_permutation_led_by_both_ranks() {
        let cos = [0.9, 0.1, 0.5, 0.7, 0.3, -0.2];
        let learned = [0.0, 0.95, 0.1, 0.2, 0.3, 0.4];
        let order = guided_order(&[&cos, &learned], &[5]);
        // Rank 0 of each source first (cosine's winner breaks the tie), then rank 1 of each.
        assert_eq!(&order[..4], &[0, 1, 3, 2]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4], "every non-excluded token once");
        assert_eq!(guided_order(&[&cos], &[]), vec![0, 3, 2, 4, 1, 5]);
        assert!(guided_order(&[], &[]).is_empty());
    }

    #[test]
    fn wire_bounds_hold_on_round_trips() {
        let mut state = 7u64;
        let row: Vec<f32> = (0..576)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i == 3 {
                    40.0
                } else {
                    3.0 * u
                }
            })
            .collect();
        for wire in [
            HiddenDtype::F32,
            HiddenDtype::F16,
            HiddenDtype::Bf16,
            HiddenDtype::Int8,
            HiddenDtype::Int4,
        ] {
            let mut payload = Vec::new();
            f32_to_hidden(wire, 1, row.len(), &row, &mut payload).expect("encode");
            let mut back = Vec::new();
            hidden_to_f32(wire, 1, row.len(), &payload, &mut back).expect("decode");
            let err = row
                .iter()
                .zip(&back)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            let bound = wire_error_bound(&back, wire);
            assert!(err <= bound, "{wire:?}: error {err} over bound {bound}");
            if wire != HiddenDtype::F32 {
                assert!(
                    err > 0.0 && bound < 20.0 * err,
                    "{wire:?}: bound {bound} too loose for {err}"
                );
            }
        }
    }
}
