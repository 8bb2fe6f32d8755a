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

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use crate::config::LlamaConfig;
use crate::cpu;
use crate::error::{ModelError, Result};
use crate::weights::{Quantized, TensorSource};
use tandem_kernels::gemm::PackedMatrix;
use tandem_kernels::gemm_bf16::{Bf16Kernel, PackedBf16};
use tandem_kernels::quant::Int8Rows;

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

/// A weight packed for one of the model's CPU kernels.
#[derive(Debug)]
pub(crate) enum Packed {
    F32(PackedMatrix),
    Bf16(PackedBf16),
    /// A light edge's projections (`tandem split --edge-dtype int8|q4-embed`).
    Int8(Int8Rows),
}

impl Packed {
    pub(crate) fn n(&self) -> usize {
        match self {
            Self::F32(w) => w.n(),
            Self::Bf16(w) => w.n(),
            Self::Int8(w) => w.n(),
        }
    }

    pub(crate) fn k(&self) -> usize {
        match self {
            Self::F32(w) => w.k(),
            Self::Bf16(w) => w.k(),
            Self::Int8(w) => w.k(),
        }
    }

    /// Bytes of the packed weight.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::F32(w) => {
                w.n().div_ceil(tandem_kernels::gemm::NR) * tandem_kernels::gemm::NR * w.k() * 4
            }
            Self::Bf16(w) => w.bytes(),
            Self::Int8(w) => w.bytes(),
        }
    }

    /// `x · Wᵀ` for rows `x` (`[m, k]`, flat, f32) into a new `[m, n]`.
    pub(crate) fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let m = x.len() / self.k().max(1);
        match self {
            Self::F32(w) => w.matmul_to_vec(x, m),
            Self::Bf16(w) => w.matmul_to_vec(x, m),
            Self::Int8(w) => w.matmul_to_vec(x, m),
        }
    }
}

fn not_a_projection(src: &dyn TensorSource, name: &str) -> ModelError {
    ModelError::Input(format!(
        "{}: `{name}` is stored in 4-bit blocks, which only the embedding table may be",
        src.path().display()
    ))
}

/// A dense projection without bias, `y = x · Wᵀ` with `W` `[out, in]`.
///
/// On the CPU in f32 or bf16 the weight is packed once at load for the model's own kernels
/// ([`PackedMatrix`], [`PackedBf16`]: several times candle's matmul at the few rows of
/// batched decoding, and a row's result does not depend on the other rows of the batch);
/// they take and return f32 activations. Any other device or dtype keeps the weight as a
/// tensor for candle's matmul.
#[derive(Clone, Debug)]
pub struct Linear(LinearRepr);

#[derive(Clone, Debug)]
enum LinearRepr {
    Packed { w: Arc<Packed>, device: Device },
    Candle(candle_nn::Linear),
}

impl Linear {
    pub(crate) fn load(
        src: &dyn TensorSource,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if let Some(q) = src.load_quantized(name, &[out_dim, in_dim])? {
            return Self::from_quantized(src, name, q, device);
        }
        Self::from_weight(src.load(name, &[out_dim, in_dim], dtype, device)?)
    }

    /// Several stored projections stacked by rows into one (`[q; k; v]`, `[gate; up]`), each
    /// `[out, in_dim]`: int8 stays int8 (rows and their scales are concatenated), floats are
    /// concatenated and packed.
    pub(crate) fn load_stacked(
        src: &dyn TensorSource,
        parts: &[(String, usize)],
        in_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut quantized = Vec::new();
        for (name, out) in parts {
            match src.load_quantized(name, &[*out, in_dim])? {
                Some(Quantized::Int8(q)) => quantized.push(q),
                Some(Quantized::Q4(_)) => return Err(not_a_projection(src, name)),
                None => break,
            }
        }
        if !quantized.is_empty() {
            if quantized.len() != parts.len() {
                return Err(ModelError::Input(format!(
                    "{}: `{}` is int8 but the projections stacked with it are not",
                    src.path().display(),
                    parts[0].0
                )));
            }
            let stacked = Int8Rows::concat(quantized).map_err(ModelError::Input)?;
            return Ok(Self(LinearRepr::Packed {
                w: Arc::new(Packed::Int8(stacked)),
                device: device.clone(),
            }));
        }
        let ws = parts
            .iter()
            .map(|(name, out)| src.load(name, &[*out, in_dim], dtype, device))
            .collect::<Result<Vec<_>>>()?;
        Self::from_weight(Tensor::cat(&ws, 0)?)
    }

