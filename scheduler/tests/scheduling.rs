//! Scenario tests of the public API: policies, sample flags, preemption, admission.

use tandem_kvcache::BlockPool;
use tandem_scheduler::{
    Batch, BatchItem, Policy, SchedError, Scheduler, SchedulerConfig, SeqId, SeqProgress, SeqState,
    StepOutcome,
};

const A: SeqId = SeqId(10);
const B: SeqId = SeqId(20);
const C: SeqId = SeqId(30);

fn config(policy: Policy, tokens: usize, seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        policy,
        max_batch_tokens: tokens,
        max_batch_seqs: seqs,
        max_sessions: 16,
        max_queued_tokens: 10_000,
        max_context: 1_000,
        prefill_slack: None,
    }
}

fn sched(policy: Policy, tokens: usize, blocks: usize, block_size: usize) -> Scheduler {
    Scheduler::new(
        config(policy, tokens, 8),
        BlockPool::new(blocks, block_size),
    )
}

fn item(id: SeqId, start: usize, len: usize, sample: bool) -> BatchItem {
    BatchItem {
        id,
        start,
        len,
        sample,
        sample_rows: usize::from(sample),
    }
}

/// schedule + update with nothing finished.
fn step(s: &mut Scheduler) -> Batch {
    let b = s.schedule();
    s.update(&b, &StepOutcome::default());
    b
}

fn progress(s: &Scheduler, id: SeqId) -> SeqProgress {
    s.progress(id).expect("live session")
}

/// A and B have produced their first token and each has one decode input pending; C has a
/// 20-position prompt pending.
fn two_decoders_and_a_long_prompt(policy: Policy) -> Scheduler {
    let mut s = sched(policy, 8, 64, 4);
    for id in [A, B, C] {
        s.add(id).expect("admitted");
    }
    s.push(A, 3, true).expect("prompt");
    s.push(B, 2, true).expect("prompt");
    let b = step(&mut s);
    assert_eq!(b.items, vec![item(A, 0, 3, true), item(B, 0, 2, true)]);
    s.push(C, 20, true).expect("prompt");
    s.push(A, 1, true).expect("decode");
    s.push(B, 1, true).expect("decode");
    s
}

#[test]
fn decode_first_puts_decodes_first_and_chunks_the_prompt_under_the_budget() {
    let mut s = two_decoders_and_a_long_prompt(Policy::DecodeFirst);
    let mut c_chunks = Vec::new();
    for _ in 0..4 {
        let b = s.schedule();
        assert!(b.num_tokens() <= 8);
        assert_eq!(b.items[0].id, A, "decodes first, oldest first");
        assert_eq!(b.items[1].id, B);
        assert_eq!((b.items[0].len, b.items[1].len), (1, 1));
        assert!(
            b.items[0].sample && b.items[1].sample,
            "decodes always sample"
        );
        assert_eq!(b.items[2].id, C, "then the prompt chunk");
        assert_eq!(b.items.len(), 3);
        c_chunks.push(b.items[2].clone());
        s.update(&b, &StepOutcome::default());
        s.push(A, 1, true).expect("next decode");
        s.push(B, 1, true).expect("next decode");
    }
    // 20 positions in chunks of what the two decodes leave of the budget of 8.
    assert_eq!(
        c_chunks,
        vec![
            item(C, 0, 6, false),
            item(C, 6, 6, false),
            item(C, 12, 6, false),
            item(C, 18, 2, true),
        ]
    );
    assert_eq!(progress(&s, C).computed, 20);
    assert_eq!(progress(&s, A).sampled_upto, 3 + 4);
}

