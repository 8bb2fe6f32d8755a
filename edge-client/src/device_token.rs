//! The device token the provider issued (`tdv_…`): the device's credential, sent as
//! `Authorization: Bearer` on the inbox calls and on every WebSocket upgrade.
//!
//! Below both users ([`crate::tls`] builds the upgrade request with it, [`crate::inbox`]
//! signs its REST calls with it). Re-exported as `tandem_edge::inbox::DeviceToken` and
//! `tandem_edge::DeviceToken`.
//!
//! Privacy: the token is a credential: its `Debug` output is redacted, it has no `Display`,
//! and no error message contains it.

use std::fmt;

use crate::error::InboxError;

/// Longest device token accepted.
const MAX_TOKEN_LEN: usize = 4096;

/// The device token the provider issued (`tdv_…`): opaque, sent as a bearer token. Its
/// `Debug` is redacted and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(String);

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceToken(<redacted>)")
    }
}

impl DeviceToken {
    /// Checks that `token` can travel in a header: 1 to 4096 visible ASCII characters.
    pub fn new(token: impl Into<String>) -> Result<Self, InboxError> {
        let token = token.into();
        let token = token.trim();
        if token.is_empty() {
            return Err(InboxError::Config("the device token is empty".into()));
        }
        if token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InboxError::Config(format!(
                "the device token must be at most {MAX_TOKEN_LEN} visible ASCII characters"
            )));
        }
        Ok(Self(token.to_owned()))
    }

    /// The token itself, for sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DeviceToken {
    type Err = InboxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}
