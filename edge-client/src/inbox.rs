//! The device's inbox: prompts that partners (third parties) sent to this user, waiting for
//! the device to answer or decline them (DESIGN.md §1, §2 steps 1–2, §9).
//!
//! # Flow
//! 1. [`EdgeClient::inbox`] (`GET /v1/edge/inbox`) lists the pending [`InboxItem`]s: who asks
//!    ([`PartnerPrompt::partner`]), the template over profile fields, the provider's system
//!    prompt, the token limit, the sampling parameters and the expiry.
//! 2. The device decides per item: [`AutoAccept::decide`] says [`Decision::Accept`] for
//!    partners the user trusts (the profile's `auto_accept_partners` setting, or the app's own
//!    list) and [`Decision::Ask`] otherwise. Before accepting, [`PartnerPrompt::assemble`]
//!    shows whether the local profile can fill the template at all: a template naming a field
//!    the profile lacks is [`PromptError::MissingFields`] before anything is sent.
//! 3. [`EdgeClient::accept`] (`POST …/accept`) returns [`Accepted`], which carries a one-use
//!    [`Ticket`]; [`EdgeClient::decline`] (`POST …/decline`) drops the item.
//! 4. [`EdgeClient::answer`] renders the template with the local profile (sanitized), puts it
//!    under the provider's system prompt with the model's chat template (the system turn is
//!    the shared prefix, its own chunk on the wire), and runs the generation over the usual
//!    WebSocket path with the ticket as `Open`'s prompt id and the partner's `max_tokens` and
//!    sampling. The cloud stores the output as the prompt's result for this user, and refuses
//!    a ticket that was used, expired or cancelled (`bad_prompt_ticket`, a `2xx` code that
//!    ends the generation with [`ClientError::Server`]). The [`TransparencyRecord`] names the
//!    partner and the prompt id.
//!
//! # Configuration
//! The REST calls need [`ClientConfig::inbox`] set to an [`InboxConfig`]: the API's base URL
//! (`https://HOST` or, on loopback, `http://HOST:PORT`) and the device token the provider issued (`tdv_…`, sent as
//! `Authorization: Bearer`). An app that only lists its inbox, without a model, can use an
//! [`InboxClient`] directly.
//!
//! # Limits
//! `https://` uses the same rustls settings as `wss://` (web roots plus
//! [`InboxConfig::with_ca_certs`]); a failed certificate check is [`InboxError::Tls`], final.
//! Each call opens one connection, runs under [`InboxConfig::timeout`] (connect included) and
//! reads at most [`InboxConfig::max_response_bytes`] of body. Nothing retries on its own:
//! `429` and `503` come back as [`InboxError::Api`] with the server's `Retry-After`.
//!
//! # Privacy
//! The device token and tickets are credentials: their `Debug` output is redacted, they have
//! no `Display`, and no error message or log line contains them. Rendering happens on the
//! device; only hidden states leave it, as for any generation.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tandem_model::chat::ChatTemplate;
use tandem_model::tokenizer::TextTokenizer;
use tandem_protocol::wire::MAX_PROMPT_ID_LEN;
use tandem_protocol::SamplingParams;

use crate::bundle::EdgeBundle;
use crate::client::{ClientConfig, ClientError, EdgeClient, GenerateRequest, Generation};
use crate::prompt::{assemble, AssembledPrompt, Profile, PromptError, PromptTemplate};
use crate::sanitize::Sanitizer;
use crate::transparency::{ModelInfo, TransparencyRecord};
use tandem_http::{BaseUrl as ApiBase, HttpError};

/// Default for [`InboxConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`InboxConfig::max_response_bytes`] (1 MiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Longest device token accepted.
const MAX_TOKEN_LEN: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why an inbox call or an answer failed. Messages never contain the device token or a ticket.
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
    /// The answer's body is longer than [`InboxConfig::max_response_bytes`].
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
    fn parse(code: &str) -> Self {
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

// ---------------------------------------------------------------------------------------------
// Configuration and credentials
// ---------------------------------------------------------------------------------------------

/// The device token the provider issued (`tdv_…`): opaque, sent as a bearer token. Its
/// `Debug` is redacted and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(String);

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceToken(<redacted>)")
    }
}