#[test]
fn prefill_first_starves_decodes_while_a_prompt_is_pending() {
    let mut s = two_decoders_and_a_long_prompt(Policy::PrefillFirst);
    let mut chunks = Vec::new();
    for _ in 0..3 {
        let b = s.schedule();
        assert_eq!(b.items.len(), 1, "only the prompt: {b:?}");
        assert_eq!(s.state(A), Some(SeqState::Ready), "A's decode waits");
        assert_eq!(s.state(B), Some(SeqState::Ready));
        chunks.push(b.items[0].clone());
        s.update(&b, &StepOutcome::default());
    }
    assert_eq!(
        chunks,
        vec![
            item(C, 0, 8, false),
            item(C, 8, 8, false),
            item(C, 16, 4, true),
        ]
    );
    // The prompt is done: now the decodes that waited three steps run.
    let b = step(&mut s);
    assert_eq!(b.items, vec![item(A, 3, 1, true), item(B, 2, 1, true)]);
}

#[test]
fn a_prompt_sent_in_three_chunks_samples_only_on_the_last() {
    let mut s = sched(Policy::DecodeFirst, 4, 16, 4);
    s.add(A).expect("admitted");
    let mut flags = Vec::new();
    for (n, complete) in [(4, false), (4, false), (4, true)] {
        s.push(A, n, complete).expect("chunk");
        let b = step(&mut s);
        assert_eq!(b.items.len(), 1);
        flags.push(b.items[0].sample);
    }
    assert_eq!(flags, vec![false, false, true]);
    // Decodes sample every time.
    for pos in 12..15 {
        s.push(A, 1, true).expect("decode");
        assert_eq!(step(&mut s).items, vec![item(A, pos, 1, true)]);
    }
    // A whole prompt received at once but chunked by the budget samples once too.
    s.add(B).expect("admitted");
    s.push(B, 10, true).expect("prompt");
    let flags: Vec<_> = (0..3).map(|_| step(&mut s).items[0].sample).collect();
    assert_eq!(flags, vec![false, false, true]);
}

#[test]
fn recomputation_does_not_sample_again_but_samples_the_owed_input() {
    // 6 blocks of 2 positions, 2 positions per step.
    let mut s = sched(Policy::DecodeFirst, 2, 6, 2);
    s.add(A).expect("admitted");
    s.add(B).expect("admitted");
    s.push(B, 3, true).expect("prompt");
    assert_eq!(step(&mut s).items, vec![item(B, 0, 2, false)]);
    assert_eq!(step(&mut s).items, vec![item(B, 2, 1, true)]);
    s.push(B, 1, true).expect("decode");
    assert_eq!(step(&mut s).items, vec![item(B, 3, 1, true)]);
    assert_eq!(s.state(B), Some(SeqState::WaitingForInput));
    // B waits for its device and holds 2 blocks; A's 10 positions need 5 of the 6.
    s.push(A, 10, true).expect("prompt");
    for start in [0, 2, 4, 6] {
        let b = step(&mut s);
        assert_eq!(b.items, vec![item(A, start, 2, false)]);
        assert!(b.preempted.is_empty());
    }
    let b = s.schedule();
    assert_eq!(b.preempted, vec![B], "the newer session loses its blocks");
    assert_eq!(b.items, vec![item(A, 8, 2, true)]);
    assert_eq!(progress(&s, B).computed, 0);
    assert_eq!(s.state(B), Some(SeqState::Ready));
    // A's generation ends and A is parked, still holding 5 blocks.
    s.update(&b, &StepOutcome { finished: vec![A] });
    // B is recomputed from 0 without new input; its old sample points (3 and 4) are passed
    // without sampling. The second chunk needs a block only parked A can give.
    assert_eq!(step(&mut s).items, vec![item(B, 0, 2, false)]);
    let b = step(&mut s);
    assert_eq!(b.preempted, vec![A], "a parked session yields to any other");
    assert_eq!(b.items, vec![item(B, 2, 2, false)]);
    assert_eq!(s.state(B), Some(SeqState::WaitingForInput));
    // The next input is owed a token, once.
    s.push(B, 1, true).expect("decode");
    assert_eq!(step(&mut s).items, vec![item(B, 4, 1, true)]);
    let st = s.stats();
    assert_eq!(st.preemptions, 2);
    assert_eq!(st.recomputed_tokens, 4, "B's first 4 positions");
    // A kept its marks: new input for A is recomputed from 0 and sampled once.
    assert_eq!(progress(&s, A).computed, 0);
    s.push(A, 1, true).expect("a new turn for A");
    let a_items: Vec<_> = (0..6)
        .flat_map(|_| step(&mut s).items)
        .filter(|i| i.id == A)
        .collect();
    assert_eq!(a_items.iter().filter(|i| i.sample).count(), 1);
    assert_eq!(a_items.last(), Some(&item(A, 10, 1, true)));
}

