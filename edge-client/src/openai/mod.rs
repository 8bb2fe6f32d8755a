//! An OpenAI-compatible endpoint on the device (DESIGN.md §12): an app that already talks to
//! a language model through an OpenAI SDK points the SDK's base URL at this endpoint and
//! gets split inference underneath.
//!
//! Routes: `POST /v1/chat/completions` (whole, or streamed as Server-Sent Events of
//! `chat.completion.chunk` objects ending with `data: [DONE]`), `POST /v1/completions`,
//! `GET /v1/models` (and `/v1/models/{id}`), and `GET /v1/tandem/transparency/{id}`: the
//! [`TransparencyRecord`](crate::TransparencyRecord) of a finished completion, whose id every
//! completion answer carries in the [`TRANSPARENCY_HEADER`] header (and as its `id`).
//!
//! What happens on the device, as `tandem-edge run` does it: the provider's system prompt
//! and the app's messages go through the model's chat template; `system` and `user` messages
//! may use profile fields (`{{ city }}`), filled from the local [`Profile`] and sanitized
//! before anything is computed; the edge layers run off the async runtime; only hidden states
//! leave the device. The private `request` module lists the parameters honoured and those
//! refused with an OpenAI-style 400 naming the parameter (docs/edge-apps.md has the table).
//!
//! Exposure: the endpoint listens on loopback only unless [`OpenAiConfig::allow_remote`] is
//! set: anything on another host could otherwise use the user's profile through it. Any
//! process on the device can reach a loopback port; [`OpenAiConfig::api_key`] makes the
//! endpoint require `Authorization: Bearer KEY` (the OpenAI SDKs send their `api_key` so).
//!
//! # Layout
//! - this module: configuration, binding, the accept loop and graceful shutdown.
//! - `service`: routes, prompt preparation, limits.
//! - `state`: what the routes and the completions share, and the transparency store.
//! - `request`: parameter checking into a valid request. `stream`: one completion, whole
//!   or as events. `api`: the OpenAI JSON shapes. `http`: bodies and framing on hyper.
//!
//! Costs: one tokio task per connection and per streamed completion; each running
//! completion holds an edge KV cache (at most [`OpenAiConfig::max_concurrent`] at once) and
//! its hidden-state frames (see [`crate::client`]); the store keeps
//! [`OpenAiConfig::records_kept`] records in memory.

mod api;
mod http;
mod request;
mod service;
mod state;
mod stream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use self::api::now_s;
pub use self::service::TRANSPARENCY_HEADER;
use self::state::{Records, Service};
use crate::bundle::EdgeBundle;
use crate::client::{ClientConfig, ClientError, EdgeClient};
use crate::prompt::Profile;
use crate::sanitize::Sanitizer;

/// How long [`OpenAiHandle::shutdown`] lets open connections finish their answers.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How the endpoint is set up.
#[derive(Clone, Debug)]
pub struct OpenAiConfig {
    /// Where to listen; port 0 picks a free port ([`OpenAiHandle::addr`] tells which).
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen` address. Off by default: see the module doc.
    pub allow_remote: bool,
    /// The provider's system prompt, put before the app's messages as its own turn.
    pub system_prompt: Option<String>,
    /// The user's profile, for `{{ field }}` templates in messages.
    pub profile: Profile,
    pub sanitizer: Sanitizer,
    /// The model name the endpoint answers to; `None`: the source model's file name without
    /// its extension (e.g. `SmolLM2-135M-Instruct.Q4_1`).
    pub model_id: Option<String>,
    /// When set, every request must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// `max_tokens` when a request gives none (capped by the context left).
    pub default_max_tokens: u32,
    /// Completions running at once; more wait their turn.
    pub max_concurrent: usize,
    /// Transparency records kept for `GET /v1/tandem/transparency/{id}` (most recent first
    /// to stay).
    pub records_kept: usize,
}

impl OpenAiConfig {
    /// Loopback at `listen`, no system prompt, an empty profile, the default sanitizer.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            allow_remote: false,
            system_prompt: None,
            profile: Profile::default(),
            sanitizer: Sanitizer::default(),
            model_id: None,
            api_key: None,
            default_max_tokens: 512,
            max_concurrent: 4,
            records_kept: 256,
        }
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenAiError {
    #[error(
        "refusing to listen on {0}: not a loopback address, so other hosts could use the \
         user's profile through it (set allow_remote, or --allow-remote, to do it on purpose)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("the edge checkpoint has no tokenizer")]
    NoTokenizer,
    #[error("invalid endpoint settings: {0}")]
    Config(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// A running endpoint. [`OpenAiHandle::shutdown`] stops it and waits; dropping the handle
/// stops it too, without waiting.
#[derive(Debug)]
pub struct OpenAiHandle {
    addr: SocketAddr,
    model_id: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl OpenAiHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The model name requests must give (`GET /v1/models` lists it).
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// `http://ADDR/v1`: what an OpenAI SDK takes as its base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops accepting, lets open connections finish their current answers (up to a
    /// grace period), and returns when the endpoint is down.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts the endpoint on the current tokio runtime for `bundle`'s model, talking to the
/// cloud as `client` says.
pub async fn serve(
    bundle: &EdgeBundle,
    client: ClientConfig,
    cfg: OpenAiConfig,
) -> Result<OpenAiHandle, OpenAiError> {
    if !cfg.listen.ip().is_loopback() && !cfg.allow_remote {
        return Err(OpenAiError::NotLoopback(cfg.listen));
    }
    if cfg.max_concurrent == 0 || cfg.default_max_tokens == 0 {
        return Err(OpenAiError::Config(
            "max_concurrent and default_max_tokens must be at least 1".into(),
        ));
    }
    let tokenizer = bundle.tokenizer.clone().ok_or(OpenAiError::NoTokenizer)?;
    let model_id = cfg.model_id.clone().unwrap_or_else(|| {
        let name = &bundle.manifest.source.name;
        name.strip_suffix(".gguf").unwrap_or(name).to_owned()
    });
    let service = Arc::new(Service {
        client: EdgeClient::from_bundle(bundle, client)?,
        tokenizer,
        chat: bundle.chat_template.clone(),
        model_info: bundle.model_info(),
        context: bundle.model.config().max_position_embeddings,
        model_id: model_id.clone(),
        started: now_s(),
        system_prompt: cfg.system_prompt,
        profile: cfg.profile,
        sanitizer: cfg.sanitizer,
        api_key: cfg.api_key,
        default_max_tokens: cfg.default_max_tokens,
        permits: Arc::new(Semaphore::new(cfg.max_concurrent)),
        records: Records::new(cfg.records_kept),
    });
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|error| OpenAiError::Bind {
            addr: cfg.listen,
            error,
        })?;
    let addr = listener.local_addr().map_err(|error| OpenAiError::Bind {
        addr: cfg.listen,
        error,
    })?;
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, service, stop_rx));
    tracing::info!(%addr, "openai endpoint listening");
    Ok(OpenAiHandle {
        addr,
        model_id,
        stop,
        task,
    })
}

/// Accepts until told to stop, then waits for the connections (each told to finish its
/// current answer and close) up to [`SHUTDOWN_GRACE`].
async fn accept_loop(
    listener: TcpListener,
    service: Arc<Service>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                conns.spawn(connection(stream, service.clone(), stop.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "openai endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Reap finished connections so the set does not grow with them.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

async fn connection(
    stream: tokio::net::TcpStream,
    service: Arc<Service>,
    mut stop: watch::Receiver<bool>,
) {
    let svc = service_fn(move |req| {
        let service = service.clone();
        async move { Ok::<_, Infallible>(service.handle(req).await) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
