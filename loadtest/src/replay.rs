//! Replayed device compute: the edge layers run once per distinct token history, not once
//! per device, so one process can play hundreds or thousands of devices.
//!
//! # The continuation tree
//! A [`Step`] is a point in a generation: a prompt followed by the output tokens received so
//! far. It holds the encoded `Hidden` frame(s) a device sends at that point and the edge KV
//! cache after them. The root of a prompt holds the prompt's chunks; the child of a step for
//! token `t` holds the one-row frame of `t`. Children are keyed by token id under their
//! parent, so a step is identified by its whole history (prompt + every token before it).
//!
//! Why the whole history and not `(prompt, position, token)`: an edge layer's output for a
//! token depends, through attention, on every token before it. Two devices that reach the
//! same position with the same token after different outputs need different hidden states;
//! a `(prompt, position, token)` key would hand one of them the other's. Keying by parent
//! step costs the same single map lookup and is exact: what a device sends is bit-for-bit
//! what a real device running the edge model on its own history would send.
//!
//! Sharing: with greedy sampling (the default) every device on the same prompt receives
//! the same tokens (as long as the server's arithmetic does not depend on the batch), so
//! `N` devices on `P` prompts compute about `P × output tokens` rows instead of
//! `N × output tokens`. If outputs do diverge, the tree simply branches: still exact, just
//! less shared.
//!
//! A frame's bytes are the same for every device at that step (sequence number and position
//! follow from the history), so devices send the cached [`Bytes`] as they are: no copy.
//!
//! # Concurrency
//! Each child slot is a [`OnceCell`]: the first device to need a step computes it and every
//! other device asking at the same time waits for that result, so a row is never computed
//! twice. The children map is behind a std `Mutex` held only to fetch or insert the cell,
//! never across an `.await`. The edge forward runs on tokio's blocking pool, one at a time
//! (a semaphore): candle already spreads one forward over the cores, and the device tasks'
//! reactor threads stay free to time frames.
//!
//! # Costs
//! Memory per step: its frame (hidden size × the wire dtype's bytes, plus 28) and the edge
//! KV of its history (`2 × edge layers × kv heads × head dim × 4 bytes` per position; the
//! cache is copied per step, see [`ContiguousKv`]). Steps live until the run ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use tandem_model::{ContiguousKv, EdgeModel, ForwardCtx};
use tandem_protocol::{f32_to_hidden, HiddenDtype, HiddenRef};
use tokio::sync::{OnceCell, Semaphore};
use tokio_tungstenite::tungstenite::Bytes;

/// Most prompt tokens per `Hidden` frame (as `tandem-edge`'s default).
pub const PROMPT_CHUNK_TOKENS: usize = 256;

/// One point of a generation; see the module doc.
#[derive(Debug)]
pub struct Step {
    /// What a device sends on reaching this step: the prompt's chunks at the root, one frame
    /// per later step.
    frames: Vec<Bytes>,
    /// The edge cache after this step's tokens.
    kv: ContiguousKv,
    /// Position of the next token (prompt length + output tokens fed so far).
    next_position: usize,
    /// Sequence number of the next `Hidden`.
    next_seq: u64,
    children: Mutex<HashMap<u32, Arc<OnceCell<Arc<Step>>>>>,
}

impl Step {
    /// The frames to send on reaching this step, in order.
    pub fn frames(&self) -> &[Bytes] {
        &self.frames
    }

    /// Tokens of the history so far (prompt and fed output tokens).
    pub fn len(&self) -> usize {
        self.next_position
    }

    pub fn is_empty(&self) -> bool {
        self.next_position == 0
    }

    fn new(frames: Vec<Bytes>, kv: ContiguousKv, next_position: usize, next_seq: u64) -> Self {
        Self {
            frames,
            kv,
            next_position,
            next_seq,
            children: Mutex::new(HashMap::new()),
        }
    }
}

/// Counts of the replay cache, for the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayStats {
    /// Prompts run through the edge before the run.
    pub prompts: u64,
    /// Decode rows asked for by devices.
    pub rows_requested: u64,
    /// Decode rows actually computed (the rest were shared).
    pub rows_computed: u64,
    /// Seconds spent in the edge layers, prompts included.
    pub edge_compute_s: f64,
}

/// The edge model and the tree's bookkeeping; see the module doc.
#[derive(Debug)]
pub struct Replay {
    model: Arc<EdgeModel>,
    dtype: HiddenDtype,
    hidden_size: usize,
    gate: Semaphore,
    prompts: AtomicU64,
    requested: AtomicU64,
    computed: AtomicU64,
    compute_ns: AtomicU64,
}

