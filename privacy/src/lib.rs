//! `tandem-privacy`, the privacy audit behind `tandem audit-privacy`: how much of a prompt could the cloud read back from the hidden
//! states it receives, and what does protecting them cost? (DESIGN.md §11, docs/privacy.md.)
//!
//! For each split depth `k`, wire encoding and noise level, the audit plays the device and
//! the server on the same prompts:
//! 1. the device runs the edge layers over the prompt (and, teacher-forced, over the tokens
//!    the noise-free model generates after it), clips and noises every row with
//!    [`tandem_model::privacy`] when asked, and encodes it for the wire;
//! 2. the cloud runs the rest; its next-token argmax and logits are compared with the
//!    noise-free f32 run: **greedy agreement** (share of steps whose argmax is the same) and
//!    **max logit drift** (largest absolute logit difference over all steps and tokens);
//! 3. the server, as an attacker with the weights, inverts the prompt rows with the two
//!    attacks of [`attack`] (shortlist nearest-neighbour, learned linear decoder) and the
//!    exhaustive search of [`exhaustive`]; as an attacker that learns only from the (token,
//!    row) pairs of earlier outputs, with [`pairs`]. The **recovery rate** is the share of
//!    prompt tokens (all of them, and those inside the marked sensitive spans) an attack gets
//!    exactly right.
//!
//! Reproducible: every noise draw is seeded from `--seed`, the cell and the prompt.
//! Progress goes to stderr (counts and settings only, never prompt text); the table (or
//! `--json`) goes to stdout; `--plot` writes a PNG.
//!
//! # Layout
//! - [`attack`]: the nearest-neighbour and learned inversions.
//! - [`exhaustive`]: the whole-vocabulary search with a guided order and an exact-match stop.
//! - [`pairs`]: the attacker that learns from output (token, row) pairs.
//! - [`score`]: the per-cell counts and summaries.
//! - [`prompts`]: the built-in prompts with their sensitive spans, the generic training text.
//! - [`cost`]: the edge's memory and compute per split depth.
//! - [`plot`]: the PNG curve.
//! - [`run`]: the audit itself; [`cli`]: the command's flags and output.

#![forbid(unsafe_code)]

pub mod attack;
pub mod cli;
pub mod cost;
pub mod exhaustive;
pub mod pairs;
pub mod plot;
pub mod prompts;
pub mod run;
pub mod score;

pub use cli::{run_cli, AuditArgs};
pub use run::{
    audit, AuditInputs, AuditReport, AuditSettings, Cell, ExhaustiveSettings, NoiseLevel,
};
