//! One completion from start to end: the generation through [`EdgeClient`], answered whole
//! (`chat.completion`, `text_completion`) or as Server-Sent Events (`chat.completion.chunk`
//! objects, or `text_completion` chunks, then `data: [DONE]`).
//!
//! A job waits for the cloud to accept the session before the HTTP answer starts, so a
//! refusal (overloaded, out of range, unreachable) is an HTTP error with its status, not a
//! stream that fails. After that, a failure mid-stream is one `data: {"error": …}` event
//! (which the OpenAI SDKs raise as `APIError`) and the stream ends without `[DONE]`. A client
//! that goes away drops the stream; the job then cancels the generation on the cloud and
//! still stores its record (finish reason `cancelled`).
//!
//! The stream's deltas are the cloud's text deltas as they arrive, so their concatenation is
//! the whole answer's `content`. Usage is the device's count: the prompt's tokens as
//! tokenized here, and every token the cloud generated (an end-of-sequence token included).
//! The transparency record is stored before the last chunk is sent.

use std::sync::Arc;

use hyper::body::Bytes;
use hyper::Response;
use serde_json::json;
use tandem_protocol::{DoneReason, ErrorCode};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::api::{
    finish_reason, now_s, ApiError, ApiUsage, AssistantMessage, ChatChoice, ChatChunk,
    ChatCompletion, ChunkChoice, Delta, Head, TextChoice, TextCompletion,
};
use super::http::{self, Body, DONE_EVENT};
use super::request::{Route, ValidRequest};
use super::state::Service;
use crate::client::{ClientError, Event, Finished, GenerateRequest, Generation};

/// A completion ready to start.
pub(crate) struct Prepared {
    pub request: GenerateRequest,
    pub prompt_tokens: u32,
}

/// A started completion. See the module doc.
pub(crate) struct Job {
    svc: Arc<Service>,
    route: Route,
    id: String,
    created: u64,
    prompt_tokens: u32,
    include_usage: bool,
    user: Option<String>,
    generation: Generation,
    /// A `Done` that came before `Opened` was seen (nothing else can precede it).
    early_done: Option<Box<Finished>>,
    _permit: OwnedSemaphorePermit,
}

impl Job {
    /// Starts the generation and waits until the cloud opened its session.
    pub(crate) async fn start(
        svc: Arc<Service>,
        route: Route,
        valid: &ValidRequest,
        prepared: Prepared,
        permit: OwnedSemaphorePermit,
    ) -> Result<Self, ApiError> {
        let mut generation = svc
            .client
            .generate(prepared.request)
            .map_err(client_error)?;
        let mut early_done = None;
        loop {
            match generation.next().await {
                Some(Event::Opened { .. }) => break,
                Some(Event::Done(f)) => {
                    early_done = Some(f);
                    break;
                }
                Some(Event::Error(e)) => return Err(client_error(e)),
                Some(_) => {}
                None => return Err(client_error(ClientError::TaskGone)),
            }
        }
        let prefix = match route {
            Route::Chat => "chatcmpl",
            Route::Completions => "cmpl",
        };
        Ok(Self {
            svc,
            route,
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: now_s(),
            prompt_tokens: prepared.prompt_tokens,
            include_usage: valid.include_usage,
            user: valid.user.clone(),
            generation,
            early_done,
            _permit: permit,
        })
    }

