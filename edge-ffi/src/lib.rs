//! The device library for apps, through UniFFI: the same flow as `tandem-edge run` (load an
//! edge checkpoint, assemble the prompt with the user's profile on the device, stream the
//! hidden states to the cloud, get text back), shaped for Kotlin, Swift and Python callers.
//!
//! - [`TandemEdge::open`] loads the edge part and prepares a client for one server URL.
//! - [`TandemEdge::generate`] runs one generation and blocks until it ends, handing each piece
//!   of text to a [`TextListener`] as it arrives; [`TandemEdge::start`] runs it in the
//!   background and returns a [`GenerationHandle`] to [`cancel`](GenerationHandle::cancel) or
//!   [`wait`](GenerationHandle::wait) for.
//! - [`TandemEdge::set_profile_json`] replaces the profile that `{{ field }}` templates read;
//!   [`TandemEdge::profile_fields`] lists its fields (the values never leave the device).
//! - Every [`Completion`] carries its transparency record (JSON): what was used and what left
//!   the device.
//!
//! Threads: the object owns a small tokio runtime (two worker threads); the edge layers run on
//! its blocking pool, never on the caller's thread or an async worker. Calls block the
//! calling thread (call them off an app's UI thread); listener callbacks arrive on a runtime
//! thread.

use std::sync::{Arc, Mutex};

use tandem_edge::{
    assemble, ClientConfig, EdgeBundle, EdgeClient, Event, GenerateRequest, Profile,
    PromptTemplate, ReconnectPolicy, Sanitizer, TransparencyRecord,
};
use tandem_protocol::SamplingParams;

uniffi::setup_scaffolding!();

/// What went wrong, by stage.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum EdgeError {
    /// The edge checkpoint could not be loaded.
    #[error("loading the edge checkpoint: {0}")]
    Load(String),
    /// The prompt or profile is not valid (a template field the profile lacks, bad JSON, …).
    #[error("prompt: {0}")]
    Prompt(String),
    /// The generation failed (the server refused it, the connection could not be restored, …).
    #[error("generation: {0}")]
    Generation(String),
}

/// Generation settings; [`default_options`] gives greedy decoding of up to 128 tokens.
#[derive(Clone, Debug, uniffi::Record)]
pub struct GenerateOptions {
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    pub seed: Option<u64>,
    /// Stop when the output contains one of these (not shown).
    pub stop: Vec<String>,
    /// A system message before the user's prompt.
    pub system: Option<String>,
}

/// Greedy decoding, up to 128 tokens, no system message.
#[uniffi::export]
pub fn default_options() -> GenerateOptions {
    GenerateOptions {
        max_tokens: 128,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: None,
        stop: Vec::new(),
        system: None,
    }
}

/// The library's version.
#[uniffi::export]
pub fn library_version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

/// A finished generation.
#[derive(Clone, Debug, uniffi::Record)]
pub struct Completion {
    pub text: String,
    /// `eos`, `stop_string`, `length` or `cancelled`.
    pub finish_reason: String,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub token_ids: Vec<u32>,
    pub time_to_first_token_s: f64,
    pub total_s: f64,
    /// The transparency record as JSON (see `docs/privacy.md`).
    pub transparency_json: String,
}

/// The loaded edge part, for display.
#[derive(Clone, Debug, uniffi::Record)]
pub struct ModelDescription {
    pub model_pair_id: String,
    /// Layers run on this device.
    pub edge_layers: u32,
    pub num_layers: u32,
    pub hidden_size: u32,
}

/// Receives the text of a generation as it arrives.
#[uniffi::export(callback_interface)]
pub trait TextListener: Send + Sync {
    fn on_text(&self, delta: String);
}

/// The edge part of a split, loaded, with a client for one server.
#[derive(uniffi::Object)]
pub struct TandemEdge {
    bundle: EdgeBundle,
    client: EdgeClient,
    profile: Mutex<Profile>,
    runtime: tokio::runtime::Runtime,
}

#[uniffi::export]
impl TandemEdge {
    /// Loads the edge checkpoint in `edge_dir` (an `edge/` part or a split directory) for the
    /// server at `server_url` (`ws://…/v1/edge/ws`).
    #[uniffi::constructor]
    pub fn open(edge_dir: String, server_url: String) -> Result<Arc<Self>, EdgeError> {
        Self::open_with(
            edge_dir,
            server_url,
            ReconnectPolicy::default().max_attempts,
        )
    }