#[test]
fn with_a_tiny_pool_the_newest_is_preempted_and_the_oldest_finishes() {
    // 5 blocks of 4 positions: three 8-position prompts cannot all be held.
    let mut s = sched(Policy::DecodeFirst, 32, 5, 4);
    for id in [A, B, C] {
        s.add(id).expect("admitted");
        s.push(id, 8, true).expect("prompt");
    }
    let b = step(&mut s);
    assert_eq!(
        b.items,
        vec![
            item(A, 0, 8, true),
            item(B, 0, 8, true),
            item(C, 0, 4, false)
        ],
        "C gets what is left, and nobody newer can be preempted for it"
    );
    s.push(A, 1, true).expect("decode");
    s.push(B, 1, true).expect("decode");
    let b = step(&mut s);
    assert_eq!(b.preempted, vec![C], "the newest loses");
    assert_eq!(
        b.items,
        vec![item(A, 8, 1, true)],
        "B cannot preempt older A"
    );
    assert_eq!(progress(&s, C).computed, 0);
    assert!(s.table(C).expect("live").blocks().is_empty());
    assert_eq!(s.stats().preemptions, 1);

    // A generates until its fourth token, then ends and leaves.
    let mut a_tokens = 2;
    while a_tokens < 4 {
        s.push(A, 1, true).expect("decode");
        let b = step(&mut s);
        assert_eq!(
            b.items.first().map(|i| i.id),
            Some(A),
            "the oldest progresses"
        );
        a_tokens += 1;
    }
    assert_eq!(progress(&s, A).sampled_upto, 11);
    assert_eq!(
        s.state(B),
        Some(SeqState::Ready),
        "B still waits for a block"
    );
    s.remove(A).expect("live");
    // B decodes; C is recomputed from position 0.
    let b = step(&mut s);
    assert_eq!(b.items, vec![item(B, 8, 1, true), item(C, 0, 8, true)]);
    assert_eq!(s.stats().preemptions, 1);
    assert_eq!(s.stats().recomputed_tokens, 4);
}

#[test]
fn decodes_already_in_the_batch_are_never_preempted() {
    // A is older and prefilling; B's decode goes first and must keep its block.
    let mut s = sched(Policy::DecodeFirst, 32, 3, 4);
    s.add(A).expect("admitted");
    s.add(B).expect("admitted");
    s.push(B, 4, true).expect("prompt");
    step(&mut s);
    s.push(B, 1, true).expect("decode");
    s.push(A, 12, true).expect("prompt");
    let b = s.schedule();
    assert!(b.preempted.is_empty());
    assert_eq!(b.items, vec![item(B, 4, 1, true), item(A, 0, 4, false)]);
    s.update(&b, &StepOutcome::default());
    // Next step B is waiting for its device, so older A may take its blocks.
    let b = step(&mut s);
    assert_eq!(b.preempted, vec![B]);
    assert_eq!(b.items, vec![item(A, 4, 8, true)]);
}

/// Everything observable that a refused request must leave alone.
fn snapshot(s: &Scheduler) -> (Vec<Option<SeqProgress>>, usize, usize, usize) {
    (
        [A, B, C].iter().map(|&id| s.progress(id)).collect(),
        s.num_sessions(),
        s.num_queued_tokens(),
        s.pool().num_free(),
    )
}

