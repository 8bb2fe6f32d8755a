//! `tandem-edge`: the device side of Tandem (DESIGN.md §1, §2, §11).
//!
//! A device loads the edge part of a split ([`EdgeBundle`]: the embedding and layers
//! `[0, k)`), assembles a prompt from a provider template and the user's local profile
//! ([`assemble`], with the [`Sanitizer`]), runs the edge layers over it with its own KV cache
//! ([`EdgeSession`]) and streams the layer-`k` hidden states to the cloud over the WebSocket
//! protocol of `docs/protocol.md` ([`EdgeClient`]), which sends the tokens back. The client
//! survives dropped connections and replica restarts (`Resume`, and a replay of every hidden
//! state when the cloud lost the session). A [`TransparencyRecord`] tells the user what was
//! used and what left the device.
//!
//! # The inbox
//! Partners send prompts to users through the provider; the device pulls them
//! ([`EdgeClient::inbox`], plain-HTTP REST with the device token: set
//! [`ClientConfig::inbox`]), decides per prompt ([`AutoAccept`]: the profile's
//! `auto_accept_partners` setting, otherwise ask the user), then [`EdgeClient::accept`]s and
//! [`EdgeClient::answer`]s it (the partner's template rendered with the local profile, the
//! generation tied to the prompt by a one-use ticket) or [`EdgeClient::decline`]s it. A
//! template that names a field the profile lacks fails before anything is sent. HTTPS is not
//! built yet (no TLS stack in this crate): `https://` URLs are refused. The CLI's
//! `tandem-edge inbox` does all of it. See [`inbox`].
//!
//! # Layout
//! - [`bundle`]: loading an `edge/` checkpoint directory.
//! - [`prompt`], [`sanitize`]: prompt templates, profiles, assembly, redaction.
//! - [`client`]: [`EdgeClient`], [`GenerateRequest`], the [`Generation`] event stream; the
//!   session task (resume, replay, dedupe) lives in the private `driver` module.
//! - [`transport`]: server lists and the reconnect policy.
//! - [`inbox`]: the inbox REST calls, auto-accept, and answering an accepted prompt; the
//!   HTTP/1.1 client under it is `tandem-http`, the project's one client stack.
//! - [`transparency`]: the record shown to the user.
//! - [`conversation`]: assembling a whole conversation (several messages) by the same rules.
//! - [`openai`]: the OpenAI-compatible endpoint on the device's loopback
//!   ([`openai::serve`]), for apps that already speak to a model through an OpenAI SDK.
//! - `cli` (feature `cli`, on by default): the `tandem-edge` command.
//!
//! # Threads
//! The edge layers never run on an async worker: each step of a generation (a prompt chunk
//! or one token) runs on tokio's blocking pool (the private `compute` module), as does
//! prompt assembly in the endpoint, so an app's runtime (even a current-thread one) keeps
//! its timers and its connections while a long prompt is computed.
//!
//! The crate stays light on purpose: tokio, a WebSocket client and hyper's HTTP/1.1 client
//! and server cores (the server for the loopback endpoint only), no web framework, no TLS, no
//! Redis, no scheduler. Nothing here logs above debug level with prompt text, profile values,
//! output text or activations.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

pub mod bundle;
#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
mod compute;
pub mod conversation;
pub mod draft;
mod driver;
pub mod inbox;
pub mod openai;
pub mod prompt;
pub mod sanitize;
pub mod tls;
pub mod transparency;
pub mod transport;

use std::sync::Arc;

pub use bundle::EdgeBundle;
use candle_core::Tensor;
pub use client::{
    ClientConfig, ClientError, EdgeClient, Event, Finished, GenerateRequest, Generation, Timings,
    Usage, WireStats,
};
pub use conversation::{assemble_conversation, AssembledConversation, Role, Turn};
pub use inbox::{
    Accepted, ApiCode, AutoAccept, Decision, DeviceToken, Inbox, InboxClient, InboxConfig,
    InboxError, InboxItem, ItemStatus, PartnerPrompt, PromptContext, PromptId, Ticket,
};
pub use openai::{OpenAiConfig, OpenAiError, OpenAiHandle};
pub use prompt::{
    assemble, AssembledPrompt, FieldUse, Profile, ProfileSettings, PromptError, PromptTemplate,
};
pub use sanitize::{Redaction, Rule, Sanitizer, SanitizerConfig};
use tandem_model::{ContiguousKv, ForwardCtx};
pub use tandem_model::{EdgeModel, ModelError};
pub use transparency::{ModelInfo, TransparencyRecord};
pub use transport::{ReconnectPolicy, ServerList};

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
