//! Tests of the CPU paged-attention kernel against a naive reference that gathers each
//! sequence's K/V into contiguous vectors and computes attention in f64.

use half::{bf16, f16};
use proptest::prelude::*;
use tandem_kvcache::attention::{
    paged_attention, paged_attention_on, AttnError, KvElem, KvSide, PagedAttnParams, SeqAttn,
};

/// Written into `out` before a call, to see which rows the kernel touched.
const SENTINEL: f32 = 7.25;

/// SplitMix64: a tiny seeded generator, so a failing case can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }

    fn fill(&mut self, n: usize, amplitude: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * amplitude).collect()
    }
}

/// One sequence of a test batch (owned, unlike `SeqAttn`).
#[derive(Debug, Clone)]
struct Seq {
    q_start: usize,
    q_len: usize,
    context_len: usize,
    table: Vec<u32>,
}

/// A whole batch: queries, one layer's caches (as f32 values) and the sequences.
#[derive(Debug, Clone)]
struct Batch {
    params: PagedAttnParams,
    tokens: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    seqs: Vec<Seq>,
}

/// The shape of a random batch: `(cached positions before the chunk, q_len)` per sequence.
#[derive(Debug, Clone)]
struct Shape {
    block_size: usize,
    num_kv_heads: usize,
    group: usize,
    head_dim: usize,
    seqs: Vec<(usize, usize)>,
    spare_blocks: usize,
    seed: u64,
}

impl Batch {
    /// Builds a batch with shuffled physical blocks, spare (never referenced) blocks full of
    /// noise, sequences listed in a different order than their rows, and gaps of rows that no
    /// sequence owns.
    fn random(shape: &Shape) -> Self {
        let mut rng = Rng(shape.seed);
        let bs = shape.block_size;
        let params = PagedAttnParams {
            num_heads: shape.num_kv_heads * shape.group,
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
            block_size: bs,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
        };
        let per_seq: Vec<usize> = shape
            .seqs
            .iter()
            .map(|&(c, n)| (c + n).div_ceil(bs))
            .collect();
        let num_blocks = per_seq.iter().sum::<usize>() + shape.spare_blocks;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        rng.shuffle(&mut ids);
        let mut ids = ids.into_iter();
        let mut row_order: Vec<usize> = (0..shape.seqs.len()).collect();
        rng.shuffle(&mut row_order);
        let mut starts = vec![0; shape.seqs.len()];
        let mut tokens = 0;
        for &i in &row_order {
            tokens += rng.below(2); // a row no sequence owns, half the time
            starts[i] = tokens;
            tokens += shape.seqs[i].1;
        }
        let seqs = shape
            .seqs
            .iter()
            .zip(&per_seq)
            .zip(&starts)
            .map(|((&(cached, q_len), &blocks), &q_start)| Seq {
                q_start,
                q_len,
                context_len: cached + q_len,
                table: ids.by_ref().take(blocks).collect(),
            })
            .collect();
        let row_len = params.num_heads * params.head_dim;
        let cache_len = num_blocks * bs * params.num_kv_heads * params.head_dim;
        Self {
            params,
            tokens,
            q: rng.fill(tokens * row_len, 2.0),
            k: rng.fill(cache_len, 2.0),
            v: rng.fill(cache_len, 1.0),
            seqs,
        }
    }

