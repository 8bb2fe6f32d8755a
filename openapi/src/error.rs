//! The one error shape of every REST route: `{"error": {"code", "message"}}`.
//!
//! Clients branch on [`ErrorCode`], never on the message. Which HTTP status each code stands
//! for is stated on its variant; the server maps it (`serve/src/rest/error.rs`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The stable error codes. Clients branch on these, so a code is never renamed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request cannot be read (malformed JSON, bad path encoding).
    BadRequest,
    /// 401: no credentials, or credentials that are not valid.
    Unauthorized,
    /// 401: a device token issued before the server's store lost its data (and with it the
    /// revocations): every such token is refused. Get a new token from the provider.
    DeviceTokenStale,
    /// 403: valid credentials that may not do this.
    Forbidden,
    /// 404: no such route or resource (or one the caller may not know about).
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 408: the request's body did not arrive in time (`http_body_timeout_ms`); the
    /// connection is closed after this answer.
    RequestTimeout,
    /// 409: the request conflicts with the current state (a tenant name already taken).
    Conflict,
    /// 413: the request body is over the limit.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 422: well-formed JSON whose values are not acceptable.
    Invalid,
    /// 429: too many requests; retry after `Retry-After` seconds.
    RateLimited,
    /// 429: the tenant's daily token quota would be passed; retry after `Retry-After`
    /// seconds (the next UTC day).
    QuotaExceeded,
    /// 503: a dependency (the store) is unavailable; retry after `Retry-After` seconds.
    Unavailable,
    /// 503: the admin routes are off because no admin key is configured.
    AdminDisabled,
    /// 500: a bug or corrupt state; the details are in the server's log.
    Internal,
}

impl ErrorCode {
    /// The snake_case name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::DeviceTokenStale => "device_token_stale",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
            Self::Conflict => "conflict",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Invalid => "invalid",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::Unavailable => "unavailable",
            Self::AdminDisabled => "admin_disabled",
            Self::Internal => "internal",
        }
    }
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable code to branch on and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}
