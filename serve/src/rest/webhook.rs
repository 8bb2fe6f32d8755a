//! Completion webhooks: when every user of a prompt's audience has a final status
//! (completed, failed, declined, cancelled, expired), the server `POST`s to the prompt's
//! `webhook_url`:
//!
//! ```json
//! {"event": "prompt.completed", "prompt_id": "…", "status": "active", "counts": {…}}
//! ```
//!
//! The body holds no output text and no user ids: the partner reads those with its key
//! (`GET /v1/prompts/{id}`), so a leaked webhook endpoint leaks nothing more than counts.
//!
//! # Delivery
//! At least once: checked after each change that can complete a prompt (a result stored, a
//! decline, a cancel), claimed once per prompt through the store (so two replicas do not
//! both send it, barring the rare crash between claim and send, which loses it; or a claim
//! window boundary, which duplicates it: partners dedupe by `prompt_id`). Three attempts
//! (immediately, after 1 s, after 4 s), each bounded by [`ATTEMPT_TIMEOUT`]; a 2xx answer
//! ends it; a target the guard refuses is not retried, and no redirect is followed.
//!
//! # Where it may go
//! [`super::webhook_target`] checks the URL on submission and again on every delivery,
//! against the addresses actually connected to: `https://` only unless the operator set
//! `webhook_allow_http`, nothing internal unless the operator allow-listed it
//! (`webhook_allow`). `https://` targets are reached over TLS (rustls) on the checked
//! connection, trusting the web's public roots plus `webhook_ca_cert`; the certificate must
//! name the URL's host.
//!
//! # Signature
//! Every delivery carries `Tandem-Signature: t=<unix seconds>,v1=<hex>`, where `v1` is
//! HMAC-SHA256 over `"{t}.{body}"` (the body's exact bytes) keyed by the tenant's webhook
//! secret (`whsec_` and 64 hex digits, the whole string as the key). The secret is made
//! with the tenant (shown once, in the answer to `POST /v1/admin/tenants`), or on the first
//! delivery of a tenant that has none, and replaced by
//! `POST /v1/admin/tenants/{id}/webhook-secret` (which shows the new one). Receivers check
//! the signature and that `t` is recent ([`verify`]; `docs/webhooks.md` has a Python one).
//!
//! Not built: completion by expiry alone (a prompt whose last users never answer is not
//! announced when it expires).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sha2::Sha256;
use tandem_openapi::prompts::StatusCounts;

use super::store::prompts::{PromptId, PromptStore, RESULT_RETENTION_MS};
use super::store::{TenantId, TenantStore};
use super::webhook_target::{system_resolver, Resolver, Target, TargetError, WebhookPolicy};
use crate::store::now_ms;

/// How long one delivery attempt may take (connect, send, read the answer).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of a receiver's answer read (only its status matters).
const MAX_WEBHOOK_ANSWER_BYTES: usize = 4 << 20;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "Tandem-Signature";

/// How webhook secrets start.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new webhook secret: [`SECRET_PREFIX`] and 256 random bits in hex.
pub fn generate_secret() -> String {
    format!("{SECRET_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// HMAC-SHA256 (RFC 2104, the `hmac` crate) with a key of any length: webhook signatures and
/// device tokens.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    // `new_from_slice` takes keys of any length for HMAC (longer ones are hashed first).
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// The [`SIGNATURE_HEADER`] value for `body` sent at `t` (Unix seconds).
pub fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let mac = hmac_sha256(secret.as_bytes(), &signed);
    format!("t={t},v1={}", hex::encode(mac))
}

/// Why a receiver refuses a delivery ([`verify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is malformed")]
    Malformed,
    #[error("the signature's timestamp is too far from now")]
    Stale,
    #[error("the signature does not match the body")]
    Mismatch,
}

