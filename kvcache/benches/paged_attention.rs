//! Decode step of 64 sessions through the CPU paged-attention kernel (Llama-3-8B head shape:
//! 32 query heads over 8 kv heads, head_dim 128, blocks of 16 positions, 512 cached positions
//! per session, physical blocks shuffled).
//!
//! Figures are ratios within one run: the kernel on the global team (the matmul threads,
//! one per core) against the same
//! kernel on one thread (parallel speedup), against gathering each session's K/V into a
//! contiguous cache first and attending there (what reading blocks in place saves), and
//! against the library it replaces: candle gathering the blocks (`index_select`) and running
//! `softmax(q·Kᵀ·scale)·V` with its matmuls, once with the kv heads repeated for GQA (as
//! candle-transformers' Llama does) and once with the query heads grouped over their kv head
//! (a reshape, candle's best case). Candle's result is checked against the kernel's once,
//! outside the timed loops. Say which machine produced the numbers when quoting them.

use candle_core::{DType, Device, Tensor};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use half::f16;
use std::hint::black_box;
use std::time::Duration;
use tandem_kernels::team::Team;
use tandem_kvcache::attention::{
    paged_attention, paged_attention_on, KvElem, PagedAttnParams, SeqAttn,
};

const SESSIONS: usize = 64;
const CONTEXT: usize = 512;
const PARAMS: PagedAttnParams = PagedAttnParams {
    num_heads: 32,
    num_kv_heads: 8,
    head_dim: 128,
    block_size: 16,
    scale: 0.088_388_35, // 1 / sqrt(128)
};

/// How candle runs grouped-query attention.
#[derive(Clone, Copy)]
enum Gqa {
    /// Every kv head copied once per query head of its group (`repeat_kv`).
    Repeat,
    /// The query heads of a group reshaped into rows that share one kv head.
    Grouped,
}

/// One layer's K and V caches as candle tensors, `[num_blocks, block_size * kv * head_dim]`.
struct CandleCache {
    k: Tensor,
    v: Tensor,
}

/// A decode batch: one query row per session, block tables over a shuffled cache.
struct Decode<T> {
    q: Vec<f32>,
    k: Vec<T>,
    v: Vec<T>,
    tables: Vec<Vec<u32>>,
}

impl<T: KvElem> Decode<T> {
    fn new(convert: impl Fn(f32) -> T) -> Self {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut bits = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let per_seq = CONTEXT / PARAMS.block_size;
        let mut ids: Vec<u32> = (0..(SESSIONS * per_seq) as u32).collect();
        for i in (1..ids.len()).rev() {
            let j = (bits() % (i as u64 + 1)) as usize;
            ids.swap(i, j);
        }
        let mut next = move || (bits() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let cache_len = ids.len() * PARAMS.block_size * PARAMS.num_kv_heads * PARAMS.head_dim;
        Self {
            q: (0..SESSIONS * PARAMS.num_heads * PARAMS.head_dim)
                .map(|_| next())
                .collect(),
            k: (0..cache_len).map(|_| convert(next())).collect(),
            v: (0..cache_len).map(|_| convert(next())).collect(),
            tables: ids.chunks(per_seq).map(<[u32]>::to_vec).collect(),
        }
    }

    fn seqs(&self) -> Vec<SeqAttn<'_>> {
        self.tables
            .iter()
            .enumerate()
            .map(|(i, table)| SeqAttn {
                q_start: i,
                q_len: 1,
                context_len: CONTEXT,
                block_table: table,
            })
            .collect()
    }

    fn paged(&self, out: &mut [f32]) {
        let seqs = self.seqs();
        paged_attention(&self.q, &seqs, &self.k, &self.v, &PARAMS, out).expect("valid batch");
    }

    fn paged_on(&self, team: &Team, out: &mut [f32]) {
        let seqs = self.seqs();
        paged_attention_on(team, &self.q, &seqs, &self.k, &self.v, &PARAMS, out)
            .expect("valid batch");
    }

    /// Copies every session's blocks into a contiguous cache (session-major, so each table is
    /// `i * n .. (i + 1) * n`), then attends there.
    fn gathered(&self, out: &mut [f32], k: &mut Vec<T>, v: &mut Vec<T>) {
        let block_len = PARAMS.block_size * PARAMS.num_kv_heads * PARAMS.head_dim;
        k.clear();
        v.clear();
        for &b in self.tables.iter().flatten() {
            let at = b as usize * block_len;
            k.extend_from_slice(&self.k[at..at + block_len]);
            v.extend_from_slice(&self.v[at..at + block_len]);
        }
        let n = CONTEXT / PARAMS.block_size;
        let tables: Vec<Vec<u32>> = (0..SESSIONS)
            .map(|i| ((i * n) as u32..((i + 1) * n) as u32).collect())
            .collect();
        let seqs: Vec<SeqAttn<'_>> = tables
            .iter()
            .enumerate()
            .map(|(i, table)| SeqAttn {
                q_start: i,
                q_len: 1,
                context_len: CONTEXT,
                block_table: table,
            })
            .collect();
        paged_attention(&self.q, &seqs, k, v, &PARAMS, out).expect("valid batch");
    }
}

