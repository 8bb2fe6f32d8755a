//! The workload of a run, drawn entirely before it starts: the prompt pool, and for every
//! device its start offset and its generations (which prompt, how many output tokens).
//!
//! Drawing it up front makes a run reproducible from its seed and keeps randomness out of
//! the timed part. Each concern has its own RNG stream derived from the seed, so changing
//! e.g. the arrival process does not change the prompts.
//!
//! Prompts are random token ids (never an end-of-sequence id), one length drawn per pool
//! entry, unless the run is given its prompts (`LoadConfig::prompts`: `--prompt-file`, a
//! text such as examples/extraction-prompt.txt put through the model's chat template; then
//! the pool is those prompts). With a trace (`--trace`) the lengths come from its records instead: the pool's
//! prompts are drawn at the trace's longest prompt, and a generation takes the first
//! `prompt_tokens` tokens of a pool prompt; every distinct (pool prompt, length) pair used is
//! one entry of [`Workload::prompts`]. A small pool is the point: devices given the same prompt, with greedy sampling,
//! receive the same tokens, so the replayed edge compute ([`crate::replay`]) is shared
//! between them. The server sees identical prompts too (its prefix sharing may adopt their
//! KV); a larger `--prompt-pool` makes the prompts more varied and that sharing rarer.

use std::collections::HashMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{FixedPrompts, LoadConfig, Trace};

/// Index of a prompt in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PromptId(pub usize);

/// One generation a device will ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationPlan {
    pub prompt: PromptId,
    /// The `Open`'s `max_tokens`.
    pub max_tokens: u32,
    /// Pause before it (zero for a device's first generation).
    pub think: Duration,
}

/// What one device does: wait `start`, then run `generations` one after the other.
#[derive(Clone, Debug, PartialEq)]
pub struct DevicePlan {
    pub start: Duration,
    pub generations: Vec<GenerationPlan>,
}

/// The whole run's workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Token ids of each prompt; index = [`PromptId`].
    pub prompts: Vec<Vec<u32>>,
    pub devices: Vec<DevicePlan>,
}

/// What the workload needs to know about the model.
#[derive(Clone, Debug)]
pub struct Vocabulary {
    pub size: u32,
    /// Ids a prompt must not contain (end of sequence).
    pub excluded: Vec<u32>,
}

impl Workload {
    /// Draws the workload of `cfg` (see the module doc).
    pub fn draw(cfg: &LoadConfig, vocab: &Vocabulary) -> Self {
        let stream =
            |n: u64| StdRng::seed_from_u64(cfg.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (mut prompt_rng, mut arrival_rng, mut gen_rng) = (stream(1), stream(2), stream(3));
        let starts = cfg.arrival.offsets(cfg.devices, &mut arrival_rng);
        let streams = Streams {
            prompt: &mut prompt_rng,
            generation: &mut gen_rng,
        };
        match &cfg.trace {
            None => Self::draw_from_pool(cfg, vocab, starts, streams),
            Some(trace) => Self::draw_from_trace(cfg, trace, vocab, starts, streams),
        }
    }

    /// Without a trace: the pool's prompts (given, or drawn at the configured lengths), and
    /// each generation's prompt and output length drawn from it.
    fn draw_from_pool(
        cfg: &LoadConfig,
        vocab: &Vocabulary,
        starts: Vec<Duration>,
        streams: Streams<'_>,
    ) -> Self {
        let Streams {
            prompt: prompt_rng,
            generation: gen_rng,
        } = streams;
        let prompts: Vec<Vec<u32>> = match &cfg.prompts {
            Some(FixedPrompts::Ids(given)) => given.clone(),
            _ => (0..cfg.prompt_pool)
                .map(|_| {
                    let len = cfg.prompt_tokens.sample(prompt_rng) as usize;
                    random_prompt(prompt_rng, len, vocab)
                })
                .collect(),
        };
        let pool = prompts.len();
        let per_device = cfg.generations_per_device as usize;
        let devices = starts
            .into_iter()
            .map(|start| DevicePlan {
                start,
                generations: (0..per_device)
                    .map(|j| GenerationPlan {
                        prompt: PromptId(gen_rng.random_range(0..pool)),
                        max_tokens: cfg.output_tokens.sample(gen_rng),
                        think: if j == 0 { Duration::ZERO } else { cfg.think },
                    })
                    .collect(),
            })
            .collect();
        Self { prompts, devices }
    }

    /// With a trace: lengths and think times from its records, prompts cut from a pool drawn
    /// at the trace's longest prompt.
    fn draw_from_trace(
        cfg: &LoadConfig,
        trace: &Trace,
        vocab: &Vocabulary,
        starts: Vec<Duration>,
        streams: Streams<'_>,
    ) -> Self {
        let Streams {
            prompt: prompt_rng,
            generation: gen_rng,
        } = streams;
        let per_device = cfg.generations_per_device as usize;
        let longest = cfg.max_prompt_tokens() as usize;
        let pool: Vec<Vec<u32>> = (0..cfg.prompt_pool)
            .map(|_| random_prompt(prompt_rng, longest, vocab))
            .collect();
        let mut prompts: Vec<Vec<u32>> = Vec::new();
        let mut ids: HashMap<(usize, usize), PromptId> = HashMap::new();
        let mut devices: Vec<DevicePlan> = starts
            .into_iter()
            .map(|start| DevicePlan {
                start,
                generations: Vec::with_capacity(per_device),
            })
            .collect();
        // Round by round, as the trace's records are taken (see `Trace::record`).
        for j in 0..per_device {
            for (d, device) in devices.iter_mut().enumerate() {
                let r = trace.record(d, j, cfg.devices);
                let entry = gen_rng.random_range(0..cfg.prompt_pool);
                let len = r.prompt_tokens as usize;
                let prompt = *ids.entry((entry, len)).or_insert_with(|| {
                    prompts.push(pool[entry][..len].to_vec());
                    PromptId(prompts.len() - 1)
                });
                let think = match (j, r.think_ms) {
                    (0, _) => Duration::ZERO,
                    (_, Some(ms)) => Duration::from_millis(ms),
                    (_, None) => cfg.think,
                };
                device.generations.push(GenerationPlan {
                    prompt,
                    max_tokens: r.output_tokens,
                    think,
                });
            }
        }
        Self { prompts, devices }
    }

    /// Generations planned over all devices.
    pub fn generations(&self) -> usize {
        self.devices.iter().map(|d| d.generations.len()).sum()
    }
}

/// The RNG streams the prompts and the generations are drawn from (the arrivals have their
/// own, used before).
struct Streams<'a> {
    prompt: &'a mut StdRng,
    generation: &'a mut StdRng,
}

