//! The per-block steps with AVX2 and FMA on 8-float vectors, for head sizes that are a
//! multiple of 8, on x86-64 CPUs without AVX-512 (AMD before Zen 4, Intel client parts): the
//! dot products, the value sums and the softmax's `exp` (a polynomial, [`exp8`], the
//! AVX-512 [`exp`](crate::simd::exp) on half the lanes) run 8 lanes at a time with fused
//! multiply-adds, instead of the portable code's 4-wide loops and one libm `expf` per score.
//!
//! Keys and values stored as `bf16` are read in place and widened in registers (a zero
//! extension and a shift: exact), as on the AVX-512 path, so the products and sums are the
//! same as over an `f32` copy of the block, bit for bit.
//!
//! Each output element is one chain of fused multiply-adds over the block's slots in order,
//! whichever heads and columns share a pass, so how the group is cut into passes changes the
//! speed, not the result. The result differs from the portable and AVX-512 paths in the last
//! bits (fused rounding, another order of additions), but not between calls: the path is
//! chosen per process from the CPU, and a row's output is bit-identical whatever batch,
//! part or thread computes it.

use super::geometry::Geometry;
use super::walk::{BlockSteps, Rows, Running, Task};
use crate::simd::exp8;
use half::bf16;
use std::arch::x86_64::*;

/// Floats per vector.
const W: usize = 8;

/// The most query heads that one pass of [`accumulate_values`] keeps in registers; larger
/// groups are taken this many heads at a time.
const GROUP_MAX: usize = 8;

/// Whether this path runs for heads of `head_dim` on this CPU.
pub(super) fn usable(head_dim: usize) -> bool {
    head_dim.is_multiple_of(W)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

/// An element of the rows the steps read, loaded 8 at a time as floats.
pub(super) trait Lane: Copy {
    /// The 8 elements at `p`, as floats.
    ///
    /// # Safety
    /// The CPU has AVX2, and `p` points to 8 readable elements.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Lane for f32 {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Lane for bf16 {
    /// bf16 is the top half of an f32: zero-extend each 16-bit lane and shift it up.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller's contract (8 bf16 values are the 16 bytes read).
        unsafe {
            let raw = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
        }
    }
}

/// The AVX2 flavour of the per-block steps; used only once [`usable`] said yes.
pub(super) struct Avx2;

