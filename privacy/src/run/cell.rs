//! One cell of the audit (a wire encoding and a noise level at one split depth): release
//! the rows as the device would, fit the attackers on rows released the same way, then
//! measure utility and recovery on every prompt.
//!
//! What a depth shares between its cells (the models, the noise-free references, the
//! training rows and the output pairs) is computed once by [`super::audit`] and lent to each
//! cell as a [`Depth`]; a cell only adds its noise, which is seeded from its coordinate.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use tandem_model::privacy::{DpConfig, GaussianMechanism, RowNoiser};
use tandem_model::{CloudModel, EdgeModel};
use tandem_protocol::HiddenDtype;

use super::report::Cell;
use super::rows::{argmax, cloud_logits, mix, release, Reference};
use super::settings::{AuditInputs, AuditSettings, ExhaustiveSettings, NoiseLevel};
use crate::attack::{AttackerView, EmbeddingIndex, NearestNeighbour, RidgeDecoder};
use crate::cost::edge_cost;
use crate::exhaustive::{Exhaustive, StopRule};
use crate::pairs::{PairSet, PairsAttack};
use crate::prompts::AuditPrompt;
use crate::score::{ratio, Tally};

/// What one split depth shares between its cells.
pub(super) struct Depth<'a> {
    pub(super) k: usize,
    pub(super) edge: &'a EdgeModel,
    pub(super) cloud: &'a CloudModel,
    pub(super) index: &'a EmbeddingIndex,
    pub(super) embed: &'a Tensor,
    pub(super) train_rows: &'a [f32],
    pub(super) train_tokens: &'a [u32],
    pub(super) refs: &'a [Reference],
    pub(super) clip: f32,
    /// Noise-free output pairs of earlier generations (empty: no pairs attack).
    pub(super) pairs: &'a PairSet,
    pub(super) head: &'a Tensor,
    pub(super) head_index: &'a EmbeddingIndex,
}

/// The attackers of one cell.
struct Attackers<'a> {
    nn: NearestNeighbour<'a>,
    decoder: RidgeDecoder,
    exhaustive: Option<Exhaustive<'a>>,
    pairs: Vec<PairsAttack>,
}

/// The exhaustive attack of a cell: the exact-match stop where the rows carry no noise.
fn exhaustive_attack<'a>(
    depth: &Depth<'a>,
    ex: ExhaustiveSettings,
    view: AttackerView,
    noise_free: bool,
) -> Exhaustive<'a> {
    let (stop, budget) = if noise_free {
        let relative = ex.match_tolerance;
        (StopRule::ExactMatch { relative }, ex.budget)
    } else {
        (StopRule::Nearest, ex.noisy_budget)
    };
    Exhaustive {
        edge: depth.edge,
        index: depth.index,
        view,
        stop,
        budget,
    }
}

/// One wire encoding and noise level at one depth: train the learned attacker on rows
/// released the same way, then score every prompt.
pub(super) fn run_cell(
    depth: &Depth<'_>,
    inputs: &AuditInputs<'_>,
    settings: &AuditSettings,
    wire: HiddenDtype,
    level: NoiseLevel,
    coord: [u64; 3],
) -> Result<Cell> {
    let started = Instant::now();
    let cell = CellAudit::new(depth, settings, wire, level, coord)?;
    let attackers = cell.attackers()?;
    let mut tally = Tally::default();
    for (pi, (p, r)) in inputs.prompts.iter().zip(depth.refs).enumerate() {
        let received = cell.release(&r.rows, pi as u64)?;
        score_prompt(depth, &attackers, p, r, &received, &mut tally)?;
    }
    Ok(cell.result(&attackers, &tally, inputs.prompts.len(), started))
}

/// A cell in progress: its depth, its wire encoding and its noise.
struct CellAudit<'d, 'a> {
    depth: &'d Depth<'a>,
    settings: &'d AuditSettings,
    wire: HiddenDtype,
    level: NoiseLevel,
    /// `None`: the rows leave as computed.
    mech: Option<GaussianMechanism>,
    /// The cell's place in the audit (depth, wire, noise): seeds its noise streams.
    coord: [u64; 3],
}

