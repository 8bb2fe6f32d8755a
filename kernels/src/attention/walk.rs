//! The walk over one query row's K/V blocks that both flavours of the kernel share: the
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

/// `f32` rows of one block: row `j` is `data[j * stride..][..head_dim]`.
pub(super) struct Rows<'a> {
    pub(super) data: &'a [f32],
    pub(super) stride: usize,
}

impl Rows<'_> {
    pub(super) fn row(&self, j: usize, width: usize) -> &[f32] {
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
/// The per-block steps of [`attend_group`](super::attend_group) in one flavour (portable, or
/// AVX-512).
pub(super) trait BlockSteps {
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

/// The walk over the row's blocks that both flavours share.
pub(super) fn walk_blocks<T: KvElem, S: BlockSteps>(
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
