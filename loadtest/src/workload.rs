//! The workload of a run, drawn entirely before it starts: the prompt pool, and for every
//! device its start offset and its generations (which prompt, how many output tokens).
//!
//! Drawing it up front makes a run reproducible from its seed and keeps randomness out of
//! the timed part. Each concern has its own RNG stream derived from the seed, so changing
//! e.g. the arrival process does not change the prompts.
//!
//! Prompts are random token ids (never an end-of-sequence id), one length drawn per pool
//! entry. A small pool is the point: devices given the same prompt, with greedy sampling,
//! receive the same tokens, so the replayed edge compute ([`crate::replay`]) is shared
//! between them. The server sees identical prompts too (its prefix sharing may adopt their
//! KV); a larger `--prompt-pool` makes the prompts more varied and that sharing rarer.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::LoadConfig;

/// Index of a prompt in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PromptId(pub usize);

/// One generation a device will ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationPlan {
    pub prompt: PromptId,
    /// The `Open`'s `max_tokens`.
    pub max_tokens: u32,
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

        let prompts = (0..cfg.prompt_pool)
            .map(|_| {
                let len = cfg.prompt_tokens.sample(&mut prompt_rng) as usize;
                (0..len)
                    .map(|_| loop {
                        let t = prompt_rng.random_range(0..vocab.size);
                        if !vocab.excluded.contains(&t) {
                            break t;
                        }
                    })
                    .collect()
            })
            .collect();
        let devices = cfg
            .arrival
            .offsets(cfg.devices, &mut arrival_rng)
            .into_iter()
            .map(|start| DevicePlan {
                start,
                generations: (0..cfg.generations_per_device)
                    .map(|_| GenerationPlan {
                        prompt: PromptId(gen_rng.random_range(0..cfg.prompt_pool)),
                        max_tokens: cfg.output_tokens.sample(&mut gen_rng),
                    })
                    .collect(),
            })
            .collect();
        Self { prompts, devices }
    }

    /// Generations planned over all devices.
    pub fn generations(&self) -> usize {
        self.devices.iter().map(|d| d.generations.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arrival, LengthDist};

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
}
