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
//! - Private: `error` (the crate's error types, re-exported where callers find them),
//!   `device_token` ([`DeviceToken`]), `session` ([`EdgeSession`]), `compute` (the edge
//!   steps on the blocking pool) and `driver`.
//!
//! The modules form layers, each using only those below it: `error`; `device_token`, then
//! [`tls`]; [`sanitize`], [`prompt`], [`transparency`], [`conversation`]; the inbox's
//! configuration and REST calls; [`client`]'s configuration and events, the `driver` task
//! (over `compute` and `session`) and [`EdgeClient`]; answering inbox prompts
//! ([`inbox`]'s `answer`); [`openai`] and `cli` on top.
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
mod device_token;
pub mod draft;
mod driver;
mod error;
pub mod inbox;
pub mod openai;
pub mod prompt;
pub mod sanitize;
mod session;
pub mod tls;
pub mod transparency;
pub mod transport;

pub use bundle::EdgeBundle;
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
pub use session::EdgeSession;
pub use tandem_model::{EdgeModel, ModelError};
pub use transparency::{ModelInfo, TransparencyRecord};
pub use transport::{ReconnectPolicy, ServerList};
