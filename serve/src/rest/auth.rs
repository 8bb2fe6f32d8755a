//! Who is calling: the provider (admin key) or a partner tenant (API key).
//!
//! # API keys
//! A key reads `tdm_{key_id}_{secret}`: `key_id` is 16 hex digits (public: it names the key in
//! listings and logs), `secret` 64 hex digits (32 bytes from the OS-seeded CSPRNG). The store
//! keeps `sha256` of the whole key string and its tenant, by `key_id`.
//!
//! # Verification, and why it takes the same path every time
//! [`PartnerAuth`] hashes whatever was presented, reads the record of the key id it names
//! (a placeholder id when the key is malformed, so a malformed key costs the same store round
//! trip as a wrong one), and compares hashes in constant time. Every failure (no header, not
//! `Bearer`, malformed, unknown, wrong, revoked) answers the same 401 body. Nothing is cached:
//! a revoked key fails on the next request on every replica.
//!
//! The admin key comes from configuration; only its hash is kept in memory, and it is
//! compared the same way. Without one, the admin routes answer 503 `admin_disabled`.

use std::fmt;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::error::ApiError;
use super::store::{KeyHash, KeyId, TenantRecord};
use super::RestState;

/// What every API key starts with.
pub const KEY_PREFIX: &str = "tdm_";
const SECRET_HEX_LEN: usize = 64;

/// The one answer to a failed partner authentication.
pub const PARTNER_UNAUTHORIZED: &str = "missing or invalid API key";
/// The one answer to a failed admin authentication.
pub const ADMIN_UNAUTHORIZED: &str = "missing or invalid admin key";

/// A freshly issued API key. Shown to the caller once; `Debug` never prints the secret.
pub struct NewApiKey {
    pub key_id: KeyId,
    key: String,
}

impl NewApiKey {
    pub fn generate() -> Self {
        let key_id = KeyId::generate();
        let secret = hex::encode(rand::random::<[u8; SECRET_HEX_LEN / 2]>());
        let key = format!("{KEY_PREFIX}{key_id}_{secret}");
        Self { key_id, key }
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.key.as_bytes())
    }

    /// The key, to hand to the caller once.
    pub fn reveal(self) -> String {
        self.key
    }
}

impl fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NewApiKey({}, <redacted>)", self.key_id)
    }
}

/// The key id a well-formed key names, or `None`.
pub fn parse_key_id(key: &str) -> Option<KeyId> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let secret_ok = secret.len() == SECRET_HEX_LEN
        && secret
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !secret_ok {
        return None;
    }
    KeyId::parse(id)
}

/// The provider's admin key, kept as its hash.
#[derive(Clone, Copy)]
pub struct AdminKey(KeyHash);

impl AdminKey {
    pub fn new(key: &str) -> Self {
        Self(KeyHash::of(key.as_bytes()))
    }

    fn matches(&self, presented: &str) -> bool {
        self.0.matches(&KeyHash::of(presented.as_bytes()))
    }
}

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminKey(<redacted>)")
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is exactly that.
pub(crate) fn bearer(parts: &Parts) -> Option<&str> {
    bearer_in(&parts.headers)
}

/// [`bearer`] for a header map.
pub(crate) fn bearer_in(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Proof that the caller presented the provider's admin key.
#[derive(Debug)]
pub struct AdminAuth(());

impl FromRequestParts<Arc<RestState>> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<RestState>,
    ) -> Result<Self, ApiError> {
        let Some(admin) = state.admin_key else {
            return Err(ApiError::admin_disabled());
        };
        // Hash and compare even without a header, so every failure takes the same path.
        let presented = bearer(parts).unwrap_or("");
        let ok = admin.matches(presented) & !presented.is_empty();
        if ok {
            Ok(Self(()))
        } else {
            Err(ApiError::unauthorized(ADMIN_UNAUTHORIZED))
        }
    }
}

/// The partner tenant whose API key the caller presented.
#[derive(Debug)]
pub struct PartnerAuth {
    pub tenant: TenantRecord,
    pub key_id: KeyId,
}

/// What a malformed key is looked up as: an id no generated key has (all zero bits is one
/// value in 2^64, and [`KeyId::generate`] would have to draw it).
fn placeholder_key_id() -> KeyId {
    KeyId::parse("0000000000000000").unwrap_or_else(KeyId::generate)
}

impl FromRequestParts<Arc<RestState>> for PartnerAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<RestState>,
    ) -> Result<Self, ApiError> {
        let presented = bearer(parts).unwrap_or("");
        let hash = KeyHash::of(presented.as_bytes());
        let parsed = parse_key_id(presented);
        let lookup = parsed.clone().unwrap_or_else(placeholder_key_id);
        let record = state.store.get_key(&lookup).await?;
        let valid = match &record {
            Some(r) => r.hash.matches(&hash) & parsed.is_some(),
            None => {
                // Same work as a hit.
                let _ = std::hint::black_box(hash.matches(&hash));
                false
            }
        };
        let unauthorized = || ApiError::unauthorized(PARTNER_UNAUTHORIZED);
        let record = match record {
            Some(r) if valid => r,
            _ => return Err(unauthorized()),
        };
        // A key whose tenant is gone is no key.
        let tenant = state
            .store
            .get_tenant(&record.tenant)
            .await?
            .ok_or_else(unauthorized)?;
        Ok(Self {
            tenant,
            key_id: record.key_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_hash() {
        let k = NewApiKey::generate();
        let id = k.key_id.clone();
        let hash = k.hash();
        assert!(!format!("{k:?}").contains(&k.key[KEY_PREFIX.len() + 17..]));
        let key = k.reveal();
        assert_eq!(parse_key_id(&key), Some(id));
        assert!(hash.matches(&KeyHash::of(key.as_bytes())));
        assert_eq!(key.len(), KEY_PREFIX.len() + 16 + 1 + SECRET_HEX_LEN);
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        let good = NewApiKey::generate().reveal();
        let cases = [
            String::new(),
            "tdm_".into(),
            good.replacen("tdm_", "tdx_", 1),
            good[..good.len() - 1].to_owned(),
            format!("{good}0"),
            good.to_uppercase(),
        ];
        for bad in cases {
            assert_eq!(parse_key_id(&bad), None, "{bad}");
        }
    }

    #[test]
    fn admin_key_matches_only_itself() {
        let a = AdminKey::new("correct horse battery staple");
        assert!(a.matches("correct horse battery staple"));
        assert!(!a.matches("correct horse battery stapl"));
        assert_eq!(format!("{a:?}"), "AdminKey(<redacted>)");
    }
}
