//! Speculation across the split, in process: a simulated device sends the token it got plus
//! drafts (chosen by an oracle so that they are all right, all wrong, or right for a while),
//! and the engine's answers, after the device's verdicts, give exactly the tokens of a run
//! without drafts: greedy and seeded sampling, across block boundaries, with KV blocks
//! returned to the pool, and with a preemption in the middle.

use tandem_testkit::tiny as common;

use std::time::{Duration, Instant};

use candle_core::Device;
use tandem_engine::{Engine, EngineConfig, Event, SessionParams};
use tandem_kvcache::KvDtype;
use tandem_model::kv::ContiguousKv;
use tandem_model::layers::ForwardCtx;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};
use tandem_model::EdgeModel;
use tandem_protocol::{FinishReason, SamplingParams};
use tandem_scheduler::{Policy, SchedulerConfig};

const MAX_TOKENS: usize = 20;

fn load(dir: &std::path::Path) -> LocalSplit {
    LocalSplit::load(
        dir,
        &LocalSplitOptions {
            edge_layers: Some(2),
            dtype: None,
            device: Device::Cpu,
        },
    )
    .expect("load")
}

fn config(kv_blocks: usize) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig {
            policy: Policy::DecodeFirst,
            max_batch_tokens: 48,
            max_batch_seqs: 16,
            max_sessions: 64,
            max_queued_tokens: 4096,
            max_context: 512,
            prefill_slack: None,
        },
        // Small blocks: drafts and their truncation cross block boundaries often.
        block_size: 4,
        kv_blocks,
        kv_dtype: KvDtype::F32,
        prefix_sharing: true,
        decode_wait: Duration::ZERO,
        max_draft_tokens: tandem_engine::MAX_DRAFT_CAP,
    }
}

fn params(sampling: SamplingParams) -> SessionParams {
    SessionParams {
        sampling: sampling.validate().expect("valid"),
        max_tokens: MAX_TOKENS,
        stop_strings: Vec::new(),
        eos_ids: Some(Vec::new()),
        trace: None,
    }
}

fn hidden(edge: &EdgeModel, kv: &mut ContiguousKv, pos: usize, tokens: &[u32]) -> Vec<f32> {
    let h = edge
        .forward(tokens, &ForwardCtx::single(pos, tokens.len()), kv)
        .expect("edge");
    h.flatten_all().expect("flat").to_vec1().expect("vec")
}

/// How the oracle drafts, given the true continuation.
#[derive(Clone, Copy, Debug)]
enum Oracle {
    None,
    AllRight,
    AllWrong,
    /// Right for `n` tokens, then wrong.
    RightFor(usize),
}

/// What one generation did.
#[derive(Debug)]
struct Run {
    tokens: Vec<u32>,
    reason: FinishReason,
    rounds: usize,
    drafted: usize,
    accepted: usize,
}

