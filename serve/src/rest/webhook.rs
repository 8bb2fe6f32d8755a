//! Completion webhooks: when every user of a prompt's audience has a final status
//! (completed, failed, declined, cancelled, expired), the server `POST`s to the prompt's
//! `webhook_url`:
//!
//! ```json
//! {"event": "prompt.completed", "prompt_id": "…", "status": "active", "counts": {…}}
//! ```
//!
//! The body holds no output text and no user ids: the partner reads those with its key
//! (`GET /v1/prompts/{id}`), so a leaked webhook endpoint leaks nothing more than counts.
//!
//! # Delivery
//! At least once: checked after each change that can complete a prompt (a result stored, a
//! decline, a cancel), claimed once per prompt through the store (so two replicas do not
//! both send it, barring the rare crash between claim and send, which loses it; or a claim
//! window boundary, which duplicates it: partners dedupe by `prompt_id`). Three attempts
//! (immediately, after 1 s, after 4 s), each bounded by the client's timeout; a 2xx answer
//! ends it; a target the guard refuses is not retried, and no redirect is followed.
//!
//! # Where it may go
//! [`super::webhook_target`] checks the URL on submission and again on every delivery,
//! against the addresses actually connected to: `https://` only unless the operator set
//! `webhook_allow_http`, nothing internal unless the operator allow-listed it
//! (`webhook_allow`). This build has no TLS client yet, so an `https://` target is accepted
//! but not delivered (the delivery logs a warning); `http://` targets with
//! `webhook_allow_http` are.
//!
//! Not built: a signature header, and completion by expiry alone (a prompt whose last users
//! never answer is not announced when it expires).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::prompts::{PromptStatus, StatusCounts};
use super::store::prompts::{PromptId, PromptStore, RESULT_RETENTION_MS};
use super::webhook_target::{system_resolver, Resolver, Target, TargetError, WebhookPolicy};
use crate::store::now_ms;

/// How long one delivery attempt may take (connect, send, read the answer).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the webhook sender needs: the prompts, the operator's target policy and the
/// resolver (the system's; tests bring their own).
#[derive(Clone)]
pub struct Webhooks {
    pub prompts: Arc<dyn PromptStore>,
    pub policy: Arc<WebhookPolicy>,
    pub resolver: Resolver,
}

impl Webhooks {
    pub fn new(prompts: Arc<dyn PromptStore>, policy: WebhookPolicy) -> Self {
        Self {
            prompts,
            policy: Arc::new(policy),
            resolver: system_resolver(),
        }
    }
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Checks whether the prompt is complete and, if so, delivers its webhook (once), off the
/// caller's path.
pub(crate) fn check_later(hooks: &Webhooks, id: PromptId) {
    let hooks = hooks.clone();
    tokio::spawn(async move {
        if let Err(e) = check(&hooks, &id).await {
            tracing::warn!(prompt = %id, error = %e, "webhook");
        }
    });
}

async fn check(hooks: &Webhooks, id: &PromptId) -> anyhow::Result<()> {
    let prompts = &*hooks.prompts;
    let Some(p) = prompts.get_prompt(id).await? else {
        return Ok(());
    };
    let Some(url) = p.webhook_url.clone() else {
        return Ok(());
    };
    let now = now_ms();
    let assignments = prompts.assignments(&p).await?;
    if assignments.is_empty() || !assignments.iter().all(|a| a.status_at(&p, now).is_final()) {
        return Ok(());
    }
    // Claimed once per prompt (the counter allows one take).
    let claim = format!("webhook:{id}");
    if prompts
        .take(&claim, 1, 1, RESULT_RETENTION_MS * 5, now)
        .await?
        .is_some()
    {
        return Ok(());
    }
    let mut counts = StatusCounts::default();
    for a in &assignments {
        counts.add(a.status_at(&p, now));
    }
    let status = if p.cancelled {
        PromptStatus::Cancelled
    } else if p.expired(now) {
        PromptStatus::Expired
    } else {
        PromptStatus::Active
    };
    let body = json!({
        "event": "prompt.completed",
        "prompt_id": id.as_str(),
        "status": status,
        "counts": counts,
    });
    // Checked again under the policy of now (submission may be long ago).
    let target = hooks.policy.parse(&url)?;
    if target.is_https() {
        anyhow::bail!("not delivered: https:// webhooks need a TLS client, which this build does not have yet");
    }
    let body = serde_json::to_vec(&body)?;
    let mut last = String::new();
    for (attempt, pause) in [0u64, 1, 4].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        match tokio::time::timeout(ATTEMPT_TIMEOUT, send(hooks, &target, &body)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                tracing::info!(prompt = %id, attempt, "webhook delivered");
                return Ok(());
            }
            Ok(Ok(status)) => last = format!("HTTP {status}"),
            Ok(Err(e)) if e.downcast_ref::<TargetError>().is_some() => {
                anyhow::bail!("not delivered: {e}")
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
        }
    }
    anyhow::bail!("not delivered after 3 attempts: {last}")
}

/// One attempt: connect to a checked address of the target, `POST` the body, and return
/// the answer's status (a redirect is just a status that is not 2xx).
async fn send(hooks: &Webhooks, target: &Target, body: &[u8]) -> anyhow::Result<u16> {
    let stream = hooks.policy.connect(target, &hooks.resolver).await?;
    let headers = [("Content-Type".to_owned(), "application/json".to_owned())];
    let reply = crate::admin_cli::exchange_on(
        stream,
        &target.host_header(),
        "POST",
        &target.path_and_query(),
        &headers,
        body,
    )
    .await?;
    Ok(reply.status)
}
