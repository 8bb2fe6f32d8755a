//! The OpenAI wire shapes the endpoint answers with: errors, chat completions and their
//! stream chunks, text completions, the model list.
//!
//! Only the fields the OpenAI API reference defines, with the same names and nesting, so the
//! official SDKs parse them into their own types; fields the endpoint has no value for
//! (`logprobs`, `system_fingerprint`, `refusal`) are `null` as in OpenAI's own answers.
//! Every error is [`ApiError`]: `{"error": {"message", "type", "param", "code"}}` with the
//! HTTP status the SDKs map to their exception classes (400 → `BadRequestError`, 401 →
//! `AuthenticationError`, 404 → `NotFoundError`, …). Messages name parameters, never prompt
//! text or profile values.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tandem_protocol::{DoneReason, FinishReason};

/// An error answer. See the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    /// The request parameter at fault (`n`, `messages[1].content`, …).
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    /// A 400 `invalid_request_error` naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 about the request as a whole (bad JSON, wrong content type).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// A parameter this endpoint does not implement: 400 with code `unsupported_parameter`.
    pub fn unsupported(param: &str, what: &str) -> Self {
        Self::invalid(
            param,
            format!("{what} is not supported by the Tandem device endpoint"),
        )
        .with_code("unsupported_parameter")
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn not_found(message: impl Into<String>, code: &str) -> Self {
        Self {
            status: 404,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code.into()),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: 401,
            message: "a valid API key is required (Authorization: Bearer KEY)".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key".into()),
        }
    }

    pub fn server(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some(code.into()),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// OpenAI's `finish_reason` for a generation's end.
pub(crate) fn finish_reason(reason: DoneReason) -> &'static str {
    match reason {
        DoneReason::Finished(FinishReason::Length) => "length",
        DoneReason::Finished(FinishReason::Eos | FinishReason::StopString)
        | DoneReason::Cancelled => "stop",
    }
}

/// Token counts: the prompt as tokenized on the device, the tokens the cloud generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct ApiUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl ApiUsage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// What every answer about one completion shares.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Head<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
}

#[derive(Debug, Serialize)]
pub(crate) struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
    pub refusal: Option<()>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

/// `chat.completion`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion<'a> {
    #[serde(flatten)]
    pub head: Head<'a>,
    pub system_fingerprint: Option<()>,
    pub choices: [ChatChoice<'a>; 1],
    pub usage: ApiUsage,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion.chunk`. With `stream_options.include_usage`, every chunk carries
/// `"usage": null` except the last, whose `choices` is empty and whose `usage` is set.
#[derive(Debug, Serialize)]
pub(crate) struct ChatChunk<'a> {
    #[serde(flatten)]
    pub head: Head<'a>,
    pub system_fingerprint: Option<()>,
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<ApiUsage>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct TextChoice<'a> {
    pub text: &'a str,
    pub index: u32,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// `text_completion`, whole or as a stream chunk (`finish_reason` null until the last).
#[derive(Debug, Serialize)]
pub(crate) struct TextCompletion<'a> {
    #[serde(flatten)]
    pub head: Head<'a>,
    pub system_fingerprint: Option<()>,
    pub choices: Vec<TextChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<ApiUsage>>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub(crate) struct ModelEntry<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// Unix seconds now: the `created` of the objects answered.
pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
