//! Paged attention on the CPU: causal scaled-dot-product attention for a varlen batch, read
//! straight from paged K/V storage.
//!
//! # Role
//!
//! One decoder layer of the cloud half runs many sessions at once. Each session contributes a
//! run of query rows (one row for a decode, several for a prefill chunk) and owns a list of
//! physical cache blocks. [`paged_attention`] walks each session's blocks in place; it never
//! gathers a session's K/V into a contiguous buffer.
//!
//! # Layout and invariants
//!
//! * `k_cache` and `v_cache` hold one layer, laid out `[num_blocks, block_size, kv_heads,
//!   head_dim]`. Position `p` of a sequence lives in block `block_table[p / block_size]`, slot
//!   `p % block_size`.
//! * `q` and `out` are `[tokens, num_heads, head_dim]`. A sequence owns rows `q_start ..
//!   q_start + q_len`; the rows of different sequences never overlap. Rows no sequence owns
//!   are left untouched in `out`.
//! * The new rows' K/V are already in the cache: query row `i` of a sequence sits at position
//!   `context_len - q_len + i` and attends to positions `0 ..= context_len - q_len + i`.
//! * Grouped-query attention: query head `h` reads kv head `h / (num_heads / num_kv_heads)`.
//! * Every input is checked before any work starts; bad input is an [`AttnError`], never a
//!   panic. The kernel below the check only ever sees validated geometry.
//!
//! # Parallelism and determinism
//!
//! The unit of work is one (query row, kv head) pair: the `num_heads / num_kv_heads` query
//! heads that share a kv head are computed together, so each key and value row is loaded (and,
//! for half-precision storage, converted) once per group rather than once per head. Their
//! outputs are one contiguous slice of `out`, so the tasks own disjoint `&mut` slices and need
//! no synchronisation. The tasks, in row order, are cut into contiguous parts that the
//! model's fork-join [`Team`] (the matmul threads) claims one at a time; each output element is
//! produced by exactly one task, always visiting the keys in the same order, so the result is
//! bit-identical whatever the thread count or schedule. Running on the team rather than a
//! separate pool keeps one set of threads hot across a layer's matmuls and attention.
//!
//! # Costs
//!
//! For a row at position `p`, one pass over `p + 1` keys: `2 * (p + 1) * head_dim` multiply-adds
//! per query head, and one `exp` per key and head. The softmax is streamed block by block (a
//! running max and sum per head, the output rescaled once per block), so no score vector longer
//! than one block is ever held. `f32` storage is read in place; `f16`/`bf16` blocks are widened
//! one block and kv head at a time. Rows of a prefill chunk each walk their own keys (keys are
//! not tiled across rows). Memory: one scratch buffer per part (`group * block_size +
//! 2 * block_size * head_dim + 2 * group` floats, at most [`PARTS_PER_THREAD`] parts per
//! thread) and one `Vec` of per-sequence task offsets per call.
//!
//! The inner loops are plain slice code written to auto-vectorise (4-wide SSE2 on the default
//! x86-64 target; wider when the workspace is built for a newer CPU). Rust never fuses a
//! multiply and an add on its own, so such a build changes speed, not results.

use crate::team::Team;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use thiserror::Error;

/// Parts per team thread in one call: enough that a thread finishing early finds more (rows
/// differ in context length), few enough that each part's scratch is paid for.
const PARTS_PER_THREAD: usize = 8;

/// An element type of the K/V cache, read as `f32` by the kernel.
pub trait KvElem: Copy + Send + Sync {
    /// Widens one element to `f32`.
    fn to_f32(self) -> f32;

    /// Widens `src` into `dst` (same length). Override where a batched conversion is faster.
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    /// `Some(src)` when `Self` is `f32`, so the kernel reads the cache without a copy.
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl KvElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
}

impl KvElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl KvElem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    /// bf16 is the top half of an f32, so widening is a shift (exact, NaN included): a loop
    /// the compiler vectorises, 16 lanes at a time on AVX-512. A prefill chunk widens its
    /// whole context once per query row and head group, so this is on the hot path (`half`'s
    /// slice conversion, one element at a time, made bf16 prefill 3x slower than f32).
    fn widen(src: &[bf16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present.
            return unsafe { widen_bf16_avx512(src, dst) };
        }
        widen_bf16(src, dst);
    }
}

fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// [`widen_bf16`] compiled for AVX-512 (the same shifts, 16 lanes at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn widen_bf16_avx512(src: &[bf16], dst: &mut [f32]) {
    widen_bf16(src, dst);
}

/// One sequence of the batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqAttn<'a> {
    /// First row of this sequence's queries in `q`.
    pub q_start: usize,
    /// Number of new query rows (a prefill chunk, or 1 for a decode).
    pub q_len: usize,
    /// Positions in the cache for this sequence, including the new rows, whose K/V the caller
    /// has already written. The new rows sit at positions `context_len - q_len .. context_len`.
    pub context_len: usize,
    /// Physical block ids of this sequence, in order; must cover `context_len` positions.
    /// Entries past the last needed block are ignored.
    pub block_table: &'a [u32],
}

/// Shapes shared by every sequence of one call.
#[derive(Debug, Clone, Copy)]
pub struct PagedAttnParams {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; must divide `num_heads`.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Positions per cache block.
    pub block_size: usize,
    /// Factor applied to every `q · k` score, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

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

/// Why a [`paged_attention`] call was refused. Nothing is written to `out` on error.
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

/// Computes causal attention for every sequence of the batch from paged K/V storage.
///
/// `q` and `out` are `[tokens, num_heads, head_dim]`; `k_cache` and `v_cache` are one layer,
/// `[num_blocks, block_size, num_kv_heads, head_dim]`. See the module doc for the semantics.
/// Rows of `out` that no sequence owns are not written. On error nothing is written.
pub fn paged_attention<T: KvElem>(
    q: &[f32],
    seqs: &[SeqAttn<'_>],
    k_cache: &[T],
    v_cache: &[T],
    params: &PagedAttnParams,
    out: &mut [f32],
) -> Result<(), AttnError> {
    paged_attention_on(Team::global(), q, seqs, k_cache, v_cache, params, out)
}

/// [`paged_attention`] on the threads of `team` (tests compare thread counts with it).
pub fn paged_attention_on<T: KvElem>(
    team: &Team,
    q: &[f32],
    seqs: &[SeqAttn<'_>],
    k_cache: &[T],
    v_cache: &[T],
    params: &PagedAttnParams,
    out: &mut [f32],
) -> Result<(), AttnError> {
    let geo = Geometry::check(params, q.len(), out.len(), k_cache.len(), v_cache.len())?;
    let order = check_sequences(seqs, &geo)?;
    let cache = Cache {
        k: k_cache,
        v: v_cache,
        geo,
    };
    // Task `t` of the `i`-th sequence in `order` is global task `starts[i] + t`: its row
    // `t / num_kv_heads`, kv head `t % num_kv_heads`.
    let mut starts = Vec::with_capacity(order.len() + 1);
    let mut total = 0;
    for &i in &order {
        starts.push(total);
        total += seqs[i].q_len * geo.num_kv_heads;
    }
    starts.push(total);
    if total == 0 {
        return Ok(());
    }
    let parts = total.min(PARTS_PER_THREAD * team.threads());
    let group_len = geo.group * geo.head_dim;
    let out_at = OutPtr(out.as_mut_ptr());
    team.run(parts, &|part| {
        let (lo, hi) = (part * total / parts, (part + 1) * total / parts);
        let mut scratch = Scratch::new(&geo);
        // The sequence holding task `lo`: starts are strictly increasing (no empty sequence
        // is in `order`), and `starts[0] = 0 <= lo < total`.
        let mut i = starts.partition_point(|&x| x <= lo) - 1;
        let mut t = lo;
        while t < hi {
            let seq = &seqs[order[i]];
            let end = starts[i + 1].min(hi);
            let first_pos = seq.context_len - seq.q_len;
            for u in t..end {
                let local = u - starts[i];
                let (row, kv_head) = (local / geo.num_kv_heads, local % geo.num_kv_heads);
                let at = (seq.q_start + row) * geo.row_len + kv_head * group_len;
                // SAFETY: `check_sequences` proved the sequences' rows disjoint and inside
                // `out`; within a row each kv head owns its own `group_len` floats; and each
                // task belongs to exactly one part. So no two writers share an element, and
                // `out` is borrowed mutably for the whole call.
                let out =
                    unsafe { std::slice::from_raw_parts_mut(out_at.get().add(at), group_len) };
                let task = Task {
                    kv_head,
                    keys: first_pos + row + 1,
                    q: &q[at..][..group_len],
                    scale: params.scale,
                };
                attend_group(&cache, seq.block_table, &task, out, &mut scratch);
            }
            t = end;
            i += 1;
        }
    });
    Ok(())
}

/// `out`'s base pointer, shared with the team's threads, which write disjoint tasks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: see the write in `paged_attention_on`: every element has exactly one writer.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Validated shapes of one call, with the strides the kernel needs.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    num_kv_heads: usize,
    /// Query heads per kv head.
    group: usize,
    head_dim: usize,
    block_size: usize,
    /// Elements in one row of `q` / `out`: `num_heads * head_dim`.
    row_len: usize,
    /// Elements in one cache slot: `num_kv_heads * head_dim`.
    slot_len: usize,
    /// Elements in one cache block: `block_size * slot_len`.
    block_len: usize,
    /// Rows of `q`.
    rows: usize,
    /// Blocks in each cache.
    num_blocks: usize,
}

impl Geometry {
    fn check(
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
fn check_sequences(seqs: &[SeqAttn<'_>], geo: &Geometry) -> Result<Vec<usize>, AttnError> {
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

/// One layer's caches with the validated geometry.
struct Cache<'c, T> {
    k: &'c [T],
    v: &'c [T],
    geo: Geometry,
}

/// Per-part working memory, reused across the tasks of a part.
struct Scratch {
    /// Scores of the current block, `[group, block_size]`; turned into weights in place.
    scores: Vec<f32>,
    running: Running,
    /// One block of keys or values widened to `f32`, `[block_size, head_dim]` (unused for
    /// `f32` storage, which is read in place).
    k_rows: Vec<f32>,
    v_rows: Vec<f32>,
}

/// The streaming-softmax state of each head of the group.
struct Running {
    /// Largest score seen so far.
    max: Vec<f32>,
    /// Sum of `exp(score - max)` so far.
    sum: Vec<f32>,
}

impl Scratch {
    fn new(geo: &Geometry) -> Self {
        Self {
            scores: vec![0.0; geo.group * geo.block_size],
            running: Running {
                max: vec![0.0; geo.group],
                sum: vec![0.0; geo.group],
            },
            k_rows: vec![0.0; geo.block_size * geo.head_dim],
            v_rows: vec![0.0; geo.block_size * geo.head_dim],
        }
    }
}

/// One query row's heads that share a kv head.
struct Task<'q> {
    kv_head: usize,
    /// Positions this row attends to: `0 .. keys`.
    keys: usize,
    /// The group's queries, `[group, head_dim]`.
    q: &'q [f32],
    scale: f32,
}

/// `f32` rows of one block: row `j` is `data[j * stride..][..head_dim]`.
struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
}

impl Rows<'_> {
    fn row(&self, j: usize, width: usize) -> &[f32] {
        &self.data[j * self.stride..][..width]
    }
}

/// The first `slots` rows of a block for one kv head (`src` starts at slot 0 of the block, at
/// that head): the cache itself for `f32`, else a widened copy in `scratch`.
fn block_rows<'a, T: KvElem>(
    src: &'a [T],
    geo: &Geometry,
    slots: usize,
    scratch: &'a mut [f32],
) -> Rows<'a> {
    if let Some(data) = T::as_f32(src) {
        return Rows {
            data,
            stride: geo.slot_len,
        };
    }
    let hd = geo.head_dim;
    for (j, dst) in scratch.chunks_exact_mut(hd).take(slots).enumerate() {
        T::widen(&src[j * geo.slot_len..][..hd], dst);
    }
    Rows {
        data: scratch,
        stride: hd,
    }
}

