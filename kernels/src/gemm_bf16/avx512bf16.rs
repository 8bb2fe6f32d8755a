//! The AVX512-BF16 kernel ([`super::Bf16Kernel::Avx512Bf16`]): a block of up to 12 rows × 32
//! columns of accumulators in registers, fed by `vdpbf16ps` on one broadcast activation pair
//! and two 64-byte weight lines per pair row.

use std::arch::x86_64::*;

/// `R` rows × 32 columns in `2 R` zmm accumulators over the whole `k`: per pair row, two
/// 64-byte weight loads and, per row, one broadcast pair and two `vdpbf16ps`.
///
/// # Safety
/// As [`super::pairs_block`], and the CPU must have AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn block<const R: usize>(
    a: &[u16],
    kp: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    // SAFETY: `a` is `[kp / 2][R]` pairs and `panel` `kp / 2` lines of 64 values (checked
    // by the caller), so every load is in bounds; the stores are the caller's promise.
    unsafe {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        let ap = a.as_ptr().cast::<i32>();
        let bp = panel.as_ptr();
        for j in 0..kp / 2 {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(j * 64).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(j * 64 + 32).cast()));
            for r in 0..R {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(j * R + r)));
                lo[r] = _mm512_dpbf16_ps(lo[r], av, b0);
                hi[r] = _mm512_dpbf16_ps(hi[r], av, b1);
            }
        }
        crate::gemm::avx512::store_block(&lo, &hi, c, ldc, cols);
    }
}
