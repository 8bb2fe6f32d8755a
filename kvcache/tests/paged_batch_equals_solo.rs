//! Batched equals unbatched, through the paged cache: several sequences of different prompt
//! lengths, admitted at different steps, mixing prefill chunks and decodes in one varlen batch
//! over `PagedKv`, give the logits (within 1e-4) and greedy tokens of each sequence run alone
//! through the contiguous cache — for chunk sizes 1, 7 and 64 and block sizes 1, 5 and 16,
//! in f32, f16 and bf16 storage. Also: prefix sharing of a common system prompt.

use tandem_testkit::tiny as common;

use candle_core::{Device, Tensor};
use tandem_kvcache::{BlockHash, BlockPool, BlockTable, KvDtype, KvLayout, KvStorage, PagedKv};
use tandem_model::kv::ContiguousKv;
use tandem_model::layers::ForwardCtx;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};
use tandem_model::sampling::argmax;

const DECODE_STEPS: usize = 6;

struct Seq {
    prompt: Vec<u32>,
    join_at: usize,
    edge_kv: ContiguousKv,
    table: BlockTable,
    /// Tokens fed to the model so far (prompt positions, then generated tokens).
    fed: usize,
    next: Option<u32>,
    logits: Vec<Tensor>,
    tokens: Vec<u32>,
}

fn layout(m: &LocalSplit, blocks: usize, block_size: usize, dtype: KvDtype) -> KvLayout {
    let cfg = m.cloud.config();
    let range = m.cloud.split().cloud_range();
    KvLayout {
        first_layer: range.start,
        num_layers: range.len(),
        num_blocks: blocks,
        block_size,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        dtype,
    }
}

/// Runs all sequences together; each step takes a chunk of at most `chunk` prompt tokens from
/// every prefilling sequence and one token from every decoding one.
fn run_batched(
    m: &LocalSplit,
    prompts: &[Vec<u32>],
    chunk: usize,
    block_size: usize,
    dtype: KvDtype,
) -> Vec<Seq> {
    let pool = BlockPool::new(1024, block_size);
    let mut storage = KvStorage::new(layout(m, 1024, block_size, dtype));
    let n = m.edge.config().num_hidden_layers;
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Seq {
            prompt: p.clone(),
            join_at: i % 3,
            edge_kv: ContiguousKv::new(n, 512),
            table: pool.new_table(),
            fed: 0,
            next: None,
            logits: Vec::new(),
            tokens: Vec::new(),
        })
        .collect();
    for step in 0.. {
        let mut spans = Vec::new();
        let mut hidden = Vec::new();
        let mut members = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            if step < s.join_at || s.tokens.len() >= DECODE_STEPS {
                continue;
            }
            let input: Vec<u32> = if s.fed < s.prompt.len() {
                s.prompt[s.fed..(s.fed + chunk).min(s.prompt.len())].to_vec()
            } else {
                vec![s.next.expect("a decoding sequence has a next token")]
            };
            let ctx = ForwardCtx::single(s.fed, input.len());
            hidden.push(m.edge.forward(&input, &ctx, &mut s.edge_kv).expect("edge"));
            let copies = s.table.reserve(input.len()).expect("blocks");
            assert!(copies.is_empty());
            spans.push((s.fed, input.len()));
            members.push(i);
            s.fed += input.len();
        }
        if members.is_empty() {
            break;
        }
        let ctx = ForwardCtx::varlen(&spans);
        let x = Tensor::cat(&hidden, 0).expect("cat");
        let tables: Vec<&BlockTable> = members.iter().map(|&i| &seqs[i].table).collect();
        let mut kv = PagedKv::new(&mut storage, &tables);
        let logits = m.cloud.forward(&x, &ctx, &mut kv).expect("cloud");
        for (row, &i) in members.iter().enumerate() {
            let s = &mut seqs[i];
            if s.fed < s.prompt.len() {
                continue; // mid-prompt chunk: no token yet
            }
            let l = logits.get(row).expect("row");
            let t = argmax(&l.to_vec1::<f32>().expect("v"));
            s.logits.push(l);
            s.tokens.push(t);
            s.next = Some(t);
        }
    }
    seqs
}

fn tiny() -> (tempfile::TempDir, LocalSplit, Vec<Vec<u32>>) {
    let spec = common::specs()[2].clone(); // GQA 8:2, Llama 3 rope, 5 layers
    let tmp = tempfile::tempdir().expect("tmp");
    common::write_hf(tmp.path(), &spec);
    let m = LocalSplit::load(
        tmp.path(),
        &LocalSplitOptions {
            edge_layers: Some(2),
            dtype: None,
            device: Device::Cpu,
        },
    )
    .expect("load");
    let mut rng = common::Rng::new(77);
    let lens = [1usize, 3, 9, 17, 40, 70, 5, 33, 2, 16, 64, 12];
    let prompts = lens
        .iter()
        .map(|&l| {
            (0..l)
                .map(|_| 4 + rng.below(spec.vocab as u32 - 4))
                .collect()
        })
        .collect();
    (tmp, m, prompts)
}

