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

use candle_core::{DType, Device, Module, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::weights::TensorSource;

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

/// A dense projection without bias. A newtype so that quantized matmuls can be added as
/// another representation later without touching the layer code.
#[derive(Clone, Debug)]
pub struct Linear(candle_nn::Linear);

impl Linear {
    pub(crate) fn load(
        src: &dyn TensorSource,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let w = src.load(name, &[out_dim, in_dim], dtype, device)?;
        Ok(Self(candle_nn::Linear::new(w, None)))
    }

    pub(crate) fn from_weight(w: Tensor) -> Self {
        Self(candle_nn::Linear::new(w, None))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(x)?)
    }

    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }
}

/// RMSNorm with a learned scale.
#[derive(Clone, Debug)]
pub struct RmsNorm(candle_nn::RmsNorm);

impl RmsNorm {
    pub(crate) fn load(
        src: &dyn TensorSource,
        name: &str,
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let w = src.load(name, &[cfg.hidden_size], dtype, device)?;
        Ok(Self(candle_nn::RmsNorm::new(w, cfg.rms_norm_eps)))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(x)?)
    }
}

/// Rotary position embedding (the half-split "NeoX" layout HF Llama weights use).
#[derive(Clone, Debug)]
pub struct Rotary {
    inv_freq: Tensor, // [1, head_dim / 2], f32
    dtype: DType,
}

/// cos/sin rows for the positions of one forward pass, shared by all its layers.
#[derive(Clone, Debug)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let n = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, (1, n), device)?,
            dtype,
        })
    }

    /// cos/sin `[tokens, head_dim / 2]` for the given absolute positions.
    pub fn tables(&self, positions: &[u32]) -> Result<RopeTables> {
        let t = positions.len();
        let pos =
            Tensor::from_slice(positions, (t, 1), self.inv_freq.device())?.to_dtype(DType::F32)?;
        let angles = pos.matmul(&self.inv_freq)?;
        Ok(RopeTables {
            cos: angles.cos()?.to_dtype(self.dtype)?,
            sin: angles.sin()?.to_dtype(self.dtype)?,
        })
    }
}

impl RopeTables {
    /// Rotates `x` (`[tokens, heads, head_dim]`).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?.unsqueeze(0)?;
        Ok(candle_nn::rotary_emb::rope_thd(&x, &self.cos, &self.sin)?.squeeze(0)?)
    }
}

/// The attention block. Q, K and V are one matmul (`qkv_proj`: the three weights stacked
/// row-wise at load, `[q + 2 kv, hidden]`), and so are the MLP's gate and up projections: at
/// the few rows per step of batched decoding, one larger GEMM costs less than three small
/// ones (one pass over the activations, one thread-pool hand-off).
#[derive(Clone, Debug)]
struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Clone, Debug)]
struct Mlp {
    /// `[gate; up]`, `[2 * intermediate, hidden]`.
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: usize,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.intermediate;
        let gate_up = self.gate_up_proj.forward(x)?;
        let gated =
            (candle_nn::ops::silu(&gate_up.narrow(1, 0, f)?)? * gate_up.narrow(1, f, f)?)?;
        self.down_proj.forward(&gated)
    }
}

/// One pre-norm Llama decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    index: usize,
    input_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    mlp: Mlp,
}

