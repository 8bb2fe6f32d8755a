//! The CPU f32 path of a decoder layer: the steps between the matmuls as single passes over
//! plain slices.
//!
//! Through candle, a layer's elementwise work is about a dozen tensor ops (norm, narrow,
//! contiguous copies, RoPE, SiLU, multiply, two residual adds), each allocating its output
//! and each handing its work to candle's own spinning thread pool, which on a machine with
//! few cores fights the matmul threads for them. Here each step is one pass: the residual add
//! and the next RMSNorm share a pass, RoPE is applied while Q, K and V are cut out of the
//! fused projection, SiLU and the gate multiply share one. Large passes split their rows
//! over the matmuls' threads ([`Team`]).
//!
//! The arithmetic is candle's, operation for operation (the same f32 formulas in the same
//! order), so this path and the candle path agree to the last bit on everything except the
//! matmuls and, on AVX-512, SiLU's `exp` (a vector polynomial within 2 ulp of libm's).

use crate::team::Team;

/// Rows at or above this many floats in total are split between threads.
const PARALLEL_FLOATS: usize = 1 << 15;
/// Floats per piece of work handed to a thread.
const FLOATS_PER_PART: usize = 1 << 13;

/// Runs `f(row_in, row_out)` over matching rows of `input` (`width_in` floats each) and
/// `out` (`width_out` each), on several threads when there is enough work.
fn rows<F>(input: &[f32], width_in: usize, out: &mut [f32], width_out: usize, f: F)
where
    F: Fn(&[f32], &mut [f32]) + Sync,
{
    let per_part = (FLOATS_PER_PART / (width_in + width_out)).max(1);
    let piece = |i: usize, out: &mut [f32]| {
        let first = i * per_part;
        let input = &input[first * width_in..];
        for (x, o) in input.chunks(width_in).zip(out.chunks_mut(width_out)) {
            f(x, o);
        }
    };
    if input.len() + out.len() >= PARALLEL_FLOATS {
        Team::global().for_chunks(out, per_part * width_out, &piece);
    } else {
        piece(0, out);
    }
}

/// One row of RMSNorm, as candle computes it: `x / sqrt(mean(x²) + eps) * w`.
#[inline]
fn rms_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum2 = x.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((o, &v), &a) in out.iter_mut().zip(x).zip(w) {
        *o = v / m * a;
    }
}

/// RMSNorm of every row of `x` (`[rows, w.len()]`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    rows(x, w.len(), &mut out, w.len(), |x, o| rms_row(x, w, eps, o));
    out
}

/// `x += y`, then the RMSNorm of the new `x`: the residual add and the next layer norm in one
/// pass.
pub fn add_rms_norm(x: &mut [f32], y: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    let per_part = (FLOATS_PER_PART / (3 * h)).max(1);
    let piece = |i: usize, x: &mut [f32], out: &mut [f32]| {
        let y = &y[i * per_part * h..];
        for ((x, y), o) in x.chunks_mut(h).zip(y.chunks(h)).zip(out.chunks_mut(h)) {
            x.iter_mut().zip(y).for_each(|(x, &y)| *x += y);
            rms_row(x, w, eps, o);
        }
    };
    if x.len() * 3 >= PARALLEL_FLOATS {
        // Two outputs: the pieces of `x` are cut here, those of `out` by the team.
        let xs = SharedMut(x.as_mut_ptr());
        let len = x.len();
        Team::global().for_chunks(&mut out, per_part * h, &|i, out| {
            let start = i * per_part * h;
            // SAFETY: the same disjoint piece of `x` as the team's piece of `out`, and `x`
            // is borrowed mutably for the whole call.
            let x = unsafe { std::slice::from_raw_parts_mut(xs.get().add(start), out.len()) };
            debug_assert!(start + out.len() <= len);
            piece(i, x, out);
        });
    } else {
        piece(0, x, &mut out);
    }
    out
}