#[test]
fn batched_paged_equals_solo_contiguous() {
    let (_tmp, m, prompts) = tiny();
    let solo: Vec<_> = prompts
        .iter()
        .map(|p| common::run_greedy(&m, p, DECODE_STEPS))
        .collect();
    for (chunk, block_size) in [(1, 5), (7, 16), (64, 1), (7, 5)] {
        let seqs = run_batched(&m, &prompts, chunk, block_size, KvDtype::F32);
        let mut worst = 0f32;
        for (i, (s, (logits, tokens))) in seqs.iter().zip(&solo).enumerate() {
            assert_eq!(
                &s.tokens, tokens,
                "chunk {chunk}, block {block_size}: seq {i} tokens differ"
            );
            for (a, b) in s.logits.iter().zip(logits) {
                worst = worst.max(common::max_abs_diff(a, b));
            }
        }
        println!("chunk {chunk}, block size {block_size}: max |logit diff| batched vs solo = {worst:.3e}");
        assert!(worst <= 1e-4, "chunk {chunk}, block {block_size}: {worst}");
    }
}

#[test]
fn half_precision_storage_stays_close() {
    let (_tmp, m, prompts) = tiny();
    let f32_run = run_batched(&m, &prompts, 7, 16, KvDtype::F32);
    for dtype in [KvDtype::F16, KvDtype::BF16] {
        let run = run_batched(&m, &prompts, 7, 16, dtype);
        let worst = run
            .iter()
            .zip(&f32_run)
            .map(|(a, b)| common::max_abs_diff(&a.logits[0], &b.logits[0]))
            .fold(0f32, f32::max);
        println!("{dtype:?} KV storage: max |first-token logit diff| vs f32 = {worst:.3e}");
        assert!(worst > 0.0, "{dtype:?} storage should round");
        assert!(worst < 0.5, "{dtype:?} storage drifted: {worst}");
    }
}

#[test]
fn sessions_sharing_a_system_prompt_share_its_blocks() {
    let (_tmp, m, prompts) = tiny();
    let bs = 4;
    let pool = BlockPool::new(64, bs);
    let mut storage = KvStorage::new(layout(&m, 64, bs, KvDtype::F32));
    let n = m.edge.config().num_hidden_layers;
    let system: Vec<u32> = prompts[4][..13].to_vec(); // 3 full blocks + 1
    let mut outputs = Vec::new();
    let mut tables = Vec::new();
    for (i, tail) in [&prompts[2], &prompts[3], &prompts[7]].iter().enumerate() {
        let prompt: Vec<u32> = system.iter().chain(tail.iter()).copied().collect();
        // The device runs the system prompt as its own first chunk, so that its hidden states
        // are computed the same way (same matmul shapes) on every device: only then are they
        // byte-identical. (Row results of a matmul may change with the number of rows.)
        let mut edge_kv = ContiguousKv::new(n, 512);
        let h_sys = m
            .edge
            .forward(&system, &ForwardCtx::single(0, system.len()), &mut edge_kv)
            .expect("edge");
        let h_tail = m
            .edge
            .forward(
                tail,
                &ForwardCtx::single(system.len(), tail.len()),
                &mut edge_kv,
            )
            .expect("edge");
        let hidden = Tensor::cat(&[&h_sys, &h_tail], 0).expect("cat");
        // The hash chain over each full block's hidden-state bytes.
        let flat: Vec<f32> = hidden.flatten_all().expect("f").to_vec1().expect("v");
        let row = m.cloud.config().hidden_size;
        let mut hashes = Vec::new();
        for b in 0..prompt.len() / bs {
            let bytes: Vec<u8> = flat[b * bs * row..(b + 1) * bs * row]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            hashes.push(BlockHash::chain(hashes.last().copied(), &bytes));
        }
        let mut table = pool.new_table();
        let reused = table.adopt_prefix(&hashes).expect("empty table");
        if i == 0 {
            assert_eq!(reused, 0);
        } else {
            assert_eq!(
                reused,
                3 * bs,
                "session {i} reuses the 3 full system blocks"
            );
        }
        let rest = prompt.len() - reused;
        table.reserve(rest).expect("blocks");
        let ctx = ForwardCtx::single(reused, rest);
        let x = hidden.narrow(0, reused, rest).expect("narrow");
        let logits = {
            let mut kv = PagedKv::new(&mut storage, &[&table]);
            m.cloud.forward(&x, &ctx, &mut kv).expect("cloud")
        };
        for (b, h) in hashes.iter().enumerate().skip(table.hashes().len()) {
            table.register_full_block(b, *h).expect("full");
        }
        outputs.push((prompt, logits.squeeze(0).expect("sq")));
        tables.push(table);
    }
    assert_eq!(
        pool.shared_hits(),
        6,
        "two sessions adopted three blocks each"
    );
    for b in &tables[0].blocks()[..3] {
        assert_eq!(pool.ref_count(*b), 3);
    }
    for (prompt, logits) in &outputs {
        let (solo, _) = common::run_greedy(&m, prompt, 1);
        let d = common::max_abs_diff(&solo[0], logits);
        assert!(d <= 1e-4, "shared-prefix session differs from solo by {d}");
    }
}
