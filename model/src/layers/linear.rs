//! [`Linear`]: a dense projection without bias, and [`Packed`], the weight packed once at
//! load for one of the model's CPU kernels (f32, bf16 or a light edge's int8). Loading checks
//! each stored tensor's shape and refuses 4-bit blocks anywhere but the embedding table.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use crate::cpu;
use crate::error::{ModelError, Result};
use crate::weights::{Quantized, TensorSource};
use tandem_kernels::gemm::PackedMatrix;
use tandem_kernels::gemm_bf16::{Bf16Kernel, PackedBf16};
use tandem_kernels::quant::Int8Rows;

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
    pub(super) fn packed(&self) -> Option<&Packed> {
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