    fn from_quantized(
        src: &dyn TensorSource,
        name: &str,
        q: Quantized,
        device: &Device,
    ) -> Result<Self> {
        match q {
            Quantized::Int8(w) if device.is_cpu() => Ok(Self(LinearRepr::Packed {
                w: Arc::new(Packed::Int8(w)),
                device: device.clone(),
            })),
            Quantized::Int8(_) => Err(ModelError::Input(format!(
                "{}: `{name}` is int8, which runs on the CPU only",
                src.path().display()
            ))),
            Quantized::Q4(_) => Err(not_a_projection(src, name)),
        }
    }

    pub(crate) fn from_weight(w: Tensor) -> Result<Self> {
        if !w.device().is_cpu() || !matches!(w.dtype(), DType::F32 | DType::BF16) {
            return Ok(Self(LinearRepr::Candle(candle_nn::Linear::new(w, None))));
        }
        let (n, k) = w.dims2()?;
        let packed = if w.dtype() == DType::F32 {
            cpu::with_f32(&w, |data| Packed::F32(PackedMatrix::pack(data, n, k)))?
        } else {
            // Refuse at load, not at the first step, when TANDEM_BF16_KERNEL names a kernel
            // this CPU lacks.
            Bf16Kernel::selected().map_err(ModelError::Input)?;
            cpu::with_slice::<half::bf16, _>(&w, |data| Packed::Bf16(PackedBf16::pack(data, n, k)))?
        };
        Ok(Self(LinearRepr::Packed {
            w: Arc::new(packed),
            device: w.device().clone(),
        }))
    }

    /// The dtype of the activations this projection takes (f32 for the packed kernels).
    pub fn dtype(&self) -> DType {
        match &self.0 {
            LinearRepr::Packed { .. } => DType::F32,
            LinearRepr::Candle(l) => l.weight().dtype(),
        }
    }

    /// Bytes of this projection's weight as held in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.0 {
            LinearRepr::Packed { w, .. } => w.bytes(),
            LinearRepr::Candle(l) => l.weight().elem_count() * l.weight().dtype().size_in_bytes(),
        }
    }

    /// The packed weight, when this projection runs on one of the model's CPU kernels.
    fn packed(&self) -> Option<&Packed> {
        match &self.0 {
            LinearRepr::Packed { w, .. } => Some(w),
            LinearRepr::Candle(_) => None,
        }
    }

    /// `x` is `[..., in]`; the result is `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, device) = match &self.0 {
            LinearRepr::Candle(l) => return Ok(l.forward(x)?),
            LinearRepr::Packed { w, device } => (w, device),
        };
        let (n, k) = (w.n(), w.k());
        let dims = x.dims();
        if x.dtype() != DType::F32 || dims.last() != Some(&k) {
            return Err(ModelError::Input(format!(
                "a [{n}, {k}] projection got a {:?} input of shape {dims:?} (it takes f32)",
                x.dtype()
            )));
        }
        let out = cpu::with_f32(x, |x| w.matmul(x))?;
        let mut shape = dims.to_vec();
        shape[dims.len() - 1] = n;
        Ok(Tensor::from_vec(out, shape, device)?)
    }
}

