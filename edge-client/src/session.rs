//! [`EdgeSession`]: one conversation's edge state on the device, the shared edge weights plus
//! this conversation's KV cache and position.
//!
//! Invariants: [`EdgeSession::feed`] either consumes all its tokens or, on error, nothing;
//! [`EdgeSession::truncate`] only ever moves the position back. Costs: a feed is one forward
//! pass of the edge layers over the new tokens (the cache clone it starts from is cheap:
//! tensors are reference-counted). Synchronous and CPU-bound: async code runs it on the
//! blocking pool (the private `compute` module).

use std::sync::Arc;

use candle_core::Tensor;
use tandem_model::{ContiguousKv, EdgeModel, ForwardCtx, ModelError};

/// One conversation on the device: the shared edge weights plus this conversation's cache.
#[derive(Debug)]
pub struct EdgeSession {
    model: Arc<EdgeModel>,
    kv: ContiguousKv,
    position: usize,
}

impl EdgeSession {
    /// A new, empty session over `model`.
    pub fn new(model: Arc<EdgeModel>) -> Self {
        let cfg = model.config();
        let kv = ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings);
        Self {
            model,
            kv,
            position: 0,
        }
    }

    /// The edge weights this session runs.
    pub(crate) fn model(&self) -> &EdgeModel {
        &self.model
    }

    /// Positions consumed so far (the next token's position).
    pub fn position(&self) -> usize {
        self.position
    }

    /// Forgets the positions from `position` on (draft tokens the cloud did not confirm);
    /// a position at or past the current one changes nothing.
    pub fn truncate(&mut self, position: usize) -> Result<(), ModelError> {
        if position < self.position {
            self.kv.truncate(position)?;
            self.position = position;
        }
        Ok(())
    }

    /// Runs the edge layers over `tokens` (a prompt chunk, or the one token the cloud sent
    /// back) and returns their hidden states `[tokens, hidden]`. On error nothing is consumed.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to feed".into()));
        }
        let ctx = ForwardCtx::single(self.position, tokens.len());
        let mut kv = self.kv.clone(); // cheap: tensors are reference-counted
        let hidden = self.model.forward(tokens, &ctx, &mut kv)?;
        self.kv = kv;
        self.position += tokens.len();
        Ok(hidden)
    }
}
