//! The checks of one call: [`Geometry`], the validated shapes with the strides the kernel
//! needs, and the checks of each sequence against them (rows inside `q` and disjoint, block
//! tables long enough and in range). Below these checks the kernel only sees valid geometry.

use super::error::{AttnError, KvSide};
use super::{PagedAttnParams, SeqAttn};

/// Validated shapes of one call, with the strides the kernel needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) num_kv_heads: usize,
    /// Query heads per kv head.
    pub(super) group: usize,
    pub(super) head_dim: usize,
    pub(super) block_size: usize,
    /// Elements in one row of `q` / `out`: `num_heads * head_dim`.
    pub(super) row_len: usize,
    /// Elements in one cache slot: `num_kv_heads * head_dim`.
    pub(super) slot_len: usize,
    /// Elements in one cache block: `block_size * slot_len`.
    pub(super) block_len: usize,
    /// Rows of `q`.
    pub(super) rows: usize,
    /// Blocks in each cache.
    pub(super) num_blocks: usize,
}

impl Geometry {
    pub(super) fn check(
        p: &PagedAttnParams,
        q_len: usize,
        out_len: usize,
        k_len: usize,
        v_len: usize,
    ) -> Result<Self, AttnError> {
        for (name, value) in [
            ("num_heads", p.num_heads),
            ("num_kv_heads", p.num_kv_heads),
            ("head_dim", p.head_dim),
            ("block_size", p.block_size),
        ] {
            if value == 0 {
                return Err(AttnError::ZeroDimension { name });
            }
        }
        if !p.num_heads.is_multiple_of(p.num_kv_heads) {
            return Err(AttnError::HeadsNotDivisible {
                num_heads: p.num_heads,
                num_kv_heads: p.num_kv_heads,
            });
        }
        let overflow = || AttnError::DimensionOverflow;
        let row_len = p.num_heads.checked_mul(p.head_dim).ok_or_else(overflow)?;
        let slot_len = p
            .num_kv_heads
            .checked_mul(p.head_dim)
            .ok_or_else(overflow)?;
        let block_len = slot_len.checked_mul(p.block_size).ok_or_else(overflow)?;
        if !q_len.is_multiple_of(row_len) {
            return Err(AttnError::QueryShape {
                len: q_len,
                row_len,
            });
        }
        if out_len != q_len {
            return Err(AttnError::OutputShape { q_len, out_len });
        }
        for (side, len) in [(KvSide::Key, k_len), (KvSide::Value, v_len)] {
            if len % block_len != 0 {
                return Err(AttnError::CacheShape {
                    side,
                    len,
                    block_len,
                });
            }
        }
        if k_len != v_len {
            return Err(AttnError::CacheMismatch { k_len, v_len });
        }
        Ok(Self {
            num_kv_heads: p.num_kv_heads,
            group: p.num_heads / p.num_kv_heads,
            head_dim: p.head_dim,
            block_size: p.block_size,
            row_len,
            slot_len,
            block_len,
            rows: q_len / row_len,
            num_blocks: k_len / block_len,
        })
    }
}

/// Checks every sequence against the geometry and returns the indices of the sequences that
/// have rows, sorted by `q_start`.
pub(super) fn check_sequences(
    seqs: &[SeqAttn<'_>],
    geo: &Geometry,
) -> Result<Vec<usize>, AttnError> {
    for (i, s) in seqs.iter().enumerate() {
        check_sequence(i, s, geo)?;
    }
    let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].q_len > 0).collect();
    order.sort_by_key(|&i| (seqs[i].q_start, i));
    for pair in order.windows(2) {
        let (a, b) = (&seqs[pair[0]], &seqs[pair[1]]);
        if a.q_start + a.q_len > b.q_start {
            return Err(AttnError::OverlappingRows {
                first: pair[0].min(pair[1]),
                second: pair[0].max(pair[1]),
            });
        }
    }
    Ok(order)
}

fn check_sequence(seq: usize, s: &SeqAttn<'_>, geo: &Geometry) -> Result<(), AttnError> {
    if s.q_len > s.context_len {
        return Err(AttnError::QueryLongerThanContext {
            seq,
            q_len: s.q_len,
            context_len: s.context_len,
        });
    }
    if s.q_start
        .checked_add(s.q_len)
        .is_none_or(|end| end > geo.rows)
    {
        return Err(AttnError::RowsOutOfRange {
            seq,
            q_start: s.q_start,
            q_len: s.q_len,
            rows: geo.rows,
        });
    }
    // Only the blocks a query can reach are read: the last query sits at context_len - 1.
    let needed = if s.q_len == 0 {
        0
    } else {
        s.context_len.div_ceil(geo.block_size)
    };
    let Some(table) = s.block_table.get(..needed) else {
        return Err(AttnError::BlockTableTooShort {
            seq,
            len: s.block_table.len(),
            needed,
            context_len: s.context_len,
        });
    };
    if let Some((index, &block)) = table
        .iter()
        .enumerate()
        .find(|&(_, &b)| b as usize >= geo.num_blocks)
    {
        return Err(AttnError::BlockOutOfRange {
            seq,
            index,
            block,
            num_blocks: geo.num_blocks,
        });
    }
    Ok(())
}