impl Replay {
    pub fn new(model: Arc<EdgeModel>, dtype: HiddenDtype) -> Self {
        let hidden_size = model.config().hidden_size;
        Self {
            model,
            dtype,
            hidden_size,
            gate: Semaphore::new(1),
            prompts: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            computed: AtomicU64::new(0),
            compute_ns: AtomicU64::new(0),
        }
    }

    /// Runs the edge over a prompt and returns the root of its tree. Blocking (call it
    /// before the run, or from a blocking thread).
    pub fn prompt(&self, tokens: &[u32]) -> anyhow::Result<Arc<Step>> {
        anyhow::ensure!(!tokens.is_empty(), "empty prompt");
        let started = Instant::now();
        let cfg = self.model.config();
        let mut kv = ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings);
        let chunks: Vec<&[u32]> = tokens.chunks(PROMPT_CHUNK_TOKENS).collect();
        let mut frames = Vec::with_capacity(chunks.len());
        let mut position = 0;
        for (seq, chunk) in chunks.iter().enumerate() {
            let complete = seq + 1 == chunks.len();
            frames.push(self.forward(chunk, position, seq as u64, complete, &mut kv)?);
            position += chunk.len();
        }
        self.add_compute(started);
        self.prompts.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Step::new(
            frames,
            kv,
            position,
            chunks.len() as u64,
        )))
    }

    /// The step after `at` when the server sent `token`: cached, or computed once.
    pub async fn next(self: &Arc<Self>, at: &Arc<Step>, token: u32) -> anyhow::Result<Arc<Step>> {
        self.requested.fetch_add(1, Ordering::Relaxed);
        let cell = {
            let mut children = at.children.lock().unwrap_or_else(|e| e.into_inner());
            children.entry(token).or_default().clone()
        };
        let step = cell
            .get_or_try_init(|| async {
                let _turn = self.gate.acquire().await.context("replay gate closed")?;
                let (replay, parent) = (self.clone(), at.clone());
                tokio::task::spawn_blocking(move || replay.compute_child(&parent, token))
                    .await
                    .context("the edge compute task failed")?
            })
            .await?;
        Ok(step.clone())
    }

    pub fn stats(&self) -> ReplayStats {
        ReplayStats {
            prompts: self.prompts.load(Ordering::Relaxed),
            rows_requested: self.requested.load(Ordering::Relaxed),
            rows_computed: self.computed.load(Ordering::Relaxed),
            edge_compute_s: self.compute_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    fn compute_child(&self, parent: &Step, token: u32) -> anyhow::Result<Arc<Step>> {
        let started = Instant::now();
        let mut kv = parent.kv.clone(); // cheap: the tensors are reference-counted
        let frame = self.forward(
            &[token],
            parent.next_position,
            parent.next_seq,
            true,
            &mut kv,
        )?;
        self.add_compute(started);
        self.computed.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Step::new(
            vec![frame],
            kv,
            parent.next_position + 1,
            parent.next_seq + 1,
        )))
    }

    /// Runs the edge over `tokens` at `position` and encodes their `Hidden` frame.
    fn forward(
        &self,
        tokens: &[u32],
        position: usize,
        seq: u64,
        complete: bool,
        kv: &mut ContiguousKv,
    ) -> anyhow::Result<Bytes> {
        let ctx = ForwardCtx::single(position, tokens.len());
        let hidden: Tensor = self.model.forward(tokens, &ctx, kv)?;
        encode_hidden(
            &hidden,
            self.dtype,
            self.hidden_size,
            position,
            seq,
            complete,
        )
    }

    fn add_compute(&self, started: Instant) {
        self.compute_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Encodes the edge output `hidden` (`[tokens, hidden_size]`, any float dtype) for tokens
/// starting at `position` as the `Hidden` frame of sequence number `seq`.
pub(crate) fn encode_hidden(
    hidden: &Tensor,
    dtype: HiddenDtype,
    hidden_size: usize,
    position: usize,
    seq: u64,
    complete: bool,
) -> anyhow::Result<Bytes> {
    encode_drafted(hidden, dtype, hidden_size, position, seq, complete, 0)
}

/// [`encode_hidden`] for a decode step whose last `drafts` rows are the device's drafts.
pub(crate) fn encode_drafted(
    hidden: &Tensor,
    dtype: HiddenDtype,
    hidden_size: usize,
    position: usize,
    seq: u64,
    complete: bool,
    drafts: u8,
) -> anyhow::Result<Bytes> {
    let values: Vec<f32> = hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let rows = values.len() / hidden_size.max(1);
    let mut payload = Vec::new();
    f32_to_hidden(dtype, rows, hidden_size, &values, &mut payload)?;
    let frame = HiddenRef {
        seq,
        first_position: position as u32,
        token_count: rows as u32,
        complete,
        drafts,
        dtype,
        payload: &payload,
    }
    .encode()?;
    Ok(Bytes::from(frame))
}
