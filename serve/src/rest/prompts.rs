//! The partner's prompts: `/v1/prompts` (submit, list, read with results, cancel).
//!
//! # Visibility
//! A partner reaches only its own prompts: another tenant's prompt id answers 404 exactly
//! like an unknown one. Nothing here returns the provider's system prompt, a device token, a
//! ticket, or any profile value (the server never has those: templates name profile fields,
//! the device fills them in). A partner sees, per user of its audience, the status, and for
//! completed generations the output text, finish reason, token usage and timings. Declined
//! and expired say only that.
//!
//! # Limits, checked in this order on submission
//! 1. the request rate per tenant ([`super::RestState::partner_requests_per_minute`], every
//!    partner route): 429 `rate_limited`;
//! 2. the body: template, audience, `max_tokens`, sampling, expiry, webhook: 422 `invalid`;
//! 3. `max_audience`: 403 `forbidden`;
//! 4. `prompts_per_minute`: 429 `rate_limited`;
//! 5. `tokens_per_day`, charged `max_tokens × audience` at submission (the most it can
//!    cost): 429 `quota_exceeded` with `Retry-After` until the next UTC day.
//!
//! The counters are in the store (Redis when configured), so replicas share them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tandem_protocol::SamplingParams;
use utoipa::ToSchema;

use super::auth::PartnerAuth;
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::store::prompts::{
    Assignment, AssignmentStatus, GenerationResult, PromptId, PromptRecord, UserId,
};
use super::{rfc3339_ms, RestState};
use crate::store::now_ms;

/// The longest template, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 4096;
/// The longest profile field name a template may use.
pub const MAX_FIELD_NAME_LEN: usize = 64;
/// Default and longest prompt lifetimes.
pub const DEFAULT_EXPIRY_SECONDS: u64 = 24 * 3600;
pub const MAX_EXPIRY_SECONDS: u64 = 7 * 24 * 3600;
pub use super::webhook_target::MAX_WEBHOOK_URL_LEN;
/// Prompts one list answer holds.
pub const LIST_LIMIT: usize = 100;

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 24 * 3600 * 1000;

/// The profile fields a template names, in order of first use, or why the template is not
/// acceptable. A template is text with `{{field}}` placeholders (`field`: `[a-z_][a-z0-9_]*`,
/// spaces allowed inside the braces), nothing else: no other `{{`/`}}`, no `{%`/`{#`, no
/// control characters but newline and tab.
pub fn template_fields(template: &str) -> Result<Vec<String>, String> {
    if template.trim().is_empty() {
        return Err("template must not be empty".into());
    }
    if template.len() > MAX_TEMPLATE_BYTES {
        return Err(format!(
            "template must be at most {MAX_TEMPLATE_BYTES} bytes"
        ));
    }
    if template
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err("template must not hold control characters other than newline and tab".into());
    }
    if template.contains("{%") || template.contains("{#") {
        return Err(
            "template may only hold {{field}} placeholders, no statements or comments".into(),
        );
    }
    let mut fields: Vec<String> = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        if rest[..open].contains("}}") {
            return Err("template has `}}` without `{{`".into());
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| "template has `{{` without `}}`".to_owned())?;
        let name = after[..close].trim();
        let valid = !name.is_empty()
            && name.len() <= MAX_FIELD_NAME_LEN
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(format!(
                "placeholder {{{{{}}}}} must name a profile field: [a-z_][a-z0-9_]*, at most {MAX_FIELD_NAME_LEN} characters",
                after[..close].chars().take(80).collect::<String>()
            ));
        }
        if !fields.iter().any(|f| f == name) {
            fields.push(name.to_owned());
        }
        rest = &after[close + 2..];
    }
    if rest.contains("}}") {
        return Err("template has `}}` without `{{`".into());
    }
    Ok(fields)
}

