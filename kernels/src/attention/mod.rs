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
//! than one block is ever held. `f32` storage is read in place, and so is `bf16` on the AVX-512
//! and AVX2 paths (widened in registers); otherwise `f16`/`bf16` blocks are widened one block
//! and kv head at a time. Rows of a prefill chunk each walk their own keys (keys are not tiled
//! across rows). Memory: one scratch buffer per part (`group * block_size + 2 * block_size *
//! head_dim + 2 * group` floats, at most `PARTS_PER_THREAD` parts per thread) and one `Vec`
//! of per-sequence task offsets per call.
//!
//! The per-block steps come in three flavours, and a call runs the first this CPU allows for
//! its head size: AVX-512 (a multiple of 16), AVX2 with FMA (a multiple of 8: x86-64 CPUs
//! without AVX-512, such as AMD's before Zen 4), or portable slice code written to
//! auto-vectorise (4-wide SSE2 on the default x86-64 target; wider when the workspace is built
//! for a newer CPU; Rust never fuses a multiply and an add on its own, so such a build changes
//! speed, not results). The flavours round differently in the last bits (fused multiply-adds,
//! the order of additions, a polynomial `exp`); the choice depends only on the CPU and the
//! head size, so one process always gets the same bits for a row.
//!
//! # Layout
//!
//! * this module: the public entry points, [`SeqAttn`] and [`PagedAttnParams`], the choice of
//!   a flavour, and the split of a call into tasks over the team.
//! * `geometry`: the checks of a call's shapes and sequences, and the validated `Geometry`.
//! * `error`: [`AttnError`], why a call was refused.
//! * `elem`: [`KvElem`], the cache's element types and their widening to `f32`.
//! * `walk`: the streaming walk over one row's blocks, shared by the three flavours of the
//!   per-block steps: `portable` (plain slice code), `avx2` and `avx512`.
//! * `tests`: the flavours against each other (the end-to-end tests are `tandem-kvcache`'s).

use crate::team::Team;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod elem;
mod error;
mod geometry;
mod portable;
#[cfg(test)]
mod tests;
mod walk;

pub use elem::KvElem;
pub use error::{AttnError, KvSide};

use geometry::{check_sequences, Geometry};
use walk::{walk_blocks, walk_in_place, Cache, Scratch, Task};

/// Parts per team thread in one call: enough that a thread finishing early finds more (rows
/// differ in context length), few enough that each part's scratch is paid for.
const PARTS_PER_THREAD: usize = 8;

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
    let call = Call::check(q, seqs, k_cache, v_cache, params, out.len())?;
    call.run(team, Flavour::best(params.head_dim), out);
    Ok(())
}

/// The flavours of the per-block steps, fastest first: the same arithmetic, rounded
/// differently in the last bits (see the module doc's costs). A call runs [`Flavour::best`],
/// so one process always runs the same flavour for a given head size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Flavour {
    const ALL: &[Self] = &[
        #[cfg(target_arch = "x86_64")]
        Self::Avx512,
        #[cfg(target_arch = "x86_64")]
        Self::Avx2,
        Self::Portable,
    ];

    /// Whether this CPU runs the flavour for heads of `head_dim`.
    fn usable(self, head_dim: usize) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => avx512::usable(head_dim),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::usable(head_dim),
            Self::Portable => true,
        }
    }

    /// The fastest flavour this CPU runs for heads of `head_dim`.
    fn best(head_dim: usize) -> Self {
        Self::usable_for(head_dim).next().unwrap_or(Self::Portable)
    }

    /// The flavours this CPU runs for heads of `head_dim`, fastest first.
    fn usable_for(head_dim: usize) -> impl Iterator<Item = Self> {
        Self::ALL
            .iter()
            .copied()
            .filter(move |f| f.usable(head_dim))
    }
}

/// One checked call: its queries, sequences (`order` lists those with rows, by `q_start`)
/// and caches.
struct Call<'a, T> {
    q: &'a [f32],
    seqs: &'a [SeqAttn<'a>],
    order: Vec<usize>,
    cache: Cache<'a, T>,
    scale: f32,
}

