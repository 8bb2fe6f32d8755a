//! [`DecoderLayer`]: one pre-norm Llama decoder layer (attention block and MLP), with its
//! fused CPU path for f32 on the CPU, and [`LayerStack`], consecutive layers sharing one
//! rotary embedding. Also the HF names and shapes of a layer's tensors.

use candle_core::{DType, Device, Tensor};

use super::linear::{Linear, Packed};
use super::norm::RmsNorm;
use super::rotary::{RopeTables, Rotary};
use super::{ForwardCtx, KvView};
use crate::config::LlamaConfig;
use crate::cpu;
use crate::error::Result;
use crate::weights::TensorSource;

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
