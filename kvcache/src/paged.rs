//! [`PagedKv`]: the paged cache seen from one forward pass, plugged into the model's layer
//! code through `tandem_model::KvView`.
//!
//! For each layer it (1) writes the batch's new keys and values into their slots, found through
//! each sequence's block table, then (2) runs the paged attention kernel straight over the
//! blocks. The caller must have reserved the new positions in every table beforehand
//! ([`crate::BlockTable::reserve`]) and applied the copy-on-write copies it returned.
//!
//! Cost per layer: one host copy of q, k and v to f32 (the CPU kernel reads f32 queries), the
//! slot writes (`tokens * kv_heads * head_dim` elements each for K and V), and the kernel.

use candle_core::{DType, Tensor};
use tandem_model::{ForwardCtx, KvView, ModelError};

use crate::block::{BlockId, BlockTable};
use crate::storage::KvStorage;
use tandem_kernels::attention::{PagedAttnParams, SeqAttn};

/// The storage and the block tables of one batch, in the batch's sequence order.
#[derive(Debug)]
pub struct PagedKv<'a> {
    storage: &'a mut KvStorage,
    tables: Vec<Vec<u32>>,
}

impl<'a> PagedKv<'a> {
    /// `tables[i]` belongs to the `i`-th sequence of the `ForwardCtx` the layers will be run
    /// with, and must already hold its new positions.
    pub fn new(storage: &'a mut KvStorage, tables: &[&BlockTable]) -> Self {
        let tables = tables
            .iter()
            .map(|t| t.blocks().iter().map(|b| b.0).collect())
            .collect();
        Self { storage, tables }
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl KvView for PagedKv<'_> {
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
        let block_size = self.storage.layout().block_size;
        let row = kv_heads * head_dim;
        let (kf, vf) = (host_f32(k)?, host_f32(v)?);
        for (span, table) in spans.iter().zip(&self.tables) {
            for j in 0..span.len {
                let pos = span.past + j;
                let block = table.get(pos / block_size).copied().ok_or_else(|| {
                    ModelError::Cache(format!("position {pos} has no block reserved"))
                })?;
                let r = (span.start + j) * row;
                let (kr, vr) = (&kf[r..r + row], &vf[r..r + row]);
                if !self
                    .storage
                    .write(layer, BlockId(block), pos % block_size, kr, vr)
                {
                    return Err(ModelError::Cache(format!(
                        "layer {layer}, block {block}: outside the storage"
                    )));
                }
            }
        }
        let seqs: Vec<SeqAttn<'_>> = spans
            .iter()
            .zip(&self.tables)
            .map(|(s, t)| SeqAttn {
                q_start: s.start,
                q_len: s.len,
                context_len: s.past + s.len,
                block_table: t,
            })
            .collect();
        let params = PagedAttnParams {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            block_size,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        let qf = host_f32(q)?;
        let mut out = vec![0f32; qf.len()];
        self.storage
            .attend(layer, &qf, &seqs, &params, &mut out)
            .map_err(|e| ModelError::Cache(e.to_string()))?;
        Ok(Tensor::from_vec(out, (rows, heads * head_dim), q.device())?.to_dtype(q.dtype())?)
    }
}