impl DeviceToken {
    /// Checks that `token` can travel in a header: 1 to 4096 visible ASCII characters.
    pub fn new(token: impl Into<String>) -> Result<Self, InboxError> {
        let token = token.into();
        let token = token.trim();
        if token.is_empty() {
            return Err(InboxError::Config("the device token is empty".into()));
        }
        if token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InboxError::Config(format!(
                "the device token must be at most {MAX_TOKEN_LEN} visible ASCII characters"
            )));
        }
        Ok(Self(token.to_owned()))
    }

    /// The token itself, for sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DeviceToken {
    type Err = InboxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Where the device's inbox is and how the device signs in. See the module doc.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    api: ApiBase,
    token: DeviceToken,
    /// The longest one call may take, connecting included.
    pub timeout: Duration,
    /// The largest response body read.
    pub max_response_bytes: usize,
    /// TLS settings for an `https://` base (the web roots plus [`InboxConfig::with_ca_certs`]).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl InboxConfig {
    /// `api_base` is the server's REST root, `https://HOST[:PORT]` or `http://HOST:PORT` (an
    /// optional path prefix is kept). `https://` trusts the web roots; add a private CA with
    /// [`InboxConfig::with_ca_certs`].
    pub fn new(api_base: &str, token: DeviceToken) -> Result<Self, InboxError> {
        let api = ApiBase::parse(api_base).map_err(InboxError::Config)?;
        let tls = if api.is_tls() {
            Some(crate::tls::client_config(&[]).map_err(InboxError::Config)?)
        } else {
            None
        };
        Ok(Self {
            api,
            token,
            timeout: DEFAULT_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            tls,
        })
    }

    /// Trusts `cas` (a private CA, e.g. from [`crate::tls::read_ca_file`]) besides the web
    /// roots for an `https://` base; the same settings the `wss://` connection uses.
    pub fn with_ca_certs(
        mut self,
        cas: &[crate::tls::CertificateDer<'static>],
    ) -> Result<Self, InboxError> {
        if self.api.is_tls() {
            self.tls = Some(crate::tls::client_config(cas).map_err(InboxError::Config)?);
        }
        Ok(self)
    }

    /// The base URL, normalized.
    pub fn api_base(&self) -> String {
        self.api.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// API types
// ---------------------------------------------------------------------------------------------

/// An inbox prompt's id. Checked when parsed: 1 to 64 ASCII letters, digits, `-` or `_`
/// (the server writes 16 lowercase hex digits), so it is safe inside a URL path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PromptId(String);

impl PromptId {
    pub fn new(id: impl Into<String>) -> Result<Self, InboxError> {
        let id = id.into();
        let ok = (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(id))
        } else {
            Err(InboxError::Decode(format!("`{id}` is not a prompt id")))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PromptId {
    type Error = InboxError;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl From<PromptId> for String {
    fn from(id: PromptId) -> Self {
        id.0
    }
}

impl fmt::Display for PromptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The one-use ticket that ties a generation to an accepted prompt (`tkt_…`; it travels as
/// `Open`'s prompt id). A credential: redacted `Debug`, no `Display`. Checked when parsed:
/// visible ASCII, at most the wire's prompt-id length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ticket(String);

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ticket(<redacted>)")
    }
}

impl Ticket {
    /// The ticket itself, for the `Open` frame.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Ticket {
    type Error = InboxError;

    fn try_from(t: String) -> Result<Self, Self::Error> {
        if (1..=MAX_PROMPT_ID_LEN).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(t))
        } else {
            Err(InboxError::Decode(format!(
                "the ticket must be 1 to {MAX_PROMPT_ID_LEN} visible ASCII characters"
            )))
        }
    }
}

impl From<Ticket> for String {
    fn from(t: Ticket) -> Self {
        t.0
    }
}

/// What a partner asks the device to run: the same in an [`InboxItem`] and in [`Accepted`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartnerPrompt {
    /// The partner's display name (what auto-accept matches).
    pub partner: String,
    /// A template over profile fields (`{{ interests }}`; see [`crate::prompt`]).
    pub template: String,
    /// The provider's system prompt; `None` or empty: no system turn.
    #[serde(default)]
    pub system_prompt: Option<String>,
    pub max_tokens: u32,
    #[serde(default)]
    pub sampling: SamplingParams,
    /// When the prompt stops being answerable (RFC 3339, as the server wrote it).
    pub expires: String,
}

/// The state of an inbox item. The inbox lists pending items only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    #[default]
    Pending,
    Accepted,
    Declined,
    Expired,
    Cancelled,
    /// A state this build does not know.
    #[serde(other)]
    Other,
}

