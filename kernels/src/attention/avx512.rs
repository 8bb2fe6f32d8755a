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
#[target_feature(enable = "avx512f")]
fn score_block<E: Lane>(
    keys: &Rows<'_, E>,
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
fn dot<E: Lane>(a: &[f32], b: &[E]) -> f32 {
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
                E::load16(pb.add(i * W)),
                even,
            );
            odd = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add((i + 1) * W)),
                E::load16(pb.add((i + 1) * W)),
                odd,
            );
            i += 2;
        }
        if i < n {
            even = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i * W)),
                E::load16(pb.add(i * W)),
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
/// 16-float column at a time with two accumulators (even and odd slots).
#[target_feature(enable = "avx512f")]
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
                    let a = E::load16(vp.add(j * stride + c));
                    let b = E::load16(vp.add((j + 1) * stride + c));
                    even = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), a, even);
                    odd = _mm512_fmadd_ps(_mm512_set1_ps(w[j + 1]), b, odd);
                    j += 2;
                }
                if j < slots {
                    let a = E::load16(vp.add(j * stride + c));
                    even = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), a, even);
                }
                _mm512_storeu_ps(o, _mm512_add_ps(even, odd));
            }
        }
    }
}
