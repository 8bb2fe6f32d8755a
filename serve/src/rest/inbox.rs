//! The device's inbox: `/v1/edge/inbox...`, authenticated by device tokens.
//!
//! A device lists the prompts waiting for its user (with the partner's name, the template,
//! the profile fields it names, and the provider's system prompt), and accepts or declines
//! each. Accepting returns a one-time ticket; the device runs the generation over the
//! WebSocket with the ticket in its `Open` frame, and the server stores the output as this
//! user's result of the prompt. A device reaches only its own user's assignments: another
//! user's prompt answers 404 like an unknown one.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::device::DeviceAuth;
use super::error::{ApiError, ApiPath, ErrorBody};
use super::prompts::{fields_of, user_result};
use super::store::prompts::{AnswerRefusal, AssignmentStatus, PromptId, PromptRecord};
use super::store::KeyHash;
use super::{rfc3339_ms, RestState};
use crate::store::now_ms;

pub use tandem_openapi::inbox::{Accepted, Inbox, InboxItem, OwnAnswer};

/// What every prompt ticket starts with.
pub const TICKET_PREFIX: &str = "tkt_";

/// A prompt as it appears in the user's inbox (`pending`).
fn inbox_item(p: &PromptRecord, system_prompt: &str) -> InboxItem {
    InboxItem {
        prompt_id: p.id.to_string(),
        partner: p.partner.clone(),
        template: p.template.clone(),
        fields: fields_of(&p.template),
        system_prompt: system_prompt.to_owned(),
        max_tokens: p.max_tokens,
        sampling: p.sampling.clone(),
        expires: rfc3339_ms(p.expires_ms),
        status: AssignmentStatus::Pending,
    }
}

const MINUTE_MS: u64 = 60_000;

async fn device_rate(state: &RestState, auth: &DeviceAuth) -> Result<(), ApiError> {
    let limit = u64::from(state.device_requests_per_minute);
    if let Some(ms) = state
        .prompts
        .take(&format!("dev:{}", auth.user), 1, limit, MINUTE_MS, now_ms())
        .await?
    {
        return Err(ApiError::rate_limited(
            format!("over {limit} requests per minute for this user"),
            Duration::from_millis(ms),
        ));
    }
    Ok(())
}

fn not_in_inbox() -> ApiError {
    ApiError::not_found("no such prompt in this inbox")
}

/// The prompt if `user` is in its audience, else 404.
async fn audience_prompt(
    state: &RestState,
    auth: &DeviceAuth,
    raw: &str,
) -> Result<PromptRecord, ApiError> {
    let id = PromptId::parse(raw).ok_or_else(not_in_inbox)?;
    match state.prompts.get_prompt(&id).await? {
        Some(p) if p.audience.contains(&auth.user) => Ok(p),
        _ => Err(not_in_inbox()),
    }
}

fn refusal(r: AnswerRefusal) -> ApiError {
    match r {
        AnswerRefusal::NotFound => not_in_inbox(),
        AnswerRefusal::NotPending(status) => ApiError::conflict(format!(
            "the prompt is {} for this user, not pending",
            status.as_str()
        )),
    }
}

