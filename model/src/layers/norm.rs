//! [`RmsNorm`]: RMSNorm with a learned scale, also kept as an f32 slice for the fused CPU path.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::activation_dtype;
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::weights::TensorSource;

/// RMSNorm with a learned scale.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    norm: candle_nn::RmsNorm,
    /// The scale as f32 on the CPU, for the fused CPU path.
    pub(super) cpu: Option<Arc<[f32]>>,
    pub(super) eps: f32,
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