#[test]
fn admission_errors_change_nothing() {
    let cfg = SchedulerConfig {
        max_sessions: 2,
        max_queued_tokens: 20,
        max_context: 30,
        prefill_slack: None,
        ..config(Policy::DecodeFirst, 8, 8)
    };
    // 7 blocks of 4: 28 positions at most per session.
    let mut s = Scheduler::new(cfg, BlockPool::new(7, 4));
    s.add(A).expect("admitted");
    s.add(B).expect("admitted");
    s.push(A, 5, false).expect("chunk");
    step(&mut s);
    let before = snapshot(&s);
    let check = |s: &Scheduler, r: Result<(), SchedError>, want: SchedError| {
        assert_eq!(r, Err(want));
        assert_eq!(snapshot(s), before);
    };

    let r = s.add(C);
    assert!(matches!(r, Err(SchedError::Overloaded(_))), "{r:?}");
    assert_eq!(snapshot(&s), before);
    let r = s.add(A);
    check(&s, r, SchedError::DuplicateSession(A));
    let r = s.push(C, 1, true);
    check(&s, r, SchedError::UnknownSession(C));
    let r = s.remove(C);
    check(&s, r, SchedError::UnknownSession(C));
    let r = s.push(A, 26, true);
    check(&s, r, SchedError::ContextLength { len: 31, max: 30 });
    let r = s.push(A, 24, true);
    check(
        &s,
        r,
        SchedError::TooLarge {
            needed: 8,
            total: 7,
        },
    );
    s.push(B, 15, false).expect("15 queued");
    let before = snapshot(&s);
    let r = s.push(A, 6, true);
    assert!(matches!(r, Err(SchedError::Overloaded(_))), "{r:?}");
    assert_eq!(snapshot(&s), before);
    s.push(A, 5, true).expect("exactly at the queue limit");
    // A owes a token until its complete input has been computed and sampled.
    let before = snapshot(&s);
    let r = s.push(A, 1, true);
    assert_eq!(r, Err(SchedError::NotReady(A)));
    assert_eq!(snapshot(&s), before);
    let b = step(&mut s);
    assert_eq!(b.items[0], item(A, 5, 5, true));
    assert_eq!(progress(&s, A).sampled_upto, 10);
    s.push(A, 1, true)
        .expect("the token came; the next input is welcome");
}

#[test]
fn a_recomputation_backlog_does_not_refuse_device_input() {
    let cfg = SchedulerConfig {
        max_queued_tokens: 10,
        ..config(Policy::DecodeFirst, 32, 8)
    };
    let mut s = Scheduler::new(cfg, BlockPool::new(4, 4));
    s.add(A).expect("admitted");
    s.add(B).expect("admitted");
    s.push(B, 10, true).expect("prompt");
    step(&mut s);
    s.push(A, 10, true).expect("at the limit");
    let r = s.push(B, 1, true);
    assert!(matches!(r, Err(SchedError::Overloaded(_))), "{r:?}");
    let b = step(&mut s);
    assert_eq!(b.preempted, vec![B]);
    assert_eq!(b.items, vec![item(A, 0, 10, true)]);
    assert_eq!(
        s.num_queued_tokens(),
        10,
        "B's 10 positions wait to be recomputed"
    );
    assert_eq!(s.num_fresh_tokens(), 0);
    // Both devices' next inputs are accepted although 10 positions are queued.
    s.push(A, 1, true).expect("decode input");
    s.push(B, 1, true).expect("next input");
    assert_eq!(s.num_queued_tokens(), 12);
    assert_eq!(s.num_fresh_tokens(), 2);
    assert_eq!(s.stats().fresh_tokens, 2);
}

fn hashes(tag: u8, n: usize) -> Vec<tandem_kvcache::BlockHash> {
    let mut prev = None;
    (0..n)
        .map(|i| {
            let h = tandem_kvcache::BlockHash::chain(prev, &[tag, i as u8]);
            prev = Some(h);
            h
        })
        .collect()
}

