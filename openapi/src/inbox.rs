//! The device's inbox (`/v1/edge/inbox...`): the prompts waiting for its user, an accepted
//! prompt's ticket, and the user's own answers.

use serde::{Deserialize, Serialize};
use tandem_protocol::SamplingParams;
use utoipa::ToSchema;

use crate::prompts::{AssignmentStatus, UserResult};

/// A prompt waiting for the user.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct InboxItem {
    pub prompt_id: String,
    /// The partner asking.
    pub partner: String,
    /// The partner's template; `{{field}}` names a field of the user's profile.
    pub template: String,
    /// The profile fields the template names.
    pub fields: Vec<String>,
    /// The provider's system prompt, to put before the rendered template.
    pub system_prompt: String,
    pub max_tokens: u32,
    #[schema(value_type = Object)]
    pub sampling: SamplingParams,
    #[schema(format = DateTime)]
    pub expires: String,
    /// `pending` for listed items.
    pub status: AssignmentStatus,
}

/// `GET /v1/edge/inbox`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Inbox {
    pub user_id: String,
    /// Soonest expiry first.
    pub items: Vec<InboxItem>,
}

/// An accepted prompt: run it with `ticket` as the `Open` frame's prompt id, and these
/// `max_tokens` and `sampling` (the server enforces them).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub prompt_id: String,
    /// One-time: it starts one generation, until the prompt expires.
    #[schema(example = "tkt_<64 hex digits>")]
    pub ticket: String,
    pub partner: String,
    pub template: String,
    pub fields: Vec<String>,
    pub system_prompt: String,
    pub max_tokens: u32,
    #[schema(value_type = Object)]
    pub sampling: SamplingParams,
    #[schema(format = DateTime)]
    pub expires: String,
}

/// One of the user's own assignments, whatever its status, with the result when there is
/// one: what the user may always see about their own data.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct OwnAnswer {
    pub item: InboxItem,
    pub result: UserResult,
}