/// What a receiver does: checks that `header` signs `body` with `secret` and that its
/// timestamp is within `tolerance_s` of `now_s` (replays of old deliveries fail). Any `v1`
/// in the header may match (there is one today). Compared in constant time.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now_s: u64,
    tolerance_s: u64,
) -> Result<(), SignatureError> {
    let mut t = None;
    let mut macs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<u64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => {
                macs.push(tandem_store::SecretDigest::from_hex(v).ok_or(SignatureError::Malformed)?)
            }
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if macs.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if t.abs_diff(now_s) > tolerance_s {
        return Err(SignatureError::Stale);
    }
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let want = tandem_store::SecretDigest(hmac_sha256(secret.as_bytes(), &signed));
    if macs.iter().any(|m| m.matches(&want)) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The tenant's webhook secret, made now if it has none.
pub async fn tenant_secret(
    tenants: &dyn TenantStore,
    tenant: &TenantId,
) -> Result<String, super::store::TenantStoreError> {
    if let Some(s) = tenants.webhook_secret(tenant).await? {
        return Ok(s);
    }
    tenants
        .set_webhook_secret(tenant, &generate_secret(), false)
        .await
}

/// What the webhook sender needs: the prompts, the tenants (for their secrets), the
/// operator's target policy and the resolver (the system's; tests bring their own).
#[derive(Clone)]
pub struct Webhooks {
    pub prompts: Arc<dyn PromptStore>,
    pub tenants: Arc<dyn TenantStore>,
    pub policy: Arc<WebhookPolicy>,
    pub resolver: Resolver,
    /// Trust for `https://` targets ([`crate::server::tls::client_config`]).
    pub tls: Arc<rustls::ClientConfig>,
}

impl Webhooks {
    pub fn new(
        prompts: Arc<dyn PromptStore>,
        tenants: Arc<dyn TenantStore>,
        policy: WebhookPolicy,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            prompts,
            tenants,
            policy: Arc::new(policy),
            resolver: system_resolver(),
            tls,
        }
    }
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Checks whether the prompt is complete and, if so, delivers its webhook (once), off the
/// caller's path.
pub(crate) fn check_later(hooks: &Webhooks, id: PromptId) {
    let hooks = hooks.clone();
    tokio::spawn(async move {
        if let Err(e) = check(&hooks, &id).await {
            tracing::warn!(prompt = %id, error = %e, "webhook");
        }
    });
}

async fn check(hooks: &Webhooks, id: &PromptId) -> anyhow::Result<()> {
    let prompts = &*hooks.prompts;
    let Some(p) = prompts.get_prompt(id).await? else {
        return Ok(());
    };
    let Some(url) = p.webhook_url.clone() else {
        return Ok(());
    };
    let now = now_ms();
    let assignments = prompts.assignments(&p).await?;
    if assignments.is_empty() || !assignments.iter().all(|a| a.status_at(&p, now).is_final()) {
        return Ok(());
    }
    // Claimed once per prompt (the counter allows one take).
    let claim = format!("webhook:{id}");
    if prompts
        .take(&claim, 1, 1, RESULT_RETENTION_MS * 5, now)
        .await?
        .is_some()
    {
        return Ok(());
    }
    let mut counts = StatusCounts::default();
    for a in &assignments {
        counts.add(a.status_at(&p, now));
    }
    let status = p.status_at(now);
    let body = json!({
        "event": "prompt.completed",
        "prompt_id": id.as_str(),
        "status": status,
        "counts": counts,
    });
    // Checked again under the policy of now (submission may be long ago).
    let target = hooks.policy.parse(&url)?;
    let body = serde_json::to_vec(&body)?;
    let secret = tenant_secret(&*hooks.tenants, &p.tenant).await?;
    let mut last = String::new();
    for (attempt, pause) in [0u64, 1, 4].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        // Signed per attempt: the timestamp is the attempt's.
        let signed = signature(&secret, now_ms() / 1000, &body);
        match tokio::time::timeout(ATTEMPT_TIMEOUT, send(hooks, &target, &body, &signed)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                tracing::info!(prompt = %id, attempt, "webhook delivered");
                return Ok(());
            }
            Ok(Ok(status)) => last = format!("HTTP {status}"),
            Ok(Err(e)) if e.downcast_ref::<TargetError>().is_some() => {
                anyhow::bail!("not delivered: {e}")
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
        }
    }
    anyhow::bail!("not delivered after 3 attempts: {last}")
}

/// One attempt: connect to a checked address of the target, `POST` the body, and return
/// the answer's status (a redirect is just a status that is not 2xx).
async fn send(hooks: &Webhooks, target: &Target, body: &[u8], signed: &str) -> anyhow::Result<u16> {
    let stream = hooks.policy.connect(target, &hooks.resolver).await?;
    let (host, path) = (target.host_header(), target.path_and_query());
    let mut req = tandem_http::Request::new(tandem_http::Method::POST, &path);
    req.headers.push((
        tandem_http::header::HeaderName::from_bytes(SIGNATURE_HEADER.as_bytes())?,
        tandem_http::header::HeaderValue::try_from(signed)?,
    ));
    req.body = Some((
        tandem_http::Bytes::copy_from_slice(body),
        "application/json",
    ));
    req.timeout = ATTEMPT_TIMEOUT;
    req.max_body_bytes = MAX_WEBHOOK_ANSWER_BYTES;
    let reply = if target.is_https() {
        // TLS over the checked connection: the certificate must name the URL's host.
        let name = target.server_name()?;
        let tls = tokio_rustls::TlsConnector::from(hooks.tls.clone())
            .connect(name, stream)
            .await
            .map_err(|e| anyhow::anyhow!("TLS with the webhook target: {e}"))?;
        tandem_http::send_over(tls, &host, req).await?
    } else {
        tandem_http::send_over(stream, &host, req).await?
    };
    Ok(reply.status.as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231() {
        // Case 2: a short key.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Case 6: a key longer than the block (hashed first).
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn the_signature_is_what_pythons_hmac_computes() {
        // hmac.new(secret.encode(), b"1700000000." + body, hashlib.sha256).hexdigest(),
        // the docs' receiver snippet (a 70-byte key: hashed first, as RFC 2104 says).
        let secret = format!("{SECRET_PREFIX}{}", "ab".repeat(32));
        let body = br#"{"event":"prompt.completed","prompt_id":"p1"}"#;
        assert_eq!(
            signature(&secret, 1_700_000_000, body),
            "t=1700000000,v1=d83a01792dfc43b5c5f3aad3d9f6288cce1e3b9cc4d7c108edba36af88655247"
        );
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let secret = generate_secret();
        assert!(secret.starts_with(SECRET_PREFIX) && secret.len() == SECRET_PREFIX.len() + 64);
        assert_ne!(secret, generate_secret());
        let body = br#"{"event":"prompt.completed"}"#;
        let h = signature(&secret, 1_700_000_000, body);
        assert!(h.starts_with("t=1700000000,v1="), "{h}");
        assert_eq!(verify(&secret, &h, body, 1_700_000_100, 300), Ok(()));
        assert_eq!(
            verify(
                &secret,
                &h,
                br#"{"event":"prompt.complete"}"#,
                1_700_000_000,
                300
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&generate_secret(), &h, body, 1_700_000_000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&secret, &h, body, 1_700_000_301, 300),
            Err(SignatureError::Stale)
        );
        // A timestamp changed to look fresh breaks the MAC.
        let moved = h.replace("t=1700000000", "t=1700000900");
        assert_eq!(
            verify(&secret, &moved, body, 1_700_000_900, 300),
            Err(SignatureError::Mismatch)
        );
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz"] {
            assert_eq!(
                verify(&secret, bad, body, 1, 300),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }
}
