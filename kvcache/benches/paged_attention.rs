//! Decode step of 64 sessions through the CPU paged-attention kernel (Llama-3-8B head shape:
//! 32 query heads over 8 kv heads, head_dim 128, blocks of 16 positions, 512 cached positions
//! per session, physical blocks shuffled).
//!
//! Figures are ratios within one run: the kernel on the global team (the matmul threads,
//! one per core) against the same
//! kernel on one thread (parallel speedup), and against gathering each session's K/V into a
//! contiguous cache first and attending there (what reading blocks in place saves). Say which
//! machine produced the numbers when quoting them.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use std::hint::black_box;
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

fn bench_storage<T: KvElem>(c: &mut Criterion, name: &str, convert: impl Fn(f32) -> T) {
    let batch = Decode::new(convert);
    let mut out = vec![0.0f32; batch.q.len()];
    let (mut k, mut v) = (Vec::new(), Vec::new());
    let one = Team::with_threads(1);
    let bytes = 2 * batch.k.len() * std::mem::size_of::<T>();
    let mut group = c.benchmark_group(format!("decode64x{CONTEXT}/{name}"));
    group.throughput(Throughput::Bytes(bytes as u64));
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
    group.finish();
}

fn decode(c: &mut Criterion) {
    bench_storage(c, "f32", |x| x);
    bench_storage(c, "f16", f16::from_f32);
}

criterion_group!(benches, decode);
criterion_main!(benches);
