//! The two attacks of the privacy audit: a server that holds the weights tries to read the
//! prompt back from the hidden-state rows it received.
//!
//! # Nearest-neighbour inversion ([`NearestNeighbour`])
//! Position by position, left to right, the attacker asks: which vocabulary token, pushed
//! through the edge layers at this position after the prefix recovered so far, gives the row
//! closest (L2, after the same clip the device applies) to the row received? It exploits
//! everything the server knows: weights, positions, the causal prefix it already decoded, the
//! clip bound. Running the edge layers for all `V` tokens at every position is `V` forward
//! rows per position (49,152 for the demo model): too slow on a CPU, so a cheap shortlist comes
//! first: the top `M` tokens by cosine between the received row and the raw embedding matrix,
//! united with the top `M` by the learned decoder below. Only the shortlist goes through the
//! exact edge forward, batched as `M` one-token sequences that all attend to the prefix's
//! cached K/V ([`CandidateKv`]). A token outside the shortlist cannot be recovered, so the
//! figure is a lower bound on what an attacker with more compute gets;
//! [`crate::exhaustive`] is that attacker.
//!
//! # Learned inversion ([`RidgeDecoder`])
//! A linear map from a received row (plus a constant) into the embedding space, fitted by
//! ridge regression on rows of generic text and of random token sequences (the attacker has
//! the weights and can make as many as it likes) passed through the same clip, noise and wire
//! encoding; a row is decoded to the token whose embedding is nearest by cosine. It needs no
//! prefix and no forward pass per guess.
//!
//! Costs per position: two `[V, d]` matrix-vector products for the shortlist, one batched edge
//! forward over at most `2M` rows, one one-token forward to extend the prefix. Training the
//! decoder: one `[N, d+1]ᵀ[N, d+1]` product and a Cholesky solve of size `d + 1` in f64.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use tandem_model::layers::{causal_attention, ForwardCtx, KvView};
use tandem_model::EdgeModel;
use tandem_protocol::HiddenDtype;

/// Rows `[n, d]` as one flat row-major vector.
pub type Rows = Vec<f32>;

/// Unit-length copies of the embedding matrix's rows, `[V, d]`, for cosine scoring.
#[derive(Debug)]
pub struct EmbeddingIndex {
    normed: Tensor,
    /// Token ids never guessed (special tokens: they are not prompt text).
    excluded: Vec<u32>,
}

impl EmbeddingIndex {
    /// Token ids never guessed.
    pub fn excluded(&self) -> &[u32] {
        &self.excluded
    }

