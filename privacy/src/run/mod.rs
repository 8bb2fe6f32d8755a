//! The audit loop: per split depth, wire encoding and noise level, utility and recovery.
//! See the crate doc ([`crate`]).
//!
//! # Layout
//! - this module: [`audit`], which loads what every depth shares, then per depth the models,
//!   the training rows, the output pairs and the noise-free references, and runs its cells;
//! - `settings`: [`AuditSettings`], [`NoiseLevel`], [`ExhaustiveSettings`], [`AuditInputs`];
//! - `report`: [`AuditReport`], [`Cell`], [`PromptSummary`] and the progress line;
//! - `rows`: the reference run, the release of rows through noise and the wire, the training
//!   sequences and the seeds;
//! - `cell`: one cell, from its noise to its row of the table.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use tandem_model::checkpoint::Checkpoint;
use tandem_model::split::{LoadOptions, EMBED};
use tandem_model::{CloudModel, EdgeModel, SplitPoint};

use crate::attack::{edge_rows, EmbeddingIndex};
use crate::pairs::{self, Generation, PairSet};

mod cell;
mod report;
mod rows;
mod settings;

use cell::{run_cell, Depth};
use report::{empty_report, progress_line};
use rows::{median_norm, mix, reference, training_sequences};

pub use report::{AuditReport, Cell, PromptSummary};
pub use settings::{AuditInputs, AuditSettings, ExhaustiveSettings, NoiseLevel};

/// Runs the audit. `progress` receives one line per step of the work (no prompt text).
pub fn audit(
    ck: &Checkpoint,
    inputs: &AuditInputs<'_>,
    settings: &AuditSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<AuditReport> {
    let cfg = &ck.config;
    let device = Device::Cpu;
    let d = cfg.hidden_size;
    let targets = Targets::load(ck, &inputs.excluded)?;
    let mut generations: Option<Vec<Generation>> = None;
    let lo = LoadOptions {
        dtype: DType::F32,
        device: &device,
    };
    let mut report = empty_report(ck, inputs, settings);
    let train_seqs = training_sequences(
        inputs.generic,
        inputs.bos,
        settings,
        cfg.vocab_size,
        &inputs.excluded,
    );
    for (ki, &k) in settings.edge_layers.iter().enumerate() {
        let split = SplitPoint::new(k, cfg.num_hidden_layers)?;
        progress(&format!("k={k}: loading the edge and cloud parts"));
        let edge = EdgeModel::load(ck.tensors.as_ref(), cfg, split, lo)?;
        let cloud = CloudModel::load(ck.tensors.as_ref(), cfg, split, lo)?;
        let parts = (&edge, &cloud);
        let pair_set = output_pairs(parts, inputs, settings, &mut generations, progress)?;
        let (train_rows, train_tokens) = training_rows(&edge, &train_seqs, inputs.bos)?;
        let clip = match settings.clip {
            Some(c) => c,
            None => median_norm(&train_rows, d),
        };
        report.clip_by_depth.push((k, clip));
        progress(&format!(
            "k={k}: {} training rows, clip bound {clip:.3}; noise-free reference over {} prompts",
            train_tokens.len(),
            inputs.prompts.len()
        ));
        let refs = inputs
            .prompts
            .iter()
            .map(|p| reference(&edge, &cloud, p, settings.gen_tokens))
            .collect::<Result<Vec<_>>>()?;
        let depth = Depth {
            k,
            edge: &edge,
            cloud: &cloud,
            index: &targets.index,
            embed: &targets.embed,
            train_rows: &train_rows,
            train_tokens: &train_tokens,
            refs: &refs,
            clip,
            pairs: &pair_set,
            head: &targets.head,
            head_index: &targets.head_index,
        };
        for (wi, &wire) in settings.wire.iter().enumerate() {
            for (li, level) in settings.noise.iter().enumerate() {
                let coord = [ki as u64, wi as u64, li as u64];
                let cell = run_cell(&depth, inputs, settings, wire, *level, coord)?;
                progress(&progress_line(&cell));
                report.cells.push(cell);
            }
        }
    }
    Ok(report)
}

/// What the attackers map rows back to, the same at every depth: the embedding matrix and
/// the LM head, each with its index (`excluded` tokens never guessed).
struct Targets {
    embed: Tensor,
    index: EmbeddingIndex,
    /// The output-pairs attacker's target space: the LM head the server runs anyway.
    head: Tensor,
    head_index: EmbeddingIndex,
}

impl Targets {
    fn load(ck: &Checkpoint, excluded: &[u32]) -> Result<Self> {
        let cfg = &ck.config;
        let embed = ck
            .tensors
            .load(
                EMBED,
                &[cfg.vocab_size, cfg.hidden_size],
                DType::F32,
                &Device::Cpu,
            )
            .context("loading the embedding matrix")?;
        let index = EmbeddingIndex::new(&embed, excluded.to_vec())?;
        let head = pairs::lm_head(ck).context("loading the LM head")?;
        let head_index = EmbeddingIndex::new(&head, excluded.to_vec())?;
        Ok(Self {
            embed,
            index,
            head,
            head_index,
        })
    }
}

/// The learned attacker's training rows at this depth and their tokens (BOS rows left out:
/// they are known and atypically long).
fn training_rows(
    edge: &EdgeModel,
    seqs: &[Vec<u32>],
    bos: Option<u32>,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let d = edge.config().hidden_size;
    let skip = usize::from(bos.is_some());
    let mut train_rows = Vec::new();
    let mut train_tokens = Vec::new();
    for s in seqs {
        let rows = edge_rows(edge, s)?;
        train_rows.extend_from_slice(&rows[skip * d..]);
        train_tokens.extend_from_slice(&s[skip..]);
    }
    Ok((train_rows, train_tokens))
}

/// The noise-free output pairs at this depth: the earlier generations are sampled on the
/// first call (the split is exact, so they do not depend on the depth) and kept in
/// `generations`. Empty when the attack is off or there are no earlier requests.
fn output_pairs(
    (edge, cloud): (&EdgeModel, &CloudModel),
    inputs: &AuditInputs<'_>,
    settings: &AuditSettings,
    generations: &mut Option<Vec<Generation>>,
    progress: &mut dyn FnMut(&str),
) -> Result<PairSet> {
    let most = settings.output_pairs.iter().copied().max().unwrap_or(0);
    if most == 0 || inputs.earlier.is_empty() {
        return Ok(PairSet::default());
    }
    if generations.is_none() {
        let each = most.div_ceil(inputs.earlier.len());
        progress(&format!(
            "sampling {each} output tokens after each of {} earlier requests",
            inputs.earlier.len()
        ));
        let seed = mix(settings.seed, &[0x0A7F]);
        let g = pairs::generate(edge, cloud, inputs.earlier, each, &inputs.excluded, seed)?;
        *generations = Some(g);
    }
    PairSet::collect(edge, generations.as_deref().unwrap_or_default())
}
