//! The walk over one query row's K/V blocks that every flavour of the kernel shares: the
//! per-part scratch, the streaming-softmax state, the [`BlockSteps`] a flavour provides
//! (score, softmax, accumulate, normalise) and [`walk_blocks`], which drives them block by
//! block. No score vector longer than one block is held.

use super::elem::KvElem;
use super::geometry::Geometry;

/// One layer's caches with the validated geometry.
pub(super) struct Cache<'c, T> {
    pub(super) k: &'c [T],
    pub(super) v: &'c [T],
    pub(super) geo: Geometry,
}

/// Per-part working memory, reused across the tasks of a part.
pub(super) struct Scratch {
    /// Scores of the current block, `[group, block_size]`; turned into weights in place.
    scores: Vec<f32>,
    running: Running,
    /// One block of keys or values widened to `f32`, `[block_size, head_dim]` (unused for
    /// `f32` storage, which is read in place).
    k_rows: Vec<f32>,
    v_rows: Vec<f32>,
}

/// The streaming-softmax state of each head of the group.
pub(super) struct Running {
    /// Largest score seen so far.
    pub(super) max: Vec<f32>,
    /// Sum of `exp(score - max)` so far.
    pub(super) sum: Vec<f32>,
}

impl Scratch {
    pub(super) fn new(geo: &Geometry) -> Self {
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
pub(super) struct Task<'q> {
    pub(super) kv_head: usize,
    /// Positions this row attends to: `0 .. keys`.
    pub(super) keys: usize,
    /// The group's queries, `[group, head_dim]`.
    pub(super) q: &'q [f32],
    pub(super) scale: f32,
}

/// Rows of one block: row `j` is `data[j * stride..][..head_dim]`. `f32` rows are either
/// the cache itself or a widened copy; `bf16` rows are the cache itself, widened in registers
/// by the flavours that read them ([`walk_in_place`]).
pub(super) struct Rows<'a, E = f32> {
    pub(super) data: &'a [E],
    pub(super) stride: usize,
}

impl<E> Rows<'_, E> {
    pub(super) fn row(&self, j: usize, width: usize) -> &[E] {
        &self.data[j * self.stride..][..width]
    }
}

/// Where a walk finds the rows of a block: `base` is the element of slot 0 of the block at
/// the task's kv head, `slots` the rows it needs.
trait Blocks<E> {
    fn keys(&mut self, base: usize, slots: usize) -> Rows<'_, E>;
    fn values(&mut self, base: usize, slots: usize) -> Rows<'_, E>;
    /// Asks the CPU to bring the keys (`values: false`) or values of `slots` rows at `base`
    /// towards the cache: the blocks of a sequence are scattered over the pool, so the
    /// hardware prefetchers cannot guess the next one, and without this every block's first
    /// loads wait on memory.
    fn prefetch(&self, values: bool, base: usize, slots: usize, hd: usize);
}

/// Prefetches `slots` rows of `hd` elements at `base`, `stride` apart, in `data`. Only
/// addresses are computed (never dereferenced), and a prefetch does not fault.
fn prefetch_rows<T>(data: &[T], base: usize, slots: usize, stride: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let elem = std::mem::size_of::<T>();
        let p = data.as_ptr().cast::<i8>();
        for j in 0..slots {
            let row = p.wrapping_add((base + j * stride) * elem);
            for line in (0..hd * elem).step_by(64) {
                // SAFETY: a prefetch reads nothing architecturally and never faults.
                #[allow(unused_unsafe)]
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(line))
                };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, base, slots, stride, hd);
}

/// Blocks read where they are: `f32` storage, or `bf16` for a flavour that widens in registers.
struct InPlace<'c, E> {
    k: &'c [E],
    v: &'c [E],
    stride: usize,
}

impl<E> Blocks<E> for InPlace<'_, E> {
    fn keys(&mut self, base: usize, _slots: usize) -> Rows<'_, E> {
        Rows {
            data: &self.k[base..],
            stride: self.stride,
        }
    }

    fn values(&mut self, base: usize, _slots: usize) -> Rows<'_, E> {
        Rows {
            data: &self.v[base..],
            stride: self.stride,
        }
    }

    fn prefetch(&self, values: bool, base: usize, slots: usize, hd: usize) {
        let data = if values { self.v } else { self.k };
        prefetch_rows(data, base, slots, self.stride, hd);
    }
}

/// Blocks widened to `f32` one block and kv head at a time, into the part's scratch.
struct Widened<'c, 's, T> {
    cache: &'c Cache<'c, T>,
    k_rows: &'s mut [f32],
    v_rows: &'s mut [f32],
}