    pub fn new(embed: &Tensor, excluded: Vec<u32>) -> Result<Self> {
        let e = embed.to_dtype(DType::F32)?;
        let norms = (e.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?;
        Ok(Self {
            normed: e.broadcast_div(&norms)?,
            excluded,
        })
    }

    /// Cosine of each query row `[n, d]` with every token: `[n, V]`.
    pub fn cosine(&self, queries: &Tensor) -> Result<Vec<Vec<f32>>> {
        let q = queries.to_dtype(DType::F32)?;
        let norms = (q.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?;
        let q = q.broadcast_div(&norms)?;
        let mut s: Vec<Vec<f32>> = q.matmul(&self.normed.t()?)?.to_vec2()?;
        for row in &mut s {
            for &t in &self.excluded {
                if let Some(x) = row.get_mut(t as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        Ok(s)
    }
}

/// The `m` best-scoring token ids, best first.
pub fn top_m(scores: &[f32], m: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    let m = m.min(idx.len());
    if m == 0 {
        return Vec::new();
    }
    let key = |&i: &u32| std::cmp::Reverse(ordered(scores[i as usize]));
    idx.select_nth_unstable_by_key(m - 1, key);
    idx.truncate(m);
    idx.sort_unstable_by_key(key);
    idx
}

fn ordered(x: f32) -> i64 {
    // A total order on floats that puts NaN and -inf last.
    if x.is_nan() {
        i64::MIN
    } else {
        let b = x.to_bits() as i32;
        i64::from(if b < 0 { !b ^ i32::MIN } else { b })
    }
}

/// A KV view over a recovered prefix: in `extend` mode it appends one sequence (like the
/// device's cache); in candidate mode every row of the batch is its own one-token sequence
/// that attends to the prefix and to itself, and nothing is stored.
#[derive(Debug, Default)]
pub struct CandidateKv {
    layers: Vec<Option<(Tensor, Tensor)>>,
    candidates: bool,
}

impl CandidateKv {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            candidates: false,
        }
    }

    /// Appends `token` at `position` to the recovered prefix.
    pub fn extend(&mut self, edge: &EdgeModel, token: u32, position: usize) -> Result<()> {
        self.candidates = false;
        edge.forward(&[token], &ForwardCtx::single(position, 1), self)
            .context("extending the recovered prefix")?;
        Ok(())
    }

    fn prefix(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(Option::as_ref)
    }
}

fn repeat_heads(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    // [kv_heads, T, d] → [kv_heads * rep, T, d]
    if rep == 1 {
        return x.contiguous();
    }
    let (h, t, d) = x.dims3()?;
    x.unsqueeze(1)?
        .expand((h, rep, t, d))?
        .reshape((h * rep, t, d))
}

fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

impl KvView for CandidateKv {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _ctx: &ForwardCtx,
    ) -> tandem_model::Result<Tensor> {
        if !self.candidates {
            let (k_all, v_all) = match self.prefix(layer) {
                None => (k.clone(), v.clone()),
                Some((ck, cv)) => (Tensor::cat(&[ck, k], 0)?, Tensor::cat(&[cv, v], 0)?),
            };
            let out = causal_attention(q, &k_all, &v_all);
            if let Some(slot) = self.layers.get_mut(layer) {
                *slot = Some((k_all, v_all));
            }
            return out;
        }
        let (m, heads, d) = q.dims3()?;
        let kv_heads = k.dim(1)?;
        let rep = heads / kv_heads;
        let scale = 1.0 / (d as f64).sqrt();
        let q32 = q.to_dtype(DType::F32)?;
        let k32 = k.to_dtype(DType::F32)?;
        let v32 = v.to_dtype(DType::F32)?;
        // Each candidate's score against its own key: [heads, m, 1].
        let k_rep = repeat_heads(&k32.transpose(0, 1)?, rep)?; // [heads, m, d]
        let v_rep = repeat_heads(&v32.transpose(0, 1)?, rep)?;
        let qh = q32.transpose(0, 1)?.contiguous()?; // [heads, m, d]
        let own = ((&qh * &k_rep)?.sum_keepdim(D::Minus1)? * scale)?;
        let out = match self.prefix(layer) {
            None => v_rep,
            Some((pk, pv)) => {
                let pk = repeat_heads(&pk.to_dtype(DType::F32)?.transpose(0, 1)?, rep)?;
                let pv = repeat_heads(&pv.to_dtype(DType::F32)?.transpose(0, 1)?, rep)?;
                let p = pk.dim(1)?;
                let prior = (qh.matmul(&pk.t()?)? * scale)?; // [heads, m, p]
                let att = softmax_last_dim(&Tensor::cat(&[prior, own], 2)?)?;
                let from_prefix = att.narrow(2, 0, p)?.contiguous()?.matmul(&pv)?;
                let from_self = att.narrow(2, p, 1)?.broadcast_mul(&v_rep)?;
                (from_prefix + from_self)?
            }
        };
        Ok(out
            .transpose(0, 1)?
            .reshape((m, heads * d))?
            .to_dtype(q.dtype())?)
    }
}

/// Runs the edge layers over `tokens` as one sequence and returns the rows (f32, flat).
pub fn edge_rows(edge: &EdgeModel, tokens: &[u32]) -> Result<Rows> {
    let n = edge.config().num_hidden_layers;
    let mut kv = CandidateKv::new(n);
    let h = edge.forward(tokens, &ForwardCtx::single(0, tokens.len()), &mut kv)?;
    Ok(h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// What the attacker knows about how rows were processed before it got them.
#[derive(Clone, Copy, Debug)]
pub struct AttackerView {
    /// The device's clip bound, when it clips.
    pub clip: Option<f32>,
    /// The wire encoding the rows travelled in.
    pub wire: HiddenDtype,
}

/// Nearest-neighbour inversion with a shortlist (see the module doc).
#[derive(Debug)]
pub struct NearestNeighbour<'a> {
    pub edge: &'a EdgeModel,
    pub index: &'a EmbeddingIndex,
    /// Shortlist size from each source.
    pub shortlist: usize,
    pub view: AttackerView,
}

impl NearestNeighbour<'_> {
    /// Recovers the tokens of `received` (`[n, d]`); position 0 is `known_first` when given
    /// (the BOS token every prompt starts with). `learned` gives the decoder's shortlist.
    pub fn invert(
        &self,
        received: &[f32],
        known_first: Option<u32>,
        learned: Option<&RidgeDecoder>,
    ) -> Result<Vec<u32>> {
        let d = self.edge.config().hidden_size;
        let n = received.len() / d;
        let device = Device::Cpu;
        let rows = Tensor::from_slice(received, (n, d), &device)?;
        let cos = self.index.cosine(&rows)?;
        let learned_scores = match learned {
            Some(dec) => Some(dec.scores(&rows, self.index)?),
            None => None,
        };
        let mut kv = CandidateKv::new(self.edge.config().num_hidden_layers);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let pick = match (i, known_first) {
                (0, Some(t)) => t,
                _ => {
                    let mut cands = top_m(&cos[i], self.shortlist);
                    if let Some(ls) = &learned_scores {
                        for t in top_m(&ls[i], self.shortlist) {
                            if !cands.contains(&t) {
                                cands.push(t);
                            }
                        }
                    }
                    self.best_candidate(&mut kv, i, &cands, &received[i * d..(i + 1) * d])?
                }
            };
            kv.extend(self.edge, pick, i)?;
            out.push(pick);
        }
        Ok(out)
    }

    fn best_candidate(
        &self,
        kv: &mut CandidateKv,
        position: usize,
        cands: &[u32],
        target: &[f32],
    ) -> Result<u32> {
        let dists = candidate_distances(self.edge, kv, position, cands, target, self.view.clip)?;
        let mut best = (f64::INFINITY, *cands.first().context("empty shortlist")?);
        for (&dist, &t) in dists.iter().zip(cands) {
            if dist < best.0 {
                best = (dist, t);
            }
        }
        Ok(best.1)
    }
}

/// Squared L2 distances between `target` and the rows of `cands`, each pushed through the
/// edge layers at `position` after the prefix cached in `kv` (one batched forward of
/// one-token sequences) and clipped to `clip` as the device clips.
pub fn candidate_distances(
    edge: &EdgeModel,
    kv: &mut CandidateKv,
    position: usize,
    cands: &[u32],
    target: &[f32],
    clip: Option<f32>,
) -> Result<Vec<f64>> {
    if cands.is_empty() {
        return Ok(Vec::new());
    }
    let d = target.len();
    kv.candidates = true;
    let spans: Vec<(usize, usize)> = cands.iter().map(|_| (position, 1)).collect();
    let h = edge.forward(cands, &ForwardCtx::varlen(&spans), kv);
    kv.candidates = false;
    let h = h.context("candidate forward")?;
    let mut rows: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(rows
        .chunks_exact_mut(d)
        .map(|row| {
            if let Some(c) = clip {
                tandem_model::privacy::clip_row(row, c);
            }
            row.iter()
                .zip(target)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum()
        })
        .collect())
}

/// A ridge-regression map from rows into the embedding space (see the module doc).
#[derive(Debug)]
pub struct RidgeDecoder {
    /// `[d + 1, d]`: the last row is the intercept.
    w: Tensor,
}

impl RidgeDecoder {
    /// Fits `rows [N, d] → embed[tokens] [N, d]` with ridge penalty `lambda` times the mean
    /// diagonal of the Gram matrix.
    pub fn fit(rows: &[f32], tokens: &[u32], embed: &Tensor, lambda: f64) -> Result<Self> {
        let dev = Device::Cpu;
        let n = tokens.len();
        if n == 0 || !rows.len().is_multiple_of(n) {
            bail!("{} values for {n} training tokens", rows.len());
        }
        let d = rows.len() / n;
        let x = Tensor::from_slice(rows, (n, d), &dev)?;
        let x = Tensor::cat(&[x, Tensor::ones((n, 1), DType::F32, &dev)?], 1)?;
        let ids = Tensor::from_slice(tokens, n, &dev)?;
        let y = embed.to_dtype(DType::F32)?.index_select(&ids, 0)?;
        let gram: Vec<Vec<f32>> = x.t()?.matmul(&x)?.to_vec2()?;
        let xty: Vec<Vec<f32>> = x.t()?.matmul(&y)?.to_vec2()?;
        let p = d + 1;
        let mean_diag = (0..p).map(|i| f64::from(gram[i][i])).sum::<f64>() / p as f64;
        let ridge = lambda * mean_diag.max(1e-12);
        let mut a: Vec<f64> = gram.iter().flatten().map(|&v| f64::from(v)).collect();
        for i in 0..p {
            a[i * p + i] += ridge;
        }
        cholesky_in_place(&mut a, p)?;
        let cols = xty.first().map_or(0, Vec::len);
        let mut w = vec![0f32; p * cols];
        let mut b = vec![0f64; p];
        for c in 0..cols {
            for (r, bi) in b.iter_mut().enumerate() {
                *bi = f64::from(xty[r][c]);
            }
            cholesky_solve(&a, p, &mut b);
            for r in 0..p {
                w[r * cols + c] = b[r] as f32;
            }
        }
        Ok(Self {
            w: Tensor::from_vec(w, (p, cols), &dev)?,
        })
    }