/// A slice's base pointer, shared with the team for disjoint pieces.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only to cut disjoint pieces of one mutably borrowed slice.
unsafe impl Sync for SharedMut {}
unsafe impl Send for SharedMut {}

impl SharedMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, &y)| *x += y);
}

/// From rows `[gate | up]` (`2 f` wide): `silu(gate) * up`, `f` wide.
///
/// On AVX-512 this is candle's formula 16 lanes at a time with a vector `exp`
/// ([`crate::simd::exp`], within 2 ulp of libm's), so it agrees with candle to a few ulp
/// rather than bit for bit; elsewhere it is candle's arithmetic exactly. Either way a row's
/// result depends only on that row.
pub fn silu_mul(gate_up: &[f32], f: usize) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len() / 2];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        rows(gate_up, 2 * f, &mut out, f, |gu, o| {
            let (g, u) = gu.split_at(f);
            // SAFETY: AVX-512F is present.
            unsafe { silu_mul_avx512(g, u, o) }
        });
        return out;
    }
    rows(gate_up, 2 * f, &mut out, f, |gu, o| {
        let (g, u) = gu.split_at(f);
        silu_mul_row(g, u, o);
    });
    out
}

/// `o = g / (1 + e^-g) * u`, one element at a time.
fn silu_mul_row(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// [`silu_mul_row`] on 16 lanes at a time (the tail one element at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn silu_mul_avx512(g: &[f32], u: &[f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = o.len().min(g.len()).min(u.len());
    let whole = n / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..whole).step_by(16) {
        // SAFETY: `i + 16 <= n`, within all three slices.
        unsafe {
            let gv = _mm512_loadu_ps(g.as_ptr().add(i));
            let uv = _mm512_loadu_ps(u.as_ptr().add(i));
            let e = crate::simd::exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
            _mm512_storeu_ps(o.as_mut_ptr().add(i), _mm512_mul_ps(s, uv));
        }
    }
    silu_mul_row(&g[whole..n], &u[whole..n], &mut o[whole..n]);
}

