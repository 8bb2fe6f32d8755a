//! The decoder layer and its parts, shared by the edge and the cloud.
//!
//! Hidden states are `[tokens, hidden]`: the tokens of one or several sequences laid end to
//! end (varlen, no padding). [`ForwardCtx`] says which rows belong to which sequence and how
//! many positions each sequence already has cached. Attention itself is delegated to a
//! [`KvView`], which stores the new keys/values and attends over everything cached: the edge
//! and the tests use the contiguous cache in [`crate::kv`], the cloud a paged one, and the layer
//! code is the same for both.
//!
//! Costs: one forward over `t` tokens does `t` rows of every projection (matmuls on the
//! compute dtype) plus whatever the `KvView` spends on attention. Nothing here allocates per
//! layer beyond the activations themselves.
//!
//! # Layout
//! - this module: the batch context ([`ForwardCtx`]), the [`KvView`] trait and the reference
//!   [`causal_attention`] over contiguous K/V.
//! - `linear`: [`Linear`], the projections (packed for the CPU kernels, or candle's).
//! - `norm`, `rotary`: [`RmsNorm`], and [`Rotary`] with its per-pass [`RopeTables`].
//! - `decoder`: [`DecoderLayer`] (attention block and MLP) and [`LayerStack`].

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

mod decoder;
mod linear;
mod norm;
mod rotary;

pub use decoder::{layer_prefix, layer_tensor_specs, DecoderLayer, LayerStack};
pub use linear::Linear;
pub use norm::RmsNorm;
pub use rotary::{RopeTables, Rotary};

/// One sequence's rows inside a varlen batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    /// First row of this sequence in the batch.
    pub start: usize,
    /// Number of new tokens of this sequence in the batch.
    pub len: usize,
    /// Positions of this sequence already in its KV cache (the first new token's position).
    pub past: usize,
}

/// Where each row of a varlen batch sits: its sequence and its absolute position.
#[derive(Clone, Debug)]
pub struct ForwardCtx {
    seqs: Vec<SeqSpan>,
    positions: Vec<u32>,
}

impl ForwardCtx {
    /// One sequence with `past` cached positions and `len` new tokens.
    pub fn single(past: usize, len: usize) -> Self {
        Self::varlen(&[(past, len)])
    }

    /// Several sequences laid end to end: each `(past, len)` in batch order.
    pub fn varlen(seqs: &[(usize, usize)]) -> Self {
        let mut spans = Vec::with_capacity(seqs.len());
        let mut positions = Vec::new();
        let mut start = 0;
        for &(past, len) in seqs {
            spans.push(SeqSpan { start, len, past });
            positions.extend((past..past + len).map(|p| p as u32));
            start += len;
        }
        Self {
            seqs: spans,
            positions,
        }
    }

    /// The sequences of the batch, in row order.
    pub fn seqs(&self) -> &[SeqSpan] {
        &self.seqs
    }

    /// Absolute position of every row.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Total rows in the batch.
    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }

    /// Row index of each sequence's last token (where the next token is predicted).
    pub fn last_rows(&self) -> Vec<u32> {
        self.seqs
            .iter()
            .filter(|s| s.len > 0)
            .map(|s| (s.start + s.len - 1) as u32)
            .collect()
    }
}

/// A KV cache seen from one forward pass.
///
/// `attend` must (1) store `k` and `v` for `layer` at the positions the context gives, then
/// (2) return causal attention of `q` over each sequence's cached and new positions.
/// Shapes: `q` is `[tokens, heads, head_dim]`, `k` and `v` are `[tokens, kv_heads, head_dim]`,
/// all rotated already; the result is `[tokens, heads * head_dim]` in `q`'s dtype.
/// `layer` is the global layer index (cloud layers start at the split point).
pub trait KvView {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Tensor>;
}

/// Causal scaled-dot-product attention of one sequence over contiguous K/V, in f32.
///
/// `q` is `[t, heads, d]`; `k`, `v` are `[past + t, kv_heads, d]`. Query row `i` sits at
/// position `past + i` and sees keys `0..=past + i`. Returns `[t, heads * d]` in `q`'s dtype.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (t, heads, d) = q.dims3()?;
    let (total, kv_heads, _) = k.dims3()?;
    if total < t || heads % kv_heads != 0 {
        return Err(ModelError::Input(format!(
            "attention shapes q {:?} k {:?} do not fit",
            q.dims(),
            k.dims()
        )));
    }
    let past = total - t;
    let in_dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
    let k = repeat_kv(&k.to_dtype(DType::F32)?.transpose(0, 1)?, heads / kv_heads)?;
    let v = repeat_kv(&v.to_dtype(DType::F32)?.transpose(0, 1)?, heads / kv_heads)?;
    let scale = 1.0 / (d as f64).sqrt();
    let att = (q.matmul(&k.t()?)? * scale)?;
    let att = if t > 1 {
        let mask: Vec<u8> = (0..t)
            .flat_map(|i| (0..total).map(move |j| u8::from(j > past + i)))
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), q.device())?.broadcast_as(att.shape())?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, q.device())?.broadcast_as(att.shape())?;
        mask.where_cond(&neg_inf, &att)?
    } else {
        att
    };
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    let out = att.matmul(&v)?; // [heads, t, d]
    Ok(out
        .transpose(0, 1)?
        .reshape((t, heads * d))?
        .to_dtype(in_dtype)?)
}

/// `[kv_heads, T, d]` → `[kv_heads * n_rep, T, d]`; query head `h` reads kv head `h / n_rep`.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.contiguous()?);
    }
    let (kv_heads, len, d) = x.dims3()?;
    Ok(x.unsqueeze(1)?
        .expand((kv_heads, n_rep, len, d))?
        .reshape((kv_heads * n_rep, len, d))?)
}

/// The dtype activations flow in between the layers for weights of `dtype` on `device`:
/// on the CPU, bf16 weights run on the model's bf16 kernels ([`tandem_kernels::gemm_bf16`]) with f32
/// activations, norms, residuals and attention (each matmul rounds its input rows to bf16);
/// anything else computes in the weights' dtype.
pub fn activation_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}
