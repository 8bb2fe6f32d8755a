//! The same computation with AVX-512 on whole 16-float vectors, for head sizes that are a
//! multiple of 16 (64 and 128 in every Llama-family model): the dot products, the value
//! sums and the softmax's `exp` (a polynomial, [`exp`]) run 16 lanes at a time with fused
//! multiply-adds instead of the portable code's 4-wide loops and one libm `expf` per score.
//!
//! Keys and values stored as `bf16` are read in place and widened in registers (a zero
//! extension and a shift: exact), so the block is never copied out; the products and sums are
//! the same as over an `f32` copy of it, bit for bit.
//!
//! The result differs from the portable path in the last bits (fused rounding, another
//! order of additions, another `exp`), but not between calls: the path is chosen per process
//! from the CPU, every task visits its keys and lanes in a fixed order, and so a row's
//! output is still bit-identical whatever batch, part or thread computes it.

use super::geometry::Geometry;
use super::walk::{BlockSteps, Rows, Running, Task};
use crate::simd::exp;
use half::bf16;
use std::arch::x86_64::*;

/// Floats per vector.
const W: usize = 16;

/// Whether this path runs for heads of `head_dim` on this CPU.
pub(super) fn usable(head_dim: usize) -> bool {
    head_dim.is_multiple_of(W) && std::arch::is_x86_feature_detected!("avx512f")
}

/// An element of the rows the steps read, loaded 16 at a time as floats.
pub(super) trait Lane: Copy {
    /// The 16 elements at `p`, as floats.
    ///
    /// # Safety
    /// The CPU has AVX-512F, and `p` points to 16 readable elements.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Lane for f32 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Lane for bf16 {
    /// bf16 is the top half of an f32: zero-extend each 16-bit lane and shift it up.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const bf16) -> __m512 {
        // SAFETY: the caller's contract (16 bf16 values are the 32 bytes read).
        unsafe {
            let raw = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
        }
    }
}

/// The AVX-512 flavour of the per-block steps; used only once [`usable`] said yes.
pub(super) struct Avx512;

// SAFETY (every call below): `Avx512` is chosen only after `usable` checked that the CPU
// has AVX-512F and that `head_dim` is a multiple of 16.
impl<E: Lane> BlockSteps<E> for Avx512 {
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
///
/// Sixteen keys at a time: each key's products are summed lane-wise into one vector (one
/// fused multiply-add per 16 elements of the head), and the sixteen vectors are then reduced
/// together by [`sum16`] into one vector whose lane `j` is key `j`'s score: 15 pairwise
/// steps instead of a horizontal sum per key, which cost more than the products themselves
/// at a head size of 64.
#[target_feature(enable = "avx512f")]
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
    let scale = _mm512_set1_ps(task.scale);
    for (g, q) in task.q.chunks_exact(hd).enumerate() {
        let head_scores = &mut scores[g * block_size..][..slots];
        for (c, chunk) in head_scores.chunks_mut(W).enumerate() {
            let mut acc = [_mm512_setzero_ps(); W];
            for (i, acc) in acc[..chunk.len()].iter_mut().enumerate() {
                let j = c * W + i;
                for d in (0..hd).step_by(W) {
                    // SAFETY: row `j < slots` of `keys` has `hd` elements at `j * stride`,
                    // `d + 16 <= hd`, and `q` is `hd` floats.
                    unsafe {
                        *acc = _mm512_fmadd_ps(
                            _mm512_loadu_ps(q.as_ptr().add(d)),
                            E::load16(kp.add(j * keys.stride + d)),
                            *acc,
                        );
                    }
                }
            }
            let dots = _mm512_mul_ps(sum16(&acc), scale);
            // SAFETY: the mask covers exactly the chunk's floats.
            unsafe { _mm512_mask_storeu_ps(chunk.as_mut_ptr(), lanes(chunk.len()), dots) };
        }
    }
}

/// [`sum16`]'s lane choices, round by round (groups of 8, 4, 2, 1 lanes): from a pair `(a, b)`
/// (lanes 0–15 of `a`, then 16–31 of `b`), the first half of every group of `2 * width`
/// lanes (`lo`) and the second half (`hi`). Adding the two gives a vector whose groups of
/// `width` lanes each hold partial sums of one key, keys in order.
static SUM16_LANES: [[[i32; W]; 2]; 4] = [
    sum16_lanes(8),
    sum16_lanes(4),
    sum16_lanes(2),
    sum16_lanes(1),
];

