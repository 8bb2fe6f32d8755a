//! Criterion benchmark of the engine loop on a generated model (no download): one decode
//! round for N concurrent sessions (each pushes one hidden state and gets one token back),
//! through the public in-process API, and a 256-token prefill. The model is a small random
//! Llama (hidden 256, 4 layers, GQA 8:2, vocab 4096) split at layer 1, so the figures show the
//! engine's and the kernels' overheads more than raw GEMM speed; `tandem bench` measures the
//! demo model.
//!
//! Run: `cargo bench -p tandem-serve --bench engine`.

use tandem_testkit::tiny as common;

use std::time::{Duration, Instant};

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tandem_engine::{Engine, EngineConfig, Event, Session, SessionParams};
use tandem_kvcache::KvDtype;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};
use tandem_protocol::SamplingParams;
use tandem_scheduler::{Policy, SchedulerConfig};

const HIDDEN: usize = 256;

fn spec() -> common::TinySpec {
    common::TinySpec {
        name: "bench",
        hidden: HIDDEN,
        intermediate: 768,
        vocab: 4096,
        layers: 4,
        heads: 8,
        kv_heads: 2,
        tied: true,
        llama3_rope: false,
        shards: 1,
        seed: 7,
    }
}

fn engine(dir: &std::path::Path) -> Engine {
    let m = LocalSplit::load(
        dir,
        &LocalSplitOptions {
            edge_layers: Some(1),
            dtype: None,
            device: Device::Cpu,
        },
    )
    .expect("load");
    Engine::start(
        m.cloud,
        None,
        EngineConfig {
            scheduler: SchedulerConfig {
                policy: Policy::DecodeFirst,
                max_batch_tokens: 512,
                max_batch_seqs: 256,
                max_sessions: 1024,
                max_queued_tokens: 1 << 20,
                max_context: 2048,
                prefill_slack: None,
            },
            block_size: 16,
            kv_blocks: 8192,
            kv_dtype: KvDtype::F32,
            prefix_sharing: true,
            decode_wait: std::time::Duration::ZERO,
            max_draft_tokens: tandem_engine::MAX_DRAFT_CAP,
        },
    )
}

fn params() -> SessionParams {
    SessionParams {
        sampling: SamplingParams::default().validate().expect("greedy"),
        max_tokens: 1 << 20,
        stop_strings: Vec::new(),
        eos_ids: Some(Vec::new()),
        trace: None,
    }
}

fn rows(rng: &mut common::Rng, n: usize) -> Vec<f32> {
    (0..n * HIDDEN).map(|_| rng.unit() - 0.5).collect()
}

fn wait_token(s: &Session) {
    match s.events.recv().expect("engine alive") {
        Event::Token { .. } => {}
        Event::Done { .. } => panic!("session ended"),
        Event::Error(e) => panic!("session failed: {e}"),
    }
}

/// `n` sessions with a 32-position prompt each, first token received.
fn open(engine: &Engine, rng: &mut common::Rng, n: usize) -> Vec<Session> {
    let sessions: Vec<Session> = (0..n)
        .map(|_| {
            let s = engine.open_session(params()).wait().expect("open");
            engine
                .push_hidden(s.id, rows(rng, 32), 32, true)
                .wait()
                .expect("prompt");
            s
        })
        .collect();
    sessions.iter().for_each(wait_token);
    sessions
}

fn bench_engine(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tmp");
    common::write_hf(dir.path(), &spec());
    let engine = engine(dir.path());
    let mut rng = common::Rng::new(3);
    let mut g = c.benchmark_group("engine_decode_round");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    for n in [1usize, 16, 64] {
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    // Fresh sessions every 256 rounds keep the context bounded.
                    let sessions = open(&engine, &mut rng, n);
                    let rounds = left.min(256);
                    let inputs: Vec<Vec<f32>> = (0..n).map(|_| rows(&mut rng, 1)).collect();
                    let t = Instant::now();
                    for _ in 0..rounds {
                        for (s, h) in sessions.iter().zip(&inputs) {
                            engine
                                .push_hidden_nowait(s.id, h.clone(), 1, true)
                                .expect("push");
                        }
                        sessions.iter().for_each(wait_token);
                    }
                    total += t.elapsed();
                    for s in &sessions {
                        engine.close(s.id).wait().expect("close");
                    }
                    left -= rounds;
                }
                total
            });
        });
    }
    g.finish();
    let mut g = c.benchmark_group("engine_prefill");
    g.sample_size(10);
    g.bench_function("256_positions", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let s = engine.open_session(params()).wait().expect("open");
                let h = rows(&mut rng, 256);
                let t = Instant::now();
                engine
                    .push_hidden(s.id, h, 256, true)
                    .wait()
                    .expect("prompt");
                wait_token(&s);
                total += t.elapsed();
                engine.close(s.id).wait().expect("close");
            }
            total
        });
    });
    g.finish();
}

criterion_group!(benches, bench_engine);
criterion_main!(benches);
