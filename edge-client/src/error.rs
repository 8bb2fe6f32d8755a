//! The crate's error types, in one module below every module that returns them.
//!
//! [`PromptError`] (profiles, templates, the sanitizer, prompt assembly), [`ClientError`] (a
//! generation against the cloud) and [`InboxError`] with its [`ApiCode`] (the inbox REST
//! calls and answering a partner's prompt). They live here, not beside the code that returns
//! them, because several layers share them: the sanitizer and the prompt assembly both return
//! [`PromptError`], the device token (checked below the TLS and inbox modules) returns
//! [`InboxError`], and [`InboxError`] wraps the other two. Each is re-exported where callers
//! have always found it (`tandem_edge::prompt::PromptError`, `tandem_edge::client::ClientError`,
//! `tandem_edge::inbox::{InboxError, ApiCode}`, and the crate root).
//!
//! Messages name files, fields, rules and codes, never profile values, prompt text, the
//! device token or a ticket.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tandem_model::ModelError;
use tandem_protocol::{ErrorCode, WireError};

// ---------------------------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------------------------

/// Errors from loading profiles and templates, configuring the sanitizer and assembling a
/// prompt. Messages name files, fields and rules, never profile values.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// A file could not be read.
    #[error("{what} {path}: {error}")]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// The profile is not valid JSON.
    #[error("profile{}: not valid JSON: {reason}", origin(.path))]
    ProfileJson {
        path: Option<PathBuf>,
        reason: String,
    },
    /// The profile is valid JSON but not an object of fields.
    #[error("profile{}: must be a JSON object of fields, found {found}", origin(.path))]
    ProfileNotObject {
        path: Option<PathBuf>,
        found: &'static str,
    },
    /// A setting in the profile (see [`ProfileSettings`](crate::prompt::ProfileSettings)) has the wrong shape.
    #[error("profile{}: setting `{key}` {reason}", origin(.path))]
    ProfileSetting {
        path: Option<PathBuf>,
        key: &'static str,
        reason: String,
    },
    /// The prompt template does not compile.
    #[error("prompt template: {0}")]
    TemplateSyntax(String),
    /// The template uses fields (or nested keys, `address.city`) the profile does not have.
    #[error("the prompt template uses {} that the profile does not have", field_list(.fields))]
    MissingFields { fields: Vec<String> },
    /// The template failed while rendering for another reason.
    #[error("prompt template: rendering failed: {0}")]
    TemplateRender(String),
    /// A sanitizer rule is invalid.
    #[error("sanitizer rule `{name}`: {reason}")]
    Rule { name: String, reason: String },
    /// The sanitizer configuration disables a rule that does not exist.
    #[error("sanitizer: there is no rule named `{0}` to disable")]
    UnknownRule(String),
    /// A system prompt was given for a model without a chat template.
    #[error("a system prompt needs a chat template, and none was given for this model")]
    SystemWithoutChatTemplate,
    /// The rendered user turn contains a control token's text: the template or a profile value
    /// tried to write chat structure (e.g. open a turn posing as the system prompt).
    #[error(
        "the rendered prompt contains the model's control token `{0}` (from the template or a \
         profile value); prompt text may not contain control tokens"
    )]
    ControlToken(String),
    /// The prompt came out with no tokens.
    #[error("the assembled prompt has no tokens")]
    EmptyPrompt,
    /// The chat template or the tokenizer failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

fn origin(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

fn field_list(fields: &[String]) -> String {
    let quoted: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
    match quoted.as_slice() {
        [one] => format!("the field {one}"),
        _ => format!("the fields {}", quoted.join(", ")),
    }
}

// ---------------------------------------------------------------------------------------------
// Generations
// ---------------------------------------------------------------------------------------------

/// Why a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    Request(String),
    /// The cloud answered with an error that ends the generation (`1xx`, `2xx`, `5xx`).
    #[error("the server refused: {code} ({}): {message}", code.as_u16())]
    Server { code: ErrorCode, message: String },
    /// The cloud broke the protocol (an unexpected frame, a gap in token numbers, …).
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("edge model: {0}")]
    Model(#[from] ModelError),
    /// No connection could be made (or kept) within the reconnect policy.
    #[error("gave up after {attempts} connection attempt(s) in {elapsed_s:.1}s: {last}")]
    Unreachable {
        attempts: u32,
        elapsed_s: f64,
        last: String,
    },
    /// A connection failure that retrying cannot fix: TLS (an untrusted, expired or
    /// wrongly named certificate), or an upgrade the server refused with a client error.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The generation's task ended without reporting (a panic).
    #[error("the generation task stopped unexpectedly")]
    TaskGone,
}

// ---------------------------------------------------------------------------------------------
// The inbox
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// A bad base URL, a bad token, or no inbox configured.
    #[error("inbox configuration: {0}")]
    Config(String),
    /// The server answered with an error.
    #[error(
        "the inbox server answered {status} ({code}): {message}{}",
        retry_hint(.retry_after)
    )]
    Api {
        status: u16,
        code: ApiCode,
        message: String,
        /// The server's `Retry-After` (sent with `429` and `503`).
        retry_after: Option<Duration>,
    },
    /// No complete answer: connecting, sending or reading failed, or the timeout passed.
    #[error("inbox request failed: {0}")]
    Transport(String),
    /// The TLS handshake failed: an untrusted or expired certificate, a wrong host name, no
    /// common protocol. Permanent: retrying cannot fix it.
    #[error("inbox TLS: {0}")]
    Tls(String),
    /// The answer's body is longer than
    /// [`InboxConfig::max_response_bytes`](crate::inbox::InboxConfig::max_response_bytes).
    #[error("the inbox server's answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// A success answer that is not what the API promises.
    #[error("unexpected answer from the inbox server: {0}")]
    Decode(String),
    /// The prompt cannot be rendered with this profile and model (nothing was sent).
    #[error("cannot prepare the prompt: {0}")]
    Prompt(#[from] PromptError),
    /// The generation could not start.
    #[error(transparent)]
    Client(#[from] ClientError),
}

fn retry_hint(retry_after: &Option<Duration>) -> String {
    retry_after
        .map(|d| format!(" (retry after {} s)", d.as_secs()))
        .unwrap_or_default()
}

impl InboxError {
    /// The server's error code, for [`InboxError::Api`].
    pub fn api_code(&self) -> Option<&ApiCode> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The stable error codes of the REST API that the inbox calls can meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiCode {
    /// The device token is unknown, expired or revoked (401).
    Unauthorized,
    /// The device token was issued before the server's store lost its data (401,
    /// `device_token_stale`): get a new one from the provider.
    TokenStale,
    /// No such prompt in this user's inbox (404).
    NotFound,
    /// Already accepted or declined, expired or cancelled (409).
    Conflict,
    /// Too many calls; see `retry_after` (429).
    RateLimited,
    /// A backing service is down; see `retry_after` (503).
    Unavailable,
    /// Any other code, as the server wrote it (or `http_<status>` without a JSON error body).
    Other(String),
}

impl ApiCode {
    /// The code as the server wrote it.
    pub(crate) fn parse(code: &str) -> Self {
        match code {
            "unauthorized" => Self::Unauthorized,
            "device_token_stale" => Self::TokenStale,
            "not_found" => Self::NotFound,
            "conflict" => Self::Conflict,
            "rate_limited" => Self::RateLimited,
            "unavailable" => Self::Unavailable,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::TokenStale => "device_token_stale",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Other(code) => code,
        }
    }
}

impl fmt::Display for ApiCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
