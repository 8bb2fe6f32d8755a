//! The two halves of a split model.
//!
//! [`SplitPoint`] `k` cuts an `n`-layer model so that the edge runs the embedding and layers
//! `[0, k)` and the cloud runs layers `[k, n)`, the final norm and the LM head. `1 <= k < n`:
//! with `k = 0` the device would send raw token embeddings (a lookup table away from the
//! prompt text), and with `k = n` the cloud would have nothing but the head to run.
//!
//! Both halves own immutable weights and take their KV cache as a `&mut dyn KvView`, so the
//! same model object serves any number of sequences.

use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::layers::{activation_dtype, ForwardCtx, KvView, LayerStack, Linear, RmsNorm};
use crate::weights::{Quantized, TensorSource};
use std::sync::Arc;
use tandem_kernels::quant::{Int8Rows, Q4Blocks};

pub use crate::weights::{EMBED, FINAL_NORM, LM_HEAD};

/// Where the model is cut: the edge runs layers `[0, edge_layers)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitPoint {
    edge_layers: usize,
    num_layers: usize,
}

impl SplitPoint {
    /// Validates `1 <= edge_layers < num_layers`.
    pub fn new(edge_layers: usize, num_layers: usize) -> Result<Self> {
        if edge_layers == 0 || edge_layers >= num_layers {
            return Err(ModelError::Split(format!(
                "--edge-layers must be between 1 and {} for a {num_layers}-layer model, got {edge_layers}",
                num_layers.saturating_sub(1)
            )));
        }
        Ok(Self {
            edge_layers,
            num_layers,
        })
    }

    /// Layers run on the device.
    pub fn edge_layers(&self) -> usize {
        self.edge_layers
    }

    /// Layers in the whole model.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Global indices of the edge's layers.
    pub fn edge_range(&self) -> std::ops::Range<usize> {
        0..self.edge_layers
    }

    /// Global indices of the cloud's layers.
    pub fn cloud_range(&self) -> std::ops::Range<usize> {
        self.edge_layers..self.num_layers
    }
}

/// Shared load parameters.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions<'a> {
    pub dtype: DType,
    pub device: &'a Device,
}

fn check_hidden(hidden: &Tensor, ctx: &ForwardCtx, cfg: &LlamaConfig) -> Result<()> {
    let dims = hidden.dims();
    if dims != [ctx.num_tokens(), cfg.hidden_size] {
        return Err(ModelError::Input(format!(
            "hidden states have shape {dims:?}, expected [{}, {}]",
            ctx.num_tokens(),
            cfg.hidden_size
        )));
    }
    Ok(())
}

/// The device side: token embedding and layers `[0, k)`.
#[derive(Clone, Debug)]
pub struct EdgeModel {
    cfg: LlamaConfig,
    split: SplitPoint,
    /// `[vocab, hidden]` (rows are converted when looked up).
    embed: Embedding,
    /// The dtype of the hidden states the layers compute in and this part produces.
    act: DType,
    layers: LayerStack,
}