/// The prompts waiting for the device's user.
#[utoipa::path(
    get,
    path = "/v1/edge/inbox",
    tag = "device",
    security(("device_token" = [])),
    responses(
        (status = 200, description = "The waiting prompts.", body = Inbox),
        (status = 429, description = "`rate_limited`: over the request rate.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn inbox(
    auth: DeviceAuth,
    State(state): State<Arc<RestState>>,
) -> Result<Json<Inbox>, ApiError> {
    device_rate(&state, &auth).await?;
    let prompts = state.prompts.inbox(&auth.user, now_ms()).await?;
    Ok(Json(Inbox {
        user_id: auth.user.to_string(),
        items: prompts
            .iter()
            .map(|p| inbox_item(p, &state.system_prompt))
            .collect(),
    }))
}

/// One of the user's prompts, whatever its status, with the user's own result.
#[utoipa::path(
    get,
    path = "/v1/edge/inbox/{prompt_id}",
    tag = "device",
    params(("prompt_id" = String, Path, description = "The prompt's id.")),
    security(("device_token" = [])),
    responses(
        (status = 200, description = "The prompt and the user's answer.", body = OwnAnswer),
        (status = 404, description = "`not_found`: not a prompt for this user.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: over the request rate.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn own_answer(
    auth: DeviceAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<OwnAnswer>, ApiError> {
    device_rate(&state, &auth).await?;
    let p = audience_prompt(&state, &auth, &id).await?;
    let now = now_ms();
    let assignments = state.prompts.assignments(&p).await?;
    let a = assignments
        .iter()
        .find(|a| a.user == auth.user)
        .ok_or_else(not_in_inbox)?;
    let result = user_result(a, &p, now);
    let mut item = inbox_item(&p, &state.system_prompt);
    item.status = result.status;
    Ok(Json(OwnAnswer { item, result }))
}

/// Accept a waiting prompt: returns the ticket that starts its generation.
#[utoipa::path(
    post,
    path = "/v1/edge/inbox/{prompt_id}/accept",
    tag = "device",
    params(("prompt_id" = String, Path, description = "The prompt's id.")),
    security(("device_token" = [])),
    responses(
        (status = 200, description = "Accepted; run it with the ticket.", body = Accepted),
        (status = 404, description = "`not_found`: not a prompt for this user.", body = ErrorBody),
        (status = 409, description = "`conflict`: already answered, cancelled or expired.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: over the request rate.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn accept(
    auth: DeviceAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Accepted>, ApiError> {
    device_rate(&state, &auth).await?;
    let p = audience_prompt(&state, &auth, &id).await?;
    let ticket = format!("{TICKET_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
    let hash = KeyHash::of(ticket.as_bytes());
    state
        .prompts
        .answer(&p.id, &auth.user, Some(hash), now_ms())
        .await?
        .map_err(refusal)?;
    tracing::info!(prompt = %p.id, user = %auth.user, "prompt accepted");
    Ok(Json(Accepted {
        prompt_id: p.id.to_string(),
        ticket,
        partner: p.partner.clone(),
        template: p.template.clone(),
        fields: fields_of(&p.template),
        system_prompt: state.system_prompt.clone(),
        max_tokens: p.max_tokens,
        sampling: p.sampling.clone(),
        expires: rfc3339_ms(p.expires_ms),
    }))
}

/// Decline a waiting prompt. The partner sees `declined`, never why.
#[utoipa::path(
    post,
    path = "/v1/edge/inbox/{prompt_id}/decline",
    tag = "device",
    params(("prompt_id" = String, Path, description = "The prompt's id.")),
    security(("device_token" = [])),
    responses(
        (status = 204, description = "Declined."),
        (status = 404, description = "`not_found`: not a prompt for this user.", body = ErrorBody),
        (status = 409, description = "`conflict`: already answered, cancelled or expired.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: over the request rate.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn decline(
    auth: DeviceAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    device_rate(&state, &auth).await?;
    let p = audience_prompt(&state, &auth, &id).await?;
    state
        .prompts
        .answer(&p.id, &auth.user, None, now_ms())
        .await?
        .map_err(refusal)?;
    tracing::info!(prompt = %p.id, user = %auth.user, "prompt declined");
    super::webhook::check_later(&state.webhooks, p.id.clone());
    Ok(StatusCode::NO_CONTENT)
}

/// The hash a ticket is stored under, or `None` when the string cannot be a ticket.
pub fn ticket_hash(ticket: &str) -> Option<KeyHash> {
    let hex_part = ticket.strip_prefix(TICKET_PREFIX)?;
    let ok = hex_part.len() == 64
        && hex_part
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| KeyHash::of(ticket.as_bytes()))
}
