//! `tandem-edge`: the device side of Tandem.
//!
//! So far: [`EdgeSession`], which runs the edge part of a split model ([`EdgeModel`]: the
//! embedding and layers `[0, k)`) over one conversation with its own contiguous KV cache and
//! hands back the layer-`k` hidden states that would go to the cloud. Transport, prompt
//! assembly, sanitizing and resume arrive with the edge–cloud issue.
//!
//! The crate stays light on purpose: no async runtime, no HTTP, no scheduler.

pub mod prompt;
pub mod sanitize;
pub mod transparency;

use std::sync::Arc;

use candle_core::Tensor;
pub use prompt::{assemble, AssembledPrompt, FieldUse, Profile, PromptError, PromptTemplate};
pub use sanitize::{Redaction, Rule, Sanitizer, SanitizerConfig};
use tandem_model::{ContiguousKv, ForwardCtx};
pub use tandem_model::{EdgeModel, ModelError};
pub use transparency::{ModelInfo, TransparencyRecord};

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

    /// Positions consumed so far (the next token's position).
    pub fn position(&self) -> usize {
        self.position
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