impl EdgeModel {
    /// Loads the embedding and the edge's layers from `src`.
    pub fn load(
        src: &dyn TensorSource,
        cfg: &LlamaConfig,
        split: SplitPoint,
        opts: LoadOptions<'_>,
    ) -> Result<Self> {
        check_split(cfg, split)?;
        let shape = [cfg.vocab_size, cfg.hidden_size];
        let embed = match src.load_quantized(EMBED, &shape)? {
            Some(Quantized::Int8(q)) => Embedding::Int8(Arc::new(q)),
            Some(Quantized::Q4(q)) => Embedding::Q4(Arc::new(q)),
            None => Embedding::Dense(src.load(EMBED, &shape, opts.dtype, opts.device)?),
        };
        Ok(Self {
            cfg: cfg.clone(),
            split,
            embed,
            act: activation_dtype(opts.dtype, opts.device),
            layers: LayerStack::load(src, cfg, split.edge_range(), opts.dtype, opts.device)?,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn split(&self) -> SplitPoint {
        self.split
    }

    /// Hidden-state dtype this part produces.
    pub fn dtype(&self) -> DType {
        self.act
    }

    /// Embeds `tokens` and runs the edge layers: returns layer-`k` hidden states
    /// `[tokens, hidden]`. `ctx` must describe exactly `tokens.len()` rows.
    pub fn forward(&self, tokens: &[u32], ctx: &ForwardCtx, kv: &mut dyn KvView) -> Result<Tensor> {
        if tokens.len() != ctx.num_tokens() {
            return Err(ModelError::Input(format!(
                "{} tokens for a batch of {} rows",
                tokens.len(),
                ctx.num_tokens()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        let x = self.embed.lookup(tokens, self.act, self.layers.device())?;
        self.layers.forward(x, ctx, kv)
    }

    /// Bytes of the weights held in memory: the embedding table and the layers'
    /// projections (norms excluded: a few KB).
    pub fn weight_bytes(&self) -> usize {
        self.embed.bytes() + self.layers.weight_bytes()
    }

    /// How the embedding table is held: `f32`, `f16`, `bf16`, `int8` or `q4`.
    pub fn embedding_format(&self) -> &'static str {
        match &self.embed {
            Embedding::Dense(t) => crate::weights::dtype_user_name(t.dtype()),
            Embedding::Int8(_) => "int8",
            Embedding::Q4(_) => "q4",
        }
    }
}

/// The embedding table as the device holds it: floats, or a light edge's int8 rows or 4-bit
/// blocks, whose rows are dequantized when looked up (nothing needs the whole table in f32).
#[derive(Clone, Debug)]
enum Embedding {
    Dense(Tensor),
    Int8(Arc<Int8Rows>),
    Q4(Arc<Q4Blocks>),
}

impl Embedding {
    fn lookup(&self, tokens: &[u32], act: DType, device: &Device) -> Result<Tensor> {
        let rows = |hidden: usize, row_into: &dyn Fn(usize, &mut [f32])| {
            let mut out = vec![0f32; tokens.len() * hidden];
            for (dst, &t) in out.chunks_exact_mut(hidden.max(1)).zip(tokens) {
                row_into(t as usize, dst);
            }
            Tensor::from_vec(out, (tokens.len(), hidden), device)
        };
        let x = match self {
            Self::Dense(table) => {
                let ids = Tensor::from_slice(tokens, tokens.len(), table.device())?;
                table.index_select(&ids, 0)?
            }
            Self::Int8(q) => rows(q.k(), &|r, dst| q.row_into(r, dst))?,
            Self::Q4(q) => rows(q.k(), &|r, dst| q.row_into(r, dst))?,
        };
        Ok(x.to_dtype(act)?)
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Int8(q) => q.bytes(),
            Self::Q4(q) => q.bytes(),
        }
    }
}

/// The server side: layers `[k, n)`, final norm and LM head.
#[derive(Clone, Debug)]
pub struct CloudModel {
    cfg: LlamaConfig,
    split: SplitPoint,
    layers: LayerStack,
    norm: RmsNorm,
    lm_head: Linear,
    /// The dtype the weights were loaded in.
    weights: DType,
    /// Where the weights live and the layers compute.
    device: Device,
}

impl CloudModel {
    /// Loads the cloud's layers, the final norm and the LM head (the embedding matrix when the
    /// model ties them and the source has no separate head).
    pub fn load(
        src: &dyn TensorSource,
        cfg: &LlamaConfig,
        split: SplitPoint,
        opts: LoadOptions<'_>,
    ) -> Result<Self> {
        check_split(cfg, split)?;
        let layers = LayerStack::load(src, cfg, split.cloud_range(), opts.dtype, opts.device)?;
        let head_name = if src.contains(LM_HEAD) || !cfg.tie_word_embeddings {
            LM_HEAD
        } else {
            EMBED
        };
        let head = src.load(
            head_name,
            &[cfg.vocab_size, cfg.hidden_size],
            opts.dtype,
            opts.device,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            split,
            layers,
            norm: RmsNorm::load(src, FINAL_NORM, cfg, opts.dtype, opts.device)?,
            lm_head: Linear::from_weight(head)?,
            weights: opts.dtype,
            device: opts.device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn split(&self) -> SplitPoint {
        self.split
    }

    /// Hidden-state dtype this part expects.
    pub fn dtype(&self) -> DType {
        self.lm_head.dtype()
    }

    /// Bytes of the weights one decode step reads: every layer's projections and the LM head.
    pub fn weight_bytes(&self) -> usize {
        self.layers.weight_bytes() + self.lm_head.weight_bytes()
    }

    /// Multiply-adds per row through the layers' projections and the LM head (a decode
    /// step of `s` sessions does `2 s` times this many FLOPs in its matmuls).
    pub fn matmul_params(&self) -> usize {
        let c = &self.cfg;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let layer = h * (c.q_size() + 2 * c.kv_size()) + c.q_size() * h + 3 * h * f;
        self.layers.len() * layer + c.vocab_size * h
    }

    /// The device the weights were loaded on: the layers compute there, and
    /// [`Self::forward_layers`] moves its input there.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the weights were loaded in (bf16 weights compute with f32 hidden states on
    /// the CPU: [`crate::layers::activation_dtype`]).
    pub fn weight_dtype(&self) -> DType {
        self.weights
    }

    /// Runs the cloud layers over layer-`k` hidden states `[tokens, hidden]` and returns the
    /// f32 logits `[sequences, vocab]` of each sequence's last row in `ctx`.
    pub fn forward(
        &self,
        hidden: &Tensor,
        ctx: &ForwardCtx,
        kv: &mut dyn KvView,
    ) -> Result<Tensor> {
        let x = self.forward_layers(hidden, ctx, kv)?;
        let last = ctx.last_rows();
        let idx = Tensor::from_slice(&last, last.len(), x.device())?;
        self.logits(&x.index_select(&idx, 0)?)
    }

    /// Runs only the cloud layers: returns layer-`n` hidden states (before the final norm).
    pub fn forward_layers(
        &self,
        hidden: &Tensor,
        ctx: &ForwardCtx,
        kv: &mut dyn KvView,
    ) -> Result<Tensor> {
        check_hidden(hidden, ctx, &self.cfg)?;
        let x = hidden.to_device(&self.device)?.to_dtype(self.dtype())?;
        self.layers.forward(x, ctx, kv)
    }

    /// Final norm and LM head over rows `[rows, hidden]`: f32 logits `[rows, vocab]`.
    pub fn logits(&self, rows: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(rows)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}

fn check_split(cfg: &LlamaConfig, split: SplitPoint) -> Result<()> {
    if split.num_layers() != cfg.num_hidden_layers {
        return Err(ModelError::Split(format!(
            "split is for a {}-layer model but the configuration has {} layers",
            split.num_layers(),
            cfg.num_hidden_layers
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_point_bounds() {
        assert!(SplitPoint::new(0, 4).is_err());
        assert!(SplitPoint::new(4, 4).is_err());
        let s = SplitPoint::new(3, 4).expect("valid");
        assert_eq!(s.edge_range(), 0..3);
        assert_eq!(s.cloud_range(), 3..4);
        let e = SplitPoint::new(9, 4).expect_err("too deep");
        assert!(e.to_string().contains("between 1 and 3"), "{e}");
    }
}