/// Streams the row's keys block by block, keeping a running max and sum per head, and leaves
/// the normalised attention output of the group's heads in `out` (`[group, head_dim]`).
fn attend_group<T: KvElem>(
    cache: &Cache<'_, T>,
    block_table: &[u32],
    task: &Task<'_>,
    out: &mut [f32],
    s: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512::usable(cache.geo.head_dim) {
        return walk_blocks::<T, avx512::Avx512>(cache, block_table, task, out, s);
    }
    walk_blocks::<T, Portable>(cache, block_table, task, out, s)
}

/// The per-block steps of [`attend_group`] in one flavour (portable, or AVX-512).
trait BlockSteps {
    /// `scores[g * block_size + j]` = the scaled score of head `g` against key `j`.
    fn score(keys: &Rows<'_>, geo: &Geometry, slots: usize, task: &Task<'_>, scores: &mut [f32]);
    /// Folds the block's scores into the running max and sum, rescales the partial outputs,
    /// and turns the scores into weights `exp(score - max)`.
    fn softmax(
        geo: &Geometry,
        slots: usize,
        out: &mut [f32],
        scores: &mut [f32],
        run: &mut Running,
    );
    /// Adds `weight * value` for every slot of the block to each head's partial output.
    fn accumulate(values: &Rows<'_>, geo: &Geometry, slots: usize, out: &mut [f32], scores: &[f32]);
    /// Divides each head's output by its sum of weights.
    fn normalise(geo: &Geometry, out: &mut [f32], sums: &[f32]);
}

/// The plain slice code below, for any CPU and head size.
struct Portable;

impl BlockSteps for Portable {
    fn score(keys: &Rows<'_>, geo: &Geometry, slots: usize, task: &Task<'_>, scores: &mut [f32]) {
        score_block(keys, geo, slots, task, scores);
    }

