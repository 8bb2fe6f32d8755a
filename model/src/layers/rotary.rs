//! [`Rotary`]: the rotary position embedding, and [`RopeTables`], its cos/sin rows for the
//! positions of one forward pass (built once, shared by every layer of the pass).

use candle_core::{DType, Device, Tensor};

use super::activation_dtype;
use crate::config::LlamaConfig;
use crate::error::Result;

/// Rotary position embedding (the half-split "NeoX" layout HF Llama weights use).
#[derive(Clone, Debug)]
pub struct Rotary {
    pub(super) inv_freq: Tensor, // [1, head_dim / 2], f32
    dtype: DType,
}

/// cos/sin rows for the positions of one forward pass, shared by all its layers.
#[derive(Clone, Debug)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    /// `cos` and `sin` as f32 slices, for the fused CPU path.
    pub(super) cpu: Option<(Vec<f32>, Vec<f32>)>,
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
    pub(super) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?.unsqueeze(0)?;
        Ok(candle_nn::rotary_emb::rope_thd(&x, &self.cos, &self.sin)?.squeeze(0)?)
    }
}
