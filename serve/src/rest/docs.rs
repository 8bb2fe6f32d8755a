//! `/docs`: Swagger UI over `/openapi.json`, served from assets built into the binary.
//!
//! `scripts/fetch-swagger-ui.sh` puts the pinned `swagger-ui-dist` files in
//! `openapi/swagger-ui/`; the build embeds them (cfg `tandem_swagger_ui`, set by
//! `build.rs`). Nothing is fetched at build or run time, and the page loads nothing from
//! another origin. A binary built without them answers 503 on `/docs`, naming the script.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ApiPath};

/// Whether this binary carries Swagger UI.
pub const EMBEDDED: bool = cfg!(tandem_swagger_ui);

#[cfg(tandem_swagger_ui)]
mod assets {
    pub const BUNDLE: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../openapi/swagger-ui/swagger-ui-bundle.js"
    ));
    pub const CSS: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../openapi/swagger-ui/swagger-ui.css"
    ));
}

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Tandem REST API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
<div id="ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#ui", deepLinking: true });
});
</script>
</body>
</html>
"##;

fn missing() -> ApiError {
    ApiError::unavailable(
        "this binary was built without Swagger UI: run scripts/fetch-swagger-ui.sh and rebuild; /openapi.json is served",
        std::time::Duration::from_secs(3600),
    )
}

/// The interactive API page.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "meta",
    security(()),
    responses(
        (status = 200, description = "Swagger UI for this API.", body = String, content_type = "text/html"),
        (status = 503, description = "`unavailable`: this binary was built without Swagger UI.", body = super::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn page() -> Response {
    if !EMBEDDED {
        return missing().into_response();
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// Swagger UI's script and style sheet.
#[utoipa::path(
    get,
    path = "/docs/{file}",
    tag = "meta",
    params(("file" = String, Path, description = "`swagger-ui-bundle.js` or `swagger-ui.css`.")),
    security(()),
    responses(
        (status = 200, description = "The asset.", body = String, content_type = "application/javascript"),
        (status = 404, description = "`not_found`: no such asset.", body = super::error::ErrorBody),
        (status = 503, description = "`unavailable`: this binary was built without Swagger UI.", body = super::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn asset(ApiPath(file): ApiPath<String>) -> Result<Response, ApiError> {
    let (content_type, bytes): (&str, &'static [u8]) = match file.as_str() {
        "swagger-ui-bundle.js" => ("application/javascript", bundle()?),
        "swagger-ui.css" => ("text/css", css()?),
        _ => return Err(ApiError::not_found("no such asset")),
    };
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        bytes,
    )
        .into_response())
}

#[cfg(tandem_swagger_ui)]
fn bundle() -> Result<&'static [u8], ApiError> {
    Ok(assets::BUNDLE)
}

#[cfg(tandem_swagger_ui)]
fn css() -> Result<&'static [u8], ApiError> {
    Ok(assets::CSS)
}

#[cfg(not(tandem_swagger_ui))]
fn bundle() -> Result<&'static [u8], ApiError> {
    Err(missing())
}

#[cfg(not(tandem_swagger_ui))]
fn css() -> Result<&'static [u8], ApiError> {
    Err(missing())
}
