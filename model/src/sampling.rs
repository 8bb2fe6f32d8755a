//! The sampler: f32 logits in, one token id out.
//!
//! Works on a host-side `Vec<f32>` of one row of logits. Greedy is an argmax (ties go to the
//! lowest id, so it is deterministic); random sampling applies the repetition penalty, the
//! temperature, top-k then top-p, and draws one number from a `StdRng` seeded by the request's
//! seed and the token's position in the output (`history.len()`), so the same seed and the
//! same logits give the same tokens on every machine, and a token's draw does not depend on
//! how many times the sampler was called before: speculation across the split samples after
//! draft rows that may be thrown away, and must not shift the draws of the tokens that count.
//!
//! Cost: greedy is O(vocab); random sorts the candidates, O(vocab log vocab) at worst.

use rand::{rngs::StdRng, Rng, SeedableRng};
use tandem_protocol::Sampling;

use crate::error::{ModelError, Result};

/// Per-generation sampler: the rule and the seed. It holds no stream: each draw is a function
/// of the seed and the position (see the module docs).
#[derive(Clone, Debug)]
pub struct Sampler {
    rule: Sampling,
    seed: u64,
}

/// The RNG of the draw for output position `position`: the seed and the position mixed by
/// SplitMix64's finalizer, so that neighbouring positions and seeds give unrelated streams.
fn position_rng(seed: u64, position: u64) -> StdRng {
    let mut z = seed ^ position.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

impl Sampler {
    pub fn new(rule: Sampling) -> Self {
        let seed = match rule {
            Sampling::Random { seed, .. } => seed,
            Sampling::Greedy { .. } => 0,
        };
        Self { rule, seed }
    }

    /// Chooses the next token from `logits`, given the tokens generated so far (`history`:
    /// the whole output before this token, used by the repetition penalty, and whose length
    /// is the token's position, which seeds the draw). Fails on empty or non-finite logits.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(ModelError::Input("no logits to sample from".into()));
        }
        if has_nan(logits) {
            return Err(ModelError::Input("logits contain NaN".into()));
        }
        let (penalty, random) = match self.rule {
            Sampling::Greedy { repetition_penalty } => (repetition_penalty, None),
            Sampling::Random {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                ..
            } => (repetition_penalty, Some((temperature, top_k, top_p, min_p))),
        };
        // A copy only when the penalty changes the logits (a decode step of 64 sessions would
        // otherwise copy 64 vocabulary-sized rows for greedy sampling).
        let penalized;
        let logits = if penalty != 1.0 {
            let mut l = logits.to_vec();
            apply_repetition_penalty(&mut l, history, penalty);
            penalized = l;
            &penalized[..]
        } else {
            logits
        };
        match random {
            None => Ok(argmax(logits)),
            Some((temperature, top_k, top_p, min_p)) => {
                let mut rng = position_rng(self.seed, history.len() as u64);
                Ok(draw(logits, temperature, (top_k, top_p, min_p), &mut rng))
            }
        }
    }
}

/// One draw from `logits` under the temperature and `limits` = (top_k, top_p, min_p).
fn draw(
    logits: &[f32],
    temperature: f32,
    limits: (Option<usize>, Option<f32>, Option<f32>),
    rng: &mut StdRng,
) -> u32 {
    let (top_k, top_p, min_p) = limits;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    // Highest logit first; ties by id so the order is total and reproducible.
    idx.sort_unstable_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if let Some(k) = top_k {
        idx.truncate(k.max(1));
    }
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = top_p {
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (n, q) in probs.iter().enumerate() {
            mass += q;
            if mass >= p as f64 {
                keep = n + 1;
                break;
            }
        }
        idx.truncate(keep);
        probs.truncate(keep);
    }
    if let Some(m) = min_p {
        // probs are sorted, so the kept tokens are a prefix.
        let floor = probs[0] * m as f64;
        let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        idx.truncate(keep);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (i, q) in idx.iter().zip(&probs) {
        if r < *q {
            return *i;
        }
        r -= q;
    }
    idx[idx.len() - 1]
}

/// Whether any value is NaN: whole chunks at a time (a short-circuit per value would not
/// vectorize; a row is a vocabulary long, and a decode step checks one per session).
fn has_nan(xs: &[f32]) -> bool {
    xs.chunks(256)
        .any(|c| c.iter().fold(false, |found, x| found | x.is_nan()))
}

/// Lanes of [`argmax`]: one AVX-512 register of f32.
const ARGMAX_LANES: usize = 16;

/// Index of the largest value, the lowest index on ties; 0 when no value is larger than
/// the first (all `-inf`, or NaN first: callers refuse NaN before).
///
/// Lane `l` keeps the largest value and its lowest index among positions `≡ l` (mod 16),
/// with selects the compiler turns into vector compares and blends; the lanes are then
/// reduced by value, then index, and the tail is scanned after them. The result equals the
/// plain scan's (`argmax_scalar`, checked by a test on random rows with ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let Some(&first) = logits.first() else {
        return 0;
    };
    let chunks = logits.chunks_exact(ARGMAX_LANES);
    let tail = chunks.remainder();
    let mut best_v = [first; ARGMAX_LANES];
    let mut best_i = [0u32; ARGMAX_LANES];
    let mut idx: [u32; ARGMAX_LANES] = std::array::from_fn(|l| l as u32);
    for chunk in chunks {
        for l in 0..ARGMAX_LANES {
            let x = chunk[l];
            let better = x > best_v[l];
            best_v[l] = if better { x } else { best_v[l] };
            best_i[l] = if better { idx[l] } else { best_i[l] };
            idx[l] += ARGMAX_LANES as u32;
        }
    }
    let (mut v, mut i) = (first, 0u32);
    for l in 0..ARGMAX_LANES {
        if best_v[l] > v || (best_v[l] == v && best_i[l] < i) {
            v = best_v[l];
            i = best_i[l];
        }
    }
    let start = logits.len() - tail.len();
    for (k, &x) in tail.iter().enumerate() {
        if x > v {
            v = x;
            i = (start + k) as u32;
        }
    }
    i
}

fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::new();
    for &t in history {
        if seen.insert(t) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocol::SamplingParams;

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p.validate().expect("valid"))
    }

    /// A history of `n` tokens: the draw for output position `n`.
    fn at(n: usize) -> Vec<u32> {
        vec![0; n]
    }

    #[test]
    fn a_draw_depends_on_the_seed_and_the_position_not_on_the_calls_before() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: 11,
            ..Default::default()
        };
        let mut a = sampler(p.clone());
        let in_order: Vec<u32> = (0..40)
            .map(|n| a.sample(&logits, &at(n)).expect("ok"))
            .collect();
        // Another sampler that first draws at other positions, and repeats some, as
        // speculation does: the same tokens at the same positions.
        let mut b = sampler(p);
        for n in [7, 3, 39, 3, 12] {
            assert_eq!(b.sample(&logits, &at(n)).expect("ok"), in_order[n]);
        }
        let again: Vec<u32> = (0..40)
            .map(|n| b.sample(&logits, &at(n)).expect("ok"))
            .collect();
        assert_eq!(again, in_order);
        assert!(
            in_order.iter().any(|&t| t != in_order[0]),
            "positions draw differently"
        );
    }

    /// The plain scan [`argmax`] must equal.
    fn argmax_scalar(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    #[test]
    fn the_lane_argmax_equals_the_plain_scan() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for case in 0..3_000 {
            let len = rng.random_range(1..300);
            // Few distinct values, so ties are common, with -inf and +inf now and then.
            let row: Vec<f32> = (0..len)
                .map(|_| match rng.random_range(0..20) {
                    0 => f32::NEG_INFINITY,
                    1 if case % 7 == 0 => f32::INFINITY,
                    k => (k % 5) as f32 - 2.0,
                })
                .collect();
            assert_eq!(argmax(&row), argmax_scalar(&row), "{row:?}");
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[]), 0);
        let mut long = vec![0.5f32; 49_152];
        long[40_000] = 0.75;
        long[45_000] = 0.75;
        assert_eq!(argmax(&long), 40_000);
        assert!(has_nan(&{
            let mut r = vec![0.0f32; 1000];
            r[999] = f32::NAN;
            r
        }));
        assert!(!has_nan(&long));
    }

    #[test]
    fn greedy_takes_argmax_lowest_on_ties() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], &[]).expect("ok"), 1);
        assert!(s.sample(&[], &[]).is_err());
        assert!(s.sample(&[1.0, f32::NAN], &[]).is_err());
    }

    #[test]
    fn repetition_penalty_moves_the_argmax() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[2.0, 1.5], &[0]).expect("ok"), 1);
        assert_eq!(s.sample(&[2.0, 1.5], &[]).expect("ok"), 0);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut k1 = sampler(SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        });
        for n in 0..10 {
            assert_eq!(k1.sample(&logits, &at(n)).expect("ok"), argmax(&logits));
        }
        let run = |seed| {
            let mut s = sampler(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..30)
                .map(|n| s.sample(&logits, &at(n)).expect("ok"))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(
            run(7),
            run(8),
            "different seeds should give different streams"
        );
    }

    #[test]
    fn min_p_drops_the_unlikely_tail() {
        // p(0) ~ 0.84, p(1) ~ 0.11, p(2..) ~ 0.015 each; min_p 0.1 keeps tokens 0 and 1 only.
        let logits = [4.0, 2.0, 0.0, 0.0, 0.0];
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            min_p: Some(0.1),
            seed: 9,
            ..Default::default()
        });
        let picks: Vec<u32> = (0..300)
            .map(|n| s.sample(&logits, &at(n)).expect("ok"))
            .collect();
        assert!(picks.iter().all(|&t| t < 2), "{picks:?}");
        assert!(picks.contains(&1));
        assert!(SamplingParams {
            min_p: Some(1.5),
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn top_p_keeps_only_the_head_of_the_distribution() {
        // token 0 holds ~88% of the mass; top_p = 0.5 must always pick it.
        let logits = [4.0, 2.0, 0.0, 0.0];
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            top_p: Some(0.5),
            seed: 3,
            ..Default::default()
        });
        for n in 0..100 {
            assert_eq!(s.sample(&logits, &at(n)).expect("ok"), 0);
        }
        // without top_p the other tokens show up
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        });
        let picks: Vec<u32> = (0..200)
            .map(|n| s.sample(&logits, &at(n)).expect("ok"))
            .collect();
        assert!(picks.iter().any(|&t| t != 0));
    }
}