impl<'a, T: KvElem> Call<'a, T> {
    /// Checks every input of a call whose output holds `out_len` floats.
    fn check(
        q: &'a [f32],
        seqs: &'a [SeqAttn<'a>],
        k_cache: &'a [T],
        v_cache: &'a [T],
        params: &PagedAttnParams,
        out_len: usize,
    ) -> Result<Self, AttnError> {
        let geo = Geometry::check(params, q.len(), out_len, k_cache.len(), v_cache.len())?;
        let order = check_sequences(seqs, &geo)?;
        Ok(Self {
            q,
            seqs,
            order,
            cache: Cache {
                k: k_cache,
                v: v_cache,
                geo,
            },
            scale: params.scale,
        })
    }

    /// Runs the call's tasks over `team` with the steps of `flavour`, writing `out` (of the
    /// length the call was checked for).
    ///
    /// # Panics
    /// If this CPU does not run `flavour` for the call's head size.
    fn run(&self, team: &Team, flavour: Flavour, out: &mut [f32]) {
        let geo = self.cache.geo;
        assert!(
            flavour.usable(geo.head_dim),
            "{flavour:?} does not run here"
        );
        assert_eq!(out.len(), self.q.len());
        let (seqs, order) = (self.seqs, &self.order);
        // Task `t` of the `i`-th sequence in `order` is global task `starts[i] + t`: its row
        // `t / num_kv_heads`, kv head `t % num_kv_heads`.
        let mut starts = Vec::with_capacity(order.len() + 1);
        let mut total = 0;
        for &i in order {
            starts.push(total);
            total += seqs[i].q_len * geo.num_kv_heads;
        }
        starts.push(total);
        if total == 0 {
            return;
        }
        let parts = total.min(PARTS_PER_THREAD * team.threads());
        let group_len = geo.group * geo.head_dim;
        let out_at = OutPtr(out.as_mut_ptr());
        team.run(parts, &|part| {
            let (lo, hi) = (part * total / parts, (part + 1) * total / parts);
            let mut scratch = Scratch::new(&geo);
            // The sequence holding task `lo`: starts are strictly increasing (no empty
            // sequence is in `order`), and `starts[0] = 0 <= lo < total`.
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
                    // `out` (checked to be as long as `q`); within a row each kv head owns its
                    // own `group_len` floats; and each task belongs to exactly one part. So no
                    // two writers share an element, and `out` is borrowed mutably for the
                    // whole call.
                    let out =
                        unsafe { std::slice::from_raw_parts_mut(out_at.get().add(at), group_len) };
                    let task = Task {
                        kv_head,
                        keys: first_pos + row + 1,
                        q: &self.q[at..][..group_len],
                        scale: self.scale,
                    };
                    attend_group(
                        flavour,
                        &self.cache,
                        seq.block_table,
                        &task,
                        out,
                        &mut scratch,
                    );
                }
                t = end;
                i += 1;
            }
        });
    }
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

/// Streams the row's keys block by block, keeping a running max and sum per head, and leaves
/// the normalised attention output of the group's heads in `out` (`[group, head_dim]`), with
/// the steps of `flavour` (which [`Call::run`] checked this CPU runs).
fn attend_group<T: KvElem>(
    flavour: Flavour,
    cache: &Cache<'_, T>,
    block_table: &[u32],
    task: &Task<'_>,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let geo = &cache.geo;
    match flavour {
        #[cfg(target_arch = "x86_64")]
        Flavour::Avx512 => {
            if let (Some(k), Some(v)) = (T::as_bf16(cache.k), T::as_bf16(cache.v)) {
                return walk_in_place::<_, avx512::Avx512>(k, v, geo, block_table, task, out, s);
            }
            walk_blocks::<T, avx512::Avx512>(cache, block_table, task, out, s)
        }
        #[cfg(target_arch = "x86_64")]
        Flavour::Avx2 => {
            if let (Some(k), Some(v)) = (T::as_bf16(cache.k), T::as_bf16(cache.v)) {
                return walk_in_place::<_, avx2::Avx2>(k, v, geo, block_table, task, out, s);
            }
            walk_blocks::<T, avx2::Avx2>(cache, block_table, task, out, s)
        }
        Flavour::Portable => walk_blocks::<T, portable::Portable>(cache, block_table, task, out, s),
    }
}