/// `POST /v1/prompts`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPrompt {
    /// The question, naming profile fields as `{{field}}`; the device fills them in from its
    /// user's profile. Never put personal data here.
    #[schema(example = "Suggest three gifts for someone who likes {{interests}}.")]
    pub template: String,
    /// The users to ask (1 to the tenant's `max_audience`, no duplicates).
    #[schema(value_type = Vec<String>, example = json!(["alice", "bob"]))]
    pub audience: Vec<UserId>,
    /// Most tokens per answer (1 to the server's cap).
    #[schema(minimum = 1, example = 64)]
    pub max_tokens: u32,
    /// Sampling for every answer (default greedy).
    #[schema(value_type = Option<Object>)]
    pub sampling: Option<SamplingParams>,
    /// Seconds until unanswered users expire (60 to 604800; default 86400).
    #[schema(minimum = 60, maximum = 604800)]
    pub expires_in_seconds: Option<u64>,
    /// Called with `POST` when every user of the audience has a final status (completed,
    /// failed, declined, cancelled): `{"event": "prompt.completed", "prompt_id", "status",
    /// "counts"}`, no outputs, signed: `Tandem-Signature: t=<unix seconds>,v1=<hex
    /// HMAC-SHA256 of "{t}.{body}" keyed by the tenant's webhook secret>` (the secret is in
    /// the answer to `POST /v1/admin/tenants`; `docs/webhooks.md` shows how to check it).
    /// `https://` (`http://` only where the operator allows it), at
    /// most 2048 characters, to a public address: loopback, private, link-local and other
    /// internal addresses (in any spelling) are refused with 422 `invalid` unless the
    /// operator allow-listed them.
    pub webhook_url: Option<String>,
}

/// Per-status counts of a prompt's audience.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct StatusCounts {
    pub pending: u32,
    pub accepted: u32,
    pub running: u32,
    pub completed: u32,
    pub declined: u32,
    pub expired: u32,
    pub cancelled: u32,
    pub failed: u32,
}

impl StatusCounts {
    pub(crate) fn add(&mut self, s: AssignmentStatus) {
        let slot = match s {
            AssignmentStatus::Pending => &mut self.pending,
            AssignmentStatus::Accepted => &mut self.accepted,
            AssignmentStatus::Running => &mut self.running,
            AssignmentStatus::Completed => &mut self.completed,
            AssignmentStatus::Declined => &mut self.declined,
            AssignmentStatus::Expired => &mut self.expired,
            AssignmentStatus::Cancelled => &mut self.cancelled,
            AssignmentStatus::Failed => &mut self.failed,
        };
        *slot += 1;
    }
}

/// Token usage of one answer.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Timings of one answer, from the start of the device's generation.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    pub ttft_ms: u64,
    pub total_ms: u64,
}

/// One user's answer, as the partner sees it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct UserResult {
    pub user_id: String,
    pub status: AssignmentStatus,
    /// The generated text (completed only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// `eos`, `length`, `stop_string`, `cancelled` (completed), or the error code (failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// When the status last changed (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub updated: String,
}

impl UserResult {
    pub(crate) fn of(a: &Assignment, prompt: &PromptRecord, now: u64) -> Self {
        let status = a.status_at(prompt, now);
        let r: Option<&GenerationResult> = a.result.as_ref();
        let completed = status == AssignmentStatus::Completed;
        Self {
            user_id: a.user.to_string(),
            status,
            output: r.filter(|_| completed).map(|r| r.output.clone()),
            finish_reason: r.map(|r| r.finish_reason.clone()),
            usage: r.map(|r| Usage {
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
            }),
            timings: r.map(|r| Timings {
                ttft_ms: r.ttft_ms,
                total_ms: r.total_ms,
            }),
            updated: rfc3339_ms(a.updated_ms),
        }
    }
}

/// Whether a prompt still takes answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromptStatus {
    Active,
    Cancelled,
    Expired,
}

