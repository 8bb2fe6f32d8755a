//! Device tokens: how a user's device proves which user it serves on the `/v1/edge/...`
//! routes, and the provider's routes that issue and revoke them.
//!
//! # Format
//! `tdv_{user}.{token_id}.{expires}.{epoch}.{mac}`: `user` is the [`UserId`], `token_id` 16
//! hex digits (public: revocation names it), `expires` Unix seconds, `epoch` the store's
//! device-token epoch when it was issued (decimal), `mac` the hex HMAC-SHA256 (RFC 2104) of
//! `tdv2|{user}|{token_id}|{expires}|{epoch}` under the server's device-token key. Tokens are
//! stateless: any replica with the same key verifies them; a revocation is a store entry
//! every replica reads on every request, so it takes effect at once everywhere.
//!
//! # Losing the store
//! Revocations live in the store. So that losing its data does not bring revoked tokens
//! back, the store keeps an epoch
//! ([`device_token_epoch`](crate::rest::store::prompts::PromptStore::device_token_epoch)) and only tokens of
//! the current epoch are accepted: a store that lost its data starts a new epoch, and every
//! token issued before (revoked or not) is refused with `401 device_token_stale`, which tells
//! an honest device to get a new token. The in-memory store starts a new epoch with each
//! process.
//!
//! The key comes from configuration (`--device-token-key`, at least 32 characters; its
//! sha256 is the HMAC key). Without one, the server draws a random key at start: tokens then
//! work on that process only and die with it (logged as a warning).

use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use sha2::{Digest, Sha256};

use super::auth::{bearer, AdminAuth};
use super::error::{ApiError, ApiJson, ApiPath};
use super::rfc3339_ms;
use super::store::prompts::UserId;
use super::store::PromptStore;
use super::webhook::hmac_sha256;
use super::RestState;
use crate::store::now_ms;
use tandem_store::SecretDigest;

pub use tandem_openapi::device::{IssuedDeviceToken, NewDeviceToken};

/// What every device token starts with.
pub const DEVICE_TOKEN_PREFIX: &str = "tdv_";
/// The shortest configured device-token key.
pub const MIN_DEVICE_KEY_LEN: usize = 32;
/// Default and longest lifetimes of a device token.
pub const DEFAULT_TTL_SECONDS: u64 = 30 * 24 * 3600;
pub const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;

/// The one answer to a failed device authentication.
pub const DEVICE_UNAUTHORIZED: &str = "missing or invalid device token";

/// The server's device-token signing key (32 bytes; `Debug` never shows it).
#[derive(Clone)]
pub struct DeviceKey([u8; 32]);

impl DeviceKey {
    /// The key derived from a configured secret.
    pub fn from_secret(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// A random key for this process only.
    pub fn random() -> Self {
        Self(rand::random())
    }

    fn mac(&self, user: &str, token_id: &str, expires_s: u64, epoch: u64) -> [u8; 32] {
        let msg = format!("tdv2|{user}|{token_id}|{expires_s}|{epoch}");
        hmac_sha256(&self.0, msg.as_bytes())
    }

    /// A new token for `user`, valid until `expires_s` (Unix seconds), in the store's
    /// device-token `epoch`.
    pub fn issue(&self, user: &UserId, expires_s: u64, epoch: u64) -> IssuedDeviceToken {
        let token_id = hex::encode(rand::random::<[u8; 8]>());
        let mac = hex::encode(self.mac(user.as_str(), &token_id, expires_s, epoch));
        IssuedDeviceToken {
            token: format!("{DEVICE_TOKEN_PREFIX}{user}.{token_id}.{expires_s}.{epoch}.{mac}"),
            token_id,
            user_id: user.to_string(),
            expires: rfc3339_ms(expires_s.saturating_mul(1000)),
        }
    }

    /// The token's user, id, expiry and epoch if its signature is right (neither expiry nor
    /// epoch checked).
    pub fn verify(&self, token: &str) -> Option<VerifiedToken> {
        let rest = token.strip_prefix(DEVICE_TOKEN_PREFIX)?;
        let mut parts = rest.split('.');
        let (user, token_id, expires, epoch, mac) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if parts.next().is_some() {
            return None;
        }
        let user = UserId::parse(user)?;
        let id_ok = token_id.len() == 16
            && token_id
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let expires_s: u64 = expires.parse().ok()?;
        let epoch: u64 = epoch.parse().ok()?;
        let presented = SecretDigest::from_hex(mac)?;
        let expected = SecretDigest(self.mac(user.as_str(), token_id, expires_s, epoch));
        (expected.matches(&presented) & id_ok).then(|| VerifiedToken {
            user,
            token_id: token_id.to_owned(),
            expires_ms: expires_s.saturating_mul(1000),
            epoch,
        })
    }
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

/// A token whose signature checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedToken {
    pub user: UserId,
    pub token_id: String,
    pub expires_ms: u64,
    /// The store's device-token epoch it was issued in.
    pub epoch: u64,
}

/// The device's user, from a valid, unexpired, unrevoked device token.
#[derive(Debug)]
pub struct DeviceAuth {
    pub user: UserId,
    pub token_id: String,
}

impl FromRequestParts<Arc<RestState>> for DeviceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<RestState>,
    ) -> Result<Self, ApiError> {
        let presented = bearer(parts).unwrap_or("");
        Self::check(&state.device_key, state.prompts.as_ref(), presented).await
    }
}

