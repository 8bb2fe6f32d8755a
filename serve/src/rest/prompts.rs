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
use tandem_protocol::SamplingParams;

use super::auth::PartnerAuth;
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::store::prompts::{
    Assignment, AssignmentStatus, GenerationResult, PromptId, PromptRecord, UserId,
};
use super::{rfc3339_ms, RestState};
use crate::store::now_ms;

pub use tandem_openapi::prompts::{
    NewPrompt, Prompt, PromptList, PromptStatus, StatusCounts, Timings, Usage, UserResult,
};

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

/// What the partner (and the user, in their own answer) sees of one assignment.
pub(crate) fn user_result(a: &Assignment, prompt: &PromptRecord, now: u64) -> UserResult {
    let status = a.status_at(prompt, now);
    let r: Option<&GenerationResult> = a.result.as_ref();
    let completed = status == AssignmentStatus::Completed;
    UserResult {
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

/// A prompt as its partner sees it in a list: without counts and results.
fn prompt_view(p: &PromptRecord, now: u64) -> Prompt {
    Prompt {
        id: p.id.to_string(),
        status: p.status_at(now),
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

/// A single prompt's answer: the prompt with its counts and every user's result.
fn prompt_with_results(p: &PromptRecord, assignments: &[Assignment], now: u64) -> Prompt {
    let mut counts = StatusCounts::default();
    let results: Vec<UserResult> = assignments
        .iter()
        .map(|a| user_result(a, p, now))
        .inspect(|r| counts.add(r.status))
        .collect();
    Prompt {
        counts: Some(counts),
        results: Some(results),
        ..prompt_view(p, now)
    }
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

/// A [`NewPrompt`] whose body passed every check (limit 2), with the defaults filled in.
struct ValidPrompt {
    template: String,
    audience: Vec<UserId>,
    max_tokens: u32,
    sampling: SamplingParams,
    expires_in_seconds: u64,
    webhook_url: Option<String>,
}

/// Checks the body (limit 2) in the order the module doc states: template, audience,
/// `max_tokens`, sampling, expiry, webhook.
async fn valid_prompt(state: &RestState, body: NewPrompt) -> Result<ValidPrompt, ApiError> {
    template_fields(&body.template).map_err(ApiError::invalid)?;
    check_audience(&body.audience)?;
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
        check_webhook(state, url).await?;
    }
    Ok(ValidPrompt {
        template: body.template,
        audience: body.audience,
        max_tokens: body.max_tokens,
        sampling,
        expires_in_seconds: expiry,
        webhook_url: body.webhook_url,
    })
}

/// An audience names at least one user, and none twice.
fn check_audience(audience: &[UserId]) -> Result<(), ApiError> {
    if audience.is_empty() {
        return Err(ApiError::invalid("audience must name at least one user"));
    }
    let mut seen = HashSet::with_capacity(audience.len());
    if let Some(dup) = audience.iter().find(|u| !seen.insert(*u)) {
        return Err(ApiError::invalid(format!("audience names {dup} twice")));
    }
    Ok(())
}

/// Limits 3 to 5, in order: `max_audience`, then `prompts_per_minute` and `tokens_per_day`,
/// which are taken from the tenant's counters only when the earlier limits pass.
async fn admit(
    state: &RestState,
    auth: &PartnerAuth,
    prompt: &ValidPrompt,
    now: u64,
) -> Result<(), ApiError> {
    let quotas = auth.tenant.quotas;
    let audience = prompt.audience.len();
    if audience > quotas.max_audience as usize {
        return Err(ApiError::forbidden(format!(
            "the audience of {audience} users is over this tenant's max_audience of {}",
            quotas.max_audience
        )));
    }
    take_prompt_rate(state, auth, now).await?;
    let cost = u64::from(prompt.max_tokens).saturating_mul(audience as u64);
    take_daily_tokens(state, auth, cost, now).await
}

/// Counts one prompt against `prompts_per_minute` (429 `rate_limited` when over).
async fn take_prompt_rate(state: &RestState, auth: &PartnerAuth, now: u64) -> Result<(), ApiError> {
    let quotas = auth.tenant.quotas;
    let counter = format!("ppm:{}", auth.tenant.id);
    let limit = quotas.prompts_per_minute.into();
    match state
        .prompts
        .take(&counter, 1, limit, MINUTE_MS, now)
        .await?
    {
        None => Ok(()),
        Some(ms) => Err(ApiError::rate_limited(
            format!(
                "over this tenant's {} prompts per minute",
                quotas.prompts_per_minute
            ),
            Duration::from_millis(ms),
        )),
    }
}

/// Charges `cost` tokens against `tokens_per_day` (429 `quota_exceeded` when over).
async fn take_daily_tokens(
    state: &RestState,
    auth: &PartnerAuth,
    cost: u64,
    now: u64,
) -> Result<(), ApiError> {
    let quotas = auth.tenant.quotas;
    let counter = format!("tpd:{}", auth.tenant.id);
    let limit = quotas.tokens_per_day;
    match state
        .prompts
        .take(&counter, cost, limit, DAY_MS, now)
        .await?
    {
        None => Ok(()),
        Some(ms) => Err(ApiError::quota_exceeded(
            format!(
                "max_tokens × audience = {cost} would pass this tenant's {} tokens per day",
                quotas.tokens_per_day
            ),
            Duration::from_millis(ms),
        )),
    }
}

/// Stores an admitted prompt (which puts it in its audience's inboxes), counts and logs it.
async fn store_prompt(
    state: &RestState,
    auth: &PartnerAuth,
    prompt: ValidPrompt,
    now: u64,
) -> Result<PromptRecord, ApiError> {
    let tenant = &auth.tenant.id;
    let record = PromptRecord {
        id: PromptId::generate(),
        tenant: tenant.clone(),
        partner: auth.tenant.name.clone(),
        template: prompt.template,
        audience: prompt.audience,
        max_tokens: prompt.max_tokens,
        sampling: prompt.sampling,
        created_ms: now,
        expires_ms: now + prompt.expires_in_seconds * 1000,
        webhook_url: prompt.webhook_url,
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
    Ok(record)
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
    let prompt = valid_prompt(&state, body).await?;
    let now = now_ms();
    admit(&state, &auth, &prompt, now).await?;
    let record = store_prompt(&state, &auth, prompt, now).await?;
    let assignments = state.prompts.assignments(&record).await?;
    let view = prompt_with_results(&record, &assignments, now);
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
        prompts: prompts.iter().map(|p| prompt_view(p, now)).collect(),
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
    Ok(Json(prompt_with_results(&p, &assignments, now)))
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
    Ok(Json(prompt_with_results(&p, &assignments, now)))
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
