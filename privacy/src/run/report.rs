//! What the audit found: a [`Cell`] per depth, wire encoding and noise level, gathered in
//! the [`AuditReport`] (prompt names and sizes, never their text), and the one-line progress
//! summary of a cell.

use serde::Serialize;
use tandem_model::checkpoint::Checkpoint;

use super::settings::{AuditInputs, AuditSettings};
use crate::cost::{edge_cost, EdgeCost};
use crate::pairs::PairsRecovery;
use crate::score::ExhaustiveSummary;

/// One row of the result table.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub edge_layers: usize,
    pub wire: String,
    pub noise: String,
    /// Per-row epsilon (`None`: no noise or clip only).
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    pub clip: Option<f32>,
    pub sigma: f64,
    /// Composed over the average prompt's rows (zCDP or basic, the smaller), at
    /// `delta_total = rows·delta`.
    pub prompt_epsilon: Option<f64>,
    pub prompt_delta: Option<f64>,
    pub tokens: usize,
    pub sensitive_tokens: usize,
    pub nn_recovery: f64,
    pub nn_sensitive_recovery: f64,
    pub learned_recovery: f64,
    pub learned_sensitive_recovery: f64,
    /// The exhaustive attack (when run).
    pub exhaustive: Option<ExhaustiveSummary>,
    /// The output-pairs attacker, one entry per number of pairs.
    pub output_pairs: Vec<PairsRecovery>,
    pub greedy_agreement: f64,
    /// The largest absolute logit difference from the noise-free f32 run, over every step.
    pub max_logit_drift: f64,
    /// The mean over steps of each step's largest absolute logit difference.
    pub mean_logit_drift: f64,
    /// Hidden-state payload per token on the wire (a one-token frame adds 28 bytes).
    pub payload_bytes_per_token: usize,
    pub seconds: f64,
}

impl Cell {
    /// The best sensitive-token recovery of all the attacks run.
    pub fn best_sensitive_recovery(&self) -> f64 {
        let strong = self
            .exhaustive
            .as_ref()
            .map_or(0.0, |e| e.sensitive_recovery);
        let pairs = self.output_pairs.iter().fold(0.0, |m: f64, p| {
            m.max(p.centroid_sensitive_recovery)
                .max(p.linear_sensitive_recovery)
        });
        self.nn_sensitive_recovery
            .max(self.learned_sensitive_recovery)
            .max(strong)
            .max(pairs)
    }
}

/// Everything the audit found.
#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    pub model: String,
    pub settings: AuditSettings,
    pub prompts: Vec<PromptSummary>,
    pub costs: Vec<EdgeCost>,
    /// The clip bound used at each depth.
    pub clip_by_depth: Vec<(usize, f32)>,
    pub cells: Vec<Cell>,
}

/// A prompt's name and sizes (never its text).
#[derive(Clone, Debug, Serialize)]
pub struct PromptSummary {
    pub name: String,
    pub tokens: usize,
    pub sensitive_tokens: usize,
}

/// The report before any cell: the prompts' sizes and the edge's costs.
pub(super) fn empty_report(
    ck: &Checkpoint,
    inputs: &AuditInputs<'_>,
    settings: &AuditSettings,
) -> AuditReport {
    AuditReport {
        model: ck.path.display().to_string(),
        settings: settings.clone(),
        prompts: inputs
            .prompts
            .iter()
            .map(|p| PromptSummary {
                name: p.name.clone(),
                tokens: p.scored().len(),
                sensitive_tokens: p.scored().filter(|&i| p.sensitive[i]).count(),
            })
            .collect(),
        costs: settings
            .edge_layers
            .iter()
            .map(|&k| edge_cost(&ck.config, k, settings.context))
            .collect(),
        clip_by_depth: Vec::new(),
        cells: Vec::new(),
    }
}

/// One cell's results in one line (no prompt text).
pub(super) fn progress_line(cell: &Cell) -> String {
    let ex = cell.exhaustive.as_ref().map_or(String::new(), |e| {
        format!(
            ", exhaustive {:.1}% (sensitive {:.1}%, {:.0} candidates/position, {:.1}s)",
            100.0 * e.recovery,
            100.0 * e.sensitive_recovery,
            e.mean_candidates,
            e.seconds
        )
    });
    let pairs = cell.output_pairs.last().map_or(String::new(), |p| {
        format!(
            ", {} pairs: centroid {:.1}% linear {:.1}%",
            p.pairs,
            100.0 * p.centroid_recovery,
            100.0 * p.linear_recovery
        )
    });
    format!(
        "k={} wire={} noise={}: nn {:.1}% (sensitive {:.1}%), learned {:.1}%{ex}{pairs}, \
         agreement {:.1}%, drift {:.3} in {:.1}s",
        cell.edge_layers,
        cell.wire,
        cell.noise,
        100.0 * cell.nn_recovery,
        100.0 * cell.nn_sensitive_recovery,
        100.0 * cell.learned_recovery,
        100.0 * cell.greedy_agreement,
        cell.max_logit_drift,
        cell.seconds
    )
}