impl<'d, 'a> CellAudit<'d, 'a> {
    fn new(
        depth: &'d Depth<'a>,
        settings: &'d AuditSettings,
        wire: HiddenDtype,
        level: NoiseLevel,
        coord: [u64; 3],
    ) -> Result<Self> {
        let mech = match level {
            NoiseLevel::None => None,
            NoiseLevel::Dp { epsilon } => Some(GaussianMechanism::new(DpConfig::new(
                epsilon,
                settings.delta,
                depth.clip,
            ))?),
        };
        Ok(Self {
            depth,
            settings,
            wire,
            level,
            mech,
            coord,
        })
    }

    fn hidden_size(&self) -> usize {
        self.depth.edge.config().hidden_size
    }

    /// `rows` as the cloud receives them: clipped and noised on noise stream `stream` (one
    /// per prompt, and one each for the training rows and the output pairs), then through
    /// the wire.
    fn release(&self, rows: &[f32], stream: u64) -> Result<Vec<f32>> {
        let mut noiser = self.mech.map(|m| {
            let [a, b, c] = self.coord;
            RowNoiser::new(m, Some(mix(self.settings.seed, &[a, b, c, stream])))
        });
        release(rows, self.hidden_size(), noiser.as_mut(), self.wire)
    }

    /// The attackers, fitted on rows released as this cell releases them.
    fn attackers(&self) -> Result<Attackers<'a>> {
        let (depth, settings, d) = (self.depth, self.settings, self.hidden_size());
        let noisy_train = self.release(depth.train_rows, u64::MAX)?;
        let decoder = RidgeDecoder::fit(
            &noisy_train,
            depth.train_tokens,
            depth.embed,
            settings.ridge,
        )?;
        let view = AttackerView {
            clip: self.mech.map(|m| m.clip()),
            wire: self.wire,
        };
        let noise_free = self.mech.is_none_or(|m| m.sigma() == 0.0);
        let exhaustive = settings
            .exhaustive
            .map(|ex| exhaustive_attack(depth, ex, view, noise_free));
        let released_pairs = PairSet {
            rows: self.release(&depth.pairs.rows, u64::MAX - 1)?,
            tokens: depth.pairs.tokens.clone(),
        };
        let pairs = if released_pairs.tokens.is_empty() {
            Vec::new()
        } else {
            settings
                .output_pairs
                .iter()
                .filter(|&&n| n > 0)
                .map(|&n| PairsAttack::fit(&released_pairs, n, d, depth.head, settings.ridge))
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Attackers {
            nn: NearestNeighbour {
                edge: depth.edge,
                index: depth.index,
                shortlist: settings.shortlist,
                view,
            },
            decoder,
            exhaustive,
            pairs,
        })
    }

    /// The cell's row of the table, from what `prompts` prompts added to `tally`.
    fn result(
        &self,
        attackers: &Attackers<'_>,
        tally: &Tally,
        prompts: usize,
        started: Instant,
    ) -> Cell {
        let (mech, wire) = (self.mech, self.wire);
        let exhaustive = attackers.exhaustive.as_ref().map(|ex| {
            let stop = match ex.stop {
                StopRule::ExactMatch { .. } => "exact_match",
                StopRule::Nearest => "nearest",
            };
            tally
                .exhaustive
                .summary(tally.tokens, tally.sensitive, stop, ex.budget)
        });
        let pair_sizes: Vec<(usize, usize)> = attackers
            .pairs
            .iter()
            .map(|a| (a.pairs, a.centroid.len()))
            .collect();
        let avg_rows = tally.rows / prompts.max(1);
        let composed = mech.map(|m| m.compose(avg_rows));
        Cell {
            edge_layers: self.depth.k,
            wire: wire.as_str().to_owned(),
            noise: self.level.label(),
            epsilon: mech
                .and_then(|m| m.config().epsilon.is_finite().then_some(m.config().epsilon)),
            delta: mech.map(|m| m.config().delta),
            clip: mech.map(|m| m.clip()),
            sigma: mech.map_or(0.0, |m| m.sigma()),
            prompt_epsilon: composed.as_ref().and_then(|c| c.epsilon),
            prompt_delta: composed.as_ref().map(|c| c.basic_delta),
            tokens: tally.tokens,
            sensitive_tokens: tally.sensitive,
            nn_recovery: ratio(tally.nn, tally.tokens),
            nn_sensitive_recovery: ratio(tally.nn_sensitive, tally.sensitive),
            learned_recovery: ratio(tally.learned, tally.tokens),
            learned_sensitive_recovery: ratio(tally.learned_sensitive, tally.sensitive),
            exhaustive,
            output_pairs: tally.pairs_recovery(&pair_sizes),
            greedy_agreement: ratio(tally.agree, tally.steps),
            max_logit_drift: tally.drift,
            mean_logit_drift: if tally.steps == 0 {
                0.0
            } else {
                tally.drift_sum / tally.steps as f64
            },
            payload_bytes_per_token: wire.payload_len(1, self.hidden_size()).unwrap_or(0),
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// Utility and every attack on one prompt's released rows.
fn score_prompt(
    depth: &Depth<'_>,
    att: &Attackers<'_>,
    p: &AuditPrompt,
    r: &Reference,
    received: &[f32],
    tally: &mut Tally,
) -> Result<()> {
    let d = depth.edge.config().hidden_size;
    // Utility: teacher-forced steps from the last prompt row on.
    let logits = cloud_logits(depth.cloud, received, d)?;
    let first = p.ids.len() - 1;
    for (step, want) in r.logits.iter().enumerate() {
        let got = &logits[first + step];
        tally.steps += 1;
        tally.agree += usize::from(argmax(got) == r.tokens[step]);
        let drift = got
            .iter()
            .zip(want)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        tally.drift = tally.drift.max(drift);
        tally.drift_sum += drift;
    }
    // Attacks on the prompt's rows.
    let prompt_rows = &received[..p.ids.len() * d];
    let known = p.starts_with_bos.then(|| p.ids[0]);
    let nn_guess = att.nn.invert(prompt_rows, known, Some(&att.decoder))?;
    let learned_guess = att.decoder.decode(prompt_rows, d, depth.index)?;
    for i in p.scored() {
        tally.count(
            p.sensitive[i],
            nn_guess[i] == p.ids[i],
            learned_guess[i] == p.ids[i],
        );
    }
    if let Some(ex) = &att.exhaustive {
        let started = std::time::Instant::now();
        // The guided order's hints: the learned decoder's and the output-pairs decoder's.
        let rows = Tensor::from_slice(prompt_rows, (p.ids.len(), d), &Device::Cpu)?;
        let mut hints = vec![att.decoder.scores(&rows, depth.index)?];
        if let Some(a) = att.pairs.last() {
            hints.push(a.linear.scores(&rows, depth.head_index)?);
        }
        let outcomes = ex.invert(prompt_rows, known, &hints)?;
        tally.exhaustive.seconds += started.elapsed().as_secs_f64();
        let cfg = depth.edge.config();
        let vocab = cfg.vocab_size - depth.index.excluded().len();
        let limit = ex.budget.map_or(vocab, |b| b.min(vocab));
        for i in p.scored() {
            let flops = edge_cost(cfg, depth.k, i + 1).flops_per_token as f64;
            let o = &outcomes[i];
            tally
                .exhaustive
                .count(o, o.token == p.ids[i], p.sensitive[i], limit, flops);
        }
    }
    for (ai, a) in att.pairs.iter().enumerate() {
        let (centroid, linear) = a.decode(prompt_rows, d, depth.head_index)?;
        for i in p.scored() {
            let (s, want) = (p.sensitive[i], p.ids[i]);
            tally.count_pairs(ai, s, centroid[i] == want, linear[i] == want);
        }
    }
    tally.rows += p.ids.len();
    Ok(())
}