/// One waiting prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InboxItem {
    pub prompt_id: PromptId,
    #[serde(flatten)]
    pub prompt: PartnerPrompt,
    #[serde(default)]
    pub status: ItemStatus,
}

/// `GET /v1/edge/inbox`: the user's pending prompts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inbox {
    pub user_id: String,
    pub items: Vec<InboxItem>,
}

/// `POST /v1/edge/inbox/{id}/accept`: the prompt to run and the ticket to run it with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub prompt_id: PromptId,
    pub ticket: Ticket,
    #[serde(flatten)]
    pub prompt: PartnerPrompt,
}

/// `{"error":{"code","message"}}`, the API's error body.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
}

// ---------------------------------------------------------------------------------------------
// The REST client
// ---------------------------------------------------------------------------------------------

/// The inbox calls on their own (no model needed). [`EdgeClient`] offers the same calls.
#[derive(Clone, Debug)]
pub struct InboxClient {
    cfg: InboxConfig,
}

impl InboxClient {
    pub fn new(cfg: InboxConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &InboxConfig {
        &self.cfg
    }

    /// `GET /v1/edge/inbox`.
    pub async fn list(&self) -> Result<Inbox, InboxError> {
        let res = self.call(Method::GET, "/v1/edge/inbox").await?;
        decode(&res.body)
    }

    /// `POST /v1/edge/inbox/{id}/accept`. The answer must name the same prompt.
    pub async fn accept(&self, id: &PromptId) -> Result<Accepted, InboxError> {
        let res = self
            .call(Method::POST, &format!("/v1/edge/inbox/{id}/accept"))
            .await?;
        let accepted: Accepted = decode(&res.body)?;
        if accepted.prompt_id != *id {
            return Err(InboxError::Decode(format!(
                "accepted prompt {id}, but the answer is for prompt {}",
                accepted.prompt_id
            )));
        }
        Ok(accepted)
    }

    /// `POST /v1/edge/inbox/{id}/decline`.
    pub async fn decline(&self, id: &PromptId) -> Result<(), InboxError> {
        self.call(Method::POST, &format!("/v1/edge/inbox/{id}/decline"))
            .await
            .map(drop)
    }

    /// One call; a non-2xx status becomes [`InboxError::Api`].
    async fn call(&self, method: Method, path: &str) -> Result<tandem_http::Response, InboxError> {
        let mut req = tandem_http::Request::new(method.clone(), path);
        req.bearer = Some(self.cfg.token.expose());
        req.headers.push((
            tandem_http::header::ACCEPT,
            tandem_http::header::HeaderValue::from_static("application/json"),
        ));
        req.timeout = self.cfg.timeout;
        req.max_body_bytes = self.cfg.max_response_bytes;
        req.tls = self.cfg.tls.clone();
        req.user_agent = concat!("tandem-edge/", env!("CARGO_PKG_VERSION"));
        let res = tandem_http::send(&self.cfg.api, req)
            .await
            .map_err(|e| match e {
                HttpError::Transport(m) => InboxError::Transport(m),
                HttpError::TooLarge { limit } => InboxError::TooLarge { limit },
                HttpError::Tls(m) => InboxError::Tls(m),
                HttpError::Request(m) => InboxError::Config(m),
            })?;
        tracing::debug!(%method, path, status = res.status.as_u16(), "inbox call");
        if res.status.is_success() {
            Ok(res)
        } else {
            Err(api_error(&res))
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, InboxError> {
    serde_json::from_slice(body).map_err(|e| InboxError::Decode(e.to_string()))
}

fn api_error(res: &tandem_http::Response) -> InboxError {
    let status = res.status;
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&res.body) {
        Ok(b) => (ApiCode::parse(&b.error.code), b.error.message),
        Err(_) => (
            match status {
                StatusCode::UNAUTHORIZED => ApiCode::Unauthorized,
                StatusCode::NOT_FOUND => ApiCode::NotFound,
                StatusCode::CONFLICT => ApiCode::Conflict,
                StatusCode::TOO_MANY_REQUESTS => ApiCode::RateLimited,
                StatusCode::SERVICE_UNAVAILABLE => ApiCode::Unavailable,
                s => ApiCode::Other(format!("http_{}", s.as_u16())),
            },
            status.canonical_reason().unwrap_or("error").to_owned(),
        ),
    };
    InboxError::Api {
        status: status.as_u16(),
        code,
        message,
        retry_after: res.retry_after(),
    }
}

// ---------------------------------------------------------------------------------------------
// Deciding
// ---------------------------------------------------------------------------------------------

/// What the device does with an item without asking the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The user trusts this partner: accept and answer.
    Accept,
    /// Ask the user (or leave the item waiting where no one can be asked).
    Ask,
}

/// The partners whose prompts the device answers without asking. Names match exactly (case
/// and spaces included): auto-accepting is a trust decision, so a look-alike name must not
/// pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AutoAccept {
    partners: BTreeSet<String>,
    everyone: bool,
}

impl AutoAccept {
    /// Asks about every prompt.
    pub fn none() -> Self {
        Self::default()
    }