impl<T: KvElem + candle_core::WithDType> Decode<T> {
    fn candle_cache(&self) -> candle_core::Result<CandleCache> {
        let block_len = PARAMS.block_size * PARAMS.num_kv_heads * PARAMS.head_dim;
        let blocks = self.k.len() / block_len;
        let shape = (blocks, block_len);
        Ok(CandleCache {
            k: Tensor::from_slice(&self.k, shape, &Device::Cpu)?,
            v: Tensor::from_slice(&self.v, shape, &Device::Cpu)?,
        })
    }

    /// The same decode attention through candle: each session's blocks gathered into
    /// contiguous `[sessions, kv, context, head_dim]` tensors (widened to f32, as the kernel
    /// widens), then `softmax(q·Kᵀ·scale)·V`. Returns `[sessions, heads, head_dim]`.
    fn candle(&self, cache: &CandleCache, gqa: Gqa) -> candle_core::Result<Tensor> {
        let (s, c) = (SESSIONS, CONTEXT);
        let (h, kv, d) = (PARAMS.num_heads, PARAMS.num_kv_heads, PARAMS.head_dim);
        let ids: Vec<u32> = self.tables.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(ids, self.tables.len() * self.tables[0].len(), &Device::Cpu)?;
        let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
            cache
                .index_select(&ids, 0)?
                .reshape((s, c, kv, d))?
                .to_dtype(DType::F32)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (k, v) = (gather(&cache.k)?, gather(&cache.v)?);
        let q = Tensor::from_slice(&self.q, (s, h, d), &Device::Cpu)?;
        let (q, k, v) = match gqa {
            Gqa::Repeat => {
                let repeat = |x: &Tensor| Tensor::cat(&vec![x; h / kv], 2)?.reshape((s, h, c, d));
                (q.reshape((s, h, 1, d))?, repeat(&k)?, repeat(&v)?)
            }
            Gqa::Grouped => (q.reshape((s, kv, h / kv, d))?, k, v),
        };
        let scores = q.matmul(&k.t()?)?.affine(f64::from(PARAMS.scale), 0.0)?;
        candle_nn::ops::softmax_last_dim(&scores)?
            .matmul(&v)?
            .reshape((s, h, d))
    }
}

/// Checks once, outside the timed loops, that candle computes what the kernel computes.
fn check_candle<T: KvElem + candle_core::WithDType>(batch: &Decode<T>, cache: &CandleCache) {
    let mut want = vec![0.0f32; batch.q.len()];
    batch.paged(&mut want);
    for gqa in [Gqa::Repeat, Gqa::Grouped] {
        let got = batch
            .candle(cache, gqa)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("candle attention");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "candle and the kernel differ by {worst}");
    }
}

fn bench_storage<T: KvElem + candle_core::WithDType>(
    c: &mut Criterion,
    name: &str,
    convert: impl Fn(f32) -> T,
) {
    let batch = Decode::new(convert);
    let cache = batch.candle_cache().expect("candle cache");
    check_candle(&batch, &cache);
    let mut out = vec![0.0f32; batch.q.len()];
    let (mut k, mut v) = (Vec::new(), Vec::new());
    let one = Team::with_threads(1);
    let bytes = 2 * batch.k.len() * std::mem::size_of::<T>();
    let mut group = c.benchmark_group(format!("decode64x{CONTEXT}/{name}"));
    group.throughput(Throughput::Bytes(bytes as u64));
    // Flat: every sample the same number of iterations, so the slow candle cases (hundreds
    // of milliseconds an iteration) finish in a few seconds each.
    // Short warm-up and measurement keep the whole bench under about two minutes.
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(20);
    let threads = Team::global().threads();
    group.bench_function(
        BenchmarkId::new("paged", format!("{threads}threads")),
        |b| b.iter(|| batch.paged(black_box(&mut out))),
    );
    group.bench_function(BenchmarkId::new("paged", "1thread"), |b| {
        b.iter(|| batch.paged_on(&one, black_box(&mut out)))
    });
    group.bench_function(
        BenchmarkId::new("gather_then_attend", format!("{threads}threads")),
        |b| b.iter(|| batch.gathered(black_box(&mut out), &mut k, &mut v)),
    );
    group.sample_size(10);
    let candle_threads = candle_core::utils::get_num_threads();
    for (case, gqa) in [
        ("candle_repeat_kv", Gqa::Repeat),
        ("candle_grouped", Gqa::Grouped),
    ] {
        group.bench_function(
            BenchmarkId::new(case, format!("{candle_threads}threads")),
            |b| b.iter(|| black_box(batch.candle(&cache, gqa).expect("candle attention"))),
        );
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    bench_storage(c, "f32", |x| x);
    bench_storage(c, "f16", f16::from_f32);
}

criterion_group!(benches, decode);
criterion_main!(benches);
