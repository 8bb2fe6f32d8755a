//! The AVX2 kernel ([`super::Bf16Kernel::Avx2`]), for CPUs with AVX2 and FMA but neither
//! AMX nor AVX512-BF16 (AMD Zen 1–3, Intel client cores): the packed weights are widened to
//! f32 in registers (a bf16 value is the top half of an f32: a shift or a mask, exact) and
//! multiplied with fused multiply-adds.
//!
//! A 32-byte load of a pair row holds eight columns' `(w[c][2j], w[c][2j + 1])` pairs, one
//! per 32-bit lane: shifted left by 16 it is the eight even weights, masked to its top half
//! the eight odd ones. Each activation pair is broadcast and split the same way. Per pair
//! row and column the accumulator takes `a₀·w₀` and then `a₁·w₁`, each by one fused
//! multiply-add; a product of two bf16 values is exact in f32, so each step rounds exactly
//! as the portable kernel's add does, and the two kernels give the same bits (the tests
//! check it).
//!
//! A block is at most [`MR`] rows × 16 columns: `2 · MR` accumulators, four widened weight
//! vectors and the two halves of a broadcast pair in the sixteen 256-bit registers; a
//! 32-column panel takes two passes.

use std::arch::x86_64::*;

/// Most rows per sub-block.
pub(super) const MR: usize = 5;

/// The sub-blocks `(first row, rows)` of a block of `rows` rows, as even as possible.
pub(super) fn sub_blocks(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let blocks = rows.div_ceil(MR).max(1);
    (0..blocks).map(move |b| {
        let (base, extra) = (rows / blocks, rows % blocks);
        (b * base + b.min(extra), base + usize::from(b < extra))
    })
}

/// Rows `r0 .. r0 + R` of a block whose activations are `[kp / 2][lda]` pairs of f32 (the
/// [`widen_pairs`] layout), against one panel, into the first `cols` columns of `c` (row
/// stride `ldc`). One or two rows take all 32 columns in one pass (more independent sums in
/// flight, each weight line read once); more rows take two passes of 16.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` must hold `2 * kp * lda` values with `r0 + R <= lda`,
/// `panel` `kp * 32`; `c` must address `R` rows of `cols <= 32` writable floats at stride
/// `ldc`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(super) unsafe fn block<const R: usize>(
    a: &[u16],
    lda: usize,
    r0: usize,
    kp: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    debug_assert!(r0 + R <= lda && a.len() == 2 * kp * lda && panel.len() == kp * 32);
    // Vectors of 8 columns per pass: 4 (one pass) for up to two rows, else 2.
    let nv = if R <= 2 { 4 } else { 2 };
    // SAFETY: the pair `(j, r0 + r)` is the two f32 at `a[(j * lda + r0 + r) * 4..][..4]`,
    // inside `a`; pair row `j` of the panel is `panel[j * 64..][..64]`, and the loads read 16
    // values at `(h + 8 v) * 2` with `h + 8 v < 32`; the stores are the caller's promise.
    unsafe {
        let ap = a.as_ptr().cast::<f32>().add(2 * r0);
        let bp = panel.as_ptr();
        let top = _mm256_set1_epi32(-65536); // 0xffff_0000
        for h in (0..cols).step_by(8 * nv) {
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            for j in 0..kp / 2 {
                let line = bp.add(j * 64 + h * 2);
                let mut even = [_mm256_setzero_ps(); 4];
                let mut odd = [_mm256_setzero_ps(); 4];
                for v in 0..nv {
                    let w = _mm256_loadu_si256(line.add(16 * v).cast());
                    even[v] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
                    odd[v] = _mm256_castsi256_ps(_mm256_and_si256(w, top));
                }
                let pairs = ap.add(2 * j * lda);
                for r in 0..R {
                    let a0 = _mm256_set1_ps(pairs.add(2 * r).read_unaligned());
                    let a1 = _mm256_set1_ps(pairs.add(2 * r + 1).read_unaligned());
                    for v in 0..nv {
                        acc[r][v] =
                            _mm256_fmadd_ps(a1, odd[v], _mm256_fmadd_ps(a0, even[v], acc[r][v]));
                    }
                }
            }
            let left = cols - h;
            for (v, at) in (0..nv).zip((0..left).step_by(8)) {
                let lanes = (left - at).min(8);
                for r in 0..R {
                    crate::gemm::avx2::store8(acc[r][v], c.add(r * ldc + h + at), lanes);
                }
            }
        }
    }
}

/// The pair layout `[kp / 2][rows]` of bf16 pairs (`data`, as `u16`s) widened to pairs of
/// f32 (as `u16`s: the bf16 value is an f32's top half, under a zero low half), so that the
/// kernel broadcasts each activation straight from memory.
pub(super) fn widen_pairs(pairs: &[u16]) -> Vec<u16> {
    pairs.iter().flat_map(|&b| [0, b]).collect()
}
