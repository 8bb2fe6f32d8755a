//! The output-pairs attacker: it learns only from what serving hands it for free.
//!
//! The server samples every output token itself and then receives that token's hidden state
//! from the device (the device embeds the token, runs its layers and sends the row). So every
//! generation leaves the server a set of (token, row) pairs, whatever the device's layers are
//! (public, private or perturbed) and whatever noise the device adds: the pairs carry the same
//! noise as the prompt's rows. This attacker never runs the edge layers; it fits on the pairs
//! of earlier generations of the same device and decodes the prompt's rows:
//!
//! - **centroid**: the mean row of every token seen in the pairs; a prompt row decodes to the
//!   token with the nearest mean (L2). Uses nothing but the pairs; it cannot name a token it
//!   never saw as an output.
//! - **linear**: a ridge map from rows into the rows of the LM head (the server runs the LM
//!   head itself, so it has that matrix whatever the device keeps private), fitted on the
//!   pairs; a row decodes to the token whose LM-head row is nearest by cosine. It can name
//!   tokens it never saw.
//!
//! The earlier generations are sampled by the audit itself ([`generate`]) from
//! [`crate::prompts::EARLIER_REQUESTS`], seeded; the first `N` pairs are taken round-robin
//! over the generations (`N / R` from each of `R`).
//!
//! Costs: generating is one whole-model forward per output token (once per audit); per depth,
//! one edge forward over each generation; per cell and `N`, a ridge fit of size `d + 1` and
//! one `[n, d] × [d, m]` product per decoder.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use tandem_model::layers::ForwardCtx;
use tandem_model::sampling::Sampler;
use tandem_model::{CloudModel, ContiguousKv, EdgeModel};
use tandem_protocol::Sampling;

use crate::attack::{edge_rows, top_m, EmbeddingIndex, RidgeDecoder};

/// One earlier generation: the request's tokens followed by the sampled output.
#[derive(Clone, Debug)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub request_len: usize,
}

/// Samples `tokens_each` tokens after each request with the split model (edge then cloud;
/// the split is exact, so this is the whole model). Special tokens are masked so every
/// generation runs to its length. Temperature 0.8, top-p 0.95, seeded per request.
pub fn generate(
    edge: &EdgeModel,
    cloud: &CloudModel,
    requests: &[Vec<u32>],
    tokens_each: usize,
    excluded: &[u32],
    seed: u64,
) -> Result<Vec<Generation>> {
    let cfg = edge.config();
    let (n, max) = (cfg.num_hidden_layers, cfg.max_position_embeddings);
    let mut out = Vec::with_capacity(requests.len());
    for (r, request) in requests.iter().enumerate() {
        ensure!(!request.is_empty(), "an empty earlier request");
        let mut sampler = Sampler::new(Sampling::Random {
            temperature: 0.8,
            top_k: None,
            top_p: Some(0.95),
            min_p: None,
            seed: seed.wrapping_add(r as u64),
            repetition_penalty: 1.1,
        });
        let (mut ekv, mut ckv) = (ContiguousKv::new(n, max), ContiguousKv::new(n, max));
        let mut ids = request.clone();
        let (mut input, mut pos) = (request.clone(), 0);
        let steps = tokens_each.min(max.saturating_sub(request.len()));
        for _ in 0..steps {
            let ctx = ForwardCtx::single(pos, input.len());
            let h = edge.forward(&input, &ctx, &mut ekv)?;
            let mut logits: Vec<f32> = cloud.forward(&h, &ctx, &mut ckv)?.squeeze(0)?.to_vec1()?;
            for &t in excluded {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            pos += input.len();
            let t = sampler.sample(&logits, &ids[request.len()..])?;
            ids.push(t);
            input = vec![t];
        }
        out.push(Generation {
            ids,
            request_len: request.len(),
        });
    }
    Ok(out)
}

/// The (row, token) pairs of the generations' outputs at one depth, round-robin over the
/// generations: the first `N` of them are `N / R` from each.
#[derive(Clone, Debug, Default)]
pub struct PairSet {
    /// `[N, d]`, flat.
    pub rows: Vec<f32>,
    pub tokens: Vec<u32>,
}

impl PairSet {
    /// The edge's (noise-free) rows of every output token of `gens`.
    pub fn collect(edge: &EdgeModel, gens: &[Generation]) -> Result<Self> {
        let d = edge.config().hidden_size;
        let per_gen = gens
            .iter()
            .map(|g| Ok((edge_rows(edge, &g.ids)?, g)))
            .collect::<Result<Vec<_>>>()?;
        let longest = gens.iter().map(|g| g.ids.len() - g.request_len).max();
        let mut set = Self::default();
        for j in 0..longest.unwrap_or(0) {
            for (rows, g) in &per_gen {
                let p = g.request_len + j;
                if let Some(&t) = g.ids.get(p) {
                    set.rows.extend_from_slice(&rows[p * d..(p + 1) * d]);
                    set.tokens.push(t);
                }
            }
        }
        Ok(set)
    }
}

/// Token-mean decoder (see the module doc).
#[derive(Debug)]
pub struct CentroidDecoder {
    tokens: Vec<u32>,
    /// `[m, d]`.
    centroids: Tensor,
    /// `‖c‖²` per centroid.
    sq_norms: Vec<f32>,
}

impl CentroidDecoder {
    pub fn fit(rows: &[f32], tokens: &[u32], d: usize) -> Result<Self> {
        ensure!(
            !tokens.is_empty() && rows.len() == tokens.len() * d,
            "{} values for {} pairs of width {d}",
            rows.len(),
            tokens.len()
        );
        let mut sums: BTreeMap<u32, (Vec<f64>, usize)> = BTreeMap::new();
        for (row, &t) in rows.chunks_exact(d).zip(tokens) {
            let e = sums.entry(t).or_insert_with(|| (vec![0.0; d], 0));
            for (s, &x) in e.0.iter_mut().zip(row) {
                *s += f64::from(x);
            }
            e.1 += 1;
        }
        let m = sums.len();
        let mut flat = Vec::with_capacity(m * d);
        let mut ids = Vec::with_capacity(m);
        let mut sq_norms = Vec::with_capacity(m);
        for (t, (sum, count)) in sums {
            let c: Vec<f32> = sum.iter().map(|&s| (s / count as f64) as f32).collect();
            sq_norms.push(c.iter().map(|x| x * x).sum());
            flat.extend(c);
            ids.push(t);
        }
        Ok(Self {
            tokens: ids,
            centroids: Tensor::from_vec(flat, (m, d), &Device::Cpu)?,
            sq_norms,
        })
    }

    /// Distinct tokens seen.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token of the nearest centroid for each row of `rows` (`[n, d]`, flat).
    pub fn decode(&self, rows: &[f32], d: usize) -> Result<Vec<u32>> {
        let n = rows.len() / d;
        let x = Tensor::from_slice(rows, (n, d), &Device::Cpu)?;
        let dots: Vec<Vec<f32>> = x.matmul(&self.centroids.t()?)?.to_vec2()?;
        // argmin ‖x − c‖² = argmax 2x·c − ‖c‖².
        Ok(dots
            .iter()
            .map(|row| {
                let scores: Vec<f32> = row
                    .iter()
                    .zip(&self.sq_norms)
                    .map(|(&dot, &sq)| 2.0 * dot - sq)
                    .collect();
                let best = top_m(&scores, 1).first().copied().unwrap_or(0);
                self.tokens.get(best as usize).copied().unwrap_or(0)
            })
            .collect())
    }
}

/// Recovery of one pairs attacker at one number of pairs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairsRecovery {
    pub pairs: usize,
    /// Distinct output tokens among them.
    pub distinct_tokens: usize,
    pub centroid_recovery: f64,
    pub centroid_sensitive_recovery: f64,
    pub linear_recovery: f64,
    pub linear_sensitive_recovery: f64,
}

