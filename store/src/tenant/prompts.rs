//! Partner prompts, their per-user assignments and results, device-token revocations and
//! rate-limit counters: the [`PromptStore`] half of the REST store (DESIGN.md §2, §8).
//!
//! # The life of one assignment (a prompt × one user of its audience)
//! ```text
//!   pending ──accept──▶ accepted ──ticket claimed by Open──▶ running ──Done──▶ completed
//!      │                   │                                    └──fatal error──▶ failed
//!      └──decline──▶ declined
//!   pending/accepted ──partner cancels──▶ cancelled
//!   pending/accepted ──the prompt's expiry passes──▶ expired (read as such; no write needed)
//! ```
//! Every transition is one atomic store operation that checks the state it leaves, so two
//! devices (or a device and the partner) racing on one assignment cannot both win.
//!
//! # Tickets
//! Accepting returns a one-time ticket; the store keeps only its sha256 ([`KeyHash`]). The
//! device puts the ticket in its `Open` frame; [`PromptStore::claim_ticket`] turns
//! `accepted` into `running` once, so a ticket cannot start two generations.

use std::fmt;

use serde::{Deserialize, Serialize};
use tandem_openapi::prompts::PromptStatus;
use tandem_protocol::SamplingParams;

use super::{is_id, KeyHash, TenantFuture, TenantId, ID_HEX_LEN};

// User ids and assignment statuses are part of the REST contract (`tandem-openapi`).
pub use tandem_openapi::prompts::{AssignmentStatus, UserId, MAX_USER_ID_LEN};

hex_id!(
    /// A partner prompt's id: 16 lowercase hex digits.
    PromptId
);

/// A prompt as the store keeps it (serialized as JSON in Redis).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub id: PromptId,
    pub tenant: TenantId,
    /// The partner's display name, shown to users in their inbox.
    pub partner: String,
    pub template: String,
    pub audience: Vec<UserId>,
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub webhook_url: Option<String>,
    pub cancelled: bool,
}

impl PromptRecord {
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_ms
    }

    /// Whether the prompt still takes answers at `now_ms`.
    pub fn status_at(&self, now_ms: u64) -> PromptStatus {
        if self.cancelled {
            PromptStatus::Cancelled
        } else if self.expired(now_ms) {
            PromptStatus::Expired
        } else {
            PromptStatus::Active
        }
    }
}

/// What a finished generation produced, as stored for the partner and the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationResult {
    pub output: String,
    /// `eos`, `length`, `stop_string`, `cancelled`, or an error code for `failed`.
    pub finish_reason: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// From the claim of the ticket to the first token.
    pub ttft_ms: u64,
    /// From the claim of the ticket to the end.
    pub total_ms: u64,
}

/// One user's assignment of one prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub user: UserId,
    /// As stored (never `Expired`).
    pub status: AssignmentStatus,
    pub updated_ms: u64,
    pub result: Option<GenerationResult>,
}

impl Assignment {
    /// The status as callers see it at `now_ms`: unanswered or unstarted work of an expired
    /// prompt is `expired`.
    pub fn status_at(&self, prompt: &PromptRecord, now_ms: u64) -> AssignmentStatus {
        match self.status {
            AssignmentStatus::Pending | AssignmentStatus::Accepted if prompt.expired(now_ms) => {
                AssignmentStatus::Expired
            }
            s => s,
        }
    }
}

/// Why a device's answer (accept or decline) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerRefusal {
    /// Not in this user's inbox (no such prompt, or another audience).
    NotFound,
    /// Already answered, cancelled or expired; the status says which.
    NotPending(AssignmentStatus),
}

/// Why a ticket could not start a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketRefusal {
    /// Never issued, already used, or its prompt's data is gone.
    Unknown,
    /// The prompt expired or was cancelled.
    Closed(AssignmentStatus),
}

/// A claimed ticket: the prompt and the user whose generation now runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Claimed {
    pub prompt: PromptRecord,
    pub user: UserId,
}

/// How long a prompt's data (record, assignments, results) outlives its expiry.
pub const RESULT_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// Prompts, assignments, tickets, revocations and counters. Implemented by both tenant
/// stores, on the same connection and with the same errors.
pub trait PromptStore: Send + Sync {
    /// Stores the prompt and a `pending` assignment for every user of its audience.
    fn create_prompt<'a>(&'a self, prompt: &'a PromptRecord) -> TenantFuture<'a, ()>;

    /// The prompt, or `None`.
    fn get_prompt<'a>(&'a self, id: &'a PromptId) -> TenantFuture<'a, Option<PromptRecord>>;

