//! A whole serving run: 12 devices stream their prompts in chunks of 7 positions, each
//! session generates 5 tokens, and the KV pool is too small to hold everyone at once.

use std::collections::BTreeMap;

use tandem_kvcache::BlockPool;
use tandem_scheduler::{Policy, Scheduler, SchedulerConfig, SeqId, StepOutcome};

const PROMPTS: [usize; 12] = [3, 17, 40, 9, 28, 55, 12, 33, 7, 21, 46, 14];
const CHUNK: usize = 7;
const TOKENS: usize = 5;
const BLOCK_SIZE: usize = 4;
/// The longest session needs 15 blocks; all of them together need about 100.
const BLOCKS: usize = 24;

/// One device and what the test observed of its session.
#[derive(Debug, Default)]
struct Device {
    prompt: usize,
    sent: usize,
    /// End positions of the items that produced a token, in order.
    samples: Vec<usize>,
    /// Where the next item must start: the end of the last one, or 0 after a preemption.
    cursor: usize,
    done: bool,
}

impl Device {
    /// The device streams its prompt one chunk per engine step.
    fn send_chunk(&mut self, s: &mut Scheduler, id: SeqId) {
        if self.sent < self.prompt {
            let n = CHUNK.min(self.prompt - self.sent);
            self.sent += n;
            s.push(id, n, self.sent == self.prompt)
                .expect("prompt chunk");
        }
    }
}

/// Runs the simulation; returns the scheduler's preemption count.
fn simulate(policy: Policy) -> u64 {
    let cfg = SchedulerConfig {
        policy,
        max_batch_tokens: 32,
        max_batch_seqs: 8,
        max_sessions: 12,
        max_queued_tokens: 10_000,
        max_context: 128,
        prefill_slack: None,
    };
    let mut s = Scheduler::new(cfg, BlockPool::new(BLOCKS, BLOCK_SIZE));
    let mut devices: BTreeMap<SeqId, Device> = BTreeMap::new();
    let mut steps = 0;
    while steps < 10_000 && (devices.len() < PROMPTS.len() || devices.values().any(|d| !d.done)) {
        // A new device connects every other step.
        if steps % 2 == 0 && devices.len() < PROMPTS.len() {
            let id = SeqId(devices.len() as u64);
            s.add(id).expect("admitted");
            let prompt = PROMPTS[devices.len()];
            devices.insert(
                id,
                Device {
                    prompt,
                    ..Device::default()
                },
            );
        }
        for (&id, d) in devices.iter_mut() {
            d.send_chunk(&mut s, id);
        }
        let batch = s.schedule();
        steps += 1;
        assert!(batch.num_tokens() <= 32 && batch.items.len() <= 8);
        for v in &batch.preempted {
            devices.get_mut(v).expect("known").cursor = 0;
        }
        let mut finished = Vec::new();
        for it in &batch.items {
            let d = devices.get_mut(&it.id).expect("known");
            assert!(!d.done, "{:?} scheduled after it finished", it.id);
            assert_eq!(it.start, d.cursor, "{:?} computes in order", it.id);
            d.cursor = it.end();
            if it.sample {
                d.samples.push(it.end());
                if d.samples.len() == TOKENS {
                    finished.push(it.id);
                }
            }
        }
        s.update(&batch, &StepOutcome { finished });
        for it in batch.items.iter().filter(|i| i.sample) {
            let d = devices.get_mut(&it.id).expect("known");
            if d.samples.len() < TOKENS {
                // The device runs its layers on the new token and sends the next input.
                s.push(it.id, 1, true).expect("decode input");
            } else {
                d.done = true;
                // Even sessions leave; odd ones stay parked for a next turn, holding blocks
                // until someone needs them.
                if it.id.0 % 2 == 0 {
                    s.remove(it.id).expect("live");
                }
            }
        }
    }
    assert!(steps < 10_000, "the run did not finish: {devices:?}");
    for (id, d) in &devices {
        let want: Vec<usize> = (0..TOKENS).map(|t| d.prompt + t).collect();
        assert_eq!(
            d.samples, want,
            "{id:?} gets its 5 tokens, in order, once each"
        );
    }
    let stats = s.stats();
    assert_eq!(stats.sessions_ready + stats.sessions_running, 0);
    for id in devices.keys() {
        // Removing an already removed session is an error; ignore those.
        let _ = s.remove(*id);
    }
    assert_eq!(s.pool().num_free(), BLOCKS, "every block back");
    stats.preemptions
}

#[test]
fn decode_first_serves_every_session_through_preemptions() {
    let preemptions = simulate(Policy::DecodeFirst);
    assert!(preemptions > 0, "the pool was meant to be too small");
}

#[test]
fn prefill_first_serves_every_session_through_preemptions() {
    let preemptions = simulate(Policy::PrefillFirst);
    assert!(preemptions > 0, "the pool was meant to be too small");
}