/// Both decoders fitted on the first `n` of some released pairs.
#[derive(Debug)]
pub struct PairsAttack {
    pub pairs: usize,
    pub centroid: CentroidDecoder,
    pub linear: RidgeDecoder,
}

impl PairsAttack {
    /// Fits on the first `n` pairs; `head` is the LM head `[V, d]`, `ridge` the penalty.
    pub fn fit(released: &PairSet, n: usize, d: usize, head: &Tensor, ridge: f64) -> Result<Self> {
        let n = n.min(released.tokens.len());
        let (rows, tokens) = (&released.rows[..n * d], &released.tokens[..n]);
        Ok(Self {
            pairs: n,
            centroid: CentroidDecoder::fit(rows, tokens, d)?,
            linear: RidgeDecoder::fit(rows, tokens, head, ridge)?,
        })
    }

    /// (centroid, linear) guesses for `rows`; `head_index` indexes the LM head's rows.
    pub fn decode(
        &self,
        rows: &[f32],
        d: usize,
        head_index: &EmbeddingIndex,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok((
            self.centroid.decode(rows, d)?,
            self.linear.decode(rows, d, head_index)?,
        ))
    }
}

/// The LM head `[V, d]` as f32 (the embedding when the model ties them).
pub fn lm_head(ck: &tandem_model::checkpoint::Checkpoint) -> Result<Tensor> {
    use tandem_model::split::{EMBED, LM_HEAD};
    let cfg = &ck.config;
    let name = if ck.tensors.contains(LM_HEAD) || !cfg.tie_word_embeddings {
        LM_HEAD
    } else {
        EMBED
    };
    Ok(ck.tensors.load(
        name,
        &[cfg.vocab_size, cfg.hidden_size],
        DType::F32,
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centroids_decode_to_the_nearest_mean() {
        // Token 7 around (1, 0), token 3 around (0, 1).
        let rows = [1.1, 0.0, 0.9, 0.1, 0.0, 1.2, 0.1, 0.8];
        let dec = CentroidDecoder::fit(&rows, &[7, 7, 3, 3], 2).expect("fit");
        assert_eq!(dec.len(), 2);
        let got = dec
            .decode(&[0.8, 0.3, 0.2, 0.7, 5.0, -1.0], 2)
            .expect("decode");
        assert_eq!(got, vec![7, 3, 7]);
        assert!(CentroidDecoder::fit(&rows, &[7, 7, 3], 2).is_err());
    }
}
