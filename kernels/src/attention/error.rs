//! [`AttnError`]: why a [`super::paged_attention`] call was refused, and [`KvSide`], which
//! cache an error is about. Every input is checked before any work starts, so an error means
//! nothing was written.

use thiserror::Error;

/// Which of the two caches an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSide {
    /// The key cache.
    Key,
    /// The value cache.
    Value,
}

impl std::fmt::Display for KvSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvSide::Key => "key",
            KvSide::Value => "value",
        })
    }
}

/// Why a [`paged_attention`](super::paged_attention) call was refused. Nothing is written to
/// `out` on error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AttnError {
    /// A dimension that must be positive is zero.
    #[error("{name} must be positive")]
    ZeroDimension { name: &'static str },
    /// The query heads do not split evenly over the kv heads.
    #[error("num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")]
    HeadsNotDivisible {
        num_heads: usize,
        num_kv_heads: usize,
    },
    /// A product of the dimensions does not fit in `usize`.
    #[error("attention dimensions overflow usize")]
    DimensionOverflow,
    /// `q` is not a whole number of rows.
    #[error("q has {len} elements, not a whole number of rows of {row_len}")]
    QueryShape { len: usize, row_len: usize },
    /// `out` and `q` differ in length.
    #[error("out has {out_len} elements but q has {q_len}")]
    OutputShape { q_len: usize, out_len: usize },
    /// A cache is not a whole number of blocks.
    #[error("{side} cache has {len} elements, not a whole number of blocks of {block_len}")]
    CacheShape {
        side: KvSide,
        len: usize,
        block_len: usize,
    },
    /// The key and value caches differ in length.
    #[error("key cache has {k_len} elements but value cache has {v_len}")]
    CacheMismatch { k_len: usize, v_len: usize },
    /// A sequence has more new rows than positions.
    #[error("sequence {seq}: q_len {q_len} exceeds context_len {context_len}")]
    QueryLongerThanContext {
        seq: usize,
        q_len: usize,
        context_len: usize,
    },
    /// A sequence's rows run past the end of `q`.
    #[error("sequence {seq}: rows from {q_start} (q_len {q_len}) run past the {rows} rows of q")]
    RowsOutOfRange {
        seq: usize,
        q_start: usize,
        q_len: usize,
        rows: usize,
    },
    /// Two sequences claim the same query row.
    #[error("sequences {first} and {second} share query rows")]
    OverlappingRows { first: usize, second: usize },
    /// A block table does not cover the sequence's context.
    #[error("sequence {seq}: {len} blocks cannot hold {context_len} positions ({needed} needed)")]
    BlockTableTooShort {
        seq: usize,
        len: usize,
        needed: usize,
        context_len: usize,
    },
    /// A block id names a block the cache does not have.
    #[error("sequence {seq}: block id {block} (table index {index}) is past the {num_blocks} cached blocks")]
    BlockOutOfRange {
        seq: usize,
        index: usize,
        block: u32,
        num_blocks: usize,
    },
}