/// RMSNorm with a learned scale.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    norm: candle_nn::RmsNorm,
    /// The scale as f32 on the CPU, for the fused CPU path.
    cpu: Option<Arc<[f32]>>,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn load(
        src: &dyn TensorSource,
        name: &str,
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // Norm weights are tiny: with bf16 weights on the CPU they are kept in f32, the
        // activations' dtype.
        let dtype = activation_dtype(dtype, device);
        let w = src.load(name, &[cfg.hidden_size], dtype, device)?;
        let cpu = if device.is_cpu() && dtype == DType::F32 {
            Some(w.to_vec1::<f32>()?.into())
        } else {
            None
        };
        Ok(Self {
            norm: candle_nn::RmsNorm::new(w, cfg.rms_norm_eps),
            cpu,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(x)?)
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
    /// `cos` and `sin` as f32 slices, for the fused CPU path.
    cpu: Option<(Vec<f32>, Vec<f32>)>,
}

impl Rotary {
    pub fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let n = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, (1, n), device)?,
            dtype: activation_dtype(dtype, device),
        })
    }

    /// cos/sin `[tokens, head_dim / 2]` for the given absolute positions.
    pub fn tables(&self, positions: &[u32]) -> Result<RopeTables> {
        let t = positions.len();
        let pos =
            Tensor::from_slice(positions, (t, 1), self.inv_freq.device())?.to_dtype(DType::F32)?;
        let angles = pos.matmul(&self.inv_freq)?;
        let (cos, sin) = (
            angles.cos()?.to_dtype(self.dtype)?,
            angles.sin()?.to_dtype(self.dtype)?,
        );
        let cpu = if cos.device().is_cpu() && self.dtype == DType::F32 {
            Some((cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?))
        } else {
            None
        };
        Ok(RopeTables { cos, sin, cpu })
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
        let stacked = |parts: &[(&str, usize)]| -> Result<Linear> {
            let parts: Vec<(String, usize)> = parts
                .iter()
                .map(|(name, o)| (format!("{p}.{name}.weight"), *o))
                .collect();
            Linear::load_stacked(src, &parts, h, dtype, device)
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

    /// Bytes of this layer's projection weights as held in memory (norms excluded: a few
    /// KB).
    pub fn weight_bytes(&self) -> usize {
        [
            &self.attn.qkv_proj,
            &self.attn.o_proj,
            &self.mlp.gate_up_proj,
            &self.mlp.down_proj,
        ]
        .iter()
        .map(|l| l.weight_bytes())
        .sum()
    }

    /// Runs the layer over `x` (`[tokens, hidden]`).
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        ctx: &ForwardCtx,
        kv: &mut dyn KvView,
    ) -> Result<Tensor> {
        if x.dtype() == DType::F32 && x.device().is_cpu() {
            if let Some(parts) = self.cpu_parts(rope) {
                return self.forward_cpu(x, parts, ctx, kv);
            }
        }
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

/// What the fused CPU path needs: present when the layer was loaded on the CPU in f32.
#[derive(Clone, Copy)]
struct CpuParts<'a> {
    input_norm: &'a [f32],
    post_attn_norm: &'a [f32],
    eps: f32,
    qkv: &'a Packed,
    o: &'a Packed,
    gate_up: &'a Packed,
    down: &'a Packed,
    cos: &'a [f32],
    sin: &'a [f32],
}

impl DecoderLayer {
    fn cpu_parts<'a>(&'a self, rope: &'a RopeTables) -> Option<CpuParts<'a>> {
        let (cos, sin) = rope.cpu.as_ref()?;
        Some(CpuParts {
            input_norm: self.input_norm.cpu.as_deref()?,
            post_attn_norm: self.post_attn_norm.cpu.as_deref()?,
            eps: self.input_norm.eps,
            qkv: self.attn.qkv_proj.packed()?,
            o: self.attn.o_proj.packed()?,
            gate_up: self.mlp.gate_up_proj.packed()?,
            down: self.mlp.down_proj.packed()?,
            cos,
            sin,
        })
    }

    /// [`Self::forward`] on the CPU in f32: the same computation, with the steps between the
    /// matmuls fused into single passes ([`crate::cpu`]).
    fn forward_cpu(
        &self,
        x: &Tensor,
        p: CpuParts<'_>,
        ctx: &ForwardCtx,
        kv: &mut dyn KvView,
    ) -> Result<Tensor> {
        let (t, hidden) = x.dims2()?;
        let a = &self.attn;
        let device = x.device();
        let mut resid = cpu::with_f32(x, <[f32]>::to_vec)?;
        let h = cpu::rms_norm(&resid, p.input_norm, p.eps);
        let qkv = p.qkv.matmul(&h);
        let shape = cpu::QkvShape {
            heads: a.heads,
            kv_heads: a.kv_heads,
            head_dim: a.head_dim,
        };
        let (q, k, v) = cpu::split_rope(&qkv, shape, p.cos, p.sin);
        let q = Tensor::from_vec(q, (t, a.heads, a.head_dim), device)?;
        let k = Tensor::from_vec(k, (t, a.kv_heads, a.head_dim), device)?;
        let v = Tensor::from_vec(v, (t, a.kv_heads, a.head_dim), device)?;
        let attn = kv.attend(self.index, &q, &k, &v, ctx)?;
        let o = cpu::with_f32(&attn, |attn| p.o.matmul(attn))?;
        let h = cpu::add_rms_norm(&mut resid, &o, p.post_attn_norm, p.eps);
        let gated = cpu::silu_mul(&p.gate_up.matmul(&h), self.mlp.intermediate);
        cpu::add_assign(&mut resid, &p.down.matmul(&gated));
        Ok(Tensor::from_vec(resid, (t, hidden), device)?)
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

    /// Where the layers compute.
    pub fn device(&self) -> &Device {
        self.rotary.inv_freq.device()
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Bytes of the layers' projection weights as held in memory.
    pub fn weight_bytes(&self) -> usize {
        self.layers.iter().map(DecoderLayer::weight_bytes).sum()
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