/// A prompt, as its partner sees it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Prompt {
    #[schema(example = "5c0ffee0deadbeef")]
    pub id: String,
    pub status: PromptStatus,
    pub template: String,
    pub audience_size: u32,
    pub max_tokens: u32,
    #[schema(value_type = Object)]
    pub sampling: SamplingParams,
    #[schema(format = DateTime)]
    pub created: String,
    #[schema(format = DateTime)]
    pub expires: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Per-status counts (on a single prompt's answer only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts: Option<StatusCounts>,
    /// One entry per user, in audience order (on a single prompt's answer only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<UserResult>>,
}

impl Prompt {
    fn of(p: &PromptRecord, now: u64) -> Self {
        let status = if p.cancelled {
            PromptStatus::Cancelled
        } else if p.expired(now) {
            PromptStatus::Expired
        } else {
            PromptStatus::Active
        };
        Self {
            id: p.id.to_string(),
            status,
            template: p.template.clone(),
            audience_size: u32::try_from(p.audience.len()).unwrap_or(u32::MAX),
            max_tokens: p.max_tokens,
            sampling: p.sampling.clone(),
            created: rfc3339_ms(p.created_ms),
            expires: rfc3339_ms(p.expires_ms),
            webhook_url: p.webhook_url.clone(),
            counts: None,
            results: None,
        }
    }

    fn with_results(mut self, p: &PromptRecord, assignments: &[Assignment], now: u64) -> Self {
        let mut counts = StatusCounts::default();
        let results: Vec<UserResult> = assignments
            .iter()
            .map(|a| UserResult::of(a, p, now))
            .inspect(|r| counts.add(r.status))
            .collect();
        self.counts = Some(counts);
        self.results = Some(results);
        self
    }
}

/// `GET /v1/prompts`: the caller's prompts, newest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PromptList {
    pub prompts: Vec<Prompt>,
}

/// Checks the per-tenant request rate of every partner route.
pub(crate) async fn partner_rate(state: &RestState, auth: &PartnerAuth) -> Result<(), ApiError> {
    let name = format!("req:{}", auth.tenant.id);
    let limit = u64::from(state.partner_requests_per_minute);
    if let Some(ms) = state
        .prompts
        .take(&name, 1, limit, MINUTE_MS, now_ms())
        .await?
    {
        return Err(ApiError::rate_limited(
            format!("over {limit} requests per minute for this tenant"),
            Duration::from_millis(ms),
        ));
    }
    Ok(())
}

/// Refuses a webhook URL its target guard refuses (`webhook_target`), naming the field.
async fn check_webhook(state: &RestState, url: &str) -> Result<(), ApiError> {
    let hooks = &state.webhooks;
    hooks
        .policy
        .check_submitted(url, &hooks.resolver)
        .await
        .map(drop)
        .map_err(|e| ApiError::invalid(e.to_string()))
}

fn prompt_id(raw: &str) -> Result<PromptId, ApiError> {
    PromptId::parse(raw).ok_or_else(|| ApiError::not_found("no such prompt"))
}

/// The caller's prompt, or 404 (also for another tenant's).
async fn own_prompt(
    state: &RestState,
    auth: &PartnerAuth,
    raw: &str,
) -> Result<PromptRecord, ApiError> {
    let id = prompt_id(raw)?;
    match state.prompts.get_prompt(&id).await? {
        Some(p) if p.tenant == auth.tenant.id => Ok(p),
        _ => Err(ApiError::not_found("no such prompt")),
    }
}

