//! The tenant store: partner tenants, their quotas and their API keys (DESIGN.md §8).
//!
//! # Layout
//! - this module: the [`TenantStore`] trait, the ids and records it keeps, and
//!   [`TenantStoreError`]; [`open`] builds either backend as one `Arc<dyn TenantStore>`.
//! - [`memory`]: [`MemoryTenantStore`], for a single process.
//! - [`redis`]: [`RedisTenantStore`], shared by replicas through the session store's Redis
//!   (and its connection, when [`Stores::open`](crate::Stores::open) opens them together).
//! - [`prompts`]: [`PromptStore`], the partner prompts' half, implemented by both backends
//!   (`redis_prompts` for Redis).
//!
//! # Guarantees
//! - **Keys are stored hashed**: the store keeps `sha256(key)` ([`KeyHash`]) only, never the
//!   key; [`KeyHash::matches`] compares in constant time.
//! - **Revocation is immediate everywhere**: nothing caches keys; every authenticated request
//!   reads the key's record from the store, so a key revoked through one replica is refused
//!   by all of them on their next request.
//! - **Writes are atomic** (a Lua script in Redis): a key is added only to an existing tenant,
//!   revoked only through its own tenant, and tenant names are unique.
//! - **Bounded latency** (Redis): every call has a timeout and fails with
//!   [`TenantStoreError::Unavailable`] instead of hanging.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod memory;
pub mod redis;

use crate::secret::SecretDigest;

pub use self::memory::MemoryTenantStore;
pub use self::redis::{RedisTenantStore, RedisTenantStoreConfig};

/// What every store method returns: a boxed, sendable future.
pub type TenantFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, TenantStoreError>> + Send + 'a>>;

/// Hex digits in a [`TenantId`] or [`KeyId`].
const ID_HEX_LEN: usize = 16;

fn is_id(s: &str) -> bool {
    s.len() == ID_HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Declares a 16-lowercase-hex-digit id newtype.
macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s).ok_or_else(|| format!("not a 16-hex-digit id: {s:?}"))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl $name {
            /// 64 random bits.
            pub fn generate() -> Self {
                Self(hex::encode(rand::random::<[u8; ID_HEX_LEN / 2]>()))
            }

            /// `None` unless `s` is 16 lowercase hex digits.
            pub fn parse(s: &str) -> Option<Self> {
                is_id(s).then(|| Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

hex_id!(
    /// A partner tenant's id: 16 lowercase hex digits.
    TenantId
);
hex_id!(
    /// An API key's public id (the part of the key that may be logged): 16 lowercase hex
    /// digits.
    KeyId
);

pub mod prompts;
mod redis_prompts;
pub use self::prompts::PromptStore;
// A tenant's limits are part of the REST contract (`tandem-openapi`); the store keeps them.
pub use tandem_openapi::tenants::Quotas;

/// A tenant as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRecord {
    pub id: TenantId,
    pub name: String,
    pub quotas: Quotas,
    /// Unix milliseconds.
    pub created_ms: u64,
}

/// `sha256` of an API key: what the store keeps instead of the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    pub fn of(key: &[u8]) -> Self {
        Self(Sha256::digest(key).into())
    }

    /// Whether the two hashes are equal, in time that does not depend on where they differ.
    pub fn matches(&self, other: &KeyHash) -> bool {
        SecretDigest(self.0).matches(&SecretDigest(other.0))
    }

    pub(crate) fn to_hex(self) -> String {
        SecretDigest(self.0).to_hex()
    }

    pub(crate) fn from_hex(s: &str) -> Option<Self> {
        SecretDigest::from_hex(s).map(|d| Self(d.0))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

/// An API key as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: KeyId,
    pub tenant: TenantId,
    pub hash: KeyHash,
    pub created_ms: u64,
}

/// A key as listed: its id and creation time, never its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_id: KeyId,
    pub created_ms: u64,
}

/// Which backend to open.
#[derive(Clone, Debug)]
pub enum TenantStoreConfig {
    Memory,
    Redis(RedisTenantStoreConfig),
}

/// Both halves of one opened backend.
pub struct RestStores {
    pub tenants: Arc<dyn TenantStore>,
    pub prompts: Arc<dyn PromptStore>,
}

/// Opens the configured backend; for Redis this connects and pings.
pub async fn open(config: &TenantStoreConfig) -> Result<RestStores, TenantStoreError> {
    Ok(match config {
        TenantStoreConfig::Memory => {
            let store = Arc::new(MemoryTenantStore::default());
            RestStores {
                tenants: store.clone(),
                prompts: store,
            }
        }
        TenantStoreConfig::Redis(cfg) => {
            let store = Arc::new(RedisTenantStore::connect(cfg.clone()).await?);
            RestStores {
                tenants: store.clone(),
                prompts: store,
            }
        }
    })
}

