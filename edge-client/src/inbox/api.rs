//! The inbox API's types as the device sees them: [`PromptId`], the one-use [`Ticket`], the
//! [`PartnerPrompt`] a partner asks the device to run, [`InboxItem`], [`Inbox`] and
//! [`Accepted`], and the API's error body. Ids and tickets are checked when parsed.
//!
//! The REST client reads the server's answers with the API's contract types
//! ([`tandem_openapi::inbox`]) and turns them into these with `TryFrom`, which checks the id
//! and the ticket: the JSON shape is written once, in the contract. These types stay for what
//! the contract's plain strings cannot say: a path-safe [`PromptId`], a [`Ticket`] whose
//! `Debug` is redacted, the system prompt and sampling grouped as a [`PartnerPrompt`], and an
//! [`ItemStatus`] that tolerates states added later. They keep their own serde derives, which
//! apps use; the tests below pin them to the contract's JSON.

use std::fmt;

use serde::{Deserialize, Serialize};
use tandem_openapi::inbox as contract;
use tandem_openapi::prompts::AssignmentStatus;
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

// ---------------------------------------------------------------------------------------------
// From the contract's types
// ---------------------------------------------------------------------------------------------

/// `running`, `completed` and `failed` are [`ItemStatus::Other`], as when the item's own serde
/// reads them (the inbox lists pending items only).
impl From<AssignmentStatus> for ItemStatus {
    fn from(s: AssignmentStatus) -> Self {
        match s {
            AssignmentStatus::Pending => Self::Pending,
            AssignmentStatus::Accepted => Self::Accepted,
            AssignmentStatus::Declined => Self::Declined,
            AssignmentStatus::Expired => Self::Expired,
            AssignmentStatus::Cancelled => Self::Cancelled,
            AssignmentStatus::Running | AssignmentStatus::Completed | AssignmentStatus::Failed => {
                Self::Other
            }
        }
    }
}

// The contract structs are taken apart field by field, without `..`: a field added to the
// contract stops this build until the device decides what to do with it. `fields` (the
// profile fields the template names) is left out: the device finds them in the template
// itself when it renders it.

/// Checks the prompt id; an empty system prompt stays `Some("")`, as the item's own serde
/// reads it ([`PartnerPrompt::system`] counts it as none).
impl TryFrom<contract::InboxItem> for InboxItem {
    type Error = InboxError;

    fn try_from(item: contract::InboxItem) -> Result<Self, Self::Error> {
        let contract::InboxItem {
            prompt_id,
            partner,
            template,
            fields: _,
            system_prompt,
            max_tokens,
            sampling,
            expires,
            status,
        } = item;
        Ok(Self {
            prompt_id: PromptId::new(prompt_id)?,
            prompt: PartnerPrompt {
                partner,
                template,
                system_prompt: Some(system_prompt),
                max_tokens,
                sampling,
                expires,
            },
            status: status.into(),
        })
    }
}

/// Checks every item's prompt id.
impl TryFrom<contract::Inbox> for Inbox {
    type Error = InboxError;