    /// [`Self::open`], with at most `reconnect_attempts` tries to restore a lost connection
    /// per outage (0: never; the default is 12, within a minute).
    #[uniffi::constructor]
    pub fn open_with(
        edge_dir: String,
        server_url: String,
        reconnect_attempts: u32,
    ) -> Result<Arc<Self>, EdgeError> {
        Self::open_configured(edge_dir, server_url, reconnect_attempts, None)
    }

    /// [`Self::open_with`], sending the device token the provider issued (`tdv_…`) on every
    /// connection: a server with a device-token key refuses sessions without one (the
    /// generation then fails at once, without retrying).
    #[uniffi::constructor]
    pub fn open_with_token(
        edge_dir: String,
        server_url: String,
        reconnect_attempts: u32,
        device_token: String,
    ) -> Result<Arc<Self>, EdgeError> {
        let token = tandem_edge::DeviceToken::new(device_token)
            .map_err(|e| EdgeError::Load(format!("the device token: {e}")))?;
        Self::open_configured(edge_dir, server_url, reconnect_attempts, Some(token))
    }
}

impl TandemEdge {
    fn open_configured(
        edge_dir: String,
        server_url: String,
        reconnect_attempts: u32,
        device_token: Option<tandem_edge::DeviceToken>,
    ) -> Result<Arc<Self>, EdgeError> {
        let bundle = EdgeBundle::load(std::path::Path::new(&edge_dir))
            .map_err(|e| EdgeError::Load(e.to_string()))?;
        if bundle.tokenizer.is_none() {
            return Err(EdgeError::Load(
                "the edge checkpoint has no tokenizer.json".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tandem-edge")
            .enable_all()
            .build()
            .map_err(|e| EdgeError::Load(format!("starting the runtime: {e}")))?;
        let mut cfg = ClientConfig::new(server_url.as_str());
        cfg.reconnect.max_attempts = reconnect_attempts;
        cfg.device_token = device_token;
        let client =
            EdgeClient::from_bundle(&bundle, cfg).map_err(|e| EdgeError::Load(e.to_string()))?;
        Ok(Arc::new(Self {
            bundle,
            client,
            profile: Mutex::new(Profile::default()),
            runtime,
        }))
    }
}

#[uniffi::export]
impl TandemEdge {
    pub fn model(&self) -> ModelDescription {
        let m = self.bundle.model_info();
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        ModelDescription {
            model_pair_id: m.model_pair_id,
            edge_layers: n(m.split_depth),
            num_layers: n(m.num_layers),
            hidden_size: n(m.hidden_size),
        }
    }

    /// Replaces the profile (a JSON object of fields, and an optional `settings` object).
    pub fn set_profile_json(&self, json: String) -> Result<(), EdgeError> {
        let p = Profile::from_json_str(&json).map_err(|e| EdgeError::Prompt(e.to_string()))?;
        *self.profile.lock().unwrap_or_else(|e| e.into_inner()) = p;
        Ok(())
    }

    /// The profile's field names (never their values).
    pub fn profile_fields(&self) -> Vec<String> {
        let p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        p.field_names().map(str::to_owned).collect()
    }

    /// Runs one generation of `prompt` (a template: `{{ field }}` reads the profile) and
    /// blocks until it ends; `listener` gets each piece of text as it arrives.
    pub fn generate(
        &self,
        prompt: String,
        options: GenerateOptions,
        listener: Option<Box<dyn TextListener>>,
    ) -> Result<Completion, EdgeError> {
        let req = self.request(&prompt, &options)?;
        // The client spawns its driver on the current runtime: enter ours, since this
        // is called from an app's thread.
        let _entered = self.runtime.enter();
        let generation = self
            .client
            .generate(req)
            .map_err(|e| EdgeError::Generation(e.to_string()))?;
        let (_cancel, rx) = tokio::sync::watch::channel(false);
        // Follow on a runtime worker, so the listener never runs on the caller's thread.
        let task = self.runtime.spawn(follow(generation, listener, rx));
        self.runtime
            .block_on(task)
            .map_err(|e| EdgeError::Generation(format!("the generation task failed: {e}")))?
    }

    /// [`Self::generate`] in the background: returns at once with a handle.
    pub fn start(
        &self,
        prompt: String,
        options: GenerateOptions,
        listener: Option<Box<dyn TextListener>>,
    ) -> Result<Arc<GenerationHandle>, EdgeError> {
        let req = self.request(&prompt, &options)?;
        // The client spawns its driver on the current runtime: enter ours, since this
        // is called from an app's thread.
        let _entered = self.runtime.enter();
        let generation = self
            .client
            .generate(req)
            .map_err(|e| EdgeError::Generation(e.to_string()))?;
        let (cancel, rx) = tokio::sync::watch::channel(false);
        let task = self.runtime.spawn(follow(generation, listener, rx));
        Ok(Arc::new(GenerationHandle {
            cancel,
            task: Mutex::new(Some(task)),
            runtime: self.runtime.handle().clone(),
        }))
    }
}

impl TandemEdge {
    /// The prompt assembled on the device, as a request with its transparency record.
    fn request(
        &self,
        prompt: &str,
        options: &GenerateOptions,
    ) -> Result<GenerateRequest, EdgeError> {
        let bad = |e: &dyn std::fmt::Display| EdgeError::Prompt(e.to_string());
        let tokenizer = self
            .bundle
            .tokenizer
            .as_ref()
            .ok_or_else(|| EdgeError::Load("no tokenizer".into()))?;
        let template = PromptTemplate::new(prompt.to_owned()).map_err(|e| bad(&e))?;
        let profile = self
            .profile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let system = options.system.as_deref();
        let assembled = assemble(
            system,
            &template,
            &profile,
            &Sanitizer::default(),
            self.bundle.chat_template.as_ref(),
            tokenizer,
        )
        .map_err(|e| bad(&e))?;
        let record =
            TransparencyRecord::new(self.bundle.model_info(), system, &template, &assembled);
        let mut req = GenerateRequest::from_assembled(&assembled);
        req.sampling = SamplingParams {
            temperature: options.temperature,
            top_p: (options.top_p < 1.0).then_some(options.top_p),
            top_k: (options.top_k > 0).then_some(options.top_k as usize),
            seed: options.seed.unwrap_or(0),
            ..SamplingParams::default()
        };
        req.max_tokens = options.max_tokens;
        req.stop = options.stop.clone();
        req.record = Some(record);
        Ok(req)
    }
}

/// A generation running in the background.
#[derive(uniffi::Object)]
pub struct GenerationHandle {
    cancel: tokio::sync::watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<Result<Completion, EdgeError>>>>,
    runtime: tokio::runtime::Handle,
}

#[uniffi::export]
impl GenerationHandle {
    /// Asks the server to stop; the generation then ends as `cancelled` (the text so far is
    /// kept). Harmless after the end.
    pub fn cancel(&self) {
        let _ = self.cancel.send(true);
    }

    /// Blocks until the generation ends. A second call is an error.
    pub fn wait(&self) -> Result<Completion, EdgeError> {
        let task = self
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| EdgeError::Generation("already waited for".into()))?;
        self.runtime
            .block_on(task)
            .map_err(|e| EdgeError::Generation(format!("the generation task failed: {e}")))?
    }
}

/// Follows a generation to its end, handing text to `listener`, cancelling when asked.
async fn follow(
    mut generation: tandem_edge::Generation,
    listener: Option<Box<dyn TextListener>>,
    mut cancel: tokio::sync::watch::Receiver<bool>,
) -> Result<Completion, EdgeError> {
    let mut cancelled = false;
    loop {
        let event = tokio::select! {
            e = generation.next() => e,
            changed = cancel.changed(), if !cancelled => {
                if changed.is_ok() && *cancel.borrow() {
                    cancelled = true;
                    generation.cancel();
                }
                continue;
            }
        };
        match event {
            None => {
                return Err(EdgeError::Generation(
                    "the generation ended without a result".into(),
                ))
            }
            Some(Event::Token { text, .. }) => {
                if let Some(l) = &listener {
                    if !text.is_empty() {
                        l.on_text(text);
                    }
                }
            }
            Some(Event::Done(f)) => {
                let transparency_json = f
                    .record
                    .as_ref()
                    .map(|r| serde_json::to_string(r).unwrap_or_default())
                    .unwrap_or_default();
                return Ok(Completion {
                    text: f.text,
                    finish_reason: f.reason.name().to_owned(),
                    prompt_tokens: f.usage.prompt_tokens,
                    output_tokens: f.usage.output_tokens,
                    token_ids: f.token_ids,
                    time_to_first_token_s: f.timings.time_to_first_token_s,
                    total_s: f.timings.total_s,
                    transparency_json,
                });
            }
            Some(Event::Error(e)) => return Err(EdgeError::Generation(e.to_string())),
            Some(_) => {}
        }
    }
}