/// Runs one generation through `engine` as a device would, drafting `k` tokens per step from
/// `truth` by `oracle` (`truth` is the output of a run without drafts; empty for that run).
#[allow(clippy::too_many_arguments)]
fn generate(
    engine: &Engine,
    edge: &EdgeModel,
    prompt: &[u32],
    sampling: SamplingParams,
    oracle: Oracle,
    k: usize,
    truth: &[u32],
    vocab: u32,
) -> Run {
    let n = edge.config().num_hidden_layers;
    let session = engine.open_session(params(sampling)).wait().expect("open");
    let mut kv = ContiguousKv::new(n, 512);
    let h = hidden(edge, &mut kv, 0, prompt);
    engine
        .push_hidden_at(session.id, h, prompt.len(), 0, 0)
        .wait()
        .expect("prompt");
    let mut pos = prompt.len();
    let mut tokens: Vec<u32> = Vec::new();
    let mut drafts: Vec<u32> = Vec::new();
    let mut draft_first = pos;
    let (mut rounds, mut drafted, mut accepted_total) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // One answer: the token that counts, then one per draft (or fewer, or `Done`).
        let mut got: Vec<(u32, bool)> = Vec::new();
        let mut done = None;
        while got.len() < 1 + drafts.len() && !got.last().is_some_and(|g| g.1) {
            match session.events.recv_timeout(Duration::from_secs(30)) {
                Ok(Event::Token {
                    id, draft, last, ..
                }) => {
                    assert_eq!(draft, !got.is_empty(), "the first token counts");
                    got.push((id, last));
                }
                Ok(Event::Done { reason, .. }) => {
                    done = Some(reason);
                    break;
                }
                Ok(Event::Error(e)) => panic!("session failed: {e}"),
                Err(e) => panic!("no answer: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "no progress");
        rounds += 1;
        let mut a = 0;
        while a < drafts.len() && a + 1 < got.len() && drafts[a] == got[a].0 {
            a += 1;
        }
        drafted += drafts.len();
        accepted_total += a;
        tokens.extend(got[..(a + 1).min(got.len())].iter().map(|g| g.0));
        if done.is_none() && tokens.len() >= MAX_TOKENS && !got[a.min(got.len() - 1)].1 {
            // The limit reached by the token that counts: `Done` follows it.
            match session.events.recv_timeout(Duration::from_secs(30)) {
                Ok(Event::Done { reason, .. }) => done = Some(reason),
                other => panic!("expected Done: {other:?}"),
            }
        }
        if let Some(reason) = done {
            engine.close(session.id).wait().expect("close");
            return Run {
                tokens,
                reason,
                rounds,
                drafted,
                accepted: accepted_total,
            };
        }
        // The verdict: start the next input after the accepted drafts.
        let at = if drafts.is_empty() {
            pos
        } else {
            draft_first + a
        };
        kv_truncate(&mut kv, at);
        let last = *tokens.last().expect("a token");
        let ended_by_draft = got[..=a.min(got.len() - 1)].last().is_some_and(|g| g.1);
        drafts = if ended_by_draft || tokens.len() >= MAX_TOKENS {
            Vec::new()
        } else {
            let next = tokens.len();
            let left = MAX_TOKENS - next - 1;
            (0..k.min(left))
                .map(|i| {
                    let right = truth.get(next + i).copied().unwrap_or(1);
                    match oracle {
                        Oracle::None => unreachable!(),
                        Oracle::AllRight => right,
                        Oracle::AllWrong => (right + 1) % vocab,
                        Oracle::RightFor(n) if i < n => right,
                        Oracle::RightFor(_) => (right + 1) % vocab,
                    }
                })
                .collect()
        };
        if matches!(oracle, Oracle::None) {
            drafts.clear();
        }
        let mut ids = vec![last];
        ids.extend_from_slice(&drafts);
        let h = hidden(edge, &mut kv, at, &ids);
        engine
            .push_hidden_at(session.id, h, ids.len(), at, drafts.len())
            .wait()
            .expect("decode input");
        pos = at + ids.len();
        draft_first = at + 1;
    }
}

fn kv_truncate(kv: &mut ContiguousKv, at: usize) {
    kv.truncate(at).expect("truncate");
}

#[test]
fn drafts_right_wrong_or_partly_right_change_no_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[2];
    common::write_hf(dir.path(), spec);
    common::write_tokenizer(dir.path());
    let m = load(dir.path());
    let vocab = spec.vocab as u32;
    let engine = Engine::start(m.cloud, m.tokenizer, config(256));
    let mut rng = common::Rng::new(9);
    let prompt: Vec<u32> = (0..11).map(|_| 4 + rng.below(vocab - 4)).collect();
    let seeded = SamplingParams {
        temperature: 0.9,
        top_k: Some(20),
        seed: 7,
        ..SamplingParams::default()
    };
    for sampling in [SamplingParams::default(), seeded] {
        let plain = generate(
            &engine,
            &m.edge,
            &prompt,
            sampling.clone(),
            Oracle::None,
            0,
            &[],
            vocab,
        );
        assert_eq!(plain.tokens.len(), MAX_TOKENS);
        assert_eq!(plain.reason, FinishReason::Length);
        assert_eq!(plain.rounds, MAX_TOKENS, "one token per round trip");
        for (oracle, k) in [
            (Oracle::AllRight, 3),
            (Oracle::AllRight, 7),
            (Oracle::AllWrong, 3),
            (Oracle::RightFor(2), 5),
            (Oracle::RightFor(1), 2),
        ] {
            let r = generate(
                &engine,
                &m.edge,
                &prompt,
                sampling.clone(),
                oracle,
                k,
                &plain.tokens,
                vocab,
            );
            let what = format!("{sampling:?} {oracle:?} k={k}");
            assert_eq!(r.tokens, plain.tokens, "{what}: tokens");
            assert_eq!(r.reason, FinishReason::Length, "{what}");
            match oracle {
                Oracle::AllRight => {
                    assert_eq!(r.accepted, r.drafted, "{what}: every draft counts");
                    assert!(r.rounds < plain.rounds / 2, "{what}: {} rounds", r.rounds);
                }
                Oracle::AllWrong => {
                    assert_eq!(r.accepted, 0, "{what}");
                    assert_eq!(r.rounds, plain.rounds, "{what}");
                }
                Oracle::RightFor(n) => {
                    assert!(r.accepted > 0 && r.accepted < r.drafted, "{what}: {r:?}");
                    assert!(r.accepted <= n * r.rounds, "{what}: {r:?}");
                }
                Oracle::None => {}
            }
        }
    }
    // Every session closed: all their blocks are back, none leaked by a truncation.
    let stats = engine.stats().wait().expect("stats").scheduler;
    assert_eq!(stats.free_blocks, stats.total_blocks, "{stats:?}");
}

#[test]
fn a_preemption_between_draft_answers_changes_no_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[2];
    common::write_hf(dir.path(), spec);
    common::write_tokenizer(dir.path());
    let m = load(dir.path());
    let vocab = spec.vocab as u32;
    let mut rng = common::Rng::new(4);
    let prompt: Vec<u32> = (0..9).map(|_| 4 + rng.below(vocab - 4)).collect();
    // Reference on a roomy cache.
    let roomy = Engine::start(m.cloud.clone(), None, config(256));
    let plain = generate(
        &roomy,
        &m.edge,
        &prompt,
        SamplingParams::default(),
        Oracle::None,
        0,
        &[],
        vocab,
    );
    drop(roomy);
    // A cache of 9 blocks of 4 (36 positions): an older session's long prompt, sent while
    // the speculating one waits for its answer, takes its blocks (it is the newest).
    let engine = Engine::start(m.cloud.clone(), None, config(9));
    let n = m.edge.config().num_hidden_layers;
    let older = engine
        .open_session(params(SamplingParams::default()))
        .wait()
        .expect("open");
    let mut okv = ContiguousKv::new(n, 512);
    let h = hidden(&m.edge, &mut okv, 0, &[5]);
    engine
        .push_hidden_at(older.id, h, 1, 0, 0)
        .wait()
        .expect("older prompt");
    assert!(matches!(
        older.events.recv_timeout(Duration::from_secs(30)),
        Ok(Event::Token { .. })
    ));
    let run = std::thread::scope(|s| {
        let speculating = s.spawn(|| {
            generate(
                &engine,
                &m.edge,
                &prompt,
                SamplingParams::default(),
                Oracle::RightFor(2),
                4,
                &plain.tokens,
                vocab,
            )
        });
        // Meanwhile the older session asks for most of the cache.
        let long: Vec<u32> = (0..28).map(|i| 4 + i % 50).collect();
        let h = hidden(&m.edge, &mut okv, 1, &long);
        engine
            .push_hidden_at(older.id, h, long.len(), 1, 0)
            .wait()
            .expect("older input");
        speculating.join().expect("thread")
    });
    assert_eq!(run.tokens, plain.tokens);
    let st = engine.stats().wait().expect("stats").scheduler;
    assert!(st.preemptions > 0, "the scenario preempts: {st:?}");
}