/// Submit a prompt to an audience of users.
#[utoipa::path(
    post,
    path = "/v1/prompts",
    tag = "partner",
    request_body = NewPrompt,
    security(("partner_key" = [])),
    responses(
        (status = 201, description = "The prompt is in its audience's inboxes.", body = Prompt),
        (status = 403, description = "`forbidden`: the audience is over the tenant's `max_audience`.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: over the request rate or `prompts_per_minute`; `quota_exceeded`: over `tokens_per_day`.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn create_prompt(
    auth: PartnerAuth,
    State(state): State<Arc<RestState>>,
    ApiJson(body): ApiJson<NewPrompt>,
) -> Result<(StatusCode, Json<Prompt>), ApiError> {
    partner_rate(&state, &auth).await?;
    template_fields(&body.template).map_err(ApiError::invalid)?;
    if body.audience.is_empty() {
        return Err(ApiError::invalid("audience must name at least one user"));
    }
    let mut seen = HashSet::with_capacity(body.audience.len());
    if let Some(dup) = body.audience.iter().find(|u| !seen.insert(*u)) {
        return Err(ApiError::invalid(format!("audience names {dup} twice")));
    }
    let cap = state.max_tokens_cap;
    if body.max_tokens == 0 || body.max_tokens > cap {
        return Err(ApiError::invalid(format!(
            "max_tokens must be between 1 and {cap}"
        )));
    }
    let sampling = body.sampling.unwrap_or_default();
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(format!("sampling: {e}")))?;
    let expiry = body.expires_in_seconds.unwrap_or(DEFAULT_EXPIRY_SECONDS);
    if !(60..=MAX_EXPIRY_SECONDS).contains(&expiry) {
        return Err(ApiError::invalid(format!(
            "expires_in_seconds must be between 60 and {MAX_EXPIRY_SECONDS}"
        )));
    }
    if let Some(url) = &body.webhook_url {
        check_webhook(&state, url).await?;
    }
    let quotas = auth.tenant.quotas;
    if body.audience.len() > quotas.max_audience as usize {
        return Err(ApiError::forbidden(format!(
            "the audience of {} users is over this tenant's max_audience of {}",
            body.audience.len(),
            quotas.max_audience
        )));
    }
    let now = now_ms();
    let tenant = &auth.tenant.id;
    if let Some(ms) = state
        .prompts
        .take(
            &format!("ppm:{tenant}"),
            1,
            quotas.prompts_per_minute.into(),
            MINUTE_MS,
            now,
        )
        .await?
    {
        return Err(ApiError::rate_limited(
            format!(
                "over this tenant's {} prompts per minute",
                quotas.prompts_per_minute
            ),
            Duration::from_millis(ms),
        ));
    }
    let cost = u64::from(body.max_tokens).saturating_mul(body.audience.len() as u64);
    if let Some(ms) = state
        .prompts
        .take(
            &format!("tpd:{tenant}"),
            cost,
            quotas.tokens_per_day,
            DAY_MS,
            now,
        )
        .await?
    {
        return Err(ApiError::quota_exceeded(
            format!(
                "max_tokens × audience = {cost} would pass this tenant's {} tokens per day",
                quotas.tokens_per_day
            ),
            Duration::from_millis(ms),
        ));
    }
    let record = PromptRecord {
        id: PromptId::generate(),
        tenant: tenant.clone(),
        partner: auth.tenant.name.clone(),
        template: body.template,
        audience: body.audience,
        max_tokens: body.max_tokens,
        sampling,
        created_ms: now,
        expires_ms: now + expiry * 1000,
        webhook_url: body.webhook_url,
        cancelled: false,
    };
    state.prompts.create_prompt(&record).await?;
    state
        .metrics
        .prompts_submitted_total
        .with(tenant.as_str())
        .inc();
    tracing::info!(
        tenant = %tenant,
        prompt = %record.id,
        audience = record.audience.len(),
        "prompt submitted"
    );
    let assignments = state.prompts.assignments(&record).await?;
    let view = Prompt::of(&record, now).with_results(&record, &assignments, now);
    Ok((StatusCode::CREATED, Json(view)))
}

