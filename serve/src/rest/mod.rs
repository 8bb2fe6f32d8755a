//! The REST front end (DESIGN.md §9): tenants and API keys, device tokens, the partners'
//! prompts and results, the devices' inboxes, health and the OpenAPI document.
//!
//! # Layout
//! - this module: [`RestState`], [`router`] (every REST route, the body limit, the JSON
//!   fallbacks), [`route_table`] (what the router serves, for the spec test) and
//!   [`openapi`] / [`openapi_json`] (the spec, also served at `/openapi.json`).
//! - [`error`]: the one JSON error shape and the extractors that produce it.
//! - [`auth`]: admin-key and API-key authentication, key generation and format.
//! - [`docs`]: Swagger UI at `/docs`, from assets built into the binary.
//! - [`tenants`]: the tenant and key routes.
//! - [`device`]: device tokens (HMAC-signed, expiring, revocable) and their admin routes.
//! - [`prompts`]: the partner's `/v1/prompts` routes, quotas and rate limits.
//! - [`inbox`]: the device's `/v1/edge/inbox` routes and prompt tickets.
//! - [`webhook`]: the signed completion webhooks; [`webhook_target`]: where they may go.
//! - [`store`]: [`store::TenantStore`] and [`store::PromptStore`], in memory or in Redis.
//!
//! The request and response bodies (and their schemas) are the contract crate's,
//! [`tandem_openapi`]; each module above re-exports the ones its routes use.
//!
//! # Invariants
//! - Every response that is not a success has the [`error::ErrorBody`] shape, including
//!   unknown routes, wrong methods and axum's own extractor rejections.
//! - No request body over [`MAX_BODY_BYTES`] is read: a larger `Content-Length` is refused
//!   with 413 before the handler runs, and a streamed body is cut at the limit (413 too).
//! - A body must arrive within [`RestState::body_timeout`] of its head, or the answer is 408
//!   `request_timeout` and the connection is closed: a client cannot hold a connection (and
//!   a handler) by trickling a body.
//! - The router is built only through `Routes::add`, which records each route, so
//!   [`route_table`] is exactly what is served; a test checks that it equals the spec.

pub mod auth;
pub mod device;
pub mod docs;
pub mod error;
pub mod inbox;
pub mod prompts;
pub mod tenants;
pub mod webhook;
pub mod webhook_target;

// The tenant and prompt stores are `tandem-store`'s; they keep their path here.
pub use tandem_store::tenant as store;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use self::auth::AdminKey;
use self::device::DeviceKey;
use self::error::{ApiError, ErrorBody};
use self::store::{PromptStore, TenantStore};

/// The largest request body any REST route reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Where the spec is served.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// What the REST handlers share.
pub struct RestState {
    pub store: Arc<dyn TenantStore>,
    /// Prompts, assignments, revocations and rate counters (the same backend as `store`).
    pub prompts: Arc<dyn PromptStore>,
    /// `None`: the admin routes answer 503 `admin_disabled`.
    pub admin_key: Option<AdminKey>,
    /// Signs and verifies device tokens.
    pub device_key: DeviceKey,
    /// The provider's system prompt, delivered to devices with every inbox item; never
    /// returned to partners.
    pub system_prompt: String,
    /// The largest `max_tokens` a prompt may ask for.
    pub max_tokens_cap: u32,
    /// Requests per minute per partner tenant, over all partner routes.
    pub partner_requests_per_minute: u32,
    /// Requests per minute per user, over all device routes.
    pub device_requests_per_minute: u32,
    /// Error answers by code and prompts by tenant are counted here.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where webhooks may go, and the sender.
    pub webhooks: webhook::Webhooks,
    /// How long a request body may take to arrive after its head (`http_body_timeout_ms`).
    pub body_timeout: std::time::Duration,
}

impl std::fmt::Debug for RestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestState")
            .field("admin_key", &self.admin_key)
            .finish_non_exhaustive()
    }
}

/// A router that remembers the `(method, path)` of every route added to it, and adds only
/// the routes whose path `keep` accepts.
struct Routes {
    router: Router<Arc<RestState>>,
    table: Vec<(Method, &'static str)>,
    keep: fn(&str) -> bool,
}

impl Routes {
    fn new() -> Self {
        Self::only(|_| true)
    }

