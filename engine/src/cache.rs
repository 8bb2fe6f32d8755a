//! The paged KV blocks the cloud model computes over: host memory, or the GPU's.

use candle_core::{Device, Tensor};
use tandem_kvcache::{BlockTable, KvLayout, KvStorage, PagedKv};
use tandem_model::{CloudModel, ForwardCtx};

use crate::types::EngineError;

/// The paged KV blocks, where the cloud model computes.
pub enum Cache {
    Cpu(KvStorage),
    #[cfg(feature = "cuda")]
    Cuda(tandem_kvcache::cuda::CudaKvStorage),
}

impl Cache {
    /// The cache for `layout` on `device` (the model's).
    pub fn new(layout: KvLayout, device: &Device) -> Result<Self, EngineError> {
        match device {
            Device::Cpu => Ok(Self::Cpu(KvStorage::new(layout))),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => tandem_kvcache::cuda::CudaKvStorage::new(layout, device)
                .map(Self::Cuda)
                .map_err(|e| EngineError::Model(e.to_string())),
            #[allow(unreachable_patterns)]
            other => Err(EngineError::Model(format!(
                "no paged KV cache for the device {other:?} in this build"
            ))),
        }
    }

    pub(crate) fn copy(&mut self, op: tandem_kvcache::CopyOp) -> Result<(), EngineError> {
        match self {
            Self::Cpu(s) => s.copy(op),
            #[cfg(feature = "cuda")]
            Self::Cuda(s) => s.copy(op).map_err(|e| EngineError::Model(e.to_string()))?,
        }
        Ok(())
    }

    pub fn forward(
        &mut self,
        cloud: &CloudModel,
        x: &Tensor,
        ctx: &ForwardCtx,
        tables: &[&BlockTable],
    ) -> Result<Tensor, tandem_model::ModelError> {
        self.forward_timed(cloud, x, ctx, tables, false)
            .map(|(t, _)| t)
    }

    /// [`Self::forward`]; with `time_attention` on a GPU, also the seconds its attention
    /// calls took (each synchronised: a diagnosis that slows the step).
    pub(crate) fn forward_timed(
        &mut self,
        cloud: &CloudModel,
        x: &Tensor,
        ctx: &ForwardCtx,
        tables: &[&BlockTable],
        time_attention: bool,
    ) -> Result<(Tensor, Option<f64>), tandem_model::ModelError> {
        let _ = time_attention;
        match self {
            Self::Cpu(s) => Ok((
                cloud.forward_layers(x, ctx, &mut PagedKv::new(s, tables))?,
                None,
            )),
            #[cfg(feature = "cuda")]
            Self::Cuda(s) => {
                use tandem_kvcache::cuda::CudaPagedKv;
                let mut kv = if time_attention {
                    CudaPagedKv::timed(s, tables)
                } else {
                    CudaPagedKv::new(s, tables)
                };
                let out = cloud.forward_layers(x, ctx, &mut kv)?;
                Ok((out, kv.attend_seconds()))
            }
        }
    }
}
