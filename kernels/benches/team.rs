//! The thread team against rayon, the pool it replaces, on the two kinds of call the engine
//! makes.
//!
//! Each case runs one closure `f(part)` over its parts three ways in the same run: on the
//! calling thread alone (`serial`), on [`Team::run`] (the caller plus one helper per other
//! core), and on rayon's global pool (`(0..parts).into_par_iter()`, called from outside the
//! pool, as the engine thread would). The closure is the same in all three, so the figures
//! differ only by how the parts reach the threads. Each part writes its own output behind a
//! `Mutex` (uncontended: one lock per part, tens of nanoseconds, in all three ways alike).
//!
//! - `handoff/rms_row`: two parts, each the RMSNorm of one 576-float row (about a hundred
//!   nanoseconds of work): the fork/join cost of a call.
//! - `handoff/rms_64rows`: the RMSNorm of 64 rows of 576 cut the way `ops` cuts it (parts of
//!   7 rows): a step's elementwise pass at 64 sessions.
//! - `matmul/*`: `[64, 576] · [576, 1536]` (the demo model's gate+up shape) cut into 4 parts
//!   of 384 output columns, each part one packed matmul (f32, and bf16 on the best kernel
//!   this CPU has).
//!
//! The parts' matmuls must run on the thread that calls them, whichever pool that is: `main`
//! sets `TANDEM_MATMUL_THREADS=1` before anything starts, so the global team (which the
//! packed matmuls split over on their own) has no helpers, and the team under test is one
//! of its own. Say which machine produced the numbers when quoting them.

use std::hint::black_box;
use std::sync::Mutex;

use criterion::{criterion_group, BenchmarkId, Criterion};
use rayon::prelude::*;
use tandem_kernels::gemm::PackedMatrix;
use tandem_kernels::gemm_bf16::PackedBf16;
use tandem_kernels::team::Team;

const HIDDEN: usize = 576;
const ROWS: usize = 64;
const COLUMNS: usize = 1536;
const MATMUL_PARTS: usize = 4;
/// Rows per part of the 64-row pass: `ops`' 8,192 floats per part over input and output.
const ROWS_PER_PART: usize = (1 << 13) / (2 * HIDDEN);

/// Deterministic values in [-0.5, 0.5).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// RMSNorm of one row, as `ops` computes it.
fn rms_row(x: &[f32], w: &[f32], out: &mut [f32]) {
    let sum2 = x.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / x.len() as f32 + 1e-5).sqrt();
    for ((o, &v), &a) in out.iter_mut().zip(x).zip(w) {
        *o = v / m * a;
    }
}

/// One output per part, each behind its own lock.
fn outputs(parts: usize, len: usize) -> Vec<Mutex<Vec<f32>>> {
    (0..parts).map(|_| Mutex::new(vec![0.0; len])).collect()
}

fn out(outs: &[Mutex<Vec<f32>>], part: usize) -> std::sync::MutexGuard<'_, Vec<f32>> {
    outs[part].lock().unwrap_or_else(|e| e.into_inner())
}

/// Benches `f` over `parts` parts serially, on `team` and on rayon, in one group.
fn three_ways(
    c: &mut Criterion,
    group: &str,
    case: &str,
    team: &Team,
    parts: usize,
    f: &(dyn Fn(usize) + Sync),
) {
    let mut g = c.benchmark_group(group);
    g.bench_function(BenchmarkId::new(case, "serial"), |b| {
        b.iter(|| (0..parts).for_each(f))
    });
    g.bench_function(
        BenchmarkId::new(case, format!("team_{}threads", team.threads())),
        |b| b.iter(|| team.run(parts, f)),
    );
    g.bench_function(
        BenchmarkId::new(
            case,
            format!("rayon_{}threads", rayon::current_num_threads()),
        ),
        |b| b.iter(|| (0..parts).into_par_iter().for_each(f)),
    );
    g.finish();
}

fn handoff(c: &mut Criterion) {
    let team = Team::with_threads(threads());
    let w = values(HIDDEN, 7);
    let x = values(ROWS * HIDDEN, 11);
    let outs = outputs(2, HIDDEN);
    three_ways(c, "handoff", "rms_row", &team, 2, &|p| {
        rms_row(&x[p * HIDDEN..][..HIDDEN], &w, &mut out(&outs, p));
    });
    let parts = ROWS.div_ceil(ROWS_PER_PART);
    let outs = outputs(parts, ROWS_PER_PART * HIDDEN);
    three_ways(c, "handoff", "rms_64rows", &team, parts, &|p| {
        let first = p * ROWS_PER_PART;
        let rows = ROWS_PER_PART.min(ROWS - first);
        let x = &x[first * HIDDEN..][..rows * HIDDEN];
        let mut o = out(&outs, p);
        for (x, o) in x.chunks(HIDDEN).zip(o.chunks_mut(HIDDEN)) {
            rms_row(x, &w, o);
        }
    });
}

fn matmul(c: &mut Criterion) {
    let team = Team::with_threads(threads());
    let cols = COLUMNS / MATMUL_PARTS;
    let x = values(ROWS * HIDDEN, 13);
    let weights: Vec<Vec<f32>> = (0..MATMUL_PARTS)
        .map(|p| values(cols * HIDDEN, 17 + p as u64))
        .collect();
    let f32s: Vec<PackedMatrix> = weights
        .iter()
        .map(|w| PackedMatrix::pack(w, cols, HIDDEN))
        .collect();
    let outs = outputs(MATMUL_PARTS, ROWS * cols);
    three_ways(c, "matmul", "f32", &team, MATMUL_PARTS, &|p| {
        f32s[p].matmul(&x, ROWS, &mut out(&outs, p));
    });
    let bf16s: Vec<PackedBf16> = weights
        .iter()
        .map(|w| PackedBf16::pack_f32(w, cols, HIDDEN))
        .collect();
    three_ways(c, "matmul", "bf16", &team, MATMUL_PARTS, &|p| {
        *out(&outs, p) = black_box(bf16s[p].matmul_to_vec(&x, ROWS));
    });
}

/// Threads of the team under test: one per core, as the global team would have.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = handoff, matmul
}

fn main() {
    // Before any thread exists (so setting the environment is sound): the global team, which
    // the packed matmuls use on their own, gets no helpers.
    std::env::set_var("TANDEM_MATMUL_THREADS", "1");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