    /// Cosine scores `[n, V]` of the decoded rows against the vocabulary.
    pub fn scores(&self, rows: &Tensor, index: &EmbeddingIndex) -> Result<Vec<Vec<f32>>> {
        let n = rows.dim(0)?;
        let x = Tensor::cat(
            &[
                rows.to_dtype(DType::F32)?,
                Tensor::ones((n, 1), DType::F32, rows.device())?,
            ],
            1,
        )?;
        index.cosine(&x.matmul(&self.w)?)
    }

    /// The best token for each row.
    pub fn decode(&self, rows: &[f32], d: usize, index: &EmbeddingIndex) -> Result<Vec<u32>> {
        let n = rows.len() / d;
        let t = Tensor::from_slice(rows, (n, d), &Device::Cpu)?;
        Ok(self
            .scores(&t, index)?
            .iter()
            .map(|s| top_m(s, 1).first().copied().unwrap_or(0))
            .collect())
    }
}

/// Lower-triangular Cholesky factor of the symmetric positive-definite `a` (`p × p`), in place.
fn cholesky_in_place(a: &mut [f64], p: usize) -> Result<()> {
    for j in 0..p {
        let mut diag = a[j * p + j];
        for k in 0..j {
            diag -= a[j * p + k] * a[j * p + k];
        }
        if diag <= 0.0 {
            bail!("the ridge system is not positive definite");
        }
        let diag = diag.sqrt();
        a[j * p + j] = diag;
        for i in j + 1..p {
            let mut s = a[i * p + j];
            for k in 0..j {
                s -= a[i * p + k] * a[j * p + k];
            }
            a[i * p + j] = s / diag;
        }
    }
    Ok(())
}

/// Solves `L Lᵀ x = b` in place with the factor from [`cholesky_in_place`].
fn cholesky_solve(l: &[f64], p: usize, b: &mut [f64]) {
    for i in 0..p {
        let mut s = b[i];
        for k in 0..i {
            s -= l[i * p + k] * b[k];
        }
        b[i] = s / l[i * p + i];
    }
    for i in (0..p).rev() {
        let mut s = b[i];
        for k in i + 1..p {
            s -= l[k * p + i] * b[k];
        }
        b[i] = s / l[i * p + i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_m_orders_and_skips_nan() {
        let s = [0.1, f32::NAN, 0.9, -1.0, 0.5, f32::NEG_INFINITY];
        assert_eq!(top_m(&s, 3), vec![2, 4, 0]);
        assert_eq!(top_m(&s, 0), Vec::<u32>::new());
        assert_eq!(top_m(&s, 10).len(), 6);
    }

    #[test]
    fn cholesky_solves() {
        // A = [[4, 2], [2, 3]], b = [2, 1] → x = [0.5, 0].
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        cholesky_in_place(&mut a, 2).expect("spd");
        let mut b = vec![2.0, 1.0];
        cholesky_solve(&a, 2, &mut b);
        assert!((b[0] - 0.5).abs() < 1e-12 && b[1].abs() < 1e-12, "{b:?}");
    }
}
