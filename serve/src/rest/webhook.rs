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
//! ends it. Plain `http://` only: this server has no TLS client. Not built: a signature
//! header, and completion by expiry alone (a prompt whose last users never answer is not
//! announced when it expires).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::prompts::{PromptStatus, StatusCounts};
use super::store::prompts::{PromptId, PromptStore, RESULT_RETENTION_MS};
use crate::store::now_ms;

/// Checks whether the prompt is complete and, if so, delivers its webhook (once), off the
/// caller's path.
pub(crate) fn check_later(prompts: Arc<dyn PromptStore>, id: PromptId) {
    tokio::spawn(async move {
        if let Err(e) = check(&*prompts, &id).await {
            tracing::warn!(prompt = %id, error = %e, "webhook");
        }
    });
}

async fn check(prompts: &dyn PromptStore, id: &PromptId) -> anyhow::Result<()> {
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
    let (addr, path) = crate::admin_cli::split_url(&url)?;
    let mut last = String::new();
    for (attempt, pause) in [0u64, 1, 4].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        match crate::admin_cli::exchange(&addr, None, "POST", &path, Some(&body)).await {
            Ok(r) if (200..300).contains(&r.status) => {
                tracing::info!(prompt = %id, attempt, "webhook delivered");
                return Ok(());
            }
            Ok(r) => last = format!("HTTP {}", r.status),
            Err(e) => last = e.to_string(),
        }
    }
    anyhow::bail!("not delivered after 3 attempts: {last}")
}
