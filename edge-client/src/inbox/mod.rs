//! The device's inbox: prompts that partners (third parties) sent to this user, waiting for
//! the device to answer or decline them (DESIGN.md §1, §2 steps 1–2, §9).
//!
//! # Flow
//! 1. [`EdgeClient::inbox`] (`GET /v1/edge/inbox`) lists the pending [`InboxItem`]s: who asks
//!    ([`PartnerPrompt::partner`]), the template over profile fields, the provider's system
//!    prompt, the token limit, the sampling parameters and the expiry.
//! 2. The device decides per item: [`AutoAccept::decide`] says [`Decision::Accept`] for
//!    partners the user trusts (the profile's `auto_accept_partners` setting, or the app's own
//!    list) and [`Decision::Ask`] otherwise. Before accepting, [`PartnerPrompt::assemble`]
//!    shows whether the local profile can fill the template at all: a template naming a field
//!    the profile lacks is [`PromptError::MissingFields`] before anything is sent.
//! 3. [`EdgeClient::accept`] (`POST …/accept`) returns [`Accepted`], which carries a one-use
//!    [`Ticket`]; [`EdgeClient::decline`] (`POST …/decline`) drops the item.
//! 4. [`EdgeClient::answer`] renders the template with the local profile (sanitized), puts it
//!    under the provider's system prompt with the model's chat template (the system turn is
//!    the shared prefix, its own chunk on the wire), and runs the generation over the usual
//!    WebSocket path with the ticket as `Open`'s prompt id and the partner's `max_tokens` and
//!    sampling. The cloud stores the output as the prompt's result for this user, and refuses
//!    a ticket that was used, expired or cancelled (`bad_prompt_ticket`, a `2xx` code that
//!    ends the generation with [`ClientError::Server`]). The [`TransparencyRecord`] names the
//!    partner and the prompt id.
//!
//! # Configuration
//! The REST calls need [`ClientConfig::inbox`] set to an [`InboxConfig`]: the API's base URL
//! (`https://HOST` or, on loopback, `http://HOST:PORT`) and the device token the provider issued (`tdv_…`, sent as
//! `Authorization: Bearer`). An app that only lists its inbox, without a model, can use an
//! [`InboxClient`] directly.
//!
//! # Limits
//! `https://` uses the same rustls settings as `wss://` (web roots plus
//! [`InboxConfig::with_ca_certs`]); a failed certificate check is [`InboxError::Tls`], final.
//! Each call opens one connection, runs under [`InboxConfig::timeout`] (connect included) and
//! reads at most [`InboxConfig::max_response_bytes`] of body. Nothing retries on its own:
//! `429` and `503` come back as [`InboxError::Api`] with the server's `Retry-After`.
//!
//! # Privacy
//! The device token and tickets are credentials: their `Debug` output is redacted, they have
//! no `Display`, and no error message or log line contains them. Rendering happens on the
//! device; only hidden states leave it, as for any generation.
//!
//! # Layout
//! - `config`: [`InboxConfig`] and the defaults of its limits.
//! - `api`: the API's types as the device sees them ([`PromptId`], [`Ticket`], [`InboxItem`],
//!   [`Accepted`], …), converted from the contract's (`tandem_openapi::inbox`).
//! - `rest`: the REST calls ([`InboxClient`]), which need no model.
//! - `decide`: [`AutoAccept`].
//! - `answer`: [`PromptContext`], [`Accepted::request`] and the inbox calls on [`EdgeClient`].
//!
//! The errors ([`InboxError`], [`ApiCode`]) live in the crate's error module and the
//! [`DeviceToken`] in a module of its own, below the TLS settings that also send it; all are
//! re-exported here.
//!
//! [`EdgeClient::inbox`]: crate::EdgeClient::inbox
//! [`EdgeClient::accept`]: crate::EdgeClient::accept
//! [`EdgeClient::decline`]: crate::EdgeClient::decline
//! [`EdgeClient::answer`]: crate::EdgeClient::answer
//! [`EdgeClient`]: crate::EdgeClient
//! [`PromptError::MissingFields`]: crate::PromptError::MissingFields
//! [`ClientError::Server`]: crate::ClientError::Server
//! [`TransparencyRecord`]: crate::TransparencyRecord
//! [`ClientConfig::inbox`]: crate::ClientConfig::inbox

mod answer;
mod api;
pub(crate) mod config;
mod decide;
pub(crate) mod rest;

pub use self::answer::PromptContext;
pub use self::api::{Accepted, Inbox, InboxItem, ItemStatus, PartnerPrompt, PromptId, Ticket};
pub use self::config::{InboxConfig, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT};
pub use self::decide::{AutoAccept, Decision};
pub use self::rest::InboxClient;
pub use crate::device_token::DeviceToken;
pub use crate::error::{ApiCode, InboxError};

#[cfg(test)]
mod tests {
    use tandem_protocol::SamplingParams;

    use super::*;
    use crate::prompt::Profile;

    fn item(partner: &str) -> InboxItem {
        InboxItem {
            prompt_id: PromptId::new("0123456789abcdef").expect("id"),
            prompt: PartnerPrompt {
                partner: partner.into(),
                template: "Hi".into(),
                system_prompt: None,
                max_tokens: 4,
                sampling: SamplingParams::default(),
                expires: "2026-11-23T10:00:00.000Z".into(),
            },
            status: ItemStatus::Pending,
        }
    }

    #[test]
    fn auto_accept_matches_names_exactly() {
        let profile = Profile::from_json_str(
            r#"{"name": "Jo", "auto_accept_partners": ["Acme Shop", "Insurer"]}"#,
        )
        .expect("profile");
        let policy = AutoAccept::from_profile(&profile);
        assert_eq!(policy.decide(&item("Acme Shop")), Decision::Accept);
        assert_eq!(policy.decide(&item("Insurer")), Decision::Accept);
        for other in ["acme shop", "Acme Shop ", "Other"] {
            assert_eq!(policy.decide(&item(other)), Decision::Ask, "{other:?}");
        }
        let policy = policy.with_partner("Other");
        assert_eq!(policy.decide(&item("Other")), Decision::Accept);
        assert_eq!(AutoAccept::none().decide(&item("Acme Shop")), Decision::Ask);
        assert_eq!(AutoAccept::everyone().decide(&item("x")), Decision::Accept);
    }

    #[test]
    fn prompt_ids_are_path_safe() {
        assert!(PromptId::new("0123456789abcdef").is_ok());
        for bad in ["", "../admin", "a/b", "a b", "é", &"a".repeat(65)] {
            assert!(PromptId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn credentials_are_redacted() {
        let token = DeviceToken::new("tdv_secret123").expect("token");
        let cfg = InboxConfig::new("http://127.0.0.1:1", token).expect("cfg");
        let shown = format!("{cfg:?} {:?}", InboxClient::new(cfg.clone()));
        assert!(!shown.contains("secret123"), "{shown}");
        let ticket = Ticket::try_from("tkt_secret456".to_owned()).expect("ticket");
        assert!(!format!("{ticket:?}").contains("secret456"));
        assert!(DeviceToken::new("has space").is_err());
        assert!(DeviceToken::new("  ").is_err());
    }
}
