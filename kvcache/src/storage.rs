//! Physical K/V storage: per layer, one key and one value buffer laid out
//! `[blocks, block_size, kv_heads, head_dim]` in f32, f16 or bf16.
//!
//! The storage knows nothing of sequences; [`crate::block`] decides which block and slot a
//! position lives in, and [`crate::paged::PagedKv`] writes new keys/values there and runs the
//! paged attention kernel over them. Sizing comes from a block count or a memory budget
//! ([`KvLayout::blocks_for_budget`]).
//!
//! Cost: `2 * layers * blocks * block_size * kv_heads * head_dim * elem_size` bytes, allocated
//! once, zeroed, never grown.

use half::{bf16, f16};

use crate::block::{BlockId, CopyOp};
use tandem_kernels::attention::{paged_attention, AttnError, KvElem, PagedAttnParams, SeqAttn};

/// Why the storage could not serve an attention call.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("layer {0} is not stored in this KV cache")]
    Layer(usize),
    #[error(transparent)]
    Kernel(#[from] AttnError),
}

/// Element type of the stored keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    BF16,
}

impl KvDtype {
    pub fn size_in_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// The shape of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Global index of the first layer stored (the cloud starts at the split point).
    pub first_layer: usize,
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Elements of one position of one layer (`kv_heads * head_dim`).
    pub fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes one block takes over all layers, keys and values.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.block_size * self.row() * self.dtype.size_in_bytes()
    }

    /// Blocks that fit in `bytes` (e.g. from `--kv-cache-gib`).
    pub fn blocks_for_budget(&self, bytes: usize) -> usize {
        bytes / self.bytes_per_block().max(1)
    }

    /// Total bytes of the storage.
    pub fn total_bytes(&self) -> usize {
        self.num_blocks * self.bytes_per_block()
    }
}

#[derive(Debug)]
enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Buf {
    fn zeros(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => Self::F32(vec![0.0; n]),
            KvDtype::F16 => Self::F16(vec![f16::ZERO; n]),
            KvDtype::BF16 => Self::BF16(vec![bf16::ZERO; n]),
        }
    }

    fn write(&mut self, at: usize, row: &[f32]) {
        match self {
            Self::F32(b) => b[at..at + row.len()].copy_from_slice(row),
            Self::F16(b) => b[at..at + row.len()]
                .iter_mut()
                .zip(row)
                .for_each(|(d, &s)| *d = f16::from_f32(s)),
            Self::BF16(b) => b[at..at + row.len()]
                .iter_mut()
                .zip(row)
                .for_each(|(d, &s)| *d = bf16::from_f32(s)),
        }
    }

    fn copy_within(&mut self, src: usize, dst: usize, len: usize) {
        match self {
            Self::F32(b) => b.copy_within(src..src + len, dst),
            Self::F16(b) => b.copy_within(src..src + len, dst),
            Self::BF16(b) => b.copy_within(src..src + len, dst),
        }
    }
}

/// Keys and values of every stored layer.
#[derive(Debug)]
pub struct KvStorage {
    layout: KvLayout,
    k: Vec<Buf>,
    v: Vec<Buf>,
}

impl KvStorage {
    /// Zeroed storage for `layout`.
    pub fn new(layout: KvLayout) -> Self {
        let n = layout.num_blocks * layout.block_size * layout.row();
        let bufs = || {
            (0..layout.num_layers)
                .map(|_| Buf::zeros(layout.dtype, n))
                .collect()
        };
        Self {
            layout,
            k: bufs(),
            v: bufs(),
        }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    fn local(&self, layer: usize) -> Option<usize> {
        layer
            .checked_sub(self.layout.first_layer)
            .filter(|&l| l < self.layout.num_layers)
    }

    fn offset(&self, block: BlockId, slot: usize) -> Option<usize> {
        let l = &self.layout;
        ((block.0 as usize) < l.num_blocks && slot < l.block_size)
            .then(|| (block.0 as usize * l.block_size + slot) * l.row())
    }

    /// Stores one position's key and value rows (`kv_heads * head_dim` each) of `layer`
    /// (global index). Returns false when the layer, block or slot is out of range.
    pub fn write(
        &mut self,
        layer: usize,
        block: BlockId,
        slot: usize,
        k: &[f32],
        v: &[f32],
    ) -> bool {
        let row = self.layout.row();
        match (self.local(layer), self.offset(block, slot)) {
            (Some(l), Some(at)) if k.len() == row && v.len() == row => {
                self.k[l].write(at, k);
                self.v[l].write(at, v);
                true
            }
            _ => false,
        }
    }

    /// Performs a copy-on-write copy in every layer.
    pub fn copy(&mut self, op: CopyOp) {
        let (Some(src), Some(dst)) = (self.offset(op.src, 0), self.offset(op.dst, 0)) else {
            return;
        };
        let len = op.len.min(self.layout.block_size) * self.layout.row();
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            b.copy_within(src, dst, len);
        }
    }

    /// Runs the paged attention kernel over `layer` (global index).
    pub fn attend(
        &self,
        layer: usize,
        q: &[f32],
        seqs: &[SeqAttn<'_>],
        params: &PagedAttnParams,
        out: &mut [f32],
    ) -> Result<(), StorageError> {
        let l = self.local(layer).ok_or(StorageError::Layer(layer))?;
        match (&self.k[l], &self.v[l]) {
            (Buf::F32(k), Buf::F32(v)) => run(q, seqs, k, v, params, out),
            (Buf::F16(k), Buf::F16(v)) => run(q, seqs, k, v, params, out),
            (Buf::BF16(k), Buf::BF16(v)) => run(q, seqs, k, v, params, out),
            // Keys and values are always made with the same dtype.
            _ => Err(StorageError::Layer(layer)),
        }
    }
}

fn run<T: KvElem>(
    q: &[f32],
    seqs: &[SeqAttn<'_>],
    k: &[T],
    v: &[T],
    params: &PagedAttnParams,
    out: &mut [f32],
) -> Result<(), StorageError> {
    Ok(paged_attention(q, seqs, k, v, params, out)?)
}
