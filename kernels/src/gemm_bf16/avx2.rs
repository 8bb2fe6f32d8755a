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
//! Activations are widened to f32 once per matmul (`[kp][rows]` per row block, the f32
//! kernel's layout), so each is one broadcast from memory. A block is at most [`MR`] rows ×
//! 16 columns: `2 · MR` accumulators, four widened weight vectors and a broadcast in the
//! sixteen 256-bit registers; a 32-column panel takes two passes (one or two rows take it in
//! one pass).
//!
//! From [`WIDEN_ROWS`] rows up, where the matmul is bound by arithmetic rather than by
//! memory, each panel is instead widened once into an f32 scratch panel and the f32 AVX2
//! kernel runs on it: its inner loop has no conversions, and its chain of fused steps over
//! `k` is this kernel's, so the bits are the same either way (and a row's result does not
//! depend on how many rows share the matmul).

use std::arch::x86_64::*;

/// Most rows per sub-block.
pub(super) const MR: usize = 5;

/// The rows of one block (activations `[kp][rows]` f32, the bf16 values widened) against one
/// packed panel, into the first `cols` columns of `c` (row stride `ldc`), in sub-blocks of at
/// most [`MR`] rows.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` must hold `kp * rows` floats and `panel` `kp * 32`
/// values; `c` must address `rows` rows of `cols <= 32` writable floats at stride `ldc`.
pub(super) unsafe fn rows(
    a: &[f32],
    rows: usize,
    kp: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    for (r0, sub) in crate::gemm::even_blocks(rows, MR) {
        // SAFETY: rows `r0..r0 + sub` of the block are rows of `c` (the caller's promise).
        let c = unsafe { c.add(r0 * ldc) };
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match sub {
                    // SAFETY: the caller's promises, for the sub-block.
                    $($r => unsafe { block::<$r>(a, rows, r0, kp, panel, c, ldc, cols) },)*
                    _ => unreachable!("sub-block of {sub} rows > {MR}"),
                }
            };
        }
        dispatch!(1 2 3 4 5);
    }
}

/// Rows `r0 .. r0 + R` of a block whose activations are `[kp][lda]` f32, against one panel,
/// into the first `cols` columns of `c` (row stride `ldc`). One or two rows take all 32
/// columns in one pass (more independent sums in flight, each weight line read once); more
/// rows take two passes of 16.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` must hold `kp * lda` floats with `r0 + R <= lda`,
/// `panel` `kp * 32` values; `c` must address `R` rows of `cols <= 32` writable floats at
/// stride `ldc`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn block<const R: usize>(
    a: &[f32],
    lda: usize,
    r0: usize,
    kp: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    debug_assert!(r0 + R <= lda && a.len() == kp * lda && panel.len() == kp * 32);
    // Vectors of 8 columns per pass: 4 (one pass) for up to two rows, else 2.
    let nv = if R <= 2 { 4 } else { 2 };
    // SAFETY: the values `(2j, r0 + r)` and `(2j + 1, r0 + r)` are inside `a`; pair row `j`
    // of the panel is `panel[j * 64..][..64]`, and the loads read 16 values at
    // `(h + 8 v) * 2` with `h + 8 v < 32`; the stores are the caller's promise.
    unsafe {
        let ap = a.as_ptr().add(r0);
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
                let a0p = ap.add(2 * j * lda);
                let a1p = a0p.add(lda);
                for r in 0..R {
                    let a0 = _mm256_broadcast_ss(&*a0p.add(r));
                    let a1 = _mm256_broadcast_ss(&*a1p.add(r));
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

/// Rows from this many up widen each panel to f32 once and run the f32 kernel on it.
pub(super) const WIDEN_ROWS: usize = 24;

/// A packed panel (`kp / 2` pair rows of 64 values) widened into the f32 kernel's panel
/// layout, `[kp][32]`: value `k` of column `c` at `k * 32 + c`.
pub(super) fn widen_panel(panel: &[u16], wide: &mut [f32]) {
    assert!(panel.len() == wide.len() && panel.len().is_multiple_of(64));
    // SAFETY: the CPU has AVX2 (this kernel is only chosen then).
    unsafe { widen_panel_avx2(panel, wide) }
}

#[target_feature(enable = "avx2")]
fn widen_panel_avx2(panel: &[u16], wide: &mut [f32]) {
    let top = _mm256_set1_epi32(-65536);
    for (line, out) in panel.chunks_exact(64).zip(wide.chunks_exact_mut(64)) {
        // Eight columns' pairs per 16 values: the even values are row `2j`, the odd `2j + 1`.
        for v in 0..4 {
            // SAFETY: `line` is 64 values and `out` 64 floats; `v * 16 + 16 <= 64` and
            // `v * 8 + 8 <= 32`.
            unsafe {
                let w = _mm256_loadu_si256(line.as_ptr().add(16 * v).cast());
                let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
                let odd = _mm256_castsi256_ps(_mm256_and_si256(w, top));
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * v), even);
                _mm256_storeu_ps(out.as_mut_ptr().add(32 + 8 * v), odd);
            }
        }
    }
}
