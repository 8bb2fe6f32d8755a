//! The f32 register blocks for CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 1–3, Intel
//! client cores): sixteen 256-bit registers, so a block is at most [`MR`] rows × 16 columns
//! (`2 · MR` accumulators, two weight vectors, one broadcast activation), and a 32-column
//! panel is done in two passes of 16; one or two rows (decoding few sequences) take the
//! panel in one pass, whose four independent sums per row hide the multiply-adds' latency.
//!
//! Every output element is the same chain of fused multiply-adds over `k`, from `k = 0` up,
//! as in the AVX-512 block: the two kernels give the same bits, and a row's result does not
//! depend on the rows around it or on how a block of rows is cut into sub-blocks.

use super::NR;
use std::arch::x86_64::*;

/// Most rows per AVX2 sub-block.
pub(crate) const MR: usize = 6;

/// One block of `rows` rows (activations packed `[k][rows]`) against one panel, into the
/// first `cols` columns of `c` (row stride `ldc`), in sub-blocks of at most [`MR`] rows as
/// even as possible (7 rows: 4 + 3, not 6 + 1, whose lone row would wait on the
/// multiply-adds' latency); the first pulls `prefetch` (the next panel) towards the cache.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` must hold `k * rows` floats, `panel` and `prefetch`
/// `k * NR`; `c` must address `rows` rows of `cols <= NR` writable floats at stride `ldc`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows(
    a: &[f32],
    rows: usize,
    k: usize,
    panel: &[f32],
    prefetch: Option<&[f32]>,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    for (s, (r0, sub)) in super::even_blocks(rows, MR).enumerate() {
        let pf = if s == 0 { prefetch } else { None };
        // SAFETY: rows `r0..r0 + sub` of the block are rows of `c` (the caller's promise).
        let c = unsafe { c.add(r0 * ldc) };
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match (sub, pf) {
                    // SAFETY (all arms): the caller's promises, for the sub-block.
                    $(($r, Some(p)) => unsafe {
                        block::<$r, true>(a, rows, r0, k, panel, p, c, ldc, cols)
                    },
                    ($r, None) => unsafe {
                        block::<$r, false>(a, rows, r0, k, panel, panel, c, ldc, cols)
                    },)*
                    _ => unreachable!("sub-block of {sub} rows > {MR}"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6);
    }
}

/// Rows `r0 .. r0 + R` of a block whose activations are packed `[k][lda]`, against one panel
/// (`[k][NR]`), into the first `cols` columns of `c` (row stride `ldc`): all 32 columns in
/// one pass for up to two rows, else two passes of 16. With `PREFETCH`, the first pass also
/// asks for the two cache lines of `next` at each `k` step.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` must hold `k * lda` floats with `r0 + R <= lda`,
/// `panel` and `next` `k * NR`; `c` must address `R` rows of `cols <= NR` writable floats at
/// stride `ldc`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn block<const R: usize, const PREFETCH: bool>(
    a: &[f32],
    lda: usize,
    r0: usize,
    k: usize,
    panel: &[f32],
    next: &[f32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    debug_assert!(r0 + R <= lda && a.len() == k * lda && panel.len() == k * NR);
    let nv = if R <= 2 { 4 } else { 2 };
    // SAFETY: every load is inside `a` (`kk * lda + r0 + r < k * lda`) or `panel`
    // (`kk * NR + h + 8 v + 8 <= k * NR`); the stores are the caller's promise about `c`.
    unsafe {
        let ap = a.as_ptr().add(r0);
        let bp = panel.as_ptr();
        let np = next.as_ptr().cast::<i8>();
        for h in (0..cols).step_by(8 * nv) {
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            for kk in 0..k {
                if PREFETCH && h == 0 {
                    _mm_prefetch::<_MM_HINT_T1>(np.add(kk * NR * 4));
                    _mm_prefetch::<_MM_HINT_T1>(np.add(kk * NR * 4 + 64));
                }
                let mut b = [_mm256_setzero_ps(); 4];
                for v in 0..nv {
                    b[v] = _mm256_loadu_ps(bp.add(kk * NR + h + 8 * v));
                }
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*ap.add(kk * lda + r));
                    for v in 0..nv {
                        acc[r][v] = _mm256_fmadd_ps(av, b[v], acc[r][v]);
                    }
                }
            }
            let left = cols - h;
            for (v, at) in (0..nv).zip((0..left).step_by(8)) {
                let lanes = (left - at).min(8);
                for r in 0..R {
                    store8(acc[r][v], c.add(r * ldc + h + at), lanes);
                }
            }
        }
    }
}

/// Stores the first `lanes` floats of `v` at `c` (all 8 when `lanes >= 8`).
///
/// # Safety
/// `c` must address `lanes.min(8)` writable floats; the CPU must have AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn store8(v: __m256, c: *mut f32, lanes: usize) {
    // SAFETY: the caller's promise about `c`; masked lanes are neither read nor written.
    unsafe {
        if lanes >= 8 {
            _mm256_storeu_ps(c, v);
        } else {
            _mm256_maskstore_ps(c, mask(lanes), v);
        }
    }
}

/// Lanes `0..n` (`n <= 8`) as a `maskstore` mask (sign bit set).
#[target_feature(enable = "avx2")]
fn mask(n: usize) -> __m256i {
    let lanes: [i32; 8] = std::array::from_fn(|i| if i < n { -1 } else { 0 });
    // SAFETY: `lanes` is 8 `i32`s.
    unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) }
}

#[cfg(test)]
mod tests {
    use super::super::even_blocks;

    /// The sub-blocks (and the row blocks) cover every row once, in order, in the fewest
    /// blocks of at most `most`, whose sizes differ by at most one (7 rows in blocks of 6:
    /// 4 + 3, not 6 + 1).
    #[test]
    fn even_blocks_cover_the_items_evenly() {
        for most in [4, 5, 6, 12] {
            for n in 0..=40 {
                let blocks: Vec<_> = even_blocks(n, most).collect();
                assert_eq!(blocks.len(), n.div_ceil(most), "{n}/{most}: {blocks:?}");
                let mut next = 0;
                for &(r, len) in &blocks {
                    assert_eq!(r, next, "{n}/{most}: {blocks:?}");
                    assert!((1..=most).contains(&len), "{n}/{most}: {blocks:?}");
                    next += len;
                }
                assert_eq!(next, n);
                let (lo, hi) = blocks
                    .iter()
                    .fold((most, 0), |(lo, hi), &(_, len)| (lo.min(len), hi.max(len)));
                assert!(blocks.is_empty() || hi - lo <= 1, "{n}/{most}: {blocks:?}");
            }
        }
        assert_eq!(even_blocks(7, 6).collect::<Vec<_>>(), [(0, 4), (4, 3)]);
    }
}