const fn sum16_lanes(width: usize) -> [[i32; W]; 2] {
    let mut out = [[0; W]; 2];
    let (mut src, mut n) = (0, 0);
    while src < 2 * W {
        if src % (2 * width) < width {
            out[0][n] = src as i32;
            out[1][n] = (src + width) as i32;
            n += 1;
        }
        src += 1;
    }
    out
}

/// The lane sums of sixteen vectors, as one vector (lane `j` = the sum of `v[j]`'s lanes):
/// four rounds that each add the two halves of pairs of vectors, halving the lanes per
/// vector and the number of vectors. The additions' order is fixed, so the result is too.
#[target_feature(enable = "avx512f")]
#[inline]
fn sum16(v: &[__m512; W]) -> __m512 {
    let mut cur = *v;
    let mut count = W;
    for [lo, hi] in &SUM16_LANES {
        // SAFETY: each index table is 16 `i32`s.
        let (lo, hi) = unsafe {
            (
                _mm512_loadu_si512(lo.as_ptr().cast()),
                _mm512_loadu_si512(hi.as_ptr().cast()),
            )
        };
        for i in 0..count / 2 {
            let (a, b) = (cur[2 * i], cur[2 * i + 1]);
            cur[i] = _mm512_add_ps(
                _mm512_permutex2var_ps(a, lo, b),
                _mm512_permutex2var_ps(a, hi, b),
            );
        }
        count /= 2;
    }
    cur[0]
}

/// The lanes `0..n` of a vector (`n <= 16`).
fn lanes(n: usize) -> __mmask16 {
    (((1u32 << n) - 1) & 0xffff) as __mmask16
}

/// As [`rescale`](super::portable::rescale): folds the block's scores into each head's running
/// max and sum, rescales the partial outputs, and leaves the weights `exp(score - max)` in
/// `scores`.
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
    for (((scores, head_out), max), sum) in heads.zip(outs).zip(&mut run.max).zip(&mut run.sum) {
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
/// 16-float column at a time with two accumulators (even and odd slots). The heads of the
/// group (up to [`GROUP_MAX`]) share each value load; each head's sums are the same, in the
/// same order, as one head at a time.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // `g` indexes the accumulators and the heads alike
fn accumulate_values<E: Lane>(
    values: &Rows<'_, E>,
    hd: usize,
    block_size: usize,
    slots: usize,
    out: &mut [f32],
    scores: &[f32],
) {
    debug_assert!(slots >= 1 && (slots - 1) * values.stride + hd <= values.data.len());
    let vp = values.data.as_ptr();
    let stride = values.stride;
    let heads = out.len() / hd;
    if heads > GROUP_MAX {
        for (head_out, w) in out
            .chunks_exact_mut(hd)
            .zip(scores.chunks_exact(block_size))
        {
            accumulate_values(values, hd, block_size, slots, head_out, w);
        }
        return;
    }
    let op = out.as_mut_ptr();
    let wp = scores.as_ptr();
    for c in (0..hd).step_by(W) {
        // SAFETY: rows `j < slots` of `values` have `hd` elements at `j * stride` (`Rows`
        // over a block), and `c + 16 <= hd`; `out` is `heads * hd` floats and `scores`
        // `heads * block_size`, with `slots <= block_size`.
        unsafe {
            let mut even = [_mm512_setzero_ps(); GROUP_MAX];
            let mut odd = [_mm512_setzero_ps(); GROUP_MAX];
            for g in 0..heads {
                even[g] = _mm512_loadu_ps(op.add(g * hd + c));
            }
            let mut j = 0;
            while j + 1 < slots {
                let a = E::load16(vp.add(j * stride + c));
                let b = E::load16(vp.add((j + 1) * stride + c));
                for g in 0..heads {
                    let w = wp.add(g * block_size + j);
                    even[g] = _mm512_fmadd_ps(_mm512_set1_ps(*w), a, even[g]);
                    odd[g] = _mm512_fmadd_ps(_mm512_set1_ps(*w.add(1)), b, odd[g]);
                }
                j += 2;
            }
            if j < slots {
                let a = E::load16(vp.add(j * stride + c));
                for g in 0..heads {
                    let w = *wp.add(g * block_size + j);
                    even[g] = _mm512_fmadd_ps(_mm512_set1_ps(w), a, even[g]);
                }
            }
            for g in 0..heads {
                _mm512_storeu_ps(op.add(g * hd + c), _mm512_add_ps(even[g], odd[g]));
            }
        }
    }
}

/// The most query heads per kv head that [`accumulate_values`] keeps in registers at once
/// (Llama-family models have 3–8).
const GROUP_MAX: usize = 8;
