//! The partner's prompts (`/v1/prompts...`) and what it sees of each user's answer; the
//! user ids an audience names and the statuses a user's assignment goes through.

use serde::{Deserialize, Serialize};
use tandem_protocol::SamplingParams;
use utoipa::ToSchema;

/// The longest user id, in bytes.
pub const MAX_USER_ID_LEN: usize = 64;

/// A user (device owner) id, as the provider names its users: 1 to 64 characters of
/// `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= MAX_USER_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| {
            format!("user ids are 1 to {MAX_USER_ID_LEN} characters of A-Z a-z 0-9 _ -")
        })
    }
}

impl From<UserId> for String {
    fn from(u: UserId) -> String {
        u.0
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where one user's assignment stands. `Expired` is never stored: a `pending` or `accepted`
/// assignment of an expired prompt reads as `expired` ([`Assignment::status_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentStatus {
    /// In the user's inbox, not answered yet.
    Pending,
    /// The user accepted; the device has not started the generation yet.
    Accepted,
    /// The generation runs.
    Running,
    /// The output is in the result.
    Completed,
    /// The user declined (no reason is kept).
    Declined,
    /// The prompt expired before the user answered or the device started.
    Expired,
    /// The partner cancelled the prompt before this user's generation started.
    Cancelled,
    /// The generation started and ended with an error.
    Failed,
}

impl AssignmentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Accepted => "accepted",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Declined => "declined",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "accepted" => Self::Accepted,
            "running" => Self::Running,
            "completed" => Self::Completed,
            "declined" => Self::Declined,
            "expired" => Self::Expired,
            "cancelled" => Self::Cancelled,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// No further transition leaves it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Declined | Self::Expired | Self::Cancelled | Self::Failed
        )
    }
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
    /// Counts one more user with status `s`.
    pub fn add(&mut self, s: AssignmentStatus) {
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

/// `GET /v1/prompts`: the caller's prompts, newest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PromptList {
    pub prompts: Vec<Prompt>,
}
