//! The transparency record: what one generation used and what left the device, for its user.
//!
//! DESIGN.md §1 gives the user the right to see everything about their own data: the
//! provider's system prompt, the third party's template, the profile fields used (as they
//! entered the prompt, after redaction), the redactions, what left the device (split depth,
//! hidden-state chunks, rows, sizes, bytes, noise) and the output. A [`TransparencyRecord`]
//! holds exactly that. It is built from an [`AssembledPrompt`] when the generation starts; the
//! transport fills in the traffic ([`TransparencyRecord::record_sent`],
//! [`TransparencyRecord::record_received`]) and the end ([`TransparencyRecord::finish`]).
//! It serializes with serde for the app, and [`TransparencyRecord::render_text`] is the
//! human-readable summary the CLI prints with `--show-transparency`.
//!
//! The record holds the user's own data (sanitized field values, the user turn, the output):
//! it is for the user's eyes on the device and must not be logged or sent to the cloud.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tandem_model::privacy::{ComposedBudget, GaussianMechanism, RowNoiser};
use tandem_model::EdgeModel;
use tandem_protocol::FinishReason;

use crate::prompt::{AssembledPrompt, FieldUse, PromptTemplate};
use crate::sanitize::Redaction;

/// The model pair and where it is cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Layers run on the device (`k`).
    pub split_depth: usize,
    /// Layers in the whole model (`n`).
    pub num_layers: usize,
    /// The manifest's `pair_id` shared by the edge and the cloud part.
    pub model_pair_id: String,
    /// Values per hidden-state row.
    pub hidden_size: usize,
}

impl ModelInfo {
    /// The split and hidden size of a loaded edge part.
    pub fn from_edge(model: &EdgeModel, model_pair_id: impl Into<String>) -> Self {
        let split = model.split();
        Self {
            split_depth: split.edge_layers(),
            num_layers: split.num_layers(),
            model_pair_id: model_pair_id.into(),
            hidden_size: model.config().hidden_size,
        }
    }
}

/// Hidden states sent to the cloud.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentTraffic {
    /// Hidden-state messages (prompt chunks and one per decode step).
    pub chunks: usize,
    /// Hidden-state rows (one per token position).
    pub rows: usize,
    /// Values per row.
    pub hidden_size: usize,
    /// Element type on the wire (`f32`, `f16`, `bf16`, `int8`); `None` until the transport
    /// says.
    pub dtype: Option<String>,
    /// Bytes sent, framing included.
    pub bytes: u64,
    /// Speculation: rows of tokens the device drafted itself (their ids never left the
    /// device), and how many of those drafts the cloud's tokens confirmed.
    #[serde(default)]
    pub drafted_tokens: u64,
    #[serde(default)]
    pub accepted_drafts: u64,
}

/// Activation compression applied before sending (DESIGN.md §11).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    F16,
    Bf16,
    Int8,
    /// 4-bit groups with the largest values of each row sent as f16.
    Int4,
}

/// Differential-privacy noise applied to the hidden states (DESIGN.md §11): every row sent
/// was clipped to `clip_norm` and got Gaussian noise of standard deviation `sigma`
/// (`tandem_model::privacy` states the mechanism and the accounting).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseRecord {
    /// Each row's L2 norm is clipped to this.
    pub clip_norm: f32,
    /// Standard deviation of the Gaussian noise added.
    pub sigma: f32,
    /// The privacy budget per row, when the mechanism reports one (`None`: infinite).
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// How sigma was calibrated.
    #[serde(default)]
    pub mechanism: String,
    /// L2 sensitivity of one clipped row (replace-one: twice the clip norm).
    #[serde(default)]
    pub sensitivity: f64,
    /// Rows that were clipped and noised (each row is noised once, before compression;
    /// resends after a reconnect resend the same noised bytes).
    #[serde(default)]
    pub rows_noised: usize,
    /// Of those, rows longer than the clip norm.
    #[serde(default)]
    pub rows_clipped: usize,
    /// The budget composed over every row noised so far.
    #[serde(default)]
    pub total: ComposedBudget,
}

impl NoiseRecord {
    /// The record of `mech` before any row was noised.
    pub fn from_mechanism(mech: &GaussianMechanism) -> Self {
        let cfg = mech.config();
        Self {
            clip_norm: mech.clip(),
            sigma: mech.sigma() as f32,
            epsilon: cfg.epsilon.is_finite().then_some(cfg.epsilon),
            delta: Some(cfg.delta),
            mechanism: cfg.calibration.as_str().to_owned(),
            sensitivity: mech.sensitivity(),
            rows_noised: 0,
            rows_clipped: 0,
            total: mech.compose(0),
        }
    }

    /// Updates the counts and the composed budget from the noiser's running totals.
    pub fn update(&mut self, noiser: &RowNoiser) {
        self.rows_noised = noiser.rows();
        self.rows_clipped = noiser.clipped();
        self.total = noiser.mechanism().compose(noiser.rows());
    }
}

