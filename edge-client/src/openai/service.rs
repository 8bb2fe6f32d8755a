//! The endpoint's routes: authentication, routing, preparing a completion (prompt assembly
//! on the device, limits, the transparency record), and answers from the local transparency
//! store (which, with the rest of the shared state, lives in `state`).
//!
//! Invariants: the prompt is assembled (templates filled, profile fields sanitized, control
//! tokens refused) before anything is computed or sent; prompt assembly runs on the blocking
//! pool like the edge layers, never on an async worker; at most `max_concurrent` generations
//! run at once (the rest wait for a permit). The store keeps the last `records_kept`
//! finished completions' records, in memory only, for `GET /v1/tandem/transparency/{id}`.
//!
//! Privacy: logs carry routes, counts and error codes, never prompt text, profile values or
//! output; records (which hold the user's own data) are answered on this endpoint only.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Method, Request, Response};
use serde_json::json;

use super::api::{ApiError, ModelEntry};
use super::http::{self, Body};
use super::request::{self, Input, Route, ValidRequest};
use super::state::Service;
use super::stream::{Job, Prepared};
use crate::client::GenerateRequest;
use crate::conversation::{assemble_conversation, ConversationError};
use crate::prompt::{assemble, PromptError, PromptTemplate};
use crate::transparency::TransparencyRecord;

/// The response header naming a completion's transparency record.
pub const TRANSPARENCY_HEADER: &str = "x-tandem-transparency-id";