/// List the caller's prompts, newest first (at most 100; without results).
#[utoipa::path(
    get,
    path = "/v1/prompts",
    tag = "partner",
    security(("partner_key" = [])),
    responses(
        (status = 200, description = "The caller's prompts.", body = PromptList),
        (status = 429, description = "`rate_limited`: over the request rate.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn list_prompts(
    auth: PartnerAuth,
    State(state): State<Arc<RestState>>,
) -> Result<Json<PromptList>, ApiError> {
    partner_rate(&state, &auth).await?;
    let now = now_ms();
    let prompts = state
        .prompts
        .list_prompts(&auth.tenant.id, LIST_LIMIT)
        .await?;
    Ok(Json(PromptList {
        prompts: prompts.iter().map(|p| Prompt::of(p, now)).collect(),
    }))
}

/// Read one of the caller's prompts with every user's result so far.
#[utoipa::path(
    get,
    path = "/v1/prompts/{id}",
    tag = "partner",
    params(("id" = String, Path, description = "The prompt's id.")),
    security(("partner_key" = [])),
    responses(
        (status = 200, description = "The prompt, its counts and results.", body = Prompt),
        (status = 404, description = "`not_found`: no such prompt of the caller's.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: over the request rate.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn get_prompt(
    auth: PartnerAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Prompt>, ApiError> {
    partner_rate(&state, &auth).await?;
    let p = own_prompt(&state, &auth, &id).await?;
    let now = now_ms();
    let assignments = state.prompts.assignments(&p).await?;
    Ok(Json(Prompt::of(&p, now).with_results(
        &p,
        &assignments,
        now,
    )))
}

/// Cancel one of the caller's prompts: users who have not started answering never will.
/// Generations already running finish and keep their results.
#[utoipa::path(
    delete,
    path = "/v1/prompts/{id}",
    tag = "partner",
    params(("id" = String, Path, description = "The prompt's id.")),
    security(("partner_key" = [])),
    responses(
        (status = 200, description = "The cancelled prompt.", body = Prompt),
        (status = 404, description = "`not_found`: no such prompt of the caller's.", body = ErrorBody),
        (status = 409, description = "`conflict`: the prompt is already cancelled or expired.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: over the request rate.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn cancel_prompt(
    auth: PartnerAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Prompt>, ApiError> {
    partner_rate(&state, &auth).await?;
    let p = own_prompt(&state, &auth, &id).await?;
    let now = now_ms();
    if p.cancelled {
        return Err(ApiError::conflict("the prompt is already cancelled"));
    }
    if p.expired(now) {
        return Err(ApiError::conflict("the prompt has expired"));
    }
    if !state.prompts.cancel_prompt(&p.id, now).await? {
        return Err(ApiError::not_found("no such prompt"));
    }
    super::webhook::check_later(&state.webhooks, p.id.clone());
    tracing::info!(tenant = %auth.tenant.id, prompt = %p.id, "prompt cancelled");
    let p = state
        .prompts
        .get_prompt(&p.id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such prompt"))?;
    let assignments = state.prompts.assignments(&p).await?;
    Ok(Json(Prompt::of(&p, now).with_results(
        &p,
        &assignments,
        now,
    )))
}

/// The fields a prompt names, for the inbox (the device checks them against its profile).
pub(crate) fn fields_of(template: &str) -> Vec<String> {
    template_fields(template).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_fields_only() {
        assert_eq!(
            template_fields("Gifts for {{interests}} in {{ city }}; again {{interests}}."),
            Ok(vec!["interests".to_owned(), "city".to_owned()])
        );
        assert_eq!(template_fields("No fields at all."), Ok(vec![]));
        for bad in [
            "",
            "   ",
            "{{Interests}}",
            "{{ 1abc }}",
            "{{interests",
            "interests}}",
            "{{a}} }}",
            "{% if x %}y{% endif %}",
            "{# note #}",
            "{{ user.name }}",
            "{{ x | upper }}",
            "bell\u{7}",
        ] {
            assert!(template_fields(bad).is_err(), "{bad:?}");
        }
        assert!(template_fields(&"a".repeat(MAX_TEMPLATE_BYTES + 1)).is_err());
    }
}