    /// Accepts every prompt (the CLI's `--yes`).
    pub fn everyone() -> Self {
        Self {
            everyone: true,
            ..Self::default()
        }
    }

    /// The profile's `auto_accept_partners` setting.
    pub fn from_profile(profile: &Profile) -> Self {
        Self {
            partners: profile
                .settings()
                .auto_accept_partners
                .iter()
                .cloned()
                .collect(),
            everyone: false,
        }
    }

    /// Also accepts `partner`'s prompts.
    pub fn with_partner(mut self, partner: impl Into<String>) -> Self {
        self.partners.insert(partner.into());
        self
    }

    /// Accept or ask, for one item.
    pub fn decide(&self, item: &InboxItem) -> Decision {
        if self.everyone || self.partners.contains(&item.prompt.partner) {
            Decision::Accept
        } else {
            Decision::Ask
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Answering
// ---------------------------------------------------------------------------------------------

/// What a partner's prompt is rendered with on the device: the user's profile, the sanitizer
/// and the model's tokenizer and chat template.
#[derive(Clone, Copy, Debug)]
pub struct PromptContext<'a> {
    pub profile: &'a Profile,
    pub sanitizer: &'a Sanitizer,
    pub tokenizer: &'a TextTokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
}

impl<'a> PromptContext<'a> {
    /// The tokenizer and chat template of a loaded edge checkpoint, which must have a
    /// tokenizer.
    pub fn from_bundle(
        bundle: &'a EdgeBundle,
        profile: &'a Profile,
        sanitizer: &'a Sanitizer,
    ) -> Result<Self, InboxError> {
        let tokenizer = bundle.tokenizer.as_ref().ok_or_else(|| {
            InboxError::Config("the edge checkpoint has no tokenizer.json".into())
        })?;
        Ok(Self {
            profile,
            sanitizer,
            tokenizer,
            chat_template: bundle.chat_template.as_ref(),
        })
    }
}

impl PartnerPrompt {
    /// The system prompt, with an empty one counted as none.
    pub fn system(&self) -> Option<&str> {
        self.system_prompt.as_deref().filter(|s| !s.is_empty())
    }

    /// The compiled template.
    pub fn compile(&self) -> Result<PromptTemplate, PromptError> {
        PromptTemplate::new(self.template.clone())
    }

    /// Renders the template with the sanitized profile under the system prompt and
    /// tokenizes it. Cheap enough to run before accepting, to learn whether the profile can
    /// answer at all ([`PromptError::MissingFields`] names what is missing).
    pub fn assemble(&self, ctx: &PromptContext<'_>) -> Result<AssembledPrompt, PromptError> {
        self.assemble_with(&self.compile()?, ctx)
    }

    fn assemble_with(
        &self,
        template: &PromptTemplate,
        ctx: &PromptContext<'_>,
    ) -> Result<AssembledPrompt, PromptError> {
        assemble(
            self.system(),
            template,
            ctx.profile,
            ctx.sanitizer,
            ctx.chat_template,
            ctx.tokenizer,
        )
    }
}

impl Accepted {
    /// The generation that answers this prompt: the assembled prompt (the system turn as the
    /// shared prefix), the ticket as prompt id, the partner's `max_tokens` and sampling, no
    /// stop strings, and a transparency record naming the partner and the prompt id.
    pub fn request(
        &self,
        ctx: &PromptContext<'_>,
        model: ModelInfo,
    ) -> Result<GenerateRequest, PromptError> {
        let template = self.prompt.compile()?;
        let prompt = self.prompt.assemble_with(&template, ctx)?;
        let record = TransparencyRecord::new(model, self.prompt.system(), &template, &prompt)
            .for_partner(self.prompt.partner.clone(), self.prompt_id.as_str());
        let mut req = GenerateRequest::from_assembled(&prompt);
        req.prompt_id = Some(self.ticket.expose().to_owned());
        req.max_tokens = self.prompt.max_tokens;
        req.sampling = self.prompt.sampling.clone();
        req.record = Some(record);
        Ok(req)
    }
}

impl ClientConfig {
    /// Sets where the inbox is (see [`InboxConfig`]); its device token also opens sessions
    /// unless [`ClientConfig::device_token`] is set.
    pub fn with_inbox(mut self, inbox: InboxConfig) -> Self {
        if self.device_token.is_none() {
            self.device_token = Some(inbox.token.clone());
        }
        self.inbox = Some(inbox);
        self
    }
}

/// The inbox calls on [`EdgeClient`]; they need [`ClientConfig::inbox`].
impl EdgeClient {
    fn inbox_client(&self) -> Result<&InboxClient, InboxError> {
        self.inbox.as_ref().ok_or_else(|| {
            InboxError::Config("no inbox configured (set ClientConfig::inbox)".into())
        })
    }

    /// The user's pending prompts.
    pub async fn inbox(&self) -> Result<Inbox, InboxError> {
        self.inbox_client()?.list().await
    }

    /// Accepts a prompt; run it with [`EdgeClient::answer`].
    pub async fn accept(&self, id: &PromptId) -> Result<Accepted, InboxError> {
        self.inbox_client()?.accept(id).await
    }

    /// Declines a prompt.
    pub async fn decline(&self, id: &PromptId) -> Result<(), InboxError> {
        self.inbox_client()?.decline(id).await
    }

    /// Starts the generation that answers an accepted prompt ([`Accepted::request`]). A
    /// prompt the profile cannot fill fails here, before anything is sent.
    pub fn answer(
        &self,
        accepted: &Accepted,
        ctx: &PromptContext<'_>,
    ) -> Result<Generation, InboxError> {
        let req = accepted.request(ctx, self.model_info())?;
        Ok(self.generate(req)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(partner: &str) -> InboxItem {
        InboxItem {
            prompt_id: PromptId::new("0123456789abcdef").expect("id"),
            prompt: PartnerPrompt {
                partner: partner.into(),
                template: "Hi".into(),
                system_prompt: None,
                max_tokens: 4,
                sampling: SamplingParams::default(),
                expires: "2026-11-23T10:00:00.000Z".into(),
            },
            status: ItemStatus::Pending,
        }
    }

    #[test]
    fn auto_accept_matches_names_exactly() {
        let profile = Profile::from_json_str(
            r#"{"name": "Jo", "auto_accept_partners": ["Acme Shop", "Insurer"]}"#,
        )
        .expect("profile");
        let policy = AutoAccept::from_profile(&profile);
        assert_eq!(policy.decide(&item("Acme Shop")), Decision::Accept);
        assert_eq!(policy.decide(&item("Insurer")), Decision::Accept);
        for other in ["acme shop", "Acme Shop ", "Other"] {
            assert_eq!(policy.decide(&item(other)), Decision::Ask, "{other:?}");
        }
        let policy = policy.with_partner("Other");
        assert_eq!(policy.decide(&item("Other")), Decision::Accept);
        assert_eq!(AutoAccept::none().decide(&item("Acme Shop")), Decision::Ask);
        assert_eq!(AutoAccept::everyone().decide(&item("x")), Decision::Accept);
    }

    #[test]
    fn prompt_ids_are_path_safe() {
        assert!(PromptId::new("0123456789abcdef").is_ok());
        for bad in ["", "../admin", "a/b", "a b", "é", &"a".repeat(65)] {
            assert!(PromptId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn credentials_are_redacted() {
        let token = DeviceToken::new("tdv_secret123").expect("token");
        let cfg = InboxConfig::new("http://127.0.0.1:1", token).expect("cfg");
        let shown = format!("{cfg:?} {:?}", InboxClient::new(cfg.clone()));
        assert!(!shown.contains("secret123"), "{shown}");
        let ticket = Ticket::try_from("tkt_secret456".to_owned()).expect("ticket");
        assert!(!format!("{ticket:?}").contains("secret456"));
        assert!(DeviceToken::new("has space").is_err());
        assert!(DeviceToken::new("  ").is_err());
    }
}
