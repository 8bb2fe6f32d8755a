//! The bf16 matmuls of one decode step of the demo model's cloud layers, on random weights:
//! 30 layers of `[qkv, o, gate+up, down]` (SmolLM2-135M's shapes), every weight packed once
//! and streamed from memory each step, as in serving. Prints the step time, the FLOP rate
//! and the weight bandwidth of the best of 8 runs (after 2 warm-ups).
//!
//! `cargo run --release -p tandem-kernels --example bf16_step -- [rows] [layers] [f32]`
//! (defaults 64 and 30); `TANDEM_BF16_KERNEL` and `TANDEM_MATMUL_THREADS` apply. A third
//! argument `f32` runs the same step on the f32 kernel (weights packed as f32) instead.

use std::time::Instant;
use tandem_kernels::gemm::PackedMatrix;
use tandem_kernels::gemm_bf16::{Bf16Kernel, PackedBf16};

/// One weight on the kernel being measured.
enum Weight {
    Bf16(PackedBf16),
    F32(PackedMatrix),
}

impl Weight {
    fn bytes(&self) -> usize {
        match self {
            Self::Bf16(w) => w.bytes(),
            Self::F32(w) => w.n() * w.k() * 4,
        }
    }

    fn matmul(&self, kernel: Bf16Kernel, x: &[f32], m: usize) -> Vec<f32> {
        match self {
            Self::Bf16(w) => w.matmul_to_vec_on(kernel, x, m),
            Self::F32(w) => w.matmul_to_vec(x, m),
        }
    }
}

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn arg(i: usize, default: usize) -> Result<usize, String> {
    std::env::args().nth(i).map_or(Ok(default), |v| {
        v.parse().map_err(|e| format!("argument {i} `{v}`: {e}"))
    })
}

fn main() -> Result<(), String> {
    let (m, layers) = (arg(1, 64)?, arg(2, 30)?);
    let f32 = std::env::args().nth(3).is_some_and(|a| a == "f32");
    let kernel = Bf16Kernel::selected()?;
    let shapes = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)];
    let weights: Vec<Weight> = (0..layers)
        .flat_map(|l| {
            shapes.iter().enumerate().map(move |(i, &(n, k))| {
                let w = values(n * k, (l * 4 + i + 1) as u64);
                if f32 {
                    Weight::F32(PackedMatrix::pack(&w, n, k))
                } else {
                    Weight::Bf16(PackedBf16::pack_f32(&w, n, k))
                }
            })
        })
        .collect();
    let inputs: Vec<Vec<f32>> = shapes.iter().map(|&(_, k)| values(m * k, 99)).collect();
    let flops = shapes.iter().map(|&(n, k)| 2 * m * n * k).sum::<usize>() * layers;
    let bytes: usize = weights.iter().map(Weight::bytes).sum();
    let mut best = f64::INFINITY;
    for run in 0..10 {
        let t = Instant::now();
        let mut sink = 0f32;
        for (w, x) in weights.iter().zip(inputs.iter().cycle()) {
            sink += w.matmul(kernel, x, m)[0];
        }
        std::hint::black_box(sink);
        if run >= 2 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    println!(
        "{} kernel, {m} rows, {layers} layers: {:.2} ms/step, {:.0} GFLOP/s, {:.1} GB/s of weights",
        if f32 { "f32" } else { kernel.name() },
        best * 1e3,
        flops as f64 / best / 1e9,
        bytes as f64 / best / 1e9
    );
    Ok(())
}
