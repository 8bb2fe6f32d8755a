//! Tenants, their quotas and API keys: the bodies of the provider's
//! `/v1/admin/tenants...` routes and the partner's `/v1/me`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A tenant's limits. Checked by [`Quotas::check`] before anything stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Prompts the tenant may submit per minute.
    #[schema(minimum = 1, maximum = 100_000)]
    pub prompts_per_minute: u32,
    /// Tokens the tenant's prompts may generate per day, over all users.
    #[schema(minimum = 1, maximum = 1000000000000.0)]
    pub tokens_per_day: u64,
    /// Users one prompt may target.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_audience: u32,
}

impl Quotas {
    pub const MAX_PROMPTS_PER_MINUTE: u32 = 100_000;
    pub const MAX_TOKENS_PER_DAY: u64 = 1_000_000_000_000;
    pub const MAX_AUDIENCE: u32 = 1_000_000;

    /// Refuses zero and values over the maxima, naming the field.
    pub fn check(&self) -> Result<(), String> {
        let range = |name: &str, v: u64, max: u64| {
            if (1..=max).contains(&v) {
                Ok(())
            } else {
                Err(format!("quotas.{name} must be between 1 and {max}"))
            }
        };
        range(
            "prompts_per_minute",
            self.prompts_per_minute.into(),
            Self::MAX_PROMPTS_PER_MINUTE.into(),
        )?;
        range(
            "tokens_per_day",
            self.tokens_per_day,
            Self::MAX_TOKENS_PER_DAY,
        )?;
        range(
            "max_audience",
            self.max_audience.into(),
            Self::MAX_AUDIENCE.into(),
        )
    }
}

/// `POST /v1/admin/tenants`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// Unique; 1 to 128 characters, no control characters, no surrounding whitespace.
    #[schema(min_length = 1, max_length = 128, example = "Acme Shop")]
    pub name: String,
    pub quotas: Quotas,
}

/// A partner tenant.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    #[schema(example = "3f9a0c1b2d4e5f60")]
    pub id: String,
    pub name: String,
    pub quotas: Quotas,
    /// When the tenant was created (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub created: String,
    /// Only in the answer to `POST /v1/admin/tenants`: the secret that signs this tenant's
    /// webhooks (`Tandem-Signature`, see `docs/webhooks.md`). Replace it with
    /// `POST /v1/admin/tenants/{id}/webhook-secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "whsec_<64 hex digits>")]
    pub webhook_secret: Option<String>,
}

/// `POST /v1/admin/tenants/{id}/webhook-secret`: the tenant's new webhook secret.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookSecret {
    /// Signs every webhook delivered from now on (HMAC-SHA256 over `"{t}.{body}"`, in
    /// `Tandem-Signature: t=<unix seconds>,v1=<hex>`); the former secret stops at once.
    #[schema(example = "whsec_<64 hex digits>")]
    pub webhook_secret: String,
}

/// `GET /v1/admin/tenants`: every tenant, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantList {
    pub tenants: Vec<Tenant>,
}

/// A key just issued. `key` is shown this once; the server keeps only its hash.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuedKey {
    #[schema(example = "0a1b2c3d4e5f6789")]
    pub key_id: String,
    /// The secret: send it as `Authorization: Bearer <key>`. It cannot be shown again.
    #[schema(example = "tdm_0a1b2c3d4e5f6789_<64 hex digits>")]
    pub key: String,
    #[schema(format = DateTime)]
    pub created: String,
}

/// A live key, as listed (never the key itself).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct KeySummary {
    pub key_id: String,
    #[schema(format = DateTime)]
    pub created: String,
}

/// `GET /v1/admin/tenants/{id}/keys`: the tenant's live keys, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeySummary>,
}

/// `GET /v1/me`: the calling partner's tenant.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Me {
    pub tenant_id: String,
    pub name: String,
    pub quotas: Quotas,
}