    /// The completion's id, which also names its transparency record.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    fn head(&self, object: &'static str) -> Head<'_> {
        Head {
            id: &self.id,
            object,
            created: self.created,
            model: &self.svc.model_id,
        }
    }

    fn usage(&self, f: &Finished) -> ApiUsage {
        let generated = u32::try_from(f.token_ids.len()).unwrap_or(u32::MAX);
        ApiUsage::new(self.prompt_tokens, generated)
    }

    /// Waits for the end; the whole answer.
    pub(crate) async fn collect(mut self) -> Result<Response<Body>, ApiError> {
        let finished = match self.early_done.take() {
            Some(f) => *f,
            None => loop {
                match self.generation.next().await {
                    Some(Event::Done(f)) => break *f,
                    Some(Event::Error(e)) => return Err(client_error(e)),
                    Some(_) => {}
                    None => return Err(client_error(ClientError::TaskGone)),
                }
            },
        };
        self.store(&finished);
        let usage = self.usage(&finished);
        let reason = finish_reason(finished.reason);
        let res = match self.route {
            Route::Chat => http::json(
                200,
                &ChatCompletion {
                    head: self.head("chat.completion"),
                    system_fingerprint: None,
                    choices: [ChatChoice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: &finished.text,
                            refusal: None,
                        },
                        logprobs: None,
                        finish_reason: reason,
                    }],
                    usage,
                },
            ),
            Route::Completions => http::json(
                200,
                &TextCompletion {
                    head: self.head("text_completion"),
                    system_fingerprint: None,
                    choices: vec![text_choice(&finished.text, Some(reason))],
                    usage: Some(Some(usage)),
                },
            ),
        };
        Ok(res)
    }

    /// Answers with an event stream now, and feeds it from a task of its own.
    pub(crate) fn stream(self) -> Response<Body> {
        let (tx, res) = http::sse();
        tokio::spawn(self.pump(tx));
        res
    }

    async fn pump(mut self, tx: mpsc::Sender<Bytes>) {
        if self.pump_inner(&tx).await.is_ok() {
            return;
        }
        // The client went away: stop the generation, and keep its record all the same (hidden
        // states did leave the device).
        tracing::info!("openai: the client left a stream; cancelling");
        self.generation.cancel();
        while let Some(event) = self.generation.next().await {
            if let Event::Done(f) = event {
                self.store(&f);
            }
        }
    }

    async fn pump_inner(&mut self, tx: &mpsc::Sender<Bytes>) -> Result<(), Gone> {
        if self.route == Route::Chat {
            let delta = Delta {
                role: Some("assistant"),
                content: Some(""),
            };
            send(tx, self.chunk(delta, None)).await?;
        }
        let finished = loop {
            if let Some(f) = self.early_done.take() {
                break *f;
            }
            match self.generation.next().await {
                Some(Event::Token { text, .. }) if !text.is_empty() => {
                    send(tx, self.text_chunk(&text, None)).await?;
                }
                Some(Event::Done(f)) => break *f,
                Some(Event::Error(e)) => {
                    let e = client_error(e);
                    tracing::warn!(code = ?e.code, "openai: generation failed mid-stream");
                    return send(tx, http::event(&e.body())).await;
                }
                Some(_) => {}
                None => {
                    let e = client_error(ClientError::TaskGone);
                    return send(tx, http::event(&e.body())).await;
                }
            }
        };
        self.store(&finished);
        let reason = finish_reason(finished.reason);
        let last = match self.route {
            Route::Chat => self.chunk(Delta::default(), Some(reason)),
            Route::Completions => self.text_chunk("", Some(reason)),
        };
        send(tx, last).await?;
        if self.include_usage {
            send(tx, self.usage_chunk(self.usage(&finished))).await?;
        }
        send(tx, Bytes::from_static(DONE_EVENT)).await
    }

    /// A content chunk of either route.
    fn text_chunk(&self, text: &str, reason: Option<&'static str>) -> Bytes {
        match self.route {
            Route::Chat => self.chunk(
                Delta {
                    role: None,
                    content: Some(text),
                },
                reason,
            ),
            Route::Completions => http::event(&TextCompletion {
                head: self.head("text_completion"),
                system_fingerprint: None,
                choices: vec![text_choice(text, reason)],
                usage: self.include_usage.then_some(None),
            }),
        }
    }

    fn chunk(&self, delta: Delta<'_>, reason: Option<&'static str>) -> Bytes {
        http::event(&ChatChunk {
            head: self.head("chat.completion.chunk"),
            system_fingerprint: None,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason: reason,
            }],
            usage: self.include_usage.then_some(None),
        })
    }

    /// The last chunk with `stream_options.include_usage`: no choices, the usage.
    fn usage_chunk(&self, usage: ApiUsage) -> Bytes {
        match self.route {
            Route::Chat => http::event(&ChatChunk {
                head: self.head("chat.completion.chunk"),
                system_fingerprint: None,
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            Route::Completions => http::event(&TextCompletion {
                head: self.head("text_completion"),
                system_fingerprint: None,
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        }
    }

    /// Keeps the transparency entry of the finished completion.
    fn store(&self, f: &Finished) {
        let entry = json!({
            "id": self.id,
            "object": "tandem.transparency",
            "created": self.created,
            "model": self.svc.model_id,
            "user": self.user,
            "finish_reason": match f.reason {
                DoneReason::Cancelled => "cancelled",
                reason => finish_reason(reason),
            },
            "usage": self.usage(f),
            "record": f.record,
        });
        self.svc.records.put(&self.id, entry);
    }
}

fn text_choice<'a>(text: &'a str, reason: Option<&'static str>) -> TextChoice<'a> {
    TextChoice {
        text,
        index: 0,
        logprobs: None,
        finish_reason: reason,
    }
}

/// The stream's reader went away.
struct Gone;

async fn send(tx: &mpsc::Sender<Bytes>, event: Bytes) -> Result<(), Gone> {
    tx.send(event).await.map_err(|_| Gone)
}

/// How a failed generation is answered.
pub(crate) fn client_error(e: ClientError) -> ApiError {
    match &e {
        ClientError::Request(_) => ApiError::bad_request(e.to_string()),
        ClientError::Server { code, .. } => match code {
            ErrorCode::BadSamplingParams | ErrorCode::ContextLengthExceeded => {
                ApiError::bad_request(e.to_string()).with_code(code.as_str())
            }
            ErrorCode::Overloaded | ErrorCode::RateLimited => ApiError {
                kind: "rate_limit_error",
                ..ApiError::server(429, code.as_str(), e.to_string())
            },
            _ => ApiError::server(502, code.as_str(), e.to_string()),
        },
        ClientError::Unreachable { .. } => {
            ApiError::server(503, "cloud_unreachable", e.to_string())
        }
        ClientError::Connect { .. } => ApiError::server(502, "cloud_connect_failed", e.to_string()),
        ClientError::Protocol(_) | ClientError::Wire(_) => {
            ApiError::server(502, "cloud_protocol_error", e.to_string())
        }
        ClientError::Model(_) | ClientError::TaskGone => {
            ApiError::server(500, "edge_error", e.to_string())
        }
    }
}
