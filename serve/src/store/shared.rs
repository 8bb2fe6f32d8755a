//! Pieces both stores (sessions, and the REST tenants in `crate::rest::store`) use: the
//! 32-byte SHA-256 digest that stands in for a secret, and the Redis connection set-up.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// The SHA-256 of a secret (a resume token, an API key): what the stores keep instead of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct SecretDigest(pub(crate) [u8; 32]);

impl SecretDigest {
    /// Whether the two digests are equal, in time that does not depend on where they differ.
    pub(crate) fn matches(&self, other: &SecretDigest) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        std::hint::black_box(diff) == 0
    }

    pub(crate) fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

/// A lazily connecting manager for `url` and the server's address (for logs), with few,
/// short reconnect retries: a failed reconnect ends quickly and the next call starts a new
/// one, so recovery follows Redis's return within about a second. The error text never
/// quotes the URL: it may hold a password.
pub(crate) fn redis_manager(
    url: &str,
    op_timeout: Duration,
) -> Result<(ConnectionManager, String), String> {
    let client =
        redis::Client::open(url).map_err(|e| format!("bad redis url: {}", e.category()))?;
    let addr = client.get_connection_info().addr().to_string();
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(op_timeout))
        .set_response_timeout(Some(op_timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
        .map_err(|e| format!("redis client: {e}"))?;
    Ok((conn, addr))
}
