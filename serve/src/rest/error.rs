//! The one JSON error shape of every REST route, and the extractors that turn axum's own
//! rejections into it.
//!
//! Every error answers `{"error": {"code": "<stable snake_case code>", "message": "..."}}`
//! with the HTTP status its [`ErrorCode`] stands for. `429` and `503` always carry
//! `Retry-After` (whole seconds); `401` carries `WWW-Authenticate: Bearer`. Messages are
//! written for the client and never include internals: store failures are logged here and
//! answered with a generic text.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use super::store::TenantStoreError;

pub use tandem_openapi::error::{ErrorBody, ErrorCode, ErrorDetail};

/// The HTTP status an [`ErrorCode`] stands for.
pub fn http_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized | ErrorCode::DeviceTokenStale => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::RateLimited | ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable | ErrorCode::AdminDisabled => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error answer of a REST route. Build it with the constructors, which make sure `429`
/// and `503` always say when to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after: Option<Duration>,
}

/// How long a client should wait after the store failed.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a client should wait before asking a server without an admin key again.
const ADMIN_DISABLED_RETRY_AFTER: Duration = Duration::from_secs(60);

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    pub fn device_token_stale(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::DeviceTokenStale, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            ErrorCode::MethodNotAllowed,
            "this route does not accept this method",
        )
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub fn request_timeout(after: Duration) -> Self {
        Self::new(
            ErrorCode::RequestTimeout,
            format!(
                "the request body did not arrive within {} ms",
                after.as_millis()
            ),
        )
    }

    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is over {limit_bytes} bytes"),
        )
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::UnsupportedMediaType, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }

    pub fn rate_limited(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(ErrorCode::RateLimited, message)
        }
    }

    pub fn quota_exceeded(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(ErrorCode::QuotaExceeded, message)
        }
    }

    pub fn unavailable(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(ErrorCode::Unavailable, message)
        }
    }

    pub fn admin_disabled() -> Self {
        Self {
            retry_after: Some(ADMIN_DISABLED_RETRY_AFTER),
            ..Self::new(
                ErrorCode::AdminDisabled,
                "the admin routes are disabled: no admin key is configured",
            )
        }
    }

    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "internal error")
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message.clone(),
            },
        }
    }

    /// Maps a rejection of one of axum's extractors by its status (axum picks 400 for
    /// syntax, 413 for size, 415 for content type, 422 for data that does not fit the type).
    fn from_rejection(status: StatusCode, text: String, limit_bytes: usize) -> Self {
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => Self::payload_too_large(limit_bytes),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::unsupported_media_type(text),
            StatusCode::UNPROCESSABLE_ENTITY => Self::invalid(text),
            s if s.is_client_error() => Self::bad_request(text),
            _ => {
                tracing::warn!(%status, rejection = %text, "extractor failed");
                Self::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http_status(self.code);
        let retry_after = self.retry_after.map(|d| d.as_secs().max(1));
        let mut response = (status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(self.code);
        response
    }
}

impl From<TenantStoreError> for ApiError {
    /// Store errors a handler did not handle itself: unavailability is the client's to retry,
    /// anything else is ours (logged, answered 500 without details).
    fn from(e: TenantStoreError) -> Self {
        match e {
            TenantStoreError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "tenant store unavailable");
                Self::unavailable("the store is unavailable", STORE_RETRY_AFTER)
            }
            TenantStoreError::UnknownTenant(_) => Self::not_found("no such tenant"),
            TenantStoreError::UnknownKey(_) => Self::not_found("no such key"),
            TenantStoreError::NameTaken(_) => Self::conflict("a tenant with this name exists"),
            other => {
                tracing::error!(error = %other, "tenant store failed");
                Self::internal()
            }
        }
    }
}

/// `Json<T>` whose rejections come out in the error shape.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    ApiError::from_rejection(
        rejection.status(),
        rejection.body_text(),
        super::MAX_BODY_BYTES,
    )
}

/// `Path<T>` whose rejections come out in the error shape.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    ApiError::from_rejection(
        rejection.status(),
        rejection.body_text(),
        super::MAX_BODY_BYTES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_on_429_and_503() {
        let r = ApiError::rate_limited("slow down", Duration::from_millis(1500)).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::unavailable("x", Duration::from_secs(7)).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let r = ApiError::admin_disabled().into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        let r = ApiError::not_found("x").into_response();
        assert!(!r.headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn codes_serialize_snake_case() {
        let body = ApiError::payload_too_large(10).body();
        let json = serde_json::to_value(&body).expect("json");
        assert_eq!(json["error"]["code"], "payload_too_large");
        assert_eq!(
            serde_json::to_value(ErrorCode::AdminDisabled).expect("json"),
            "admin_disabled"
        );
    }

    #[test]
    fn store_errors_hide_details() {
        let e = ApiError::from(TenantStoreError::Corrupt("secret detail".into()));
        assert_eq!(e.code(), ErrorCode::Internal);
        assert!(!e.message().contains("secret"));
        let e = ApiError::from(TenantStoreError::Unavailable("redis at x".into()));
        assert_eq!(e.code(), ErrorCode::Unavailable);
        assert!(!e.message().contains("redis"));
    }
}