/// `len` random token ids, none of them excluded.
fn random_prompt(rng: &mut StdRng, len: usize, vocab: &Vocabulary) -> Vec<u32> {
    (0..len)
        .map(|_| loop {
            let t = rng.random_range(0..vocab.size);
            if !vocab.excluded.contains(&t) {
                break t;
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arrival, LengthDist, Trace};

    fn cfg() -> LoadConfig {
        let mut c = LoadConfig::new("ws://127.0.0.1:1/v1/edge/ws", "edge", 50);
        c.prompt_tokens = LengthDist::uniform(3, 9).expect("u");
        c.output_tokens = LengthDist::uniform(1, 4).expect("u");
        c.generations_per_device = 3;
        c.prompt_pool = 5;
        c.seed = 42;
        c
    }

    fn vocab() -> Vocabulary {
        Vocabulary {
            size: 10,
            excluded: vec![2, 3],
        }
    }

    #[test]
    fn draws_within_the_distributions() {
        let w = Workload::draw(&cfg(), &vocab());
        assert_eq!(w.prompts.len(), 5);
        for p in &w.prompts {
            assert!((3..=9).contains(&p.len()));
            assert!(p.iter().all(|&t| t < 10 && t != 2 && t != 3), "{p:?}");
        }
        assert_eq!(w.devices.len(), 50);
        assert_eq!(w.generations(), 150);
        for d in &w.devices {
            assert!(d.start.is_zero());
            for g in &d.generations {
                assert!(g.prompt.0 < 5);
                assert!((1..=4).contains(&g.max_tokens));
            }
        }
    }

    #[test]
    fn same_seed_same_workload_and_streams_are_independent() {
        let a = Workload::draw(&cfg(), &vocab());
        assert_eq!(a, Workload::draw(&cfg(), &vocab()));

        let mut other_seed = cfg();
        other_seed.seed = 43;
        assert_ne!(a.prompts, Workload::draw(&other_seed, &vocab()).prompts);

        // Another arrival process moves the starts only.
        let mut poisson = cfg();
        poisson.arrival = Arrival::Poisson(crate::config::Rate::new(10.0).expect("rate"));
        let b = Workload::draw(&poisson, &vocab());
        assert_eq!(a.prompts, b.prompts);
        let gens = |w: &Workload| -> Vec<Vec<GenerationPlan>> {
            w.devices.iter().map(|d| d.generations.clone()).collect()
        };
        assert_eq!(gens(&a), gens(&b));
        assert!(b.devices.iter().any(|d| !d.start.is_zero()));
    }

    #[test]
    fn think_time_comes_before_every_generation_but_the_first() {
        let mut c = cfg();
        c.think = Duration::from_millis(70);
        let w = Workload::draw(&c, &vocab());
        for d in &w.devices {
            let thinks: Vec<u128> = d.generations.iter().map(|g| g.think.as_millis()).collect();
            assert_eq!(thinks, [0, 70, 70]);
        }
    }

    #[test]
    fn a_trace_sets_lengths_and_think_times_in_order() {
        let mut c = cfg();
        c.devices = 4;
        c.prompt_pool = 2;
        c.think = Duration::from_millis(5);
        c.trace = Some(
            Trace::parse(
                r#"[{"prompt_tokens": 3, "output_tokens": 7, "think_ms": 100},
                    {"prompt_tokens": 6, "output_tokens": 1},
                    {"prompt_tokens": 3, "output_tokens": 2}]"#,
                "t",
            )
            .expect("trace"),
        );
        let w = Workload::draw(&c, &vocab());
        // Record (generation j * 4 devices + device d) % 3.
        for (d, device) in w.devices.iter().enumerate() {
            for (j, g) in device.generations.iter().enumerate() {
                let want = [(3, 7, 100), (6, 1, 5), (3, 2, 5)][(j * 4 + d) % 3];
                assert_eq!(w.prompts[g.prompt.0].len(), want.0, "d{d} g{j}");
                assert_eq!(g.max_tokens, want.1, "d{d} g{j}");
                let think = if j == 0 { 0 } else { want.2 };
                assert_eq!(g.think.as_millis(), think, "d{d} g{j}");
            }
        }
        // A length-3 prompt is the start of a length-6 one from the same pool entry, and no
        // (entry, length) pair is stored twice.
        assert!(w.prompts.len() <= 2 * 2, "{}", w.prompts.len());
        let mut seen = w.prompts.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), w.prompts.len());
        for p in &w.prompts {
            assert!(p.iter().all(|&t| t < 10 && t != 2 && t != 3));
        }
        assert_eq!(w, Workload::draw(&c, &vocab()));
    }
}
