//! What the audit is asked to do: its settings ([`AuditSettings`], [`NoiseLevel`],
//! [`ExhaustiveSettings`], with the command's defaults) and its inputs besides the
//! checkpoint ([`AuditInputs`]).

use anyhow::Result;
use serde::Serialize;
use tandem_protocol::HiddenDtype;

use crate::prompts::AuditPrompt;

/// One noise setting of the audit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum NoiseLevel {
    /// Rows leave as computed.
    None,
    /// Clip to the bound and add noise calibrated to this per-row epsilon (`inf`: clip only).
    Dp { epsilon: f64 },
}

impl NoiseLevel {
    pub fn label(&self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Dp { epsilon } if epsilon.is_infinite() => "clip".into(),
            Self::Dp { epsilon } => format!("eps={epsilon}"),
        }
    }
}

impl std::str::FromStr for NoiseLevel {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "none" => Ok(Self::None),
            "inf" | "clip" => Ok(Self::Dp {
                epsilon: f64::INFINITY,
            }),
            other => match other.parse::<f64>() {
                Ok(e) if e > 0.0 => Ok(Self::Dp { epsilon: e }),
                _ => Err(format!(
                    "noise level `{other}`: none, inf (clip only) or a positive epsilon"
                )),
            },
        }
    }
}

/// What to audit.
#[derive(Clone, Debug, Serialize)]
pub struct AuditSettings {
    pub edge_layers: Vec<usize>,
    #[serde(serialize_with = "wire_names")]
    pub wire: Vec<HiddenDtype>,
    pub noise: Vec<NoiseLevel>,
    /// Per-row delta of every noise level.
    pub delta: f64,
    /// Clip bound; `None`: the median row norm of the generic text at each depth.
    pub clip: Option<f32>,
    /// Shortlist size per source for the nearest-neighbour attack.
    pub shortlist: usize,
    /// The exhaustive attack; `None` skips it.
    pub exhaustive: Option<ExhaustiveSettings>,
    /// Numbers of output pairs the output-pairs attacker fits on (empty: skipped).
    pub output_pairs: Vec<usize>,
    /// Teacher-forced steps compared for utility (the first is the prompt's next token).
    pub gen_tokens: usize,
    /// Random-token training sequences for the learned attack (besides the generic text).
    pub random_sequences: usize,
    /// Tokens per training sequence.
    pub train_seq_len: usize,
    /// Ridge penalty, relative to the mean Gram diagonal.
    pub ridge: f64,
    /// Context length at which the edge's attention FLOPs are counted.
    pub context: usize,
    pub seed: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            edge_layers: vec![1],
            wire: vec![HiddenDtype::F32],
            noise: vec![NoiseLevel::None],
            delta: 1e-5,
            clip: None,
            shortlist: 64,
            exhaustive: Some(ExhaustiveSettings::default()),
            output_pairs: vec![256, 1024, 4096],
            gen_tokens: 16,
            random_sequences: 24,
            train_seq_len: 48,
            ridge: 1e-3,
            context: 512,
            seed: 0,
        }
    }
}

/// How the exhaustive attack searches (see [`crate::exhaustive`]).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ExhaustiveSettings {
    /// Candidates per position on noise-free cells (no noise, or clipping only), which stop
    /// at the exact match before it (`None`: every non-special token).
    pub budget: Option<usize>,
    /// Candidates per position on noisy cells (`None`: every non-special token).
    pub noisy_budget: Option<usize>,
    /// Round-off tolerance of the exact match, relative to the row's norm.
    pub match_tolerance: f64,
}

impl Default for ExhaustiveSettings {
    fn default() -> Self {
        Self {
            budget: None,
            noisy_budget: Some(1024),
            match_tolerance: 1e-3,
        }
    }
}

fn wire_names<S: serde::Serializer>(v: &[HiddenDtype], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|d| d.as_str()))
}

/// Inputs the audit needs besides the checkpoint.
#[derive(Debug)]
pub struct AuditInputs<'a> {
    pub prompts: &'a [AuditPrompt],
    /// The generic training text, tokenized without special tokens.
    pub generic: &'a [u32],
    /// Token ids never guessed and never used for training (special tokens).
    pub excluded: Vec<u32>,
    pub bos: Option<u32>,
    /// Earlier requests of the same device (tokenized, BOS first when there is one): the
    /// output-pairs attacker learns from the outputs generated after them.
    pub earlier: &'a [Vec<u32>],
}