    fn try_from(inbox: contract::Inbox) -> Result<Self, Self::Error> {
        let contract::Inbox { user_id, items } = inbox;
        Ok(Self {
            user_id,
            items: items
                .into_iter()
                .map(InboxItem::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Checks the prompt id and the ticket. The ticket is a plain `String` in the contract type
/// (whose `Debug` shows it): convert the answer right after reading it, and never log it.
impl TryFrom<contract::Accepted> for Accepted {
    type Error = InboxError;

    fn try_from(accepted: contract::Accepted) -> Result<Self, Self::Error> {
        let contract::Accepted {
            prompt_id,
            ticket,
            partner,
            template,
            fields: _,
            system_prompt,
            max_tokens,
            sampling,
            expires,
        } = accepted;
        Ok(Self {
            prompt_id: PromptId::new(prompt_id)?,
            ticket: Ticket::try_from(ticket)?,
            prompt: PartnerPrompt {
                partner,
                template,
                system_prompt: Some(system_prompt),
                max_tokens,
                sampling,
                expires,
            },
        })
    }
}

/// `{"error":{"code","message"}}`, the API's error body, read more loosely than the contract's
/// [`tandem_openapi::error::ErrorBody`]: its closed `ErrorCode` would refuse a code added to
/// the server after this build, and the device would lose that code and the server's message
/// (they become [`ApiCode::Other`](crate::error::ApiCode::Other) as the server wrote it
/// instead). A test below reads every contract code with it.
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

#[cfg(test)]
mod tests {
    use tandem_openapi::error::{self as contract_error, ErrorCode};
    use tandem_protocol::SamplingParams;

    use super::*;

    fn contract_item(
        id: &str,
        system_prompt: &str,
        status: AssignmentStatus,
    ) -> contract::InboxItem {
        contract::InboxItem {
            prompt_id: id.into(),
            partner: "Acme Shop".into(),
            template: "Hi {{ name }}".into(),
            fields: vec!["name".into()],
            system_prompt: system_prompt.into(),
            max_tokens: 7,
            sampling: SamplingParams {
                temperature: 0.7,
                top_k: Some(20),
                seed: 42,
                ..SamplingParams::default()
            },
            expires: "2026-11-23T10:00:00.000Z".into(),
            status,
        }
    }

    fn contract_accepted(id: &str, ticket: &str) -> contract::Accepted {
        let item = contract_item(id, "Be brief.", AssignmentStatus::Accepted);
        contract::Accepted {
            prompt_id: item.prompt_id,
            ticket: ticket.into(),
            partner: item.partner,
            template: item.template,
            fields: item.fields,
            system_prompt: item.system_prompt,
            max_tokens: item.max_tokens,
            sampling: item.sampling,
            expires: item.expires,
        }
    }

    /// What the server writes reads the same through the contract as through the device's own
    /// serde derives (the way the client read it before).
    #[test]
    fn contract_answers_convert_as_the_device_types_read_them() {
        let inbox = contract::Inbox {
            user_id: "alice".into(),
            items: vec![
                contract_item("00000000000000aa", "Be brief.", AssignmentStatus::Pending),
                contract_item("00000000000000bb", "", AssignmentStatus::Running),
            ],
        };
        let json = serde_json::to_string(&inbox).expect("json");
        let direct: Inbox = serde_json::from_str(&json).expect("device serde");
        let converted = Inbox::try_from(inbox).expect("convert");
        assert_eq!(converted, direct);
        assert_eq!(converted.items[0].prompt.system(), Some("Be brief."));
        assert_eq!(converted.items[1].prompt.system(), None);
        assert_eq!(converted.items[1].status, ItemStatus::Other);

        let accepted = contract_accepted("00000000000000aa", "tkt_0123");
        let json = serde_json::to_string(&accepted).expect("json");
        let direct: Accepted = serde_json::from_str(&json).expect("device serde");
        let converted = Accepted::try_from(accepted).expect("convert");
        assert_eq!(converted, direct);
        assert_eq!(converted.ticket.expose(), "tkt_0123");
    }

    #[test]
    fn bad_ids_and_tickets_in_contract_answers_are_refused() {
        let item = contract_item("../admin", "", AssignmentStatus::Pending);
        let err = InboxItem::try_from(item).expect_err("bad id");
        assert!(
            matches!(&err, InboxError::Decode(m) if m == "`../admin` is not a prompt id"),
            "{err:?}"
        );
        let err = Accepted::try_from(contract_accepted("00000000000000aa", "tkt secret"))
            .expect_err("bad ticket");
        let shown = format!("{err} {err:?}");
        assert!(matches!(err, InboxError::Decode(_)), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    /// The loose error body reads every code of the contract as the server writes it, and a
    /// code this build does not know.
    #[test]
    fn the_error_body_reads_every_contract_code() {
        let codes = [
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::DeviceTokenStale,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::RequestTimeout,
            ErrorCode::Conflict,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::Invalid,
            ErrorCode::RateLimited,
            ErrorCode::QuotaExceeded,
            ErrorCode::Unavailable,
            ErrorCode::AdminDisabled,
            ErrorCode::Internal,
        ];
        for code in codes {
            let body = contract_error::ErrorBody {
                error: contract_error::ErrorDetail {
                    code,
                    message: "what happened".into(),
                },
            };
            let json = serde_json::to_vec(&body).expect("json");
            let read: ErrorBody = serde_json::from_slice(&json).expect("error body");
            assert_eq!(read.error.code, code.as_str());
            assert_eq!(read.error.message, "what happened");
        }
        let read: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"added_later"}}"#).expect("error body");
        assert_eq!(read.error.code, "added_later");
        assert_eq!(read.error.message, "");
    }
}
