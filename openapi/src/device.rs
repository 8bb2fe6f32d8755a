//! Device tokens: the bodies of the provider's `/v1/admin/device-tokens...` routes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::prompts::UserId;

/// `POST /v1/admin/device-tokens`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeviceToken {
    /// The user the device serves: 1 to 64 characters of `A-Z a-z 0-9 _ -`.
    #[schema(value_type = String, example = "alice")]
    pub user_id: UserId,
    /// Lifetime in seconds (default 30 days, at most 365 days).
    #[schema(minimum = 60, maximum = 31536000)]
    pub ttl_seconds: Option<u64>,
}

/// A device token just issued; `token` is shown this once.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuedDeviceToken {
    /// Send it as `Authorization: Bearer <token>` on the `/v1/edge/...` routes.
    #[schema(example = "tdv_alice.0a1b2c3d4e5f6789.1767225600.1764806400000.<64 hex digits>")]
    pub token: String,
    /// Names the token for revocation.
    pub token_id: String,
    pub user_id: String,
    #[schema(format = DateTime)]
    pub expires: String,
}