/// Everything about one generation that its user may see. See the module doc.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransparencyRecord {
    /// The partner (third party) whose inbox prompt this generation answers; `None` for a
    /// prompt the user's own app made. Left out of the JSON when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    /// The inbox prompt's id (not the one-use ticket); `None` as for `partner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    /// The provider's system prompt, if any.
    pub system_prompt: Option<String>,
    /// The third party's template, as written.
    pub template: String,
    /// The template rendered with the sanitized fields: the user turn the model read.
    pub user_prompt: String,
    /// Profile fields that entered the prompt, with the values that entered it.
    pub fields_used: Vec<FieldUse>,
    /// What the sanitizer removed (rule and count, never the removed text).
    pub redactions: Vec<Redaction>,
    /// Tokens in the chat-formatted prompt.
    pub prompt_tokens: usize,
    /// Leading prompt tokens that are the same for every user (the system turn).
    pub shared_prefix_tokens: usize,
    pub model: ModelInfo,
    pub sent: SentTraffic,
    /// Bytes received from the cloud (tokens and control messages).
    pub bytes_received: u64,
    /// `None`: hidden states were sent uncompressed.
    pub compression: Option<Compression>,
    /// `None`: no noise was added.
    pub noise: Option<NoiseRecord>,
    /// The output text, once finished.
    pub output: Option<String>,
    pub finish_reason: Option<FinishReason>,
}

impl TransparencyRecord {
    /// A record for a generation about to start, with no traffic yet.
    pub fn new(
        model: ModelInfo,
        system_prompt: Option<&str>,
        template: &PromptTemplate,
        prompt: &AssembledPrompt,
    ) -> Self {
        Self::from_parts(model, system_prompt, template.source().to_owned(), prompt)
    }

    /// A record for a prompt assembled from `template` as written (for a conversation of
    /// several templates: all of them, labelled; see `conversation`).
    pub fn from_parts(
        model: ModelInfo,
        system_prompt: Option<&str>,
        template: String,
        prompt: &AssembledPrompt,
    ) -> Self {
        let sent = SentTraffic {
            hidden_size: model.hidden_size,
            ..SentTraffic::default()
        };
        Self {
            partner: None,
            prompt_id: None,
            system_prompt: system_prompt.map(str::to_owned),
            template,
            user_prompt: prompt.user_prompt.clone(),
            fields_used: prompt.fields_used.clone(),
            redactions: prompt.redactions.clone(),
            prompt_tokens: prompt.ids.len(),
            shared_prefix_tokens: prompt.system_prefix_len,
            model,
            sent,
            bytes_received: 0,
            compression: None,
            noise: None,
            output: None,
            finish_reason: None,
        }
    }

    /// Marks the record as answering `partner`'s inbox prompt `prompt_id`.
    pub fn for_partner(mut self, partner: impl Into<String>, prompt_id: impl Into<String>) -> Self {
        self.partner = Some(partner.into());
        self.prompt_id = Some(prompt_id.into());
        self
    }

    /// Counts one hidden-state message of `rows` rows and `bytes` bytes sent.
    pub fn record_sent(&mut self, rows: usize, bytes: u64) {
        self.sent.chunks += 1;
        self.sent.rows += rows;
        self.sent.bytes += bytes;
    }

    /// Counts the drafts of one decode step and how many the cloud confirmed.
    pub fn record_drafts(&mut self, drafted: u64, accepted: u64) {
        self.sent.drafted_tokens += drafted;
        self.sent.accepted_drafts += accepted;
    }

    /// Counts `bytes` received from the cloud.
    pub fn record_received(&mut self, bytes: u64) {
        self.bytes_received += bytes;
    }

    /// Sets the element type of the hidden states on the wire.
    pub fn set_wire_dtype(&mut self, dtype: impl Into<String>) {
        self.sent.dtype = Some(dtype.into());
    }

    /// Records the end of the generation.
    pub fn finish(&mut self, output: impl Into<String>, reason: FinishReason) {
        self.output = Some(output.into());
        self.finish_reason = Some(reason);
    }

