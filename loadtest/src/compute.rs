//! Where a device's hidden states come from: [`Compute`] (one per run, shared by every
//! device) hands each generation a [`Cursor`] and its prompt's frames; the cursor gives the
//! frame of every token received after that.
//!
//! - Replay (`--device-compute replay`, the default): the cursor walks the shared
//!   continuation tree of [`crate::replay`]; prompts were run before the clock started.
//! - Real (`--device-compute real`): every generation owns a `tandem_edge::EdgeSession`, the
//!   real client's edge state, and runs the edge layers itself: over the prompt once the
//!   session is opened, then over each token (on tokio's blocking pool, no limit on how many
//!   at once, as every phone has its own processor). Meant for small device counts: the
//!   load generator's own CPU then stands in for the devices', and its latencies include the
//!   edge time a real device would add.
//!
//! Speculation (`--max-draft-tokens`, real compute only): a decode step may carry the
//! device's drafts after the token it received ([`Cursor::next_drafted`]); the edge first
//! forgets the positions of the last step's drafts the cloud did not confirm, then runs its
//! layers over the token and the new drafts, and sends all their rows in one frame. Replay
//! has no drafting: its tree holds one row per step, keyed by the token received.
//!
//! Both encode with the same function ([`crate::replay`]'s), from different forward code
//! (`EdgeModel::forward` over a copied cache for the tree, `EdgeSession::feed` here), and
//! `tests/short.rs` checks that they send the same bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tandem_edge::EdgeSession;
use tandem_model::EdgeModel;
use tandem_protocol::HiddenDtype;
use tokio_tungstenite::tungstenite::Bytes;

use crate::config::DeviceCompute;
use crate::replay::{
    encode_drafted, encode_hidden, Replay, ReplayStats, Step, PROMPT_CHUNK_TOKENS,
};
use crate::workload::PromptId;

/// The run's source of hidden states; see the module doc.
#[derive(Debug)]
pub enum Compute {
    Replay {
        replay: Arc<Replay>,
        /// The root of every prompt of the workload, by [`PromptId`].
        roots: Vec<Arc<Step>>,
    },
    Real(Arc<RealEdge>),
}

/// What real-mode devices share: the model, the prompts and the counters.
#[derive(Debug)]
pub struct RealEdge {
    model: Arc<EdgeModel>,
    dtype: HiddenDtype,
    hidden_size: usize,
    prompts: Vec<Vec<u32>>,
    prompts_run: AtomicU64,
    rows: AtomicU64,
    compute_ns: AtomicU64,
}

/// Where one generation stands.
#[derive(Debug)]
pub enum Cursor {
    Replay {
        replay: Arc<Replay>,
        at: Arc<Step>,
    },
    Real {
        edge: Arc<RealEdge>,
        /// `None` only while a forward runs (or after one failed).
        session: Option<EdgeSession>,
        next_seq: u64,
    },
}

impl Compute {
    /// Replayed compute over the tree whose prompt roots are `roots`.
    pub fn replay(replay: Arc<Replay>, roots: Vec<Arc<Step>>) -> Self {
        Self::Replay { replay, roots }
    }

    /// Real per-device compute over `prompts` (index = [`PromptId`]).
    pub fn real(model: Arc<EdgeModel>, dtype: HiddenDtype, prompts: Vec<Vec<u32>>) -> Self {
        let hidden_size = model.config().hidden_size;
        Self::Real(Arc::new(RealEdge {
            model,
            dtype,
            hidden_size,
            prompts,
            prompts_run: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            compute_ns: AtomicU64::new(0),
        }))
    }

    pub fn mode(&self) -> DeviceCompute {
        match self {
            Self::Replay { .. } => DeviceCompute::Replay,
            Self::Real(_) => DeviceCompute::Real,
        }
    }

    /// Tokens of a prompt.
    pub fn prompt_len(&self, prompt: PromptId) -> usize {
        match self {
            Self::Replay { roots, .. } => roots.get(prompt.0).map_or(0, |r| r.len()),
            Self::Real(edge) => edge.prompts.get(prompt.0).map_or(0, Vec::len),
        }
    }

    /// The token ids of a prompt (real compute only: replay keeps frames, not ids).
    pub fn prompt_ids(&self, prompt: PromptId) -> Option<&[u32]> {
        match self {
            Self::Replay { .. } => None,
            Self::Real(edge) => edge.prompts.get(prompt.0).map(Vec::as_slice),
        }
    }

    /// Starts a generation on `prompt`: its cursor and the prompt's `Hidden` frames (chunks
    /// of at most [`PROMPT_CHUNK_TOKENS`], the last one `complete`).
    pub async fn start(&self, prompt: PromptId) -> anyhow::Result<(Cursor, Vec<Bytes>)> {
        match self {
            Self::Replay { replay, roots } => {
                let root = roots
                    .get(prompt.0)
                    .with_context(|| format!("no prompt {}", prompt.0))?;
                let frames = root.frames().to_vec();
                let cursor = Cursor::Replay {
                    replay: replay.clone(),
                    at: root.clone(),
                };
                Ok((cursor, frames))
            }
            Self::Real(edge) => {
                let tokens = edge
                    .prompts
                    .get(prompt.0)
                    .with_context(|| format!("no prompt {}", prompt.0))?
                    .clone();
                let work = edge.clone();
                let (session, frames) =
                    tokio::task::spawn_blocking(move || work.run_prompt(&tokens))
                        .await
                        .context("the edge compute task failed")??;
                let next_seq = frames.len() as u64;
                let cursor = Cursor::Real {
                    edge: edge.clone(),
                    session: Some(session),
                    next_seq,
                };
                Ok((cursor, frames))
            }
        }
    }