impl DeviceAuth {
    /// Checks a presented device token: signature, expiry, revocation (read from the store
    /// on every call). Every failure is the same 401 ([`DEVICE_UNAUTHORIZED`]).
    pub(crate) async fn check(
        key: &DeviceKey,
        prompts: &dyn PromptStore,
        presented: &str,
    ) -> Result<Self, ApiError> {
        let unauthorized = || ApiError::unauthorized(DEVICE_UNAUTHORIZED);
        let token = key.verify(presented).ok_or_else(unauthorized)?;
        if token.expires_ms <= now_ms() {
            return Err(unauthorized());
        }
        if prompts.device_token_revoked(&token.token_id).await? {
            return Err(unauthorized());
        }
        if token.epoch != prompts.device_token_epoch(now_ms()).await? {
            return Err(ApiError::device_token_stale(
                "the device token was issued before the server lost its data; get a new one",
            ));
        }
        Ok(Self {
            user: token.user,
            token_id: token.token_id,
        })
    }
}

/// Issue a device token for a user.
#[utoipa::path(
    post,
    path = "/v1/admin/device-tokens",
    tag = "admin",
    request_body = NewDeviceToken,
    security(("admin_key" = [])),
    responses((status = 201, description = "The token (shown once).", body = IssuedDeviceToken))
)]
pub async fn issue_device_token(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
    ApiJson(body): ApiJson<NewDeviceToken>,
) -> Result<(StatusCode, Json<IssuedDeviceToken>), ApiError> {
    let ttl = body.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
    if !(60..=MAX_TTL_SECONDS).contains(&ttl) {
        return Err(ApiError::invalid(format!(
            "ttl_seconds must be between 60 and {MAX_TTL_SECONDS}"
        )));
    }
    let now = now_ms();
    let expires_s = now / 1000 + ttl;
    let epoch = state.prompts.device_token_epoch(now).await?;
    let issued = state.device_key.issue(&body.user_id, expires_s, epoch);
    tracing::info!(user = %body.user_id, token_id = %issued.token_id, "device token issued");
    Ok((StatusCode::CREATED, Json(issued)))
}

/// Revoke a device token: refused from the next request on, on every replica.
#[utoipa::path(
    delete,
    path = "/v1/admin/device-tokens/{token_id}",
    tag = "admin",
    params(("token_id" = String, Path, description = "The token's id (16 hex digits).")),
    security(("admin_key" = [])),
    responses(
        (status = 204, description = "The token is revoked."),
        (status = 404, description = "`not_found`: not a token id.", body = super::error::ErrorBody),
    )
)]
pub async fn revoke_device_token(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(token_id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let ok = token_id.len() == 16
        && token_id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !ok {
        return Err(ApiError::not_found("no such device token"));
    }
    // Tokens live at most MAX_TTL_SECONDS; the revocation outlives any of them.
    let until = now_ms().saturating_add(MAX_TTL_SECONDS * 1000);
    state.prompts.revoke_device_token(&token_id, until).await?;
    tracing::info!(token_id = %token_id, "device token revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_padded_key_signs_as_the_short_one() {
        // Device keys are 32 bytes; HMAC pads keys shorter than the block with zeros, so a
        // zero-padded 32-byte key gives RFC 4231 case 2's MAC for its 4-byte key.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn tokens_verify_and_tampering_fails() {
        let key = DeviceKey::from_secret("a device token key of 32+ chars!!");
        let user = UserId::parse("alice").expect("user");
        let t = key.issue(&user, 2_000_000_000, 42);
        let v = key.verify(&t.token).expect("valid");
        assert_eq!(v.user, user);
        assert_eq!(v.token_id, t.token_id);
        assert_eq!(v.expires_ms, 2_000_000_000_000);
        assert_eq!(v.epoch, 42);
        // Another key, another user, a later expiry, a flipped mac digit: all refused.
        let other = DeviceKey::from_secret("another device token key, 32+ ch");
        assert!(other.verify(&t.token).is_none());
        let bob = t.token.replacen("alice", "bob", 1);
        assert!(key.verify(&bob).is_none());
        let later = t.token.replacen(".2000000000.", ".2000000001.", 1);
        assert!(key.verify(&later).is_none());
        // A token cannot be moved to another epoch (the one after a loss of the store).
        let newer = t.token.replacen(".42.", ".43.", 1);
        assert!(key.verify(&newer).is_none());
        let mut flipped = t.token.clone();
        let last = flipped.pop().expect("char");
        flipped.push(if last == '0' { '1' } else { '0' });
        assert!(key.verify(&flipped).is_none());
        for bad in ["", "tdv_", "tdv_alice", &format!("{}.x", t.token)] {
            assert!(key.verify(bad).is_none(), "{bad}");
        }
        assert_eq!(format!("{key:?}"), "DeviceKey(<redacted>)");
    }
}
