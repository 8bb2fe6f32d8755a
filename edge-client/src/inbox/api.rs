//! The inbox API's types, as the REST API writes them: [`PromptId`], the one-use [`Ticket`],
//! the [`PartnerPrompt`] a partner asks the device to run, [`InboxItem`], [`Inbox`] and
//! [`Accepted`], and the API's error body. Ids and tickets are checked when parsed.

use std::fmt;

use serde::{Deserialize, Serialize};
use tandem_protocol::wire::MAX_PROMPT_ID_LEN;
use tandem_protocol::SamplingParams;

use crate::error::InboxError;

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

impl PartnerPrompt {
    /// The system prompt, with an empty one counted as none.
    pub fn system(&self) -> Option<&str> {
        self.system_prompt.as_deref().filter(|s| !s.is_empty())
    }
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
pub(super) struct ErrorBody {
    pub(super) error: ErrorDetail,
}

#[derive(Deserialize)]
pub(super) struct ErrorDetail {
    pub(super) code: String,
    #[serde(default)]
    pub(super) message: String,
}