    fn only(keep: fn(&str) -> bool) -> Self {
        Self {
            router: Router::new(),
            table: Vec::new(),
            keep,
        }
    }

    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Arc<RestState>>,
        T: 'static,
    {
        if !(self.keep)(path) {
            return self;
        }
        let filter = MethodFilter::try_from(method.clone())
            .unwrap_or_else(|_| panic!("no method filter for {method}"));
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, path));
        self
    }
}

fn routes() -> Routes {
    build_routes(Routes::new())
}

fn build_routes(routes: Routes) -> Routes {
    routes
        .add(Method::GET, "/healthz", healthz)
        .add(Method::GET, OPENAPI_PATH, serve_openapi)
        .add(Method::GET, "/docs", docs::page)
        .add(Method::GET, "/docs/{file}", docs::asset)
        .add(Method::POST, "/v1/admin/tenants", tenants::create_tenant)
        .add(Method::GET, "/v1/admin/tenants", tenants::list_tenants)
        .add(Method::GET, "/v1/admin/tenants/{id}", tenants::get_tenant)
        .add(
            Method::POST,
            "/v1/admin/tenants/{id}/keys",
            tenants::issue_key,
        )
        .add(
            Method::GET,
            "/v1/admin/tenants/{id}/keys",
            tenants::list_keys,
        )
        .add(
            Method::DELETE,
            "/v1/admin/tenants/{id}/keys/{key_id}",
            tenants::revoke_key,
        )
        .add(
            Method::PUT,
            "/v1/admin/tenants/{id}/quotas",
            tenants::set_quotas,
        )
        .add(
            Method::POST,
            "/v1/admin/tenants/{id}/webhook-secret",
            tenants::rotate_webhook_secret,
        )
        .add(Method::GET, "/v1/me", tenants::me)
        .add(
            Method::POST,
            "/v1/admin/device-tokens",
            device::issue_device_token,
        )
        .add(
            Method::DELETE,
            "/v1/admin/device-tokens/{token_id}",
            device::revoke_device_token,
        )
        .add(Method::POST, "/v1/prompts", prompts::create_prompt)
        .add(Method::GET, "/v1/prompts", prompts::list_prompts)
        .add(Method::GET, "/v1/prompts/{id}", prompts::get_prompt)
        .add(Method::DELETE, "/v1/prompts/{id}", prompts::cancel_prompt)
        .add(Method::GET, "/v1/edge/inbox", inbox::inbox)
        .add(Method::GET, "/v1/edge/inbox/{prompt_id}", inbox::own_answer)
        .add(
            Method::POST,
            "/v1/edge/inbox/{prompt_id}/accept",
            inbox::accept,
        )
        .add(
            Method::POST,
            "/v1/edge/inbox/{prompt_id}/decline",
            inbox::decline,
        )
}

/// Every `(method, path)` the REST router serves, in OpenAPI path syntax.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().table
}

/// Whether the operator listener serves `path`: `/healthz` and the `/v1/admin/...` routes.
pub fn is_operator_route(path: &str) -> bool {
    path == "/healthz" || path.starts_with("/v1/admin/")
}

/// The REST routes, with the body limit and JSON answers for unknown routes and methods.
/// Merge it into the public listener's router.
pub fn router(state: Arc<RestState>) -> Router {
    finish(routes().router, state)
}

/// The REST routes of the operator listener ([`is_operator_route`]), with the same limits,
/// fallbacks and authentication as on the public listener.
pub fn operator_router(state: Arc<RestState>) -> Router {
    finish(build_routes(Routes::only(is_operator_route)).router, state)
}

fn finish(routes: Router<Arc<RestState>>, state: Arc<RestState>) -> Router {
    routes
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), count_errors))
        .layer(middleware::from_fn(trace_requests))
        .with_state(state)
}

