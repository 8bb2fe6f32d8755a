//! The bf16 matmul kernels against the f32 kernel and candle's bf16 matmul (the library the
//! packed kernels replace), on the demo model's projection shapes, in one run.
//!
//! `cargo bench -p tandem-model --bench gemm_bf16`; throughput is in FLOPs (2 m n k).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tandem_kernels::gemm::PackedMatrix;
use tandem_kernels::gemm_bf16::{Bf16Kernel, PackedBf16};

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}

fn kernels(c: &mut Criterion) {
    // SmolLM2-135M: gate|up [3072, 576] and down [576, 1536]; Llama-3.1-8B: gate|up rows
    // [28672, 4096] are too big for a quick bench, so one slice of it, [2048, 4096].
    for &(name, n, k) in &[
        ("gate_up", 3072, 576),
        ("down", 576, 1536),
        ("8b_slice", 2048, 4096),
    ] {
        let w = data(n * k, 1);
        let bf16 = PackedBf16::pack_f32(&w, n, k);
        let f32p = PackedMatrix::pack(&w, n, k);
        let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("weight tensor");
        let mut g = c.benchmark_group(format!("matmul_{name}_{n}x{k}"));
        g.sample_size(10)
            .measurement_time(std::time::Duration::from_secs(2));
        for m in [1usize, 16, 64, 256] {
            let x = data(m * k, 2);
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            for kernel in Bf16Kernel::available() {
                g.bench_with_input(BenchmarkId::new(kernel.name(), m), &m, |b, &m| {
                    b.iter(|| bf16.matmul_to_vec_on(kernel, &x, m))
                });
            }
            g.bench_with_input(BenchmarkId::new("f32", m), &m, |b, &m| {
                b.iter(|| f32p.matmul_to_vec(&x, m))
            });
            let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::BF16))
                .expect("input tensor");
            g.bench_with_input(BenchmarkId::new("candle_bf16", m), &m, |b, _| {
                b.iter(|| xt.matmul(&wt.t().expect("t")).expect("candle matmul"))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
