//! Deciding without asking: [`AutoAccept`] says [`Decision::Accept`] for the partners the
//! user trusts (the profile's `auto_accept_partners` setting, or the app's own list) and
//! [`Decision::Ask`] for everyone else. Names match exactly.

use std::collections::BTreeSet;

use super::api::InboxItem;
use crate::prompt::Profile;

/// What the device does with an item without asking the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The user trusts this partner: accept and answer.
    Accept,
    /// Ask the user (or leave the item waiting where no one can be asked).
    Ask,
}

/// The partners whose prompts the device answers without asking. Names match exactly (case
/// and spaces included): auto-accepting is a trust decision, so a look-alike name must not
/// pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AutoAccept {
    partners: BTreeSet<String>,
    everyone: bool,
}

impl AutoAccept {
    /// Asks about every prompt.
    pub fn none() -> Self {
        Self::default()
    }

    /// Accepts every prompt (the CLI's `--yes`).
    pub fn everyone() -> Self {
        Self {
            everyone: true,
            ..Self::default()
        }
    }

    /// The profile's `auto_accept_partners` setting.
    pub fn from_profile(profile: &Profile) -> Self {
        Self {
            partners: profile
                .settings()
                .auto_accept_partners
                .iter()
                .cloned()
                .collect(),
            everyone: false,
        }
    }

    /// Also accepts `partner`'s prompts.
    pub fn with_partner(mut self, partner: impl Into<String>) -> Self {
        self.partners.insert(partner.into());
        self
    }

    /// Accept or ask, for one item.
    pub fn decide(&self, item: &InboxItem) -> Decision {
        if self.everyone || self.partners.contains(&item.prompt.partner) {
            Decision::Accept
        } else {
            Decision::Ask
        }
    }
}
