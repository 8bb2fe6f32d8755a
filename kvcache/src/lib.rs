//! `tandem-kvcache`: the cloud's paged KV cache.
//!
//! # Layout
//! - [`block`]: the logical side, with no tensors: a [`BlockPool`] of fixed-size blocks (an
//!   O(1) free list linked by index, reference counts) and one [`BlockTable`] per sequence,
//!   which frees its blocks when dropped. Full blocks can be shared between sequences through
//!   a hash chain over the hidden states that filled them (prefix sharing); a shared block is
//!   copied before it would be written (copy-on-write).
//! - [`storage`]: the physical side, per-layer K/V buffers `[blocks, block_size, kv_heads,
//!   head_dim]` in f32, f16 or bf16, sized by a block count or a memory budget.
//! - [`attention`]: the CPU paged-attention kernel, reading K/V straight from the blocks.
//! - [`paged`]: [`PagedKv`], which plugs storage and kernel into the model's layer code
//!   through `tandem_model::KvView`.
//!
//! - `cuda` (feature `cuda`): `CudaKvStorage` and `CudaPagedKv`, the same interface on a GPU,
//!   backed by this crate's own kernels (`cuda/paged_attention.cu`). CI compiles it without a
//!   GPU (scripts/build-cuda.sh); `tandem device-check` checks it against the CPU on a GPU.
//!
//! The scheduler and engine that drive this crate live in their own crates.

// Unsafe code lives in tandem-kernels; the exception here is launching our CUDA kernels
// (FFI, `cuda.rs`).
#![deny(unsafe_code)]

pub use tandem_kernels::attention;
pub mod block;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;
pub mod paged;
pub mod storage;

pub use block::{AllocStatus, BlockHash, BlockId, BlockPool, BlockTable, CopyOp, KvError};
pub use paged::PagedKv;
pub use storage::{KvDtype, KvLayout, KvStorage, StorageError};
