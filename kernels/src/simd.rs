//! Vector helpers shared by the CPU kernels (this crate's fused passes and paged attention):
//! `exp` on AVX-512 vectors and `exp8`, the same function on AVX2 vectors.

#[cfg(target_arch = "x86_64")]
pub use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The clamp of the input (see [`exp`]): `e^x` is 0 below the first, kept finite above
    /// the second.
    const CLAMP: (f32, f32) = (-104.0, 88.0);
    /// ln 2 in two parts, so that `n * LN2_HI` is exact and `r` keeps its low bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// The polynomial `p` of `e^r = 1 + r + r² p(r)` (Cephes' `expf`), highest degree first.
    const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];

    /// `e^x` per lane, within 2 ulp wherever `e^x` is a normal f32 (`-87 <= x <= 88`):
    /// `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by a degree-7 polynomial (Cephes'
    /// `expf` coefficients), scaled by `2^n`. Below -87 the result underflows to a subnormal
    /// or 0 (`e^-inf` is 0); above 88 it stays at `e^88` instead of overflowing. `e^0` is
    /// exactly 1.
    ///
    /// # Safety
    /// The CPU must have AVX-512F (callers check it once, or are AVX-512 code themselves).
    #[target_feature(enable = "avx512f")]
    pub fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(CLAMP.0));
        let x = _mm512_min_ps(x, _mm512_set1_ps(CLAMP.1));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(POLY[0]);
        for &c in &POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        // e^r = 1 + r + r² p(r)
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(y, n)
    }

    /// [`exp`] on 8 lanes with AVX2 and FMA: the same clamp, reduction and polynomial, with
    /// the same fused multiply-adds in the same order, and so the same result, bit for bit, on
    /// every input, subnormal results included (`exp8_equals_exp_bit_for_bit` checks it where
    /// the CPU has both). AVX2 has no `scalef`: `2^n` (`-150 <= n <= 127` after the clamp) is
    /// built from exponent bits as `2^(n - n/2) * 2^(n/2)`, two normal floats; the first
    /// product is exact, so the second rounds once, as `scalef` does.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA (callers check it once, or are AVX2 code themselves).
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(CLAMP.0));
        let x = _mm256_min_ps(x, _mm256_set1_ps(CLAMP.1));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(POLY[0]);
        for &c in &POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        // e^r = 1 + r + r² p(r)
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let n = _mm256_cvtps_epi32(n);
        let low = _mm256_srai_epi32::<1>(n);
        let high = _mm256_sub_epi32(n, low);
        _mm256_mul_ps(_mm256_mul_ps(y, pow2(high)), pow2(low))
    }

    /// `2^k` per lane, for `-126 <= k <= 127`: `k + 127` in the exponent bits.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn pow2(k: __m256i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            k,
            _mm256_set1_epi32(127),
        )))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn exp16(xs: &[f32; 16]) -> [f32; 16] {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F is present (checked by the callers); both arrays are 16 floats.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp(_mm512_loadu_ps(xs.as_ptr()))) };
            got
        }

        fn exp8s(xs: &[f32; 8]) -> [f32; 8] {
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA are present (checked by the callers); both arrays are 8
            // floats.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(xs.as_ptr()))) };
            got
        }

        fn has_avx2() -> bool {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }

        #[test]
        fn exp_is_within_two_ulp_of_f64_over_the_normal_range() {
            if !std::arch::is_x86_feature_detected!("avx512f") {
                return;
            }
            let mut worst = 0f64;
            let mut x = -87.0f32;
            while x <= 87.9 {
                let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 1.37e-3);
                for (&g, &x) in exp16(&xs).iter().zip(&xs) {
                    let want = f64::from(x).exp();
                    let ulp = f64::from(f32::EPSILON) * want;
                    worst = worst.max((f64::from(g) - want).abs() / ulp);
                }
                x += 0.0173;
            }
            assert!(worst <= 2.0, "worst error {worst} ulp");
            let edge: [f32; 16] =
                std::array::from_fn(|i| [0.0, -0.0, -200.0, f32::NEG_INFINITY][i % 4]);
            for (i, &g) in exp16(&edge).iter().enumerate() {
                let want = if i % 4 < 2 { 1.0 } else { 0.0 };
                assert_eq!(g, want, "exp({})", edge[i]);
            }
        }

        #[test]
        fn exp8_is_within_two_ulp_of_f64_over_the_normal_range() {
            if !has_avx2() {
                return;
            }
            let mut worst = 0f64;
            let mut x = -87.0f32;
            while x <= 87.98 {
                let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 1.37e-3);
                for (&g, &x) in exp8s(&xs).iter().zip(&xs) {
                    let want = f64::from(x).exp();
                    let ulp = f64::from(f32::EPSILON) * want;
                    worst = worst.max((f64::from(g) - want).abs() / ulp);
                }
                x += 0.0173;
            }
            assert!(worst <= 2.0, "worst error {worst} ulp");
        }

        #[test]
        fn exp8_edges_are_exact() {
            if !has_avx2() {
                return;
            }
            let xs = [
                0.0,
                -0.0,
                -200.0,
                f32::NEG_INFINITY,
                -104.0,
                -87.5,
                -100.0,
                88.0,
            ];
            let got = exp8s(&xs);
            assert_eq!(&got[..4], &[1.0, 1.0, 0.0, 0.0]);
            // Below -87.3 the result is subnormal, rounded once from the f64 value (within
            // one step of 2^-149 there), and 0 at the clamp.
            for (&g, &x) in got[4..7].iter().zip(&xs[4..7]) {
                let want = f64::from(x).exp();
                let step = f64::from(f32::from_bits(1));
                assert!(
                    g.is_subnormal() || g == 0.0,
                    "exp({x}) = {g} is not subnormal"
                );
                assert!(
                    (f64::from(g) - want).abs() <= step,
                    "exp({x}) = {g}, want {want}"
                );
            }
            // 88 is the clamp: e^88 itself, a normal float, within 2 ulp.
            let want = 88f64.exp();
            assert!((f64::from(got[7]) - want).abs() <= 2.0 * f64::from(f32::EPSILON) * want);
        }

        /// The AVX2 `exp8` and the AVX-512 `exp` are the same arithmetic; on a CPU with both
        /// they agree on every bit, from the clamp to the overflow guard, subnormals included.
        #[test]
        fn exp8_equals_exp_bit_for_bit() {
            if !has_avx2() || !std::arch::is_x86_feature_detected!("avx512f") {
                return;
            }
            let mut x = -110.0f32;
            while x <= 90.0 {
                let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 7.1e-4);
                let wide = exp16(&xs);
                for half in 0..2 {
                    let lanes: [f32; 8] = std::array::from_fn(|i| xs[half * 8 + i]);
                    for (i, (&g, &w)) in exp8s(&lanes).iter().zip(&wide[half * 8..]).enumerate() {
                        assert_eq!(g.to_bits(), w.to_bits(), "exp({})", lanes[i]);
                    }
                }
                x += 0.0113;
            }
        }
    }
}