// SAFETY (every call below): `Avx2` is chosen only after `usable` checked that the CPU has
// AVX2 and FMA and that `head_dim` is a multiple of 8.
impl<E: Lane> BlockSteps<E> for Avx2 {
    fn score(
        keys: &Rows<'_, E>,
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
        values: &Rows<'_, E>,
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

/// Multiplies each 8-float vector of `v` by `factor`.
#[target_feature(enable = "avx2")]
#[inline]
fn scale_by(v: &mut [f32], factor: f32) {
    let f = _mm256_set1_ps(factor);
    for v in v.chunks_exact_mut(W) {
        // SAFETY: `v` is 8 floats.
        unsafe {
            _mm256_storeu_ps(
                v.as_mut_ptr(),
                _mm256_mul_ps(_mm256_loadu_ps(v.as_ptr()), f),
            )
        };
    }
}

/// Divides each head's output (`hd` floats) by its sum.
#[target_feature(enable = "avx2")]
fn normalise(hd: usize, out: &mut [f32], sums: &[f32]) {
    for (head_out, &sum) in out.chunks_exact_mut(hd).zip(sums) {
        scale_by(head_out, 1.0 / sum);
    }
}

/// `scores[g * block_size + j]` = scaled `q_g · k_j`, for the `slots` keys of one block.
///
/// Eight keys at a time: each key's products are summed lane-wise into its own vector (one
/// fused multiply-add per 8 elements of the head, each query vector loaded once for the eight
/// keys), and the eight vectors are then reduced together by [`sum8`] into one vector whose
/// lane `j` is key `j`'s score. A last, short run of keys repeats its last row in the unused
/// lanes, which are computed but never stored.
#[target_feature(enable = "avx2,fma")]
fn score_block<E: Lane>(
    keys: &Rows<'_, E>,
    hd: usize,
    block_size: usize,
    slots: usize,
    task: &Task<'_>,
    scores: &mut [f32],
) {
    debug_assert!(slots >= 1 && (slots - 1) * keys.stride + hd <= keys.data.len());
    let kp = keys.data.as_ptr();
    let scale = _mm256_set1_ps(task.scale);
    for (g, q) in task.q.chunks_exact(hd).enumerate() {
        let head_scores = &mut scores[g * block_size..][..slots];
        for (c, chunk) in head_scores.chunks_mut(W).enumerate() {
            let last = chunk.len() - 1;
            let rows: [*const E; W] =
                std::array::from_fn(|i| kp.wrapping_add((c * W + i.min(last)) * keys.stride));
            let mut acc = [_mm256_setzero_ps(); W];
            for d in (0..hd).step_by(W) {
                // SAFETY: each of `rows` is a row `j < slots` of `keys`, which has `hd`
                // elements at `j * stride`; `d + 8 <= hd`, and `q` is `hd` floats.
                unsafe {
                    let qd = _mm256_loadu_ps(q.as_ptr().add(d));
                    for (acc, row) in acc.iter_mut().zip(rows) {
                        *acc = _mm256_fmadd_ps(qd, E::load8(row.add(d)), *acc);
                    }
                }
            }
            store_lanes(chunk, _mm256_mul_ps(sum8(&acc), scale));
        }
    }
}

/// The lane sums of eight vectors, as one vector (lane `j` = the sum of `v[j]`'s lanes):
/// two rounds of pairwise horizontal adds leave each vector's two half-sums in the two
/// 128-bit halves, which one add joins. Lane `j` is `((v0 + v1) + (v2 + v3)) + ((v4 + v5) +
/// (v6 + v7))` over `v[j]`'s lanes, always in that order.
#[target_feature(enable = "avx2")]
#[inline]
fn sum8(v: &[__m256; W]) -> __m256 {
    let p01 = _mm256_hadd_ps(v[0], v[1]);
    let p23 = _mm256_hadd_ps(v[2], v[3]);
    let p45 = _mm256_hadd_ps(v[4], v[5]);
    let p67 = _mm256_hadd_ps(v[6], v[7]);
    // Lanes: v0..v3's sums of lanes 0–3, then v0..v3's sums of lanes 4–7.
    let q0 = _mm256_hadd_ps(p01, p23);
    let q1 = _mm256_hadd_ps(p45, p67);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(q0, q1),
        _mm256_permute2f128_ps::<0x31>(q0, q1),
    )
}

/// All bits set in the lanes `0..n` of a mask (`n <= 8`).
#[target_feature(enable = "avx2")]
#[inline]
fn lanes(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// Stores the first `chunk.len()` (at most 8) lanes of `v` in `chunk`. A masked store is
/// slow on AMD's cores, so a whole vector is stored plainly.
#[target_feature(enable = "avx2")]
#[inline]
fn store_lanes(chunk: &mut [f32], v: __m256) {
    if let Ok(whole) = <&mut [f32; W]>::try_from(&mut *chunk) {
        // SAFETY: `whole` is 8 floats.
        unsafe { _mm256_storeu_ps(whole.as_mut_ptr(), v) }
    } else {
        // SAFETY: the mask covers exactly the chunk's floats (no other lane is written).
        unsafe { _mm256_maskstore_ps(chunk.as_mut_ptr(), lanes(chunk.len()), v) }
    }
}

/// The sum of the lanes, in a fixed order: halves, then pairs, then the last two.
#[target_feature(enable = "avx2")]
#[inline]
fn reduce_add(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The largest lane.
#[target_feature(enable = "avx2")]
#[inline]
fn reduce_max(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}

/// As the portable `rescale`: folds the block's scores into each head's running max and sum,
/// rescales the partial outputs, and leaves the weights `exp(score - max)` in `scores`.
#[target_feature(enable = "avx2,fma")]
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
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    for (((scores, head_out), max), sum) in heads.zip(outs).zip(&mut run.max).zip(&mut run.sum) {
        let scores = &mut scores[..slots];
        let mut block_max = neg_inf;
        for chunk in scores.chunks(W) {
            let m = lanes(chunk.len());
            // SAFETY: the mask covers exactly the chunk's floats (masked lanes are not read).
            let v = unsafe { _mm256_maskload_ps(chunk.as_ptr(), m) };
            let v = _mm256_blendv_ps(neg_inf, v, _mm256_castsi256_ps(m));
            block_max = _mm256_max_ps(block_max, v);
        }
        let new_max = max.max(reduce_max(block_max));
        // exp(-inf - finite) is 0, which also clears the zero-initialised state on block 0.
        let alpha = (*max - new_max).exp();
        if alpha != 1.0 {
            *sum *= alpha;
            scale_by(head_out, alpha);
        }
        *max = new_max;
        let shift = _mm256_set1_ps(new_max);
        let mut total = _mm256_setzero_ps();
        for chunk in scores.chunks_mut(W) {
            let m = lanes(chunk.len());
            // SAFETY: the mask covers exactly the chunk's floats (no other lane is read).
            let x = unsafe { _mm256_maskload_ps(chunk.as_ptr(), m) };
            let e = _mm256_and_ps(exp8(_mm256_sub_ps(x, shift)), _mm256_castsi256_ps(m));
            total = _mm256_add_ps(total, e);
            store_lanes(chunk, e);
        }
        *sum += reduce_add(total);
    }
}

/// Adds `weight_j * value_j` over the block's slots to each head's partial output. The heads
/// are taken up to [`GROUP_MAX`] at a time, and each pass holds the outputs of its heads over
/// a few 8-float columns in registers (about 8 vectors in all, enough independent chains to
/// keep both FMA units busy), so the heads of a pass share each value load.
#[target_feature(enable = "avx2,fma")]
fn accumulate_values<E: Lane>(
    values: &Rows<'_, E>,
    hd: usize,
    block_size: usize,
    slots: usize,
    out: &mut [f32],
    scores: &[f32],
) {
    let cols = Columns {
        values,
        hd,
        block_size,
        slots,
    };
    let passes = out
        .chunks_mut(GROUP_MAX * hd)
        .zip(scores.chunks(GROUP_MAX * block_size));
    for (out, scores) in passes {
        match out.len() / hd {
            1 => cols.add::<1, 8>(out, scores),
            2 => cols.add::<2, 4>(out, scores),
            3 => cols.add::<3, 2>(out, scores),
            4 => cols.add::<4, 2>(out, scores),
            5 => cols.add::<5, 1>(out, scores),
            6 => cols.add::<6, 1>(out, scores),
            7 => cols.add::<7, 1>(out, scores),
            _ => cols.add::<8, 1>(out, scores),
        }
    }
}

/// One block's values and the shapes [`accumulate_values`] passes over them.
struct Columns<'r, 'a, E> {
    values: &'r Rows<'a, E>,
    hd: usize,
    block_size: usize,
    slots: usize,
}

impl<E: Lane> Columns<'_, '_, E> {
    /// Adds the block's weighted values to the outputs of `H` heads (`out` is `[H, hd]`,
    /// `scores` their weights, `block_size` apart), `C` columns of 8 at a time, then one at a
    /// time for the rest.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn add<const H: usize, const C: usize>(&self, out: &mut [f32], scores: &[f32]) {
        let mut col = 0;
        while col + C * W <= self.hd {
            self.pass::<H, C>(col, out, scores);
            col += C * W;
        }
        while col < self.hd {
            self.pass::<H, 1>(col, out, scores);
            col += W;
        }
    }

    /// One pass over the block's slots for the columns `col .. col + 8 * C` of `H` heads: one
    /// fused multiply-add chain per output vector, slots in order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn pass<const H: usize, const C: usize>(&self, col: usize, out: &mut [f32], scores: &[f32]) {
        let (hd, bs, slots) = (self.hd, self.block_size, self.slots);
        let (vp, stride) = (self.values.data.as_ptr(), self.values.stride);
        debug_assert!(slots >= 1 && (slots - 1) * stride + hd <= self.values.data.len());
        debug_assert!(out.len() == H * hd && scores.len() >= (H - 1) * bs + slots);
        debug_assert!(col + C * W <= hd);
        let (op, wp) = (out.as_mut_ptr(), scores.as_ptr());
        // SAFETY: rows `j < slots` of `values` have `hd` elements at `j * stride` (`Rows` over
        // a block), and `col + 8 * C <= hd` (`add`'s loops); `accumulate_values` cut `out`
        // into `H` heads of `hd` floats and `scores` into their weights, `bs` apart, of which
        // the first `slots <= bs` are read. The debug assertions above restate this.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; H];
            for (g, acc) in acc.iter_mut().enumerate() {
                for (k, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_loadu_ps(op.add(g * hd + col + k * W));
                }
            }
            for j in 0..slots {
                let row = vp.add(j * stride + col);
                let mut v = [_mm256_setzero_ps(); C];
                for (k, v) in v.iter_mut().enumerate() {
                    *v = E::load8(row.add(k * W));
                }
                for (g, acc) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(*wp.add(g * bs + j));
                    for (acc, &v) in acc.iter_mut().zip(&v) {
                        *acc = _mm256_fmadd_ps(w, v, *acc);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                for (k, &acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(op.add(g * hd + col + k * W), acc);
                }
            }
        }
    }
}