/// HF tensor-name prefix of layer `i`.
pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// The HF names and shapes of every tensor of layer `i`.
pub fn layer_tensor_specs(cfg: &LlamaConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let p = layer_prefix(i);
    let (h, q, kv, f) = (
        cfg.hidden_size,
        cfg.q_size(),
        cfg.kv_size(),
        cfg.intermediate_size,
    );
    vec![
        (format!("{p}.input_layernorm.weight"), vec![h]),
        (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
        (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
        (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        (format!("{p}.mlp.gate_proj.weight"), vec![f, h]),
        (format!("{p}.mlp.up_proj.weight"), vec![f, h]),
        (format!("{p}.mlp.down_proj.weight"), vec![h, f]),
    ]
}

impl DecoderLayer {
    /// Loads layer `index` (global numbering) from `src`.
    pub fn load(
        src: &dyn TensorSource,
        cfg: &LlamaConfig,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let p = layer_prefix(index);
        let (h, q, kv, f) = (
            cfg.hidden_size,
            cfg.q_size(),
            cfg.kv_size(),
            cfg.intermediate_size,
        );
        let lin = |name: &str, o: usize, i: usize| {
            Linear::load(src, &format!("{p}.{name}.weight"), o, i, dtype, device)
        };
        let weight = |name: &str, o: usize, i: usize| {
            src.load(&format!("{p}.{name}.weight"), &[o, i], dtype, device)
        };
        let stacked = |parts: &[(&str, usize)]| -> Result<Linear> {
            let ws = parts
                .iter()
                .map(|(name, o)| weight(name, *o, h))
                .collect::<Result<Vec<_>>>()?;
            Ok(Linear::from_weight(Tensor::cat(&ws, 0)?))
        };
        let attn = Attention {
            qkv_proj: stacked(&[
                ("self_attn.q_proj", q),
                ("self_attn.k_proj", kv),
                ("self_attn.v_proj", kv),
            ])?,
            o_proj: lin("self_attn.o_proj", h, q)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        };
        let mlp = Mlp {
            gate_up_proj: stacked(&[("mlp.gate_proj", f), ("mlp.up_proj", f)])?,
            down_proj: lin("mlp.down_proj", h, f)?,
            intermediate: f,
        };
        Ok(Self {
            index,
            input_norm: RmsNorm::load(
                src,
                &format!("{p}.input_layernorm.weight"),
                cfg,
                dtype,
                device,
            )?,
            attn,
            post_attn_norm: RmsNorm::load(
                src,
                &format!("{p}.post_attention_layernorm.weight"),
                cfg,
                dtype,
                device,
            )?,
            mlp,
        })
    }

    /// This layer's global index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Runs the layer over `x` (`[tokens, hidden]`).
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        ctx: &ForwardCtx,
        kv: &mut dyn KvView,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let a = &self.attn;
        let h = self.input_norm.forward(x)?;
        let qkv = a.qkv_proj.forward(&h)?;
        let (qs, kvs) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
        let q = qkv.narrow(1, 0, qs)?.reshape((t, a.heads, a.head_dim))?;
        let k = qkv
            .narrow(1, qs, kvs)?
            .reshape((t, a.kv_heads, a.head_dim))?;
        let v = qkv
            .narrow(1, qs + kvs, kvs)?
            .reshape((t, a.kv_heads, a.head_dim))?;
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let attn = kv.attend(self.index, &q, &k, &v.contiguous()?, ctx)?;
        let x = (a.o_proj.forward(&attn)? + x)?;
        let m = self.mlp.forward(&self.post_attn_norm.forward(&x)?)?;
        Ok((m + x)?)
    }
}

/// Consecutive decoder layers and the rotary embedding they share: the body of either part.
#[derive(Clone, Debug)]
pub struct LayerStack {
    layers: Vec<DecoderLayer>,
    rotary: Rotary,
}

impl LayerStack {
    /// Loads the layers with global indices `range`.
    pub fn load(
        src: &dyn TensorSource,
        cfg: &LlamaConfig,
        range: std::ops::Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            layers: range
                .map(|i| DecoderLayer::load(src, cfg, i, dtype, device))
                .collect::<Result<Vec<_>>>()?,
            rotary: Rotary::new(cfg, dtype, device)?,
        })
    }

    /// Runs every layer over `x` (`[tokens, hidden]`); the rotary tables are built once.
    pub fn forward(&self, mut x: Tensor, ctx: &ForwardCtx, kv: &mut dyn KvView) -> Result<Tensor> {
        let rope = self.rotary.tables(ctx.positions())?;
        for layer in &self.layers {
            x = layer.forward(&x, &rope, ctx, kv)?;
        }
        Ok(x)
    }
}