#[test]
fn a_session_adopts_the_registered_blocks_of_an_identical_prefix() {
    let mut s = sched(Policy::DecodeFirst, 64, 16, 4);
    for id in [A, B, C] {
        s.add(id).expect("admitted");
    }
    // A: 10 positions, 2 full blocks hashed; computed in one step, then its blocks register.
    s.push(A, 10, true).expect("prompt");
    s.add_block_hashes(A, &hashes(1, 2)).expect("hashes");
    assert!(matches!(
        s.add_block_hashes(A, &hashes(1, 1)),
        Err(SchedError::Hashes {
            blocks: 3,
            received: 10
        })
    ));
    let b = step(&mut s);
    assert_eq!(b.items, vec![item(A, 0, 10, true)]);
    // B shares A's first two blocks and then differs; C shares only A's first block.
    s.push(B, 9, true).expect("prompt");
    s.add_block_hashes(B, &hashes(1, 2)).expect("hashes");
    s.push(C, 8, true).expect("prompt");
    let mut c = hashes(1, 1);
    c.push(hashes(9, 2)[1]);
    s.add_block_hashes(C, &c).expect("hashes");
    let b = step(&mut s);
    assert_eq!(
        b.items,
        vec![item(B, 8, 1, true), item(C, 4, 4, true)],
        "B computes only its 9th position, C its second block"
    );
    assert_eq!(s.stats().prefix_hit_tokens, 8 + 4);
    assert_eq!(s.stats().shared_blocks, 2, "A's two blocks are shared");
    assert_eq!(
        s.pool().num_used(),
        3 + 1 + 1,
        "A: 3 blocks; B and C: one block of their own each"
    );
    // Closing A keeps the shared blocks alive for the others.
    s.remove(A).expect("remove");
    assert_eq!(
        s.stats().shared_blocks,
        1,
        "block 0 is still shared by B and C"
    );
}

#[test]
fn a_prefix_that_is_the_whole_input_keeps_its_last_position_to_compute() {
    let mut s = sched(Policy::DecodeFirst, 64, 16, 4);
    for id in [A, B] {
        s.add(id).expect("admitted");
    }
    s.push(A, 8, true).expect("prompt");
    s.add_block_hashes(A, &hashes(1, 2)).expect("hashes");
    step(&mut s);
    // B's whole prompt is A's: it adopts one block, not two, since its last position's
    // logits are needed for its token.
    s.push(B, 8, true).expect("prompt");
    s.add_block_hashes(B, &hashes(1, 2)).expect("hashes");
    let b = step(&mut s);
    assert_eq!(b.items, vec![item(B, 4, 4, true)]);
    assert_eq!(s.stats().prefix_hit_tokens, 4);
}

#[test]
fn prefill_slack_caps_the_chunk_that_rides_with_decodes() {
    // Budget 64 would take the whole 20-position prompt at once; slack 0.5 with two decodes
    // and an overhead of 4 rows allows floor(0.5 * (2 + 4)) = 3 positions per step.
    let mut s = Scheduler::new(
        SchedulerConfig {
            prefill_slack: Some(0.5),
            ..config(Policy::DecodeFirst, 64, 8)
        },
        BlockPool::new(64, 4),
    );
    for id in [A, B, C] {
        s.add(id).expect("admitted");
    }
    s.push(A, 3, true).expect("prompt");
    s.push(B, 2, true).expect("prompt");
    let first = step(&mut s);
    assert_eq!(
        first.items,
        vec![item(A, 0, 3, true), item(B, 0, 2, true)],
        "no decodes in the batch: prompts are not capped"
    );
    s.set_overhead_rows(4.0);
    assert_eq!(s.prefill_cap(2), 3);
    assert_eq!(
        s.prefill_cap(0),
        usize::MAX,
        "steps without decodes are free"
    );
    s.push(C, 20, true).expect("prompt");
    s.push(A, 1, true).expect("decode");
    s.push(B, 1, true).expect("decode");
    let b = step(&mut s);
    assert_eq!(
        b.items,
        vec![
            item(A, 3, 1, true),
            item(B, 2, 1, true),
            item(C, 0, 3, false)
        ]
    );
    // The decoders are now at their devices: the prompt runs alone, still capped as if they
    // were here (floor(0.5 * (2 * 0.8^k + 4)) = 2), until no decode has been seen for long
    // enough that the recent decodes per step fall under a half (2 * 0.8^7 < 0.5).
    let mut chunks = Vec::new();
    while progress(&s, C).computed < 20 {
        let b = step(&mut s);
        assert_eq!(b.items.len(), 1, "{b:?}");
        chunks.push(b.items[0].len);
    }
    assert_eq!(chunks, vec![2, 2, 2, 2, 2, 2, 5]);
}