/// One `http.request` span per request, a child of the caller's trace when the request
/// carries W3C `traceparent`/`tracestate`. It holds the method, the route template (never
/// the raw path or query), the status and the error code.
async fn trace_requests(req: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let parent = {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        crate::telemetry::remote_parent(header("traceparent"), header("tracestate"))
    };
    let method = req.method().clone();
    let name = format!("{method} {route}");
    let span = tracing::info_span!(
        parent: None,
        "http.request",
        otel.kind = "server",
        otel.name = %name,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    crate::telemetry::adopt_parent(&span, parent);
    let response = next.run(req).instrument(span.clone()).await;
    span.record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    if let Some(code) = response.extensions().get::<error::ErrorCode>() {
        span.record("error.type", code.as_str());
    }
    response
}

/// Counts every error answer by its code (the [`error::ErrorCode`] the answer carries).
async fn count_errors(
    axum::extract::State(state): axum::extract::State<Arc<RestState>>,
    req: Request,
    next: Next,
) -> Response {
    let response = next.run(req).await;
    if let Some(code) = response.extensions().get::<error::ErrorCode>() {
        state.metrics.errors_total.with(code.as_str()).inc();
    }
    response
}

/// Reads the whole body before the handler runs: 413 for a declared `Content-Length` over
/// the limit (before reading anything) or a streamed body that passes it, 408 (and the
/// connection closed) for a body that has not arrived within [`RestState::body_timeout`],
/// 400 for one the client broke off. The handler gets the body from memory, so no handler
/// waits on a slow client.
async fn read_body(
    axum::extract::State(state): axum::extract::State<Arc<RestState>>,
    req: Request,
    next: Next,
) -> Response {
    use http_body_util::BodyExt as _;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::payload_too_large(MAX_BODY_BYTES).into_response();
    }
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    match tokio::time::timeout(state.body_timeout, limited.collect()).await {
        Ok(Ok(collected)) => {
            let req = Request::from_parts(parts, axum::body::Body::from(collected.to_bytes()));
            next.run(req).await
        }
        Ok(Err(e)) => body_error(&*e),
        Err(_) => {
            let mut response = ApiError::request_timeout(state.body_timeout).into_response();
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            response
        }
    }
}

/// The answer for a body that could not be read: over the limit, or broken off.
fn body_error(e: &(dyn std::error::Error + 'static)) -> Response {
    if e.downcast_ref::<http_body_util::LengthLimitError>()
        .is_some()
    {
        ApiError::payload_too_large(MAX_BODY_BYTES).into_response()
    } else {
        ApiError::bad_request(format!("the request body could not be read: {e}")).into_response()
    }
}

/// Liveness: answers `ok` while the process serves.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The process is serving.", body = String, content_type = "text/plain"))
)]
async fn healthz() -> &'static str {
    "ok"
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", body = Object))
)]
async fn serve_openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tandem REST API",
        description = "Split-inference LLM serving: the provider's admin routes and the partners' API. \
Every error answers `{\"error\": {\"code\", \"message\"}}` with a stable `code`."
    ),
    paths(
        healthz,
        serve_openapi,
        docs::page,
        docs::asset,
        tenants::create_tenant,
        tenants::list_tenants,
        tenants::get_tenant,
        tenants::issue_key,
        tenants::list_keys,
        tenants::revoke_key,
        tenants::set_quotas,
        tenants::rotate_webhook_secret,
        tenants::me,
        device::issue_device_token,
        device::revoke_device_token,
        prompts::create_prompt,
        prompts::list_prompts,
        prompts::get_prompt,
        prompts::cancel_prompt,
        inbox::inbox,
        inbox::own_answer,
        inbox::accept,
        inbox::decline,
    ),
    components(schemas(ErrorBody)),
    modifiers(&CommonResponses),
    tags(
        (name = "admin", description = "Provider only: authenticated by the provider's admin key."),
        (name = "partner", description = "Partner tenants: authenticated by the tenant's API key. A partner reaches its own prompts and results only."),
        (name = "device", description = "Users' devices: authenticated by a device token naming the user. A device reaches its own user's inbox and answers only."),
        (name = "meta", description = "Health and this document; no authentication."),
    )
)]
struct ApiDoc;

/// Adds the security schemes, and the error answers that routes share, so each route's
/// annotation states only its own: 401/503 on authenticated routes, 400/415/422 on routes
/// with a JSON body, 413 and 500 everywhere.
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        add_security_schemes(doc.components.get_or_insert_with(Default::default));
        for item in doc.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                add_common_responses(op);
            }
        }
    }
}

/// The three bearer schemes: the provider's admin key, device tokens, partner API keys.
fn add_security_schemes(components: &mut utoipa::openapi::Components) {
    components.add_security_scheme(
        "admin_key",
        SecurityScheme::Http(bearer("The provider's admin key (server configuration).")),
    );
    components.add_security_scheme(
        "device_token",
        SecurityScheme::Http(bearer(
            "A device token (`tdv_<user>.<token_id>.<expires>.<mac>`) naming the device's user, issued by the provider.",
        )),
    );
    components.add_security_scheme(
        "partner_key",
        SecurityScheme::Http(bearer(
            "A partner tenant's API key (`tdm_<key_id>_<secret>`), issued by the provider.",
        )),
    );
}