impl<T: KvElem> Blocks<f32> for Widened<'_, '_, T> {
    fn keys(&mut self, base: usize, slots: usize) -> Rows<'_, f32> {
        widen_rows(&self.cache.k[base..], &self.cache.geo, slots, self.k_rows)
    }

    fn values(&mut self, base: usize, slots: usize) -> Rows<'_, f32> {
        widen_rows(&self.cache.v[base..], &self.cache.geo, slots, self.v_rows)
    }

    fn prefetch(&self, values: bool, base: usize, slots: usize, hd: usize) {
        let data = if values { self.cache.v } else { self.cache.k };
        prefetch_rows(data, base, slots, self.cache.geo.slot_len, hd);
    }
}

/// The first `slots` rows of a block for one kv head (`src` starts at slot 0 of the block, at
/// that head), widened into `scratch`.
fn widen_rows<'a, T: KvElem>(
    src: &[T],
    geo: &Geometry,
    slots: usize,
    scratch: &'a mut [f32],
) -> Rows<'a, f32> {
    let hd = geo.head_dim;
    for (j, dst) in scratch.chunks_exact_mut(hd).take(slots).enumerate() {
        T::widen(&src[j * geo.slot_len..][..hd], dst);
    }
    Rows {
        data: scratch,
        stride: hd,
    }
}

/// The per-block steps of [`attend_group`](super::attend_group) in one flavour (portable,
/// AVX2 or AVX-512).
pub(super) trait BlockSteps<E = f32> {
    /// `scores[g * block_size + j]` = the scaled score of head `g` against key `j`.
    fn score(keys: &Rows<'_, E>, geo: &Geometry, slots: usize, task: &Task<'_>, scores: &mut [f32]);
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
    fn accumulate(
        values: &Rows<'_, E>,
        geo: &Geometry,
        slots: usize,
        out: &mut [f32],
        scores: &[f32],
    );
    /// Divides each head's output by its sum of weights.
    fn normalise(geo: &Geometry, out: &mut [f32], sums: &[f32]);
}

/// The walk over the row's blocks, for any storage: `f32` is read in place, the
/// half-precision types are widened block by block into the part's scratch.
pub(super) fn walk_blocks<T: KvElem, S: BlockSteps>(
    cache: &Cache<'_, T>,
    block_table: &[u32],
    task: &Task<'_>,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let Scratch {
        scores,
        running,
        k_rows,
        v_rows,
    } = s;
    if let (Some(k), Some(v)) = (T::as_f32(cache.k), T::as_f32(cache.v)) {
        let mut blocks = InPlace {
            k,
            v,
            stride: cache.geo.slot_len,
        };
        return walk::<f32, S>(
            &cache.geo,
            &mut blocks,
            block_table,
            task,
            out,
            scores,
            running,
        );
    }
    let mut blocks = Widened {
        cache,
        k_rows,
        v_rows,
    };
    walk::<f32, S>(
        &cache.geo,
        &mut blocks,
        block_table,
        task,
        out,
        scores,
        running,
    );
}

/// The walk over the row's blocks read in place as `E` (`bf16` storage, for a flavour whose
/// steps widen in registers).
pub(super) fn walk_in_place<E, S: BlockSteps<E>>(
    k: &[E],
    v: &[E],
    geo: &Geometry,
    block_table: &[u32],
    task: &Task<'_>,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let mut blocks = InPlace {
        k,
        v,
        stride: geo.slot_len,
    };
    walk::<E, S>(
        geo,
        &mut blocks,
        block_table,
        task,
        out,
        &mut s.scores,
        &mut s.running,
    );
}

/// Streams the row's blocks: score, softmax, accumulate per block, then normalise.
fn walk<E, S: BlockSteps<E>>(
    geo: &Geometry,
    blocks: &mut impl Blocks<E>,
    block_table: &[u32],
    task: &Task<'_>,
    out: &mut [f32],
    scores: &mut [f32],
    running: &mut Running,
) {
    out.fill(0.0);
    running.max.fill(f32::NEG_INFINITY);
    running.sum.fill(0.0);
    let blocks_used = task.keys.div_ceil(geo.block_size);
    let at = |block: u32| block as usize * geo.block_len + task.kv_head * geo.head_dim;
    let hd = geo.head_dim;
    for (b, &block) in block_table[..blocks_used].iter().enumerate() {
        let slots = geo.block_size.min(task.keys - b * geo.block_size);
        let base = at(block);
        // This block's values arrive while its keys are scored, the next block's keys while
        // this one's values are summed.
        blocks.prefetch(true, base, slots, hd);
        if let Some(&next) = block_table[..blocks_used].get(b + 1) {
            let next_slots = geo.block_size.min(task.keys - (b + 1) * geo.block_size);
            blocks.prefetch(false, at(next), next_slots, hd);
        }
        S::score(&blocks.keys(base, slots), geo, slots, task, scores);
        S::softmax(geo, slots, out, scores, running);
        S::accumulate(&blocks.values(base, slots), geo, slots, out, scores);
    }
    S::normalise(geo, out, &running.sum);
}