    /// The tenant's prompts, newest first, at most `limit`.
    fn list_prompts<'a>(
        &'a self,
        tenant: &'a TenantId,
        limit: usize,
    ) -> TenantFuture<'a, Vec<PromptRecord>>;

    /// Every assignment of the prompt, in audience order.
    fn assignments<'a>(&'a self, prompt: &'a PromptRecord) -> TenantFuture<'a, Vec<Assignment>>;

    /// Marks the prompt cancelled and its `pending`/`accepted` assignments `cancelled`.
    /// `false` if there is no such prompt.
    fn cancel_prompt<'a>(&'a self, id: &'a PromptId, now_ms: u64) -> TenantFuture<'a, bool>;

    /// The prompts waiting for `user` at `now_ms` (pending, not expired, not cancelled),
    /// soonest expiry first.
    fn inbox<'a>(&'a self, user: &'a UserId, now_ms: u64) -> TenantFuture<'a, Vec<PromptRecord>>;

    /// `pending` → `accepted` (remembering the ticket's hash) or `declined`.
    fn answer<'a>(
        &'a self,
        prompt: &'a PromptId,
        user: &'a UserId,
        accept: Option<KeyHash>,
        now_ms: u64,
    ) -> TenantFuture<'a, Result<(), AnswerRefusal>>;

    /// `accepted` → `running` for the assignment whose ticket hashes to `ticket`; once.
    fn claim_ticket<'a>(
        &'a self,
        ticket: &'a KeyHash,
        now_ms: u64,
    ) -> TenantFuture<'a, Result<Claimed, TicketRefusal>>;

    /// `running` → `completed` (`Ok`) or `failed` (`Err`, the result holding the reason).
    /// `false` if the assignment was not running.
    fn finish<'a>(
        &'a self,
        prompt: &'a PromptId,
        user: &'a UserId,
        result: Result<GenerationResult, GenerationResult>,
        now_ms: u64,
    ) -> TenantFuture<'a, bool>;

    /// Revokes a device token until `until_ms` (its expiry; later it is refused anyway).
    fn revoke_device_token<'a>(&'a self, token_id: &'a str, until_ms: u64) -> TenantFuture<'a, ()>;

    /// Whether the device token was revoked.
    fn device_token_revoked<'a>(&'a self, token_id: &'a str) -> TenantFuture<'a, bool>;

    /// The device-token epoch: device tokens carry the epoch they were issued in, and only
    /// the current one's are accepted. A store that has none (first use, or it lost its data
    /// and with it the revocations) starts one at `now_ms`, later than any epoch before, so
    /// every token issued before the loss, revoked or not, is refused (fail closed).
    fn device_token_epoch(&self, now_ms: u64) -> TenantFuture<'_, u64>;

    /// Adds `amount` to the counter `name` of the window holding `now_ms` (windows of
    /// `window_ms`, aligned to the Unix epoch) unless that would pass `limit`. `None`: taken;
    /// `Some(ms)`: refused, the window ends in `ms`.
    fn take<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        limit: u64,
        window_ms: u64,
        now_ms: u64,
    ) -> TenantFuture<'a, Option<u64>>;
}

/// The window holding `now_ms` and the milliseconds until it ends.
pub(crate) fn window(now_ms: u64, window_ms: u64) -> (u64, u64) {
    let w = window_ms.max(1);
    (now_ms / w, w - now_ms % w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_checked() {
        assert!(UserId::parse("alice_01-x").is_some());
        for bad in ["", "a b", "ünï", "a:b", &"x".repeat(MAX_USER_ID_LEN + 1)] {
            assert!(UserId::parse(bad).is_none(), "{bad}");
        }
        assert!(serde_json::from_str::<UserId>("\"a b\"").is_err());
    }

    #[test]
    fn statuses_round_trip_and_expiry_reads_as_expired() {
        for s in [
            AssignmentStatus::Pending,
            AssignmentStatus::Accepted,
            AssignmentStatus::Running,
            AssignmentStatus::Completed,
            AssignmentStatus::Declined,
            AssignmentStatus::Expired,
            AssignmentStatus::Cancelled,
            AssignmentStatus::Failed,
        ] {
            assert_eq!(AssignmentStatus::parse(s.as_str()), Some(s));
        }
        let prompt = PromptRecord {
            id: PromptId::generate(),
            tenant: TenantId::generate(),
            partner: "p".into(),
            template: "t".into(),
            audience: vec![],
            max_tokens: 1,
            sampling: SamplingParams::default(),
            created_ms: 0,
            expires_ms: 100,
            webhook_url: None,
            cancelled: false,
        };
        let a = |status| Assignment {
            user: UserId::parse("u").expect("id"),
            status,
            updated_ms: 0,
            result: None,
        };
        let pending = a(AssignmentStatus::Pending);
        assert_eq!(pending.status_at(&prompt, 99), AssignmentStatus::Pending);
        assert_eq!(pending.status_at(&prompt, 100), AssignmentStatus::Expired);
        let running = a(AssignmentStatus::Running);
        assert_eq!(running.status_at(&prompt, 1000), AssignmentStatus::Running);
    }

    #[test]
    fn windows_align_to_the_epoch() {
        assert_eq!(window(0, 60_000), (0, 60_000));
        assert_eq!(window(59_999, 60_000), (0, 1));
        assert_eq!(window(60_000, 60_000), (1, 60_000));
    }
}