    /// Counts for the report (in real mode every row is computed: requested = computed).
    pub fn stats(&self) -> ReplayStats {
        match self {
            Self::Replay { replay, .. } => replay.stats(),
            Self::Real(edge) => {
                let rows = edge.rows.load(Ordering::Relaxed);
                ReplayStats {
                    prompts: edge.prompts_run.load(Ordering::Relaxed),
                    rows_requested: rows,
                    rows_computed: rows,
                    edge_compute_s: edge.compute_ns.load(Ordering::Relaxed) as f64 / 1e9,
                }
            }
        }
    }
}

impl RealEdge {
    /// Blocking: a new edge session over `tokens`, and the prompt's frames.
    fn run_prompt(&self, tokens: &[u32]) -> anyhow::Result<(EdgeSession, Vec<Bytes>)> {
        anyhow::ensure!(!tokens.is_empty(), "empty prompt");
        let started = Instant::now();
        let mut session = EdgeSession::new(self.model.clone());
        let chunks: Vec<&[u32]> = tokens.chunks(PROMPT_CHUNK_TOKENS).collect();
        let mut frames = Vec::with_capacity(chunks.len());
        for (seq, chunk) in chunks.iter().enumerate() {
            let position = session.position();
            let hidden = session.feed(chunk)?;
            let complete = seq + 1 == chunks.len();
            frames.push(encode_hidden(
                &hidden,
                self.dtype,
                self.hidden_size,
                position,
                seq as u64,
                complete,
            )?);
        }
        self.add_compute(started);
        self.prompts_run.fetch_add(1, Ordering::Relaxed);
        Ok((session, frames))
    }

    /// Blocking: forgets the positions from `at` (if given), feeds `ids` (the token
    /// received, then `drafts` drafts), returns their frame.
    fn run_step(
        &self,
        session: &mut EdgeSession,
        ids: &[u32],
        drafts: u8,
        at: Option<usize>,
        seq: u64,
    ) -> anyhow::Result<Bytes> {
        let started = Instant::now();
        if let Some(at) = at {
            session.truncate(at)?;
        }
        let position = session.position();
        let hidden = session.feed(ids)?;
        let frame = encode_drafted(
            &hidden,
            self.dtype,
            self.hidden_size,
            position,
            seq,
            true,
            drafts,
        )?;
        self.add_compute(started);
        self.rows.fetch_add(ids.len() as u64, Ordering::Relaxed);
        Ok(frame)
    }

    fn add_compute(&self, started: Instant) {
        self.compute_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Cursor {
    /// The frame of `token`, received at this point; moves the cursor past it.
    pub async fn next(&mut self, token: u32) -> anyhow::Result<Bytes> {
        self.next_drafted(token, &[], None).await
    }

    /// The frame of `token` followed by `drafts` (at most [`tandem_protocol::wire::MAX_DRAFTS`]),
    /// after forgetting the edge's positions from `at` on (the drafts of the last step that
    /// did not count). Drafts and `at` need real compute.
    pub async fn next_drafted(
        &mut self,
        token: u32,
        drafts: &[u32],
        at: Option<usize>,
    ) -> anyhow::Result<Bytes> {
        match self {
            Self::Replay { .. } if !drafts.is_empty() || at.is_some() => {
                anyhow::bail!("drafting needs real edge compute (--device-compute real)")
            }
            Self::Replay { replay, at } => {
                let next = replay.next(at, token).await?;
                let frame = next
                    .frames()
                    .first()
                    .cloned()
                    .context("a decode step without a frame")?;
                *at = next;
                Ok(frame)
            }
            Self::Real {
                edge,
                session,
                next_seq,
            } => {
                let count = u8::try_from(drafts.len())
                    .ok()
                    .filter(|&d| d <= tandem_protocol::wire::MAX_DRAFTS)
                    .with_context(|| format!("{} drafts in one step", drafts.len()))?;
                let mut owned = session.take().context("the edge session was lost")?;
                let (work, seq) = (edge.clone(), *next_seq);
                let mut ids = Vec::with_capacity(1 + drafts.len());
                ids.push(token);
                ids.extend_from_slice(drafts);
                let (owned, frame) = tokio::task::spawn_blocking(move || {
                    let frame = work.run_step(&mut owned, &ids, count, at, seq);
                    (owned, frame)
                })
                .await
                .context("the edge compute task failed")?;
                *session = Some(owned);
                *next_seq += 1;
                frame
            }
        }
    }
}