/// The shapes of a fused `[q | k | v]` projection row.
#[derive(Clone, Copy, Debug)]
pub struct QkvShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Cuts rows of `[q | k | v]` into `q` `[t, heads, d]`, `k` and `v` `[t, kv_heads, d]`,
/// rotating `q` and `k` on the way (half-split RoPE with the per-row `cos`/`sin` tables,
/// `[t, d / 2]` each).
pub fn split_rope(
    qkv: &[f32],
    s: QkvShape,
    cos: &[f32],
    sin: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = s.head_dim;
    let (qs, kvs) = (s.heads * d, s.kv_heads * d);
    let width = qs + 2 * kvs;
    let t = qkv.len() / width;
    let mut q = vec![0f32; t * qs];
    let mut k = vec![0f32; t * kvs];
    let mut v = vec![0f32; t * kvs];
    let half = d / 2;
    let rotate = |src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32]| {
        for (src, dst) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
            let (x1, x2) = src.split_at(half);
            let (d1, d2) = dst.split_at_mut(half);
            for i in 0..half {
                d1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                d2[i] = x1[i] * sin[i] + x2[i] * cos[i];
            }
        }
    };
    let one = |r: usize, row: &[f32], q: &mut [f32], k: &mut [f32], v: &mut [f32]| {
        let (cos, sin) = (&cos[r * half..][..half], &sin[r * half..][..half]);
        rotate(&row[..qs], q, cos, sin);
        rotate(&row[qs..qs + kvs], k, cos, sin);
        v.copy_from_slice(&row[qs + kvs..]);
    };
    // One pass, on this thread: no transcendental functions, a few microseconds per layer.
    for (r, (((row, q), k), v)) in qkv
        .chunks(width)
        .zip(q.chunks_mut(qs))
        .zip(k.chunks_mut(kvs))
        .zip(v.chunks_mut(kvs))
        .enumerate()
    {
        one(r, row, q, k, v);
    }
    (q, k, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random(len: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).expect("test setup")
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .expect("test setup")
            .to_vec1()
            .expect("test setup")
    }

    // Each fused pass against candle's ops, bit for bit, at a small size (one thread) and a
    // large one (rows split between threads).
    const SIZES: [usize; 2] = [3, 200];

    #[test]
    fn norms_equal_candles_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(1);
        let h = 64;
        for rows in SIZES {
            let x = random(rows * h, &mut rng);
            let y = random(rows * h, &mut rng);
            let w = random(h, &mut rng);
            let want = candle_nn::ops::rms_norm(&t(&x, &[rows, h]), &t(&w, &[h]), 1e-5)
                .expect("test setup");
            assert_eq!(bits(&rms_norm(&x, &w, 1e-5)), bits(&vec(&want)));

            let sum = (t(&x, &[rows, h]) + t(&y, &[rows, h])).expect("test setup");
            let want = candle_nn::ops::rms_norm(&sum, &t(&w, &[h]), 1e-5).expect("test setup");
            let mut x2 = x.clone();
            let got = add_rms_norm(&mut x2, &y, &w, 1e-5);
            assert_eq!(bits(&x2), bits(&vec(&sum)), "rows {rows}: the residual");
            assert_eq!(bits(&got), bits(&vec(&want)), "rows {rows}: the norm");
        }
    }

    #[test]
    fn silu_gate_equals_candles_to_the_bit_or_a_few_ulp() {
        let mut rng = StdRng::seed_from_u64(2);
        let f = 96;
        for rows in SIZES {
            let gu = random(rows * 2 * f, &mut rng);
            let g = t(&gu, &[rows, 2 * f]);
            let want = (candle_nn::ops::silu(&g.narrow(1, 0, f).expect("test setup"))
                .expect("test setup")
                * g.narrow(1, f, f).expect("test setup"))
            .expect("test setup");
            let (got, want) = (silu_mul(&gu, f), vec(&want));
            if std::arch::is_x86_feature_detected!("avx512f") {
                // The vector exp: a few ulp from libm's.
                for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                    let tol = 8.0 * f32::EPSILON * b.abs().max(f32::MIN_POSITIVE);
                    assert!((a - b).abs() <= tol, "rows {rows}, element {i}: {a} vs {b}");
                }
            } else {
                assert_eq!(bits(&got), bits(&want), "rows {rows}");
            }
        }
    }

    #[test]
    fn split_rope_equals_candles_narrow_and_rope_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(3);
        let s = QkvShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        let (qs, kvs, half) = (64, 32, 8);
        for rows in SIZES {
            let qkv = random(rows * (qs + 2 * kvs), &mut rng);
            let cos = random(rows * half, &mut rng);
            let sin = random(rows * half, &mut rng);
            let (q, k, v) = split_rope(&qkv, s, &cos, &sin);
            let all = t(&qkv, &[rows, qs + 2 * kvs]);
            let (c, sn) = (t(&cos, &[rows, half]), t(&sin, &[rows, half]));
            let rope = |x: Tensor, heads: usize| {
                let x = x
                    .reshape((rows, heads, 16))
                    .expect("test setup")
                    .contiguous()
                    .expect("test setup");
                let x = x.unsqueeze(0).expect("test setup");
                vec(&candle_nn::rotary_emb::rope_thd(&x, &c, &sn).expect("test setup"))
            };
            assert_eq!(
                bits(&q),
                bits(&rope(all.narrow(1, 0, qs).expect("test setup"), 4))
            );
            assert_eq!(
                bits(&k),
                bits(&rope(all.narrow(1, qs, kvs).expect("test setup"), 2))
            );
            assert_eq!(
                bits(&v),
                bits(&vec(&all.narrow(1, qs + kvs, kvs).expect("test setup")))
            );
        }
    }
}
