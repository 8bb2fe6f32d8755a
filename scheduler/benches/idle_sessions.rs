//! What thousands of idle sessions cost the scheduler: one decode step for 64 active sessions
//! (each receives one position, the step is chosen, the outcome recorded) while N other
//! sessions hold their KV and wait for their device. The step's cost should not grow with N;
//! compare it with an engine step (tens to hundreds of ms on the demo model,
//! docs/performance.md).
//!
//! Run: `cargo bench --workspace --bench idle_sessions` (criterion; HTML under
//! target/criterion).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tandem_kvcache::BlockPool;
use tandem_scheduler::{Policy, Scheduler, SchedulerConfig, SeqId, StepOutcome};

const ACTIVE: u64 = 64;
const PROMPT: usize = 16;
const BLOCK: usize = 16;

/// Runs steps until nothing is left to compute.
fn drain(s: &mut Scheduler) {
    loop {
        let batch = s.schedule();
        if batch.is_empty() {
            return;
        }
        s.update(&batch, &StepOutcome::default());
    }
}

/// `idle` sessions that computed a prompt and wait for their device, and `ACTIVE` decoding
/// ones, each with a prompt computed and its token sampled.
fn scheduler(idle: u64) -> Scheduler {
    let sessions = idle + ACTIVE;
    let cfg = SchedulerConfig {
        policy: Policy::DecodeFirst,
        max_batch_tokens: 256,
        max_batch_seqs: 256,
        max_sessions: sessions as usize,
        max_queued_tokens: 1 << 20,
        max_context: 4096,
        prefill_slack: None,
    };
    // Room for every session's prompt and 1,000 decode positions each.
    let blocks = sessions as usize * (PROMPT + 1000).div_ceil(BLOCK);
    let mut s = Scheduler::new(cfg, BlockPool::new(blocks, BLOCK));
    for id in 0..sessions {
        s.add(SeqId(id)).expect("admit");
        s.push(SeqId(id), PROMPT, true).expect("prompt");
        if id % 256 == 255 {
            drain(&mut s);
        }
    }
    drain(&mut s);
    s
}

/// One decode round of the active sessions.
fn decode_round(s: &mut Scheduler) -> usize {
    for id in 0..ACTIVE {
        s.push(SeqId(id), 1, true).expect("decode input");
    }
    let batch = s.schedule();
    let n = batch.items.len();
    s.update(&batch, &StepOutcome::default());
    n
}

/// Decode rounds before the active sessions start over (their context would run out).
const ROUNDS_PER_LIFE: usize = 900;

/// Ends the active sessions and admits them again with a computed prompt.
fn restart_active(s: &mut Scheduler) {
    for id in 0..ACTIVE {
        s.remove(SeqId(id)).expect("remove");
        s.add(SeqId(id)).expect("admit");
        s.push(SeqId(id), PROMPT, true).expect("prompt");
    }
    drain(s);
}

fn idle_sessions(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode step of 64 sessions");
    for idle in [0u64, 500, 2_000, 8_000] {
        let mut s = scheduler(idle);
        assert_eq!(
            decode_round(&mut s),
            ACTIVE as usize,
            "only the active ones run"
        );
        let mut rounds = 1;
        group.bench_with_input(BenchmarkId::new("idle sessions", idle), &idle, |b, _| {
            // Only the decode rounds are timed, not the restarts.
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    if rounds == ROUNDS_PER_LIFE {
                        restart_active(&mut s);
                        rounds = 0;
                    }
                    let started = Instant::now();
                    std::hint::black_box(decode_round(&mut s));
                    timed += started.elapsed();
                    rounds += 1;
                }
                timed
            });
        });
    }
    group.finish();
}

criterion_group!(benches, idle_sessions);
criterion_main!(benches);