/// Why a tenant store call failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantStoreError {
    #[error("unknown tenant {0}")]
    UnknownTenant(TenantId),
    #[error("unknown key {0}")]
    UnknownKey(KeyId),
    #[error("a tenant named {0:?} exists")]
    NameTaken(String),
    /// A freshly generated id is taken (64 random bits collided).
    #[error("id {0} already exists")]
    IdTaken(String),
    /// The backend cannot be reached or did not answer in time; retry later.
    #[error("tenant store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered with something this code did not write.
    #[error("tenant store holds unreadable data: {0}")]
    Corrupt(String),
    /// The backend refused a command.
    #[error("tenant store error: {0}")]
    Backend(String),
}

/// Tenants and API keys. See the module doc for the guarantees.
pub trait TenantStore: Send + Sync {
    /// Stores a new tenant. [`TenantStoreError::NameTaken`] if the name is used.
    fn create_tenant<'a>(&'a self, tenant: &'a TenantRecord) -> TenantFuture<'a, ()>;

    /// The tenant, or `None`.
    fn get_tenant<'a>(&'a self, id: &'a TenantId) -> TenantFuture<'a, Option<TenantRecord>>;

    /// Every tenant, oldest first (ties by id).
    fn list_tenants(&self) -> TenantFuture<'_, Vec<TenantRecord>>;

    /// Stores a new key of `key.tenant`. [`TenantStoreError::UnknownTenant`] if the tenant
    /// does not exist.
    fn add_key<'a>(&'a self, key: &'a KeyRecord) -> TenantFuture<'a, ()>;

    /// The key's record, or `None` (never issued, or revoked).
    fn get_key<'a>(&'a self, id: &'a KeyId) -> TenantFuture<'a, Option<KeyRecord>>;

    /// The tenant's live keys, oldest first. [`TenantStoreError::UnknownTenant`].
    fn list_keys<'a>(&'a self, tenant: &'a TenantId) -> TenantFuture<'a, Vec<KeyInfo>>;

    /// Replaces the tenant's quotas. [`TenantStoreError::UnknownTenant`].
    fn set_quotas<'a>(&'a self, tenant: &'a TenantId, quotas: Quotas) -> TenantFuture<'a, ()>;

    /// Deletes the key. [`TenantStoreError::UnknownTenant`], or
    /// [`TenantStoreError::UnknownKey`] if the key does not exist or is another tenant's.
    fn revoke_key<'a>(&'a self, tenant: &'a TenantId, key: &'a KeyId) -> TenantFuture<'a, ()>;

    /// The tenant's webhook signing secret, `None` if none was set.
    /// [`TenantStoreError::UnknownTenant`].
    fn webhook_secret<'a>(&'a self, tenant: &'a TenantId) -> TenantFuture<'a, Option<String>>;

    /// Sets the tenant's webhook signing secret to `secret`: always when `replace`, else
    /// only if it has none (two replicas creating one on first need agree on the first).
    /// Returns the secret now in force. [`TenantStoreError::UnknownTenant`].
    fn set_webhook_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        secret: &'a str,
        replace: bool,
    ) -> TenantFuture<'a, String>;
}

/// The default timeout of one Redis call.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_16_lowercase_hex() {
        let id = TenantId::generate();
        assert_eq!(TenantId::parse(id.as_str()), Some(id));
        for bad in [
            "",
            "abc",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "0123456789abcdef0",
        ] {
            assert_eq!(KeyId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn quotas_are_checked() {
        let ok = Quotas {
            prompts_per_minute: 1,
            tokens_per_day: Quotas::MAX_TOKENS_PER_DAY,
            max_audience: 10,
        };
        assert!(ok.check().is_ok());
        let zero = Quotas {
            max_audience: 0,
            ..ok
        };
        assert!(zero.check().is_err_and(|e| e.contains("max_audience")));
        let big = Quotas {
            prompts_per_minute: Quotas::MAX_PROMPTS_PER_MINUTE + 1,
            ..ok
        };
        assert!(big.check().is_err_and(|e| e.contains("prompts_per_minute")));
    }

    #[test]
    fn key_hash_round_trips_and_matches() {
        let h = KeyHash::of(b"tdm_x");
        assert!(h.matches(&KeyHash::of(b"tdm_x")));
        assert!(!h.matches(&KeyHash::of(b"tdm_y")));
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(format!("{h:?}"), "KeyHash(..)");
    }
}