    /// A human-readable summary (plain text, lines of at most a few words of framing around
    /// the texts themselves).
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        self.render_inputs(&mut s);
        self.render_traffic(&mut s);
        self.render_output(&mut s);
        s
    }

    fn render_inputs(&self, s: &mut String) {
        let m = &self.model;
        s.push_str("What this generation used\n");
        if let Some(partner) = &self.partner {
            let _ = writeln!(
                s,
                "  Asked by {partner} (inbox prompt {}); they receive the output.",
                self.prompt_id.as_deref().unwrap_or("without an id")
            );
        }
        let _ = writeln!(
            s,
            "  Model pair {}: this device ran the embedding and the first {} of {} layers; \
             the cloud ran the rest and chose each output token.",
            m.model_pair_id, m.split_depth, m.num_layers
        );
        match &self.system_prompt {
            Some(system) => {
                let _ = writeln!(
                    s,
                    "  Provider system prompt (the same for every user; {} of the {} prompt \
                     tokens):",
                    self.shared_prefix_tokens, self.prompt_tokens
                );
                quote(s, system);
            }
            None => {
                let _ = writeln!(
                    s,
                    "  No provider system prompt ({} prompt tokens).",
                    self.prompt_tokens
                );
            }
        }
        s.push_str("  Prompt template:\n");
        quote(s, &self.template);
        if self.fields_used.is_empty() {
            s.push_str("  Profile fields used: none.\n");
        } else {
            s.push_str("  Profile fields the prompt read, after redaction:\n");
            for f in &self.fields_used {
                let _ = writeln!(s, "    - {}: {}", f.name, plain(&f.value));
            }
        }
        if self.redactions.is_empty() {
            s.push_str("  Redactions: none.\n");
        } else {
            s.push_str("  Redacted before use:\n");
            for r in &self.redactions {
                let _ = writeln!(s, "    - {}: {} × {}", r.field, r.count, r.rule);
            }
        }
        s.push_str("  The prompt as the model read it (your turn):\n");
        quote(s, &self.user_prompt);
    }

    fn render_traffic(&self, s: &mut String) {
        let t = &self.sent;
        s.push_str("What left this device\n");
        let _ = writeln!(
            s,
            "  Hidden states after layer {}: {} message{}, {} row{} of {} values ({}), {} bytes.",
            self.model.split_depth,
            t.chunks,
            plural(t.chunks),
            t.rows,
            plural(t.rows),
            t.hidden_size,
            t.dtype.as_deref().unwrap_or("dtype not reported"),
            thousands(t.bytes)
        );
        s.push_str("  No prompt text, no profile values and no prompt token ids were sent.\n");
        if t.drafted_tokens > 0 {
            let _ = writeln!(
                s,
                "  Of those rows, {} were tokens this device guessed ahead (their ids were not \
                 sent); the cloud's tokens confirmed {}.",
                t.drafted_tokens, t.accepted_drafts
            );
        }
        let compression = match self.compression {
            None => "none",
            Some(Compression::F16) => "f16",
            Some(Compression::Bf16) => "bf16",
            Some(Compression::Int8) => "int8",
            Some(Compression::Int4) => "int4 (the largest values of each row in f16)",
        };
        let _ = writeln!(s, "  Compression: {compression}.");
        match &self.noise {
            None => s.push_str(
                "  Noise: none. Without noise, hidden states from the first layers can be \
                 inverted to recover much of the prompt (the fewer layers run here, the \
                 easier).\n",
            ),
            Some(n) => {
                let _ = writeln!(
                    s,
                    "  Noise: each row clipped to norm {}, then Gaussian noise with sigma {:.4} \
                     added on this device before compression ({}).",
                    n.clip_norm, n.sigma, n.mechanism
                );
                match n.epsilon {
                    Some(e) => {
                        let _ = writeln!(
                            s,
                            "  Privacy budget per row: epsilon {e}, delta {} (sensitivity {}).",
                            n.delta.unwrap_or(0.0),
                            n.sensitivity
                        );
                    }
                    None => s.push_str(
                        "  Privacy budget per row: none (clipping only, no noise: epsilon is \
                         infinite).\n",
                    ),
                }
                let total = match n.total.epsilon {
                    Some(e) => format!("epsilon {e:.3}, delta {:.3e}", n.total.basic_delta),
                    None => "unbounded".to_owned(),
                };
                let _ = writeln!(
                    s,
                    "  Rows noised: {} ({} clipped); budget over all of them: {total}.",
                    n.rows_noised, n.rows_clipped
                );
            }
        }
        let _ = writeln!(
            s,
            "  Received from the cloud: {} bytes.",
            thousands(self.bytes_received)
        );
    }

    fn render_output(&self, s: &mut String) {
        match (&self.output, self.finish_reason) {
            (Some(out), reason) => {
                let reason = reason
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "unknown".into());
                let _ = writeln!(s, "Output (finished: {reason}):");
                quote(s, out);
                s.push_str(
                    "  The cloud produced these tokens, so the provider can read the output.\n",
                );
            }
            (None, _) => s.push_str("Output: not finished.\n"),
        }
    }
}

/// Appends `text` indented and marked as quoted, one line at a time.
fn quote(s: &mut String, text: &str) {
    if text.is_empty() {
        s.push_str("    | (empty)\n");
    }
    for line in text.lines() {
        let _ = writeln!(s, "    | {line}");
    }
}

/// A JSON value as the prompt shows it: lists comma-separated, objects `key: value; …`.
fn plain(v: &Json) -> String {
    fn go(out: &mut String, v: &Json, nested: bool) {
        match v {
            Json::Null => {}
            Json::String(x) => out.push_str(x),
            Json::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    go(out, item, true);
                }
            }
            Json::Object(map) => {
                if nested {
                    out.push('(');
                }
                for (i, (k, item)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push_str("; ");
                    }
                    out.push_str(k);
                    out.push_str(": ");
                    go(out, item, true);
                }
                if nested {
                    out.push(')');
                }
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    go(&mut out, v, false);
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn plain_json() {
        let v = serde_json::json!(["a", {"k": 1}, 2]);
        assert_eq!(plain(&v), "a, (k: 1), 2");
    }
}