#[test]
fn prefill_cap_always_lets_a_prompt_progress() {
    let mut s = Scheduler::new(
        SchedulerConfig {
            prefill_slack: Some(0.01),
            ..config(Policy::DecodeFirst, 64, 8)
        },
        BlockPool::new(64, 4),
    );
    assert_eq!(
        s.prefill_cap(1),
        1,
        "a tiny slack still allows one position"
    );
    s.set_overhead_rows(f64::NAN);
    assert_eq!(s.prefill_cap(3), 1, "a NaN overhead counts as none");
    s.set_overhead_rows(1000.0);
    assert_eq!(s.prefill_cap(3), 10);
    let off = Scheduler::new(config(Policy::DecodeFirst, 64, 8), BlockPool::new(64, 4));
    assert_eq!(off.prefill_cap(5), usize::MAX, "no slack: no cap");
    let pf = Scheduler::new(
        SchedulerConfig {
            prefill_slack: Some(0.5),
            ..config(Policy::PrefillFirst, 64, 8)
        },
        BlockPool::new(64, 4),
    );
    // The cap is computed but prefill-first never applies it (it never mixes the two).
    assert_eq!(pf.prefill_cap(2), 1);
}

#[test]
fn under_the_cap_the_shortest_prompt_goes_first() {
    let mut s = Scheduler::new(
        SchedulerConfig {
            prefill_slack: Some(1.0),
            ..config(Policy::DecodeFirst, 64, 8)
        },
        BlockPool::new(64, 4),
    );
    for id in [A, B, C] {
        s.add(id).expect("admitted");
    }
    s.push(A, 2, true).expect("prompt");
    step(&mut s);
    // A decodes; B (older) has 20 positions to go, C (newer) 3. The cap is 1 * (1 + 4) = 5:
    // C needs 3, so B, the oldest, gets the other 2 (at least a quarter: 1).
    s.set_overhead_rows(4.0);
    s.push(B, 20, true).expect("long prompt");
    s.push(C, 3, true).expect("short prompt");
    s.push(A, 1, true).expect("decode");
    let b = step(&mut s);
    assert_eq!(
        b.items,
        vec![
            item(A, 2, 1, true),
            item(B, 0, 2, false),
            item(C, 0, 3, true)
        ]
    );
    // Without the cap the order is by admission.
    let mut fcfs = sched(Policy::DecodeFirst, 64, 64, 4);
    for id in [A, B, C] {
        fcfs.add(id).expect("admitted");
    }
    fcfs.push(B, 20, true).expect("long prompt");
    fcfs.push(C, 3, true).expect("short prompt");
    let b = step(&mut fcfs);
    assert_eq!(b.items, vec![item(B, 0, 20, true), item(C, 0, 3, true)]);
}