impl Service {
    /// Answers one request.
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if !self.authorized(&req) {
            return http::error(&ApiError::unauthorized());
        }
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let answer = match (method, path.as_str()) {
            (Method::GET, "/v1/models") => Ok(self.models()),
            (Method::GET, p) if p.starts_with("/v1/models/") => self.model(&p[11..]),
            (Method::POST, "/v1/chat/completions") => self.complete(Route::Chat, req).await,
            (Method::POST, "/v1/completions") => self.complete(Route::Completions, req).await,
            (Method::GET, p) if p.starts_with("/v1/tandem/transparency/") => {
                self.transparency(&p[24..])
            }
            (_, "/v1/models" | "/v1/chat/completions" | "/v1/completions") => Err(ApiError {
                status: 405,
                ..ApiError::bad_request(format!("method not allowed on {path}"))
            }),
            _ => Err(ApiError::not_found(
                format!("no route {path} on the Tandem device endpoint"),
                "unknown_url",
            )),
        };
        answer.unwrap_or_else(|e| {
            tracing::debug!(status = e.status, code = ?e.code, param = ?e.param, "openai: refused");
            http::error(&e)
        })
    }

    /// With an API key configured, the request must carry `Authorization: Bearer KEY`.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(key) = &self.api_key else {
            return true;
        };
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        constant_time_eq(given.as_bytes(), key.as_bytes())
    }

    fn entry(&self) -> ModelEntry<'_> {
        ModelEntry {
            id: &self.model_id,
            object: "model",
            created: self.started,
            owned_by: "tandem",
        }
    }

    fn models(&self) -> Response<Body> {
        http::json(200, &json!({"object": "list", "data": [self.entry()]}))
    }

    fn model(&self, id: &str) -> Result<Response<Body>, ApiError> {
        if id != self.model_id {
            return Err(ApiError::not_found(
                format!("the model `{id}` does not exist"),
                "model_not_found",
            ));
        }
        Ok(http::json(200, &self.entry()))
    }

    fn transparency(&self, id: &str) -> Result<Response<Body>, ApiError> {
        match self.records.get(id) {
            Some(entry) => Ok(http::json(200, &entry)),
            None => Err(ApiError::not_found(
                "no finished completion with this id (records are kept in memory, for the \
                 most recent completions only)",
                "transparency_record_not_found",
            )),
        }
    }

    async fn complete(
        self: Arc<Self>,
        route: Route,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let body = http::read_json(req).await?;
        let valid = request::parse(route, body, &self.model_id)?;
        let svc = self.clone();
        let (valid, prepared) = tokio::task::spawn_blocking(move || {
            let prepared = svc.prepare(&valid);
            (valid, prepared)
        })
        .await
        .map_err(|_| ApiError::server(500, "internal", "prompt assembly stopped"))?;
        let prepared = prepared?;
        tracing::info!(
            route = ?route,
            stream = valid.stream,
            prompt_tokens = prepared.prompt_tokens,
            max_tokens = prepared.request.max_tokens,
            "openai: completion"
        );
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::server(503, "shutting_down", "the endpoint is stopping"))?;
        let job = Job::start(self, route, &valid, prepared, permit).await?;
        let id = HeaderValue::from_str(job.id()).ok();
        let mut res = if valid.stream {
            job.stream()
        } else {
            job.collect().await?
        };
        if let Some(id) = id {
            res.headers_mut().insert(TRANSPARENCY_HEADER, id);
        }
        Ok(res)
    }

    /// Assembles the prompt on the device and builds the generation request. CPU work
    /// (templates, tokenizer): runs on the blocking pool.
    fn prepare(&self, valid: &ValidRequest) -> Result<Prepared, ApiError> {
        let (prompt, system, template) = match &valid.input {
            Input::Chat(turns) => {
                let chat = self.chat.as_ref().ok_or_else(|| {
                    ApiError::invalid(
                        "messages",
                        "this model has no chat template: use /v1/completions",
                    )
                })?;
                let system = self.system_prompt.as_deref();
                let a = assemble_conversation(
                    system,
                    turns,
                    &self.profile,
                    &self.sanitizer,
                    chat,
                    &self.tokenizer,
                )
                .map_err(conversation_error)?;
                (a.prompt, system, a.template_text)
            }
            Input::Text(text) => {
                let template = PromptTemplate::new(text.clone()).map_err(prompt_error("prompt"))?;
                let p = assemble(
                    None,
                    &template,
                    &self.profile,
                    &self.sanitizer,
                    None,
                    &self.tokenizer,
                )
                .map_err(prompt_error("prompt"))?;
                (p, None, text.clone())
            }
        };
        let max_tokens = self.max_tokens(valid, prompt.ids.len())?;
        let record =
            TransparencyRecord::from_parts(self.model_info.clone(), system, template, &prompt);
        let mut request = GenerateRequest::from_assembled(&prompt);
        request.sampling = valid.sampling.clone();
        request.max_tokens = max_tokens;
        request.stop = valid.stop.clone();
        request.record = Some(record);
        Ok(Prepared {
            request,
            prompt_tokens: u32::try_from(prompt.ids.len()).unwrap_or(u32::MAX),
        })
    }

    /// The token limit: as asked, or the default, within the context left after the prompt.
    fn max_tokens(&self, valid: &ValidRequest, prompt_len: usize) -> Result<u32, ApiError> {
        let left = self.context.saturating_sub(prompt_len);
        let param = match valid.input {
            Input::Chat(_) => "messages",
            Input::Text(_) => "prompt",
        };
        if left == 0 {
            return Err(ApiError::invalid(
                param,
                format!(
                    "the prompt has {prompt_len} tokens; the model's context is {}",
                    self.context
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let left = u32::try_from(left).unwrap_or(u32::MAX);
        match valid.max_tokens {
            None => Ok(self.default_max_tokens.min(left)),
            Some(n) if n <= left => Ok(n),
            Some(n) => Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "the prompt ({prompt_len} tokens) plus max_tokens ({n}) exceed the model's \
                     context of {} tokens",
                    self.context
                ),
            )
            .with_code("context_length_exceeded")),
        }
    }
}

/// Whether `a` equals `b`, in time that does not depend on where they differ (`subtle`).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

fn conversation_error(e: ConversationError) -> ApiError {
    let param = match e.turn {
        Some(i) => format!("messages[{i}].content"),
        None => "messages".to_owned(),
    };
    prompt_error(param)(e.error)
}

/// A prompt that cannot be assembled: the app's fault (400) unless the model failed.
fn prompt_error(param: impl Into<String>) -> impl Fn(PromptError) -> ApiError {
    let param = param.into();
    move |e| {
        let code = match &e {
            PromptError::MissingFields { .. } => "missing_profile_fields",
            PromptError::ControlToken(_) => "control_token",
            PromptError::TemplateSyntax(_) | PromptError::TemplateRender(_) => "template_error",
            PromptError::EmptyPrompt => "empty_prompt",
            PromptError::Model(_) => {
                return ApiError::server(500, "edge_model_error", e.to_string());
            }
            _ => "invalid_prompt",
        };
        ApiError::invalid(param.clone(), e.to_string()).with_code(code)
    }
}