    fn softmax(
        geo: &Geometry,
        slots: usize,
        out: &mut [f32],
        scores: &mut [f32],
        run: &mut Running,
    ) {
        rescale(geo, slots, out, scores, run);
    }

    fn accumulate(
        values: &Rows<'_>,
        geo: &Geometry,
        slots: usize,
        out: &mut [f32],
        scores: &[f32],
    ) {
        accumulate_values(values, geo, slots, out, scores);
    }

    fn normalise(geo: &Geometry, out: &mut [f32], sums: &[f32]) {
        for (head_out, &sum) in out.chunks_exact_mut(geo.head_dim).zip(sums) {
            let inv = 1.0 / sum;
            head_out.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// The walk over the row's blocks that both flavours share.
fn walk_blocks<T: KvElem, S: BlockSteps>(
    cache: &Cache<'_, T>,
    block_table: &[u32],
    task: &Task<'_>,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let geo = &cache.geo;
    out.fill(0.0);
    s.running.max.fill(f32::NEG_INFINITY);
    s.running.sum.fill(0.0);
    let blocks = task.keys.div_ceil(geo.block_size);
    for (b, &block) in block_table[..blocks].iter().enumerate() {
        let slots = geo.block_size.min(task.keys - b * geo.block_size);
        let base = block as usize * geo.block_len + task.kv_head * geo.head_dim;
        let keys = block_rows(&cache.k[base..], geo, slots, &mut s.k_rows);
        S::score(&keys, geo, slots, task, &mut s.scores);
        S::softmax(geo, slots, out, &mut s.scores, &mut s.running);
        let values = block_rows(&cache.v[base..], geo, slots, &mut s.v_rows);
        S::accumulate(&values, geo, slots, out, &s.scores);
    }
    S::normalise(geo, out, &s.running.sum);
}

/// Fills `scores[g * block_size + j]` with the scaled score of head `g` against key `j`.
fn score_block(keys: &Rows<'_>, geo: &Geometry, slots: usize, task: &Task<'_>, scores: &mut [f32]) {
    for j in 0..slots {
        let key = keys.row(j, geo.head_dim);
        for (g, q) in task.q.chunks_exact(geo.head_dim).enumerate() {
            scores[g * geo.block_size + j] = dot(q, key) * task.scale;
        }
    }
}

/// Folds the block's scores into the running max and sum, rescales the partial outputs to
/// the new max, and turns the scores into unnormalised weights `exp(score - max)`.
fn rescale(geo: &Geometry, slots: usize, out: &mut [f32], scores: &mut [f32], run: &mut Running) {
    let heads = scores.chunks_exact_mut(geo.block_size);
    let outs = out.chunks_exact_mut(geo.head_dim);
    for (((scores, head_out), max), sum) in heads.zip(outs).zip(&mut run.max).zip(&mut run.sum) {
        let scores = &mut scores[..slots];
        let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let new_max = max.max(block_max);
        // exp(-inf - finite) is 0, which also clears the zero-initialised state on block 0.
        let alpha = (*max - new_max).exp();
        if alpha != 1.0 {
            *sum *= alpha;
            head_out.iter_mut().for_each(|x| *x *= alpha);
        }
        *max = new_max;
        for x in scores.iter_mut() {
            *x = (*x - new_max).exp();
        }
        *sum += scores.iter().sum::<f32>();
    }
}

/// Adds `weight * value` for every slot of the block to each head's partial output, four
/// slots per pass so each output element is loaded and stored a quarter as often.
fn accumulate_values(
    values: &Rows<'_>,
    geo: &Geometry,
    slots: usize,
    out: &mut [f32],
    scores: &[f32],
) {
    let hd = geo.head_dim;
    let quads = slots / 4 * 4;
    for j in (0..quads).step_by(4) {
        let rows = [0, 1, 2, 3].map(|i| values.row(j + i, hd));
        for (head_out, w) in out
            .chunks_exact_mut(hd)
            .zip(scores.chunks_exact(geo.block_size))
        {
            let w = [w[j], w[j + 1], w[j + 2], w[j + 3]];
            let lanes = rows[0].iter().zip(rows[1]).zip(rows[2]).zip(rows[3]);
            for (o, (((a, b), c), d)) in head_out.iter_mut().zip(lanes) {
                *o += (w[0] * a + w[1] * b) + (w[2] * c + w[3] * d);
            }
        }
    }
    for j in quads..slots {
        let row = values.row(j, hd);
        for (head_out, w) in out
            .chunks_exact_mut(hd)
            .zip(scores.chunks_exact(geo.block_size))
        {
            let w = w[j];
            for (o, &x) in head_out.iter_mut().zip(row) {
                *o += w * x;
            }
        }
    }
}

/// Dot product with sixteen independent partial sums, so the loop vectorises without
/// reassociating additions. The order of every addition is fixed by the code, hence the
/// result is deterministic. Kept out of line: inlined into the score loop, the compiler
/// re-vectorised it with shuffles, where on its own it compiles to plain 4-wide loads and
/// multiply-adds.
#[inline(never)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let (a16, b16) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0.0f32; LANES];
    for (xa, xb) in a16.zip(b16) {
        // Fixed-length views let the compiler unroll into full-width vector code; the
        // conversions cannot fail on `chunks_exact` chunks.
        if let (Ok(xa), Ok(xb)) = (<&[f32; LANES]>::try_from(xa), <&[f32; LANES]>::try_from(xb)) {
            for ((s, x), y) in acc.iter_mut().zip(xa).zip(xb) {
                *s += x * y;
            }
        }
    }
    // Fold as four 4-wide vectors, then across: this shape keeps the loop above 4 lanes
    // wide (a halving fold makes the compiler pair lanes instead).
    let quad: [f32; 4] =
        std::array::from_fn(|i| (acc[i] + acc[i + 4]) + (acc[i + 8] + acc[i + 12]));
    (quad[0] + quad[1]) + (quad[2] + quad[3]) + tail
}

/// The same computation with AVX-512 on whole 16-float vectors, for head sizes that are a
/// multiple of 16 (64 and 128 in every Llama-family model): the dot products, the value
/// sums and the softmax's `exp` (a polynomial, [`exp`]) run 16 lanes at a time with fused
/// multiply-adds instead of the portable code's 4-wide loops and one libm `expf` per score.
///
/// The result differs from the portable path in the last bits (fused rounding, another
/// order of additions, another `exp`), but not between calls: the path is chosen per process
/// from the CPU, every task visits its keys and lanes in a fixed order, and so a row's
/// output is still bit-identical whatever batch, part or thread computes it.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BlockSteps, Geometry, Rows, Running, Task};
    use crate::simd::exp;
    use std::arch::x86_64::*;

    /// Floats per vector.
    const W: usize = 16;

    /// Whether this path runs for heads of `head_dim` on this CPU.
    pub(super) fn usable(head_dim: usize) -> bool {
        head_dim.is_multiple_of(W) && std::arch::is_x86_feature_detected!("avx512f")
    }

    /// The AVX-512 flavour of the per-block steps; used only once [`usable`] said yes.
    pub(super) struct Avx512;

    // SAFETY (every call below): `Avx512` is chosen only after `usable` checked that the CPU
    // has AVX-512F and that `head_dim` is a multiple of 16.
    impl BlockSteps for Avx512 {
        fn score(
            keys: &Rows<'_>,
            geo: &Geometry,
            slots: usize,
            task: &Task<'_>,
            scores: &mut [f32],
        ) {
            unsafe { score_block(keys, geo.head_dim, geo.block_size, slots, task, scores) }
        }

        fn softmax(
            geo: &Geometry,
            slots: usize,
            out: &mut [f32],
            scores: &mut [f32],
            run: &mut Running,
        ) {
            unsafe { softmax_block(geo.head_dim, geo.block_size, slots, out, scores, run) }
        }

        fn accumulate(
            values: &Rows<'_>,
            geo: &Geometry,
            slots: usize,
            out: &mut [f32],
            scores: &[f32],
        ) {
            unsafe { accumulate_values(values, geo.head_dim, geo.block_size, slots, out, scores) }
        }

        fn normalise(geo: &Geometry, out: &mut [f32], sums: &[f32]) {
            unsafe { normalise(geo.head_dim, out, sums) }
        }
    }

    /// Divides each head's output (`hd` floats) by its sum.
    #[target_feature(enable = "avx512f")]
    fn normalise(hd: usize, out: &mut [f32], sums: &[f32]) {
        for (head_out, &sum) in out.chunks_exact_mut(hd).zip(sums) {
            let inv = _mm512_set1_ps(1.0 / sum);
            for v in head_out.chunks_exact_mut(W) {
                // SAFETY: `v` is 16 floats.
                unsafe {
                    _mm512_storeu_ps(
                        v.as_mut_ptr(),
                        _mm512_mul_ps(_mm512_loadu_ps(v.as_ptr()), inv),
                    )
                };
            }
        }
    }

    /// `scores[g * block_size + j]` = scaled `q_g · k_j`, for the `slots` keys of one block.
    #[target_feature(enable = "avx512f")]
    fn score_block(
        keys: &Rows<'_>,
        hd: usize,
        block_size: usize,
        slots: usize,
        task: &Task<'_>,
        scores: &mut [f32],
    ) {
        for j in 0..slots {
            let key = keys.row(j, hd);
            for (g, q) in task.q.chunks_exact(hd).enumerate() {
                scores[g * block_size + j] = dot(q, key) * task.scale;
            }
        }
    }

    /// `a · b` for equal lengths that are a multiple of 16: two accumulators (even and odd
    /// vectors), then one horizontal sum.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        debug_assert!(a.len() == b.len() && a.len().is_multiple_of(W));
        let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let n = a.len().min(b.len()) / W;
        // SAFETY: every offset below is `< n * 16 <= len` of both slices.
        unsafe {
            let mut i = 0;
            while i + 1 < n {
                even = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pa.add(i * W)),
                    _mm512_loadu_ps(pb.add(i * W)),
                    even,
                );
                odd = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pa.add((i + 1) * W)),
                    _mm512_loadu_ps(pb.add((i + 1) * W)),
                    odd,
                );
                i += 2;
            }
            if i < n {
                even = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pa.add(i * W)),
                    _mm512_loadu_ps(pb.add(i * W)),
                    even,
                );
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(even, odd))
    }

    /// The lanes `0..n` of a vector (`n <= 16`).
    fn lanes(n: usize) -> __mmask16 {
        (((1u32 << n) - 1) & 0xffff) as __mmask16
    }

    /// As [`super::rescale`]: folds the block's scores into each head's running max and sum,
    /// rescales the partial outputs, and leaves the weights `exp(score - max)` in `scores`.
    #[target_feature(enable = "avx512f")]
    fn softmax_block(
        hd: usize,
        block_size: usize,
        slots: usize,
        out: &mut [f32],
        scores: &mut [f32],
        run: &mut Running,
    ) {
        let heads = scores.chunks_exact_mut(block_size);
        let outs = out.chunks_exact_mut(hd);
        for (((scores, head_out), max), sum) in heads.zip(outs).zip(&mut run.max).zip(&mut run.sum)
        {
            let scores = &mut scores[..slots];
            let mut block_max = _mm512_set1_ps(f32::NEG_INFINITY);
            for chunk in scores.chunks(W) {
                let m = lanes(chunk.len());
                // SAFETY: the mask covers exactly the chunk's floats.
                let v = unsafe { _mm512_mask_loadu_ps(block_max, m, chunk.as_ptr()) };
                block_max = _mm512_max_ps(block_max, v);
            }
            let new_max = max.max(_mm512_reduce_max_ps(block_max));
            // exp(-inf - finite) is 0, which also clears the zero-initialised state on block 0.
            let alpha = (*max - new_max).exp();
            if alpha != 1.0 {
                *sum *= alpha;
                let a = _mm512_set1_ps(alpha);
                for v in head_out.chunks_exact_mut(W) {
                    // SAFETY: `v` is 16 floats.
                    unsafe {
                        _mm512_storeu_ps(
                            v.as_mut_ptr(),
                            _mm512_mul_ps(_mm512_loadu_ps(v.as_ptr()), a),
                        )
                    };
                }
            }
            *max = new_max;
            let shift = _mm512_set1_ps(new_max);
            let mut total = _mm512_setzero_ps();
            for chunk in scores.chunks_mut(W) {
                let m = lanes(chunk.len());
                // SAFETY: the mask covers exactly the chunk's floats.
                unsafe {
                    let x = _mm512_maskz_loadu_ps(m, chunk.as_ptr());
                    let e = _mm512_maskz_mov_ps(m, exp(_mm512_sub_ps(x, shift)));
                    _mm512_mask_storeu_ps(chunk.as_mut_ptr(), m, e);
                    total = _mm512_add_ps(total, e);
                }
            }
            *sum += _mm512_reduce_add_ps(total);
        }
    }

    /// Adds `weight_j * value_j` over the block's slots to each head's partial output, one
    /// 16-float column at a time with two accumulators (even and odd slots).
    #[target_feature(enable = "avx512f")]
    fn accumulate_values(
        values: &Rows<'_>,
        hd: usize,
        block_size: usize,
        slots: usize,
        out: &mut [f32],
        scores: &[f32],
    ) {
        debug_assert!(slots >= 1 && (slots - 1) * values.stride + hd <= values.data.len());
        let vp = values.data.as_ptr();
        let stride = values.stride;
        for (head_out, w) in out
            .chunks_exact_mut(hd)
            .zip(scores.chunks_exact(block_size))
        {
            let w = &w[..slots];
            for c in (0..hd).step_by(W) {
                // SAFETY: rows `j < slots` of `values` have `hd` floats at `j * stride`
                // (`Rows` over a block), and `c + 16 <= hd`; `head_out` is `hd` floats.
                unsafe {
                    let o = head_out.as_mut_ptr().add(c);
                    let mut even = _mm512_loadu_ps(o);
                    let mut odd = _mm512_setzero_ps();
                    let mut j = 0;
                    while j + 1 < slots {
                        let a = _mm512_loadu_ps(vp.add(j * stride + c));
                        let b = _mm512_loadu_ps(vp.add((j + 1) * stride + c));
                        even = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), a, even);
                        odd = _mm512_fmadd_ps(_mm512_set1_ps(w[j + 1]), b, odd);
                        j += 2;
                    }
                    if j < slots {
                        let a = _mm512_loadu_ps(vp.add(j * stride + c));
                        even = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), a, even);
                    }
                    _mm512_storeu_ps(o, _mm512_add_ps(even, odd));
                }
            }
        }
    }
}