    fn seq_attn(&self) -> Vec<SeqAttn<'_>> {
        self.seqs
            .iter()
            .map(|s| SeqAttn {
                q_start: s.q_start,
                q_len: s.q_len,
                context_len: s.context_len,
                block_table: &s.table,
            })
            .collect()
    }

    /// Runs the kernel on caches converted to `T`; `out` starts full of [`SENTINEL`].
    fn run<T: KvElem>(&self, convert: impl Fn(f32) -> T) -> Result<Vec<f32>, AttnError> {
        let k: Vec<T> = self.k.iter().map(|&x| convert(x)).collect();
        let v: Vec<T> = self.v.iter().map(|&x| convert(x)).collect();
        let mut out = vec![SENTINEL; self.q.len()];
        paged_attention(&self.q, &self.seq_attn(), &k, &v, &self.params, &mut out)?;
        Ok(out)
    }

    fn run_f32(&self) -> Vec<f32> {
        self.run(|x| x).expect("valid batch")
    }

    fn run_f32_on(&self, team: &tandem_kernels::team::Team) -> Vec<f32> {
        let mut out = vec![SENTINEL; self.q.len()];
        paged_attention_on(
            team,
            &self.q,
            &self.seq_attn(),
            &self.k,
            &self.v,
            &self.params,
            &mut out,
        )
        .expect("valid batch");
        out
    }

    /// The batch with its caches rounded through `T`, so a reference sees the stored values.
    fn rounded<T: KvElem>(&self, convert: impl Fn(f32) -> T) -> Self {
        let round = |xs: &[f32]| xs.iter().map(|&x| convert(x).to_f32()).collect();
        Self {
            k: round(&self.k),
            v: round(&self.v),
            ..self.clone()
        }
    }

    /// Naive attention: gathers each sequence's K/V contiguously, then for every row and head
    /// computes all masked scores, a softmax and the weighted sum, in f64. Rows no sequence
    /// owns keep [`SENTINEL`].
    fn reference(&self) -> Vec<f32> {
        let p = &self.params;
        let (hd, group) = (p.head_dim, p.num_heads / p.num_kv_heads);
        let mut out = vec![SENTINEL; self.q.len()];
        for s in &self.seqs {
            let (k, v) = (self.gather(&self.k, s), self.gather(&self.v, s));
            for i in 0..s.q_len {
                let pos = s.context_len - s.q_len + i;
                for h in 0..p.num_heads {
                    let kvh = h / group;
                    let at = ((s.q_start + i) * p.num_heads + h) * hd;
                    let q = &self.q[at..at + hd];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|t| {
                            let key = &k[(t * p.num_kv_heads + kvh) * hd..][..hd];
                            let dot: f64 = q.iter().zip(key).map(|(&a, &b)| a as f64 * b).sum();
                            dot * p.scale as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for d in 0..hd {
                        let mixed: f64 = (0..=pos)
                            .map(|t| weights[t] * v[(t * p.num_kv_heads + kvh) * hd + d])
                            .sum();
                        out[at + d] = (mixed / total) as f32;
                    }
                }
            }
        }
        out
    }

    /// One sequence's cache rows, `[context_len, kv_heads, head_dim]`, in position order.
    fn gather(&self, cache: &[f32], s: &Seq) -> Vec<f64> {
        let p = &self.params;
        let slot = p.num_kv_heads * p.head_dim;
        (0..s.context_len)
            .flat_map(|pos| {
                let block = s.table[pos / p.block_size] as usize;
                let at = (block * p.block_size + pos % p.block_size) * slot;
                cache[at..at + slot].iter().map(|&x| x as f64)
            })
            .collect()
    }
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == SENTINEL {
            assert_eq!(g, SENTINEL, "element {i} of an unowned row was written");
        } else {
            let err = (g - w).abs();
            assert!(
                err <= tol * w.abs().max(1.0),
                "element {i}: got {g}, want {w} (err {err})"
            );
        }
    }
}

