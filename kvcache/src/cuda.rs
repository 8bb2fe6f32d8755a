//! The paged cache on a CUDA device, behind the `cuda` feature: the same [`KvView`] interface
//! as [`crate::PagedKv`], backed by `candle-flash-attn`'s paged varlen kernel.
//!
//! **Status: written against candle-flash-attn 0.11's API and never compiled or run here**
//! (the machines this crate is built on have no CUDA toolkit; CPU builds do not compile this
//! file). Treat it as the interface and the plan, to be proved on a GPU before use.
//!
//! Layout: per layer, K and V are one device tensor each, `[num_blocks * block_size,
//! kv_heads * head_dim]` (a view of `[num_blocks, block_size, kv_heads, head_dim]`, the shape
//! the kernel reads) in f16 or bf16 (flash-attention has no f32 path). `block_size` must be a
//! multiple of 32 (the kernel's requirement).
//!
//! Per layer and step: (1) the batch's new keys and values are scattered into their slots
//! (`slot = block * block_size + pos % block_size`) with one `scatter_set` each; (2) one call
//! of `flash_attn_varlen_paged_windowed` over the whole varlen batch, causal (window
//! `(None, Some(0))`, aligned bottom-right so a chunk sees every cached position before it),
//! with `seqlens_q` the cumulative query lengths, `seqlens_k` the cumulative context lengths
//! and the block tables padded to the longest one. Nothing is gathered per sequence.

use candle_core::{DType, Device, Tensor};
use tandem_model::{ForwardCtx, KvView, ModelError};

use crate::block::BlockTable;
use crate::storage::KvLayout;

/// K/V blocks of every cloud layer on one CUDA device.
#[derive(Debug)]
pub struct CudaKvStorage {
    layout: KvLayout,
    dtype: DType,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl CudaKvStorage {
    /// Allocates `layout.num_blocks` blocks per layer on `device` in `dtype` (f16 or bf16).
    pub fn new(layout: KvLayout, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        if !matches!(dtype, DType::F16 | DType::BF16) {
            return Err(ModelError::Cache(format!(
                "the CUDA paged cache holds f16 or bf16, not {dtype:?}"
            )));
        }
        if layout.block_size % 32 != 0 {
            return Err(ModelError::Cache(format!(
                "the CUDA paged kernel needs a block size that is a multiple of 32, not {}",
                layout.block_size
            )));
        }
        let shape = (
            layout.num_blocks * layout.block_size,
            layout.kv_heads * layout.head_dim,
        );
        let mut k = Vec::with_capacity(layout.num_layers);
        let mut v = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(Self {
            layout,
            dtype,
            k,
            v,
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Copy-on-write: copies the first `len` slots of block `src` into block `dst`, every layer.
    pub fn copy_block(&mut self, src: u32, dst: u32, len: usize) -> Result<(), ModelError> {
        let bs = self.layout.block_size;
        for t in self.k.iter().chain(self.v.iter()) {
            let rows = t.narrow(0, src as usize * bs, len)?.contiguous()?;
            t.slice_set(&rows, 0, dst as usize * bs)?;
        }
        Ok(())
    }
}

/// One forward pass's view of the CUDA cache (the counterpart of [`crate::PagedKv`]).
#[derive(Debug)]
pub struct CudaPagedKv<'a> {
    storage: &'a mut CudaKvStorage,
    tables: Vec<Vec<u32>>,
}

impl<'a> CudaPagedKv<'a> {
    /// `tables[i]` belongs to the `i`-th sequence of the batch and holds its new positions.
    pub fn new(storage: &'a mut CudaKvStorage, tables: &[&BlockTable]) -> Self {
        let tables = tables
            .iter()
            .map(|t| t.blocks().iter().map(|b| b.0).collect())
            .collect();
        Self { storage, tables }
    }
}

impl KvView for CudaPagedKv<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Tensor, ModelError> {
        let (rows, heads, head_dim) = q.dims3()?;
        let (_, kv_heads, _) = k.dims3()?;
        let spans = ctx.seqs();
        if spans.len() != self.tables.len() {
            return Err(ModelError::Cache(format!(
                "{} sequences in the batch but {} block tables",
                spans.len(),
                self.tables.len()
            )));
        }
        let l = layer
            .checked_sub(self.storage.layout.first_layer)
            .filter(|l| *l < self.storage.k.len())
            .ok_or_else(|| ModelError::Cache(format!("layer {layer} is not in this cache")))?;
        let bs = self.storage.layout.block_size;
        let row = kv_heads * head_dim;
        let device = q.device();

        // (1) Scatter the new keys and values into their slots.
        let mut slots = Vec::with_capacity(rows * row);
        for (span, table) in spans.iter().zip(&self.tables) {
            for j in 0..span.len {
                let pos = span.past + j;
                let block = table.get(pos / bs).copied().ok_or_else(|| {
                    ModelError::Cache(format!("position {pos} has no block reserved"))
                })?;
                let slot = block as i64 * bs as i64 + (pos % bs) as i64;
                slots.extend(std::iter::repeat_n(slot, row));
            }
        }
        let index = Tensor::from_vec(slots, (rows, row), device)?;
        let dtype = self.storage.dtype;
        let kr = k.to_dtype(dtype)?.reshape((rows, row))?.contiguous()?;
        let vr = v.to_dtype(dtype)?.reshape((rows, row))?.contiguous()?;
        self.storage.k[l].scatter_set(&index, &kr, 0)?;
        self.storage.v[l].scatter_set(&index, &vr, 0)?;

        // (2) One paged varlen flash-attention call over the batch.
        let mut cu_q = vec![0u32];
        let mut cu_k = vec![0u32];
        let (mut max_q, mut max_k, mut max_blocks) = (0usize, 0usize, 0usize);
        for (span, table) in spans.iter().zip(&self.tables) {
            let ctx_len = span.past + span.len;
            cu_q.push(cu_q[cu_q.len() - 1] + span.len as u32);
            cu_k.push(cu_k[cu_k.len() - 1] + ctx_len as u32);
            max_q = max_q.max(span.len);
            max_k = max_k.max(ctx_len);
            max_blocks = max_blocks.max(table.len());
        }
        let mut padded = Vec::with_capacity(spans.len() * max_blocks);
        for table in &self.tables {
            padded.extend_from_slice(table);
            padded.extend(std::iter::repeat_n(0u32, max_blocks - table.len()));
        }
        let n = spans.len();
        let block_table = Tensor::from_vec(padded, (n, max_blocks), device)?;
        let seqlens_q = Tensor::from_vec(cu_q, n + 1, device)?;
        let seqlens_k = Tensor::from_vec(cu_k, n + 1, device)?;
        let blocks = self.storage.layout.num_blocks;
        let kc = self.storage.k[l].reshape((blocks, bs, kv_heads, head_dim))?;
        let vc = self.storage.v[l].reshape((blocks, bs, kv_heads, head_dim))?;
        let out = candle_flash_attn::flash_attn_varlen_paged_windowed(
            &q.to_dtype(dtype)?.contiguous()?,
            &kc,
            &vc,
            &seqlens_q,
            &seqlens_k,
            &block_table,
            None,
            max_q,
            max_k,
            1.0 / (head_dim as f32).sqrt(),
            None,
            Some(0),
            bs,
            None,
        )?;
        Ok(out.reshape((rows, heads * head_dim))?.to_dtype(q.dtype())?)
    }
}