#[test]
fn a_session_idle_at_its_device_yields_its_blocks_after_a_while_and_waits_for_its_device() {
    const I: SeqId = SeqId(1);
    const N: SeqId = SeqId(2);
    // Two blocks of 128: I (oldest) and A each hold one; N, the newest, needs one.
    let mut s = Scheduler::new(config(Policy::DecodeFirst, 128, 8), BlockPool::new(2, 128));
    s.add(I).expect("admitted");
    s.push(I, 4, true).expect("prompt");
    assert_eq!(step(&mut s).items, vec![item(I, 0, 4, true)]);
    s.add(A).expect("admitted");
    s.push(A, 1, true).expect("prompt");
    step(&mut s);
    s.add(N).expect("admitted");
    s.push(N, 4, true).expect("prompt");
    let mut steps = 2u64;
    let started = loop {
        s.push(A, 1, true).expect("decode");
        let b = step(&mut s);
        steps += 1;
        if let Some(n) = b.items.iter().find(|i| i.id == N) {
            assert_eq!(n, &item(N, 0, 4, true));
            assert_eq!(
                b.preempted,
                vec![I],
                "I, idle the longest, gave up its block"
            );
            break steps;
        }
        assert!(b.preempted.is_empty(), "step {steps}: {b:?}");
        assert!(steps < 200, "N never got a block");
    };
    // I was last given an item at step 0; it qualifies after IDLE_STEPS_BEFORE_EVICTION.
    assert_eq!(started, tandem_scheduler::IDLE_STEPS_BEFORE_EVICTION + 1);
    // I is not recomputed while it waits for its device...
    assert_eq!(progress(&s, I).computed, 0);
    assert_eq!(s.state(I), Some(SeqState::WaitingForInput));
    for _ in 0..3 {
        s.push(A, 1, true).expect("decode");
        assert!(step(&mut s).items.iter().all(|i| i.id != I));
    }
    // ...and when it sends more, it is recomputed (taking N's block: N is newer) and its new
    // input sampled once.
    s.push(I, 1, true).expect("I's device is back");
    assert_eq!(s.state(I), Some(SeqState::Ready));
    let b = step(&mut s);
    assert_eq!(b.items, vec![item(I, 0, 5, true)]);
    assert_eq!(b.preempted, vec![N]);
}

#[test]
fn blocked_work_ages_idle_sessions_without_any_step() {
    const I: SeqId = SeqId(1);
    const N: SeqId = SeqId(2);
    // One block: I holds it and waits for its device; nothing else runs.
    let mut s = Scheduler::new(config(Policy::DecodeFirst, 64, 8), BlockPool::new(1, 64));
    s.add(I).expect("admitted");
    s.push(I, 4, true).expect("prompt");
    step(&mut s);
    assert!(!s.blocked());
    s.add(N).expect("admitted");
    s.push(N, 4, true).expect("prompt");
    let mut calls = 0u64;
    let b = loop {
        let b = step(&mut s);
        calls += 1;
        if !b.is_empty() {
            break b;
        }
        assert!(s.blocked(), "N's prompt waits for a block");
        assert!(calls < 200, "N never got a block");
    };
    assert_eq!(b.items, vec![item(N, 0, 4, true)]);
    assert_eq!(b.preempted, vec![I]);
    assert_eq!(calls, tandem_scheduler::IDLE_STEPS_BEFORE_EVICTION);
    assert!(!s.blocked());
    // With nothing to do the scheduler is not blocked.
    assert!(step(&mut s).is_empty());
    assert!(!s.blocked());
}

// ---------------------------------------------------------------------------------------
// Speculation: the token before the drafts and the drafts, sampled in one step; truncation.

/// A has a 5-position prompt computed and its first token produced.
fn one_decoder(tokens: usize, blocks: usize) -> Scheduler {
    let mut s = sched(Policy::DecodeFirst, tokens, blocks, 4);
    s.add(A).expect("admitted");
    s.push(A, 5, true).expect("prompt");
    while progress(&s, A).sampled_upto < 5 {
        assert!(!step(&mut s).is_empty(), "the prompt progresses");
    }
    s
}

#[test]
fn a_speculative_input_is_one_decode_item_that_samples_every_row() {
    let mut s = one_decoder(8, 16);
    s.push_drafts(A, 4, true, 3).expect("token + 3 drafts");
    let b = step(&mut s);
    assert_eq!(
        b.items,
        vec![BatchItem {
            id: A,
            start: 5,
            len: 4,
            sample: true,
            sample_rows: 4
        }]
    );
    assert_eq!(b.num_sampled_rows(), 4);
    // Two drafts accepted: keep positions up to the second draft, drop the third.
    s.truncate(A, 8).expect("truncate");
    let p = progress(&s, A);
    assert_eq!((p.received, p.computed), (8, 8));
    assert_eq!(s.table(A).expect("table").len(), 8);
    assert_eq!(s.num_queued_tokens(), 0);
    assert_eq!(s.num_fresh_tokens(), 0);
    // The next input continues at 8.
    s.push_drafts(A, 2, true, 1).expect("next");
    let b = step(&mut s);
    assert_eq!(
        (b.items[0].start, b.items[0].len, b.items[0].sample_rows),
        (8, 2, 2)
    );
}