/// The names of the security schemes an operation states.
fn security_schemes(op: &utoipa::openapi::path::Operation) -> Vec<String> {
    op.security
        .iter()
        .flatten()
        .filter_map(|s| serde_json::to_value(s).ok())
        .filter_map(|v| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()))
        .flatten()
        .collect()
}

/// Adds to one operation the error answers its security scheme and body imply, unless its
/// own annotation states them.
fn add_common_responses(op: &mut utoipa::openapi::path::Operation) {
    let schemes = security_schemes(op);
    let has_body = op.request_body.is_some();
    let r = &mut op.responses.responses;
    let mut add = |status: &str, text: &str, retry: bool| {
        r.entry(status.to_owned())
            .or_insert_with(|| error_response(text, retry).into());
    };
    if schemes.iter().any(|s| s == "admin_key") {
        add("401", "`unauthorized`: missing or wrong admin key.", false);
        add(
            "503",
            "`admin_disabled`: no admin key is configured; or `unavailable`: the store is unavailable.",
            true,
        );
    }
    if schemes.iter().any(|s| s == "device_token") {
        add(
            "401",
            "`unauthorized`: missing, malformed, expired or revoked device token; \
             `device_token_stale`: issued before the server's store lost its data \
             (get a new token).",
            false,
        );
        add("503", "`unavailable`: the store is unavailable.", true);
    }
    if schemes.iter().any(|s| s == "partner_key") {
        add(
            "401",
            "`unauthorized`: missing, malformed, wrong or revoked API key.",
            false,
        );
        add("503", "`unavailable`: the store is unavailable.", true);
    }
    if has_body {
        add("400", "`bad_request`: the body is not valid JSON.", false);
        add(
            "415",
            "`unsupported_media_type`: the body is not `application/json`.",
            false,
        );
        add(
            "422",
            "`invalid`: the JSON does not fit the schema or its values are out of range.",
            false,
        );
    }
    // Every route refuses a declared body over the limit, body or not.
    add(
        "413",
        "`payload_too_large`: the body is over 65536 bytes.",
        false,
    );
    add("500", "`internal`: a server fault.", false);
}

fn bearer(description: &str) -> Http {
    let mut http = Http::new(HttpAuthScheme::Bearer);
    http.description = Some(description.to_owned());
    http
}

fn error_response(description: &str, retry_after: bool) -> utoipa::openapi::Response {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .build();
    let mut builder = ResponseBuilder::new()
        .description(description)
        .content("application/json", content);
    if retry_after {
        let header = HeaderBuilder::new()
            .schema(u64_schema())
            .description(Some("Seconds to wait before retrying."))
            .build();
        builder = builder.header("Retry-After", header);
    }
    builder.build()
}

fn u64_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(1))
        .build()
}

/// The OpenAPI document of every REST route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// [`openapi`] as pretty JSON with a final newline: the text of `openapi/openapi.json`.
pub fn openapi_json() -> String {
    let mut text = openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| panic!("the OpenAPI document does not serialize: {e}"));
    text.push('\n');
    text
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds (`2024-05-01T12:00:00.000Z`).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_714_564_800_000), "2024-05-01T12:00:00.000Z");
        assert_eq!(rfc3339_ms(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    /// The two ways a body read fails get different answers: 413 for a body over the limit
    /// (the client may shorten it), 400 for one the client broke off.
    #[tokio::test]
    async fn a_body_past_the_limit_is_told_apart_from_a_broken_one() {
        use http_body_util::BodyExt as _;
        let long = axum::body::Body::from(vec![b' '; MAX_BODY_BYTES + 1]);
        let e = http_body_util::Limited::new(long, MAX_BODY_BYTES)
            .collect()
            .await
            .expect_err("over the limit");
        assert_eq!(body_error(&*e).status(), StatusCode::PAYLOAD_TOO_LARGE);
        let chunks: [Result<Vec<u8>, std::io::Error>; 2] = [
            Ok(b"{\"na".to_vec()),
            Err(std::io::Error::other("reset by peer")),
        ];
        let broken = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
        let e = http_body_util::Limited::new(broken, MAX_BODY_BYTES)
            .collect()
            .await
            .expect_err("broken off");
        let response = body_error(&*e);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let code = response.extensions().get::<error::ErrorCode>().copied();
        assert_eq!(code, Some(error::ErrorCode::BadRequest));
    }

    #[test]
    fn every_route_has_a_method_filter_and_the_spec_builds() {
        assert!(!route_table().is_empty());
        assert!(openapi_json().contains("\"admin_key\""));
    }
}
