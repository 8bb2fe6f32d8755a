//! Vector helpers shared by the CPU kernels (this crate's fused passes, the paged attention
//! of `tandem-kvcache`).

#[cfg(target_arch = "x86_64")]
pub use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

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
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts, so that `n * LN2_HI` is exact and `r` keeps its low bits.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        // e^r = 1 + r + r² p(r)
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(y, n)
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
    }
}