#[test]
fn truncation_returns_blocks_to_the_pool_and_refuses_to_cut_what_counts() {
    let mut s = one_decoder(16, 16);
    let free_before = s.pool().num_free();
    s.push_drafts(A, 9, true, 8).expect("token + 8 drafts");
    step(&mut s);
    // Positions 0..14: four blocks of 4; the prompt and token held two.
    assert_eq!(s.pool().num_free(), free_before - 2);
    // The token before the drafts (position 5) always counts.
    assert_eq!(
        s.truncate(A, 5),
        Err(SchedError::Truncate { len: 5, min: 6 })
    );
    s.truncate(A, 6).expect("no draft accepted");
    assert_eq!(s.pool().num_free(), free_before, "back to two blocks");
    assert_eq!(progress(&s, A).received, 6);
    // Not while a token is owed.
    s.push_drafts(A, 3, true, 2).expect("next");
    assert_eq!(s.truncate(A, 7), Err(SchedError::NotReady(A)));
}

#[test]
fn drafts_must_be_the_token_before_them_and_them_and_fit_a_step() {
    let mut s = one_decoder(4, 16);
    let before = snapshot(&s);
    for (n, complete, drafts) in [(4, false, 3), (5, true, 3), (2, true, 3), (5, true, 4)] {
        assert_eq!(
            s.push_drafts(A, n, complete, drafts),
            Err(SchedError::Drafts { drafts, rows: n })
        );
    }
    assert_eq!(snapshot(&s), before);
}

#[test]
fn a_short_budget_never_splits_the_sampled_rows() {
    // B decodes with 3 drafts; A's prompt fills the budget of 6 so only 2 positions are left
    // for B in the first step: B waits rather than computing part of its drafts.
    let mut s = sched(Policy::PrefillFirst, 6, 32, 4);
    s.add(B).expect("admitted");
    s.push(B, 2, true).expect("prompt");
    step(&mut s);
    s.add(A).expect("admitted");
    s.push(A, 4, true).expect("prompt");
    s.push_drafts(B, 4, true, 3).expect("decode + drafts");
    let b = step(&mut s);
    assert_eq!(b.items, vec![item(A, 0, 4, true)], "B does not fit whole");
    let b = step(&mut s);
    assert_eq!(
        (b.items[0].id, b.items[0].len, b.items[0].sample_rows),
        (B, 4, 4)
    );
}

#[test]
fn preempted_mid_draft_the_recomputation_samples_the_drafts_whole() {
    // One session: preempt by dropping its KV (a newer session cannot; use a tiny pool and
    // an older session that needs the blocks).
    let mut s = sched(Policy::DecodeFirst, 3, 4, 4);
    s.add(A).expect("admitted");
    s.add(B).expect("admitted");
    s.push(B, 6, true).expect("B prompt");
    // B's prompt: 3 + 3 positions over two steps.
    step(&mut s);
    step(&mut s);
    s.push_drafts(B, 3, true, 2).expect("B decode + drafts");
    // A (older) now needs the blocks: B is preempted before its drafts run.
    s.push(A, 12, true).expect("A prompt");
    let mut sampled_b = Vec::new();
    for _ in 0..20 {
        let b = step(&mut s);
        for i in b.items.iter().filter(|i| i.id == B) {
            assert!(
                i.end() <= 6 || i.end() == 9,
                "an item of B ends inside its drafts: {i:?}"
            );
            if i.sample {
                sampled_b.push((i.start, i.len, i.sample_rows));
            }
        }
        if progress(&s, A).sampled_upto == 12 && progress(&s, B).sampled_upto == 9 {
            break;
        }
    }
    assert!(
        s.stats().preemptions > 0,
        "the scenario must preempt B: {:?}",
        s.stats()
    );
    assert_eq!(progress(&s, B).sampled_upto, 9);
    assert_eq!(
        sampled_b.len(),
        1,
        "B samples its drafts once: {sampled_b:?}"
    );
    assert_eq!(sampled_b[0].2, 3);
}
