//! `tandem bench --roofline`: this machine's limits, measured in the same run as the figures
//! they bound.
//!
//! - Memory read bandwidth: every thread of the matmul team sums its part of a buffer much
//!   larger than the caches (1 GiB), best of three passes.
//! - The kernel's peak: the model's own matmul (the dtype's kernel) on 64 rows against a
//!   weight that stays in the cache (1 MiB in bf16, 2 MiB in f32), on the same team.
//!
//! A decode step of `s` sessions reads every cloud weight once (`bytes`) and does `2 s P`
//! FLOPs in its matmuls (`P` the multiply-adds per row), so its time is at least
//! `max(bytes / bandwidth, 2 s P / peak)`: the figures are reported as fractions of that
//! bound. Attention and the KV reads are left out of the bound (a few percent of a step at
//! 64-token contexts), so the fractions are, if anything, flattering by that much.

use std::time::Instant;

use serde::Serialize;
use tandem_kernels::gemm::PackedMatrix;
use tandem_kernels::gemm_bf16::PackedBf16;
use tandem_kernels::team::Team;

/// The machine's measured limits.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Limits {
    pub read_bandwidth_gb_per_s: f64,
    pub matmul_peak_gflop_per_s: f64,
    /// `bf16` or `f32`: the kernel the peak was measured on.
    pub kernel_dtype: &'static str,
}

/// Measures both limits for the weights' dtype (`bf16` or anything else: f32).
pub fn measure(bf16: bool) -> Limits {
    Limits {
        read_bandwidth_gb_per_s: read_bandwidth(1 << 30),
        matmul_peak_gflop_per_s: matmul_peak(bf16),
        kernel_dtype: if bf16 { "bf16" } else { "f32" },
    }
}

/// GB/s of summing a `bytes`-long buffer on every team thread, best of three.
fn read_bandwidth(bytes: usize) -> f64 {
    let words: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let team = Team::global();
    let parts = team.threads();
    let per = words.len().div_ceil(parts);
    let sums: Vec<std::sync::atomic::AtomicU64> = (0..parts)
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        team.run(parts, &|p| {
            let part = words.chunks(per).nth(p).unwrap_or(&[]);
            // Eight independent sums, so the loop is bound by loads, not by one add chain.
            let mut acc = [0u64; 8];
            for c in part.chunks_exact(8) {
                for (a, &w) in acc.iter_mut().zip(c) {
                    *a = a.wrapping_add(w);
                }
            }
            let s = acc.iter().fold(0u64, |s, &a| s.wrapping_add(a));
            sums[p].store(
                std::hint::black_box(s),
                std::sync::atomic::Ordering::Relaxed,
            );
        });
        best = best.min(started.elapsed().as_secs_f64());
    }
    std::hint::black_box(&sums);
    bytes as f64 / best / 1e9
}

/// GFLOP/s of the model's matmul on 64 rows with the weight in cache, best of three.
fn matmul_peak(bf16: bool) -> f64 {
    let (m, n, k) = (64, 512, 1024);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
        .collect();
    let packed_bf16 = bf16.then(|| PackedBf16::pack_f32(&w, n, k));
    let packed_f32 = (!bf16).then(|| PackedMatrix::pack(&w, n, k));
    let call = || match (&packed_bf16, &packed_f32) {
        (Some(p), _) => p.matmul_to_vec(&x, m),
        (_, Some(p)) => p.matmul_to_vec(&x, m),
        _ => Vec::new(),
    };
    // Warm the cache and size the repetitions to about 0.2 s.
    let started = Instant::now();
    std::hint::black_box(call());
    let reps = ((0.2 / started.elapsed().as_secs_f64().max(1e-6)) as usize).clamp(3, 10_000);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(call());
        }
        best = best.min(started.elapsed().as_secs_f64() / reps as f64);
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// One measured figure against its bound.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Fraction {
    /// Rows per step (sessions for decode, prompt tokens for prefill).
    pub rows: usize,
    pub tokens_per_s: f64,
    /// The bound's tokens/s: `rows / max(bytes / bandwidth, 2 rows P / peak)`.
    pub bound_tokens_per_s: f64,
    /// `memory` or `compute`: which term of the bound is larger.
    pub bound_by: &'static str,
    pub fraction_of_bound: f64,
}

/// `tokens_per_s` measured at `rows` rows per step, against the roofline of a model whose
/// step reads `bytes` of weights and does `2 * rows * params` FLOPs.
pub fn fraction(
    limits: &Limits,
    bytes: usize,
    params: usize,
    rows: usize,
    tokens_per_s: f64,
) -> Fraction {
    let memory_s = bytes as f64 / (limits.read_bandwidth_gb_per_s * 1e9);
    let compute_s = 2.0 * (rows * params) as f64 / (limits.matmul_peak_gflop_per_s * 1e9);
    let step_s = memory_s.max(compute_s);
    let bound = rows as f64 / step_s;
    Fraction {
        rows,
        tokens_per_s,
        bound_tokens_per_s: bound,
        bound_by: if memory_s >= compute_s {
            "memory"
        } else {
            "compute"
        },
        fraction_of_bound: tokens_per_s / bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_switches_from_memory_to_compute_with_the_rows() {
        let limits = Limits {
            read_bandwidth_gb_per_s: 10.0,
            matmul_peak_gflop_per_s: 1000.0,
            kernel_dtype: "bf16",
        };
        // 1 GB of weights, 0.5 G multiply-adds per row: memory takes 0.1 s a step, compute
        // 1 ms per row.
        let one = fraction(&limits, 1_000_000_000, 500_000_000, 1, 5.0);
        assert_eq!(one.bound_by, "memory");
        assert!((one.bound_tokens_per_s - 10.0).abs() < 1e-9);
        assert!((one.fraction_of_bound - 0.5).abs() < 1e-9);
        let many = fraction(&limits, 1_000_000_000, 500_000_000, 256, 500.0);
        assert_eq!(many.bound_by, "compute");
        assert!((many.bound_tokens_per_s - 1000.0).abs() < 1e-6);
    }
}