fn shape_strategy() -> impl Strategy<Value = Shape> {
    let seq = prop_oneof![
        (0usize..40, Just(1usize)), // decode after a cached prefix
        (Just(0usize), 1usize..12), // first prefill chunk
        (1usize..40, 2usize..12),   // later prefill chunk
    ];
    (
        // Blocks of 32 take two rounds of 16 keys in the AVX-512 score step.
        prop::sample::select(vec![1usize, 2, 16, 32]),
        1usize..=2,
        // 3: the demo model's group; 12: more query heads per kv head than the AVX-512
        // value step keeps in registers at once.
        prop::sample::select(vec![1usize, 2, 3, 4, 12]),
        prop::sample::select(vec![1usize, 5, 8, 16, 19, 32]),
        prop::collection::vec(seq, 1..=5),
        0usize..4,
        any::<u64>(),
    )
        .prop_map(
            |(block_size, num_kv_heads, group, head_dim, seqs, spare_blocks, seed)| Shape {
                block_size,
                num_kv_heads,
                group,
                head_dim,
                seqs,
                spare_blocks,
                seed,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn f32_storage_matches_reference(shape in shape_strategy()) {
        let batch = Batch::random(&shape);
        assert_close(&batch.run_f32(), &batch.reference(), 1e-5);
    }

    #[test]
    fn half_storage_matches_reference_on_rounded_values(shape in shape_strategy()) {
        let batch = Batch::random(&shape);
        let got = batch.run(f16::from_f32).expect("valid batch");
        assert_close(&got, &batch.rounded(f16::from_f32).reference(), 1e-4);
        let got = batch.run(bf16::from_f32).expect("valid batch");
        assert_close(&got, &batch.rounded(bf16::from_f32).reference(), 1e-4);
    }

    /// bf16 storage is read in place and widened in registers on the AVX-512 path, and
    /// widened into a copy elsewhere; either way the kernel sees exactly the f32 values of the
    /// rounded cache, so the output equals the f32 run over that cache bit for bit.
    #[test]
    fn bf16_storage_equals_f32_storage_of_the_same_values(shape in shape_strategy()) {
        let batch = Batch::random(&shape);
        let got = batch.run(bf16::from_f32).expect("valid batch");
        let want = batch.rounded(bf16::from_f32).run_f32();
        let bits = |xs: &[f32]| xs.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
    }
}

/// A storage type with no override of `KvElem`'s provided methods: hundredths in an `i16`.
#[derive(Debug, Clone, Copy)]
struct Centi(i16);

impl KvElem for Centi {
    fn to_f32(self) -> f32 {
        f32::from(self.0) / 100.0
    }
}

#[test]
fn a_custom_element_type_uses_the_default_widening() {
    let shape = Shape {
        block_size: 2,
        num_kv_heads: 2,
        group: 2,
        head_dim: 5,
        seqs: vec![(7, 1), (0, 5), (3, 4)],
        spare_blocks: 2,
        seed: 7,
    };
    let batch = Batch::random(&shape);
    let centi = |x: f32| Centi((x * 100.0).round() as i16);
    let got = batch.run(centi).expect("valid batch");
    assert_close(&got, &batch.rounded(centi).reference(), 1e-5);
}

/// A one-sequence batch whose caches hold `k` and `v` in the given physical blocks.
fn single(params: PagedAttnParams, q: Vec<f32>, k: Vec<f32>, v: Vec<f32>, seq: Seq) -> Batch {
    let tokens = q.len() / (params.num_heads * params.head_dim);
    Batch {
        params,
        tokens,
        q,
        k,
        v,
        seqs: vec![seq],
    }
}

fn params(
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> PagedAttnParams {
    PagedAttnParams {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale: 1.0,
    }
}

#[test]
fn zero_queries_average_the_visible_values() {
    // Five positions in blocks [2, 0, 1] of size 2 (block 1 only half used). Position p has
    // value p + 1; zero queries weigh every visible position equally, so chunk row i (at
    // position 2 + i) must average 1 ..= 3 + i. Block 1's unused slot holds a trap value.
    let slot = |pos: usize| [2usize, 0, 1][pos / 2] * 2 + pos % 2;
    let mut v = vec![1000.0; 6];
    for pos in 0..5 {
        v[slot(pos)] = (pos + 1) as f32;
    }
    let seq = Seq {
        q_start: 0,
        q_len: 3,
        context_len: 5,
        table: vec![2, 0, 1],
    };
    let batch = single(params(1, 1, 1, 2), vec![0.0; 3], vec![0.5; 6], v, seq);
    assert_close(&batch.run_f32(), &[2.0, 2.5, 3.0], 1e-6);
}

#[test]
fn a_single_key_returns_its_value_exactly() {
    let seq = Seq {
        q_start: 1,
        q_len: 1,
        context_len: 1,
        table: vec![1],
    };
    let v = vec![9.0, 9.0, 9.0, 0.25, -1.5, 3.0];
    let batch = single(params(1, 1, 3, 1), vec![0.3; 6], vec![0.1; 6], v, seq);
    assert_eq!(
        batch.run_f32(),
        vec![SENTINEL, SENTINEL, SENTINEL, 0.25, -1.5, 3.0]
    );
}

#[test]
fn query_heads_read_their_own_kv_head() {
    // Four query heads over two kv heads: heads 0 and 1 must see kv head 0 (value 1), heads 2
    // and 3 kv head 1 (value 2), whatever the queries. Slot 3 is past the context (trap 5).
    let seq = Seq {
        q_start: 0,
        q_len: 1,
        context_len: 3,
        table: vec![0],
    };
    let v: Vec<f32> = (0..3)
        .flat_map(|_| [1.0, 1.0, 2.0, 2.0])
        .chain([5.0; 4])
        .collect();
    let q: Vec<f32> = (0..8).map(|i| i as f32 * 0.1).collect();
    let k: Vec<f32> = (0..16).map(|i| (i % 5) as f32 * 0.2).collect();
    let batch = single(params(4, 2, 2, 4), q, k, v, seq);
    let out = batch.run_f32();
    assert_close(&out, &[1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0], 1e-6);
    assert_close(&out, &batch.reference(), 1e-6);
}

#[test]
fn empty_sequences_and_batches_write_nothing() {
    let batch = Batch {
        params: params(2, 1, 4, 2),
        tokens: 2,
        q: vec![1.0; 16],
        k: vec![1.0; 8],
        v: vec![1.0; 8],
        seqs: vec![Seq {
            q_start: 2,
            q_len: 0,
            context_len: 0,
            table: vec![],
        }],
    };
    assert_eq!(batch.run_f32(), vec![SENTINEL; 16]);
    let none = Batch {
        seqs: vec![],
        ..batch
    };
    assert_eq!(none.run_f32(), vec![SENTINEL; 16]);
}

/// Runs the kernel on a team of `threads` threads.
fn run_in_pool(batch: &Batch, threads: usize) -> Vec<f32> {
    batch.run_f32_on(&tandem_kernels::team::Team::with_threads(threads))
}

#[test]
fn output_is_bit_identical_across_thread_counts() {
    let shape = Shape {
        block_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        seqs: vec![
            (300, 1),
            (0, 40),
            (77, 1),
            (120, 17),
            (5, 1),
            (250, 1),
            (33, 9),
            (0, 1),
        ],
        spare_blocks: 3,
        seed: 42,
    };
    let batch = Batch::random(&shape);
    let bits = |xs: Vec<f32>| xs.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let one = bits(run_in_pool(&batch, 1));
    for threads in [2, 4] {
        assert_eq!(one, bits(run_in_pool(&batch, threads)), "{threads} threads");
    }
    assert_close(&run_in_pool(&batch, 4), &batch.reference(), 1e-5);
}

/// A valid two-sequence batch for the validation tests to break one thing at a time:
/// 2 heads over 1 kv head, head_dim 2, blocks of 2, 4 blocks in the cache, 4 rows of q.
fn valid_batch() -> Batch {
    let seq = |q_start, q_len, context_len, table: &[u32]| Seq {
        q_start,
        q_len,
        context_len,
        table: table.to_vec(),
    };
    Batch {
        params: params(2, 1, 2, 2),
        tokens: 4,
        q: vec![0.5; 16],
        k: vec![0.5; 16],
        v: vec![0.5; 16],
        seqs: vec![seq(0, 1, 3, &[3, 1]), seq(1, 3, 4, &[0, 2])],
    }
}

/// Runs `broken` and checks the call failed with `want` without touching `out`.
fn expect_error(broken: &Batch, want: AttnError) {
    let b = broken;
    let mut out = vec![SENTINEL; b.tokens * 4];
    let got = paged_attention(&b.q, &b.seq_attn(), &b.k, &b.v, &b.params, &mut out);
    assert_eq!(got, Err(want));
    assert!(
        out.iter().all(|&x| x == SENTINEL),
        "out was written on error"
    );
}

#[test]
fn the_base_of_the_validation_tests_is_valid() {
    let batch = valid_batch();
    assert_close(&batch.run_f32(), &batch.reference(), 1e-6);
}

#[test]
fn bad_dimensions_are_errors() {
    let base = valid_batch();
    let mut b = base.clone();
    b.params.head_dim = 0;
    expect_error(&b, AttnError::ZeroDimension { name: "head_dim" });
    let mut b = base.clone();
    b.params.block_size = 0;
    expect_error(&b, AttnError::ZeroDimension { name: "block_size" });
    let mut b = base.clone();
    b.params.num_kv_heads = 0;
    expect_error(
        &b,
        AttnError::ZeroDimension {
            name: "num_kv_heads",
        },
    );
    let mut b = base.clone();
    b.params.num_heads = 3;
    b.params.num_kv_heads = 2;
    expect_error(
        &b,
        AttnError::HeadsNotDivisible {
            num_heads: 3,
            num_kv_heads: 2,
        },
    );
    let mut b = base;
    b.params.num_heads = usize::MAX;
    expect_error(&b, AttnError::DimensionOverflow);
}

#[test]
fn bad_buffer_shapes_are_errors() {
    let base = valid_batch();
    let mut b = base.clone();
    b.q.pop();
    expect_error(
        &b,
        AttnError::QueryShape {
            len: 15,
            row_len: 4,
        },
    );

    let mut out = vec![0.0; 12];
    let got = paged_attention(
        &base.q,
        &base.seq_attn(),
        &base.k,
        &base.v,
        &base.params,
        &mut out,
    );
    assert_eq!(
        got,
        Err(AttnError::OutputShape {
            q_len: 16,
            out_len: 12
        })
    );

    let mut b = base.clone();
    b.k.truncate(15);
    let want = AttnError::CacheShape {
        side: KvSide::Key,
        len: 15,
        block_len: 4,
    };
    expect_error(&b, want);
    let mut b = base.clone();
    b.v.extend([0.0; 3]);
    let want = AttnError::CacheShape {
        side: KvSide::Value,
        len: 19,
        block_len: 4,
    };
    expect_error(&b, want);
    let mut b = base;
    b.v.extend([0.0; 4]);
    expect_error(
        &b,
        AttnError::CacheMismatch {
            k_len: 16,
            v_len: 20,
        },
    );
}

#[test]
fn bad_sequences_are_errors() {
    let base = valid_batch();
    let mut b = base.clone();
    b.seqs[1].q_len = 5;
    let want = AttnError::QueryLongerThanContext {
        seq: 1,
        q_len: 5,
        context_len: 4,
    };
    expect_error(&b, want);
    let mut b = base.clone();
    b.seqs[1].q_start = 2;
    let want = AttnError::RowsOutOfRange {
        seq: 1,
        q_start: 2,
        q_len: 3,
        rows: 4,
    };
    expect_error(&b, want);
    let mut b = base.clone();
    b.seqs[0].q_start = usize::MAX;
    let want = AttnError::RowsOutOfRange {
        seq: 0,
        q_start: usize::MAX,
        q_len: 1,
        rows: 4,
    };
    expect_error(&b, want);
    let mut b = base.clone();
    b.seqs[1].q_len = 2;
    b.seqs[0].q_start = 2; // rows 1..3 and 2..3
    expect_error(
        &b,
        AttnError::OverlappingRows {
            first: 0,
            second: 1,
        },
    );
    let mut b = base.clone();
    b.seqs[0].table.pop();
    let want = AttnError::BlockTableTooShort {
        seq: 0,
        len: 1,
        needed: 2,
        context_len: 3,
    };
    expect_error(&b, want);
    let mut b = base;
    b.seqs[1].table[1] = 4;
    let want = AttnError::BlockOutOfRange {
        seq: 1,
        index: 1,
        block: 4,
        num_blocks: 4,
    };
    expect_error(&b, want);
}

#[test]
fn errors_explain_themselves() {
    let err = AttnError::BlockOutOfRange {
        seq: 3,
        index: 1,
        block: 9,
        num_blocks: 4,
    };
    let text = err.to_string();
    assert!(
        text.contains("sequence 3") && text.contains("block id 9"),
        "{text}"
    );
}
