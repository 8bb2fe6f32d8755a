//! Tenants and API keys: the provider's `/v1/admin/tenants...` routes and the partner's
//! `/v1/me`.
//!
//! The bodies are the contract's ([`tandem_openapi::tenants`], re-exported here). Requests
//! are checked once here (`tenant_record`) and only valid values reach the store. Ids in
//! paths that cannot be ids answer 404 like unknown ones.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::auth::{AdminAuth, NewApiKey, PartnerAuth};
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::store::{KeyId, KeyInfo, KeyRecord, Quotas, TenantId, TenantRecord, TenantStoreError};
use super::{rfc3339_ms, RestState};
use crate::store::now_ms;

pub use tandem_openapi::tenants::{
    IssuedKey, KeyList, KeySummary, Me, NewTenant, Tenant, TenantList, WebhookSecret,
};

/// The longest tenant name, in characters.
pub const MAX_NAME_CHARS: usize = 128;

/// The tenant to store for a [`NewTenant`], or why not (422).
fn tenant_record(new: NewTenant, now: u64) -> Result<TenantRecord, ApiError> {
    let chars = new.name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(ApiError::invalid(format!(
            "name must be 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    if new.name.trim() != new.name || new.name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name must not have surrounding whitespace or control characters",
        ));
    }
    new.quotas.check().map_err(ApiError::invalid)?;
    Ok(TenantRecord {
        id: TenantId::generate(),
        name: new.name,
        quotas: new.quotas,
        created_ms: now,
    })
}

/// A stored tenant as the API shows it (its webhook secret only where a route adds it).
fn tenant_view(t: TenantRecord) -> Tenant {
    Tenant {
        id: t.id.to_string(),
        name: t.name,
        quotas: t.quotas,
        created: rfc3339_ms(t.created_ms),
        webhook_secret: None,
    }
}

fn key_summary(k: KeyInfo) -> KeySummary {
    KeySummary {
        key_id: k.key_id.to_string(),
        created: rfc3339_ms(k.created_ms),
    }
}

fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(raw).ok_or_else(|| ApiError::not_found("no such tenant"))
}

/// Store errors with the tenant or key in context.
fn not_found(e: TenantStoreError) -> ApiError {
    match e {
        TenantStoreError::UnknownTenant(_) => ApiError::not_found("no such tenant"),
        TenantStoreError::UnknownKey(_) => ApiError::not_found("no such key"),
        other => other.into(),
    }
}

/// Create a partner tenant.
#[utoipa::path(
    post,
    path = "/v1/admin/tenants",
    tag = "admin",
    request_body = NewTenant,
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "The tenant was created.", body = Tenant),
        (status = 409, description = "`conflict`: a tenant with this name exists.", body = ErrorBody),
    )
)]
pub async fn create_tenant(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
    ApiJson(body): ApiJson<NewTenant>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    let record = tenant_record(body, now_ms())?;
    state.store.create_tenant(&record).await?;
    let secret = state
        .store
        .set_webhook_secret(&record.id, &super::webhook::generate_secret(), true)
        .await?;
    tracing::info!(tenant = %record.id, "tenant created");
    let mut tenant = tenant_view(record);
    tenant.webhook_secret = Some(secret);
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// Replace a tenant's webhook signing secret: deliveries from now on are signed with the
/// new one, which this answer shows (the only time it is shown).
#[utoipa::path(
    post,
    path = "/v1/admin/tenants/{id}/webhook-secret",
    tag = "admin",
    params(("id" = String, Path, description = "The tenant's id.")),
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "The new secret.", body = WebhookSecret),
        (status = 404, description = "`not_found`: no such tenant.", body = ErrorBody),
    )
)]
pub async fn rotate_webhook_secret(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<WebhookSecret>), ApiError> {
    let id = tenant_id(&id)?;
    let secret = state
        .store
        .set_webhook_secret(&id, &super::webhook::generate_secret(), true)
        .await
        .map_err(not_found)?;
    tracing::info!(tenant = %id, "webhook secret replaced");
    Ok((
        StatusCode::CREATED,
        Json(WebhookSecret {
            webhook_secret: secret,
        }),
    ))
}

/// List every tenant, oldest first.
#[utoipa::path(
    get,
    path = "/v1/admin/tenants",
    tag = "admin",
    security(("admin_key" = [])),
    responses((status = 200, description = "All tenants.", body = TenantList))
)]
pub async fn list_tenants(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
) -> Result<Json<TenantList>, ApiError> {
    let tenants = state.store.list_tenants().await?;
    Ok(Json(TenantList {
        tenants: tenants.into_iter().map(tenant_view).collect(),
    }))
}

/// Read one tenant.
#[utoipa::path(
    get,
    path = "/v1/admin/tenants/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "The tenant's id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The tenant.", body = Tenant),
        (status = 404, description = "`not_found`: no such tenant.", body = ErrorBody),
    )
)]
pub async fn get_tenant(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Tenant>, ApiError> {
    let id = tenant_id(&id)?;
    match state.store.get_tenant(&id).await? {
        Some(t) => Ok(Json(tenant_view(t))),
        None => Err(ApiError::not_found("no such tenant")),
    }
}

/// Issue an API key for a tenant. The key is in this answer only.
#[utoipa::path(
    post,
    path = "/v1/admin/tenants/{id}/keys",
    tag = "admin",
    params(("id" = String, Path, description = "The tenant's id.")),
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "The key (shown once).", body = IssuedKey),
        (status = 404, description = "`not_found`: no such tenant.", body = ErrorBody),
    )
)]
pub async fn issue_key(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<IssuedKey>), ApiError> {
    let tenant = tenant_id(&id)?;
    let key = NewApiKey::generate();
    let record = KeyRecord {
        key_id: key.key_id.clone(),
        tenant,
        hash: key.hash(),
        created_ms: now_ms(),
    };
    state.store.add_key(&record).await.map_err(not_found)?;
    tracing::info!(tenant = %record.tenant, key_id = %record.key_id, "api key issued");
    Ok((
        StatusCode::CREATED,
        Json(IssuedKey {
            key_id: record.key_id.to_string(),
            key: key.reveal(),
            created: rfc3339_ms(record.created_ms),
        }),
    ))
}

/// List a tenant's live keys (ids and creation times only).
#[utoipa::path(
    get,
    path = "/v1/admin/tenants/{id}/keys",
    tag = "admin",
    params(("id" = String, Path, description = "The tenant's id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The tenant's keys.", body = KeyList),
        (status = 404, description = "`not_found`: no such tenant.", body = ErrorBody),
    )
)]
pub async fn list_keys(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyList>, ApiError> {
    let tenant = tenant_id(&id)?;
    let keys = state.store.list_keys(&tenant).await.map_err(not_found)?;
    Ok(Json(KeyList {
        keys: keys.into_iter().map(key_summary).collect(),
    }))
}

/// Replace a tenant's quotas; they apply from the next request on, on every replica.
#[utoipa::path(
    put,
    path = "/v1/admin/tenants/{id}/quotas",
    tag = "admin",
    params(("id" = String, Path, description = "The tenant's id.")),
    request_body = Quotas,
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The tenant with its new quotas.", body = Tenant),
        (status = 404, description = "`not_found`: no such tenant.", body = ErrorBody),
    )
)]
pub async fn set_quotas(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(quotas): ApiJson<Quotas>,
) -> Result<Json<Tenant>, ApiError> {
    let id = tenant_id(&id)?;
    quotas.check().map_err(ApiError::invalid)?;
    state
        .store
        .set_quotas(&id, quotas)
        .await
        .map_err(not_found)?;
    tracing::info!(tenant = %id, "quotas set");
    match state.store.get_tenant(&id).await? {
        Some(t) => Ok(Json(tenant_view(t))),
        None => Err(ApiError::not_found("no such tenant")),
    }
}

/// Revoke a key: it is refused from the next request on, on every replica.
#[utoipa::path(
    delete,
    path = "/v1/admin/tenants/{id}/keys/{key_id}",
    tag = "admin",
    params(
        ("id" = String, Path, description = "The tenant's id."),
        ("key_id" = String, Path, description = "The key's id."),
    ),
    security(("admin_key" = [])),
    responses(
        (status = 204, description = "The key is revoked."),
        (status = 404, description = "`not_found`: no such tenant, or no such key of this tenant.", body = ErrorBody),
    )
)]
pub async fn revoke_key(
    _: AdminAuth,
    State(state): State<Arc<RestState>>,
    ApiPath((id, key_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_id(&id)?;
    let key = KeyId::parse(&key_id).ok_or_else(|| ApiError::not_found("no such key"))?;
    state
        .store
        .revoke_key(&tenant, &key)
        .await
        .map_err(not_found)?;
    tracing::info!(tenant = %tenant, key_id = %key, "api key revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// The calling partner's tenant and quotas (counted against the tenant's request rate like
/// every partner route).
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "partner",
    security(("partner_key" = [])),
    responses(
        (status = 200, description = "The caller's tenant.", body = Me),
        (status = 429, description = "`rate_limited`: over the request rate.", body = super::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn me(
    auth: PartnerAuth,
    State(state): State<Arc<RestState>>,
) -> Result<Json<Me>, ApiError> {
    super::prompts::partner_rate(&state, &auth).await?;
    Ok(Json(Me {
        tenant_id: auth.tenant.id.to_string(),
        name: auth.tenant.name,
        quotas: auth.tenant.quotas,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas() -> Quotas {
        Quotas {
            prompts_per_minute: 10,
            tokens_per_day: 1000,
            max_audience: 5,
        }
    }

    #[test]
    fn names_are_checked() {
        let new = |name: &str| NewTenant {
            name: name.to_owned(),
            quotas: quotas(),
        };
        assert!(tenant_record(new("Acme Shop"), 1).is_ok());
        for bad in [
            "",
            " Acme",
            "Acme ",
            "Ac\nme",
            &"x".repeat(MAX_NAME_CHARS + 1),
        ] {
            let e = tenant_record(new(bad), 1).expect_err(bad);
            assert_eq!(e.code(), super::super::error::ErrorCode::Invalid);
        }
    }
}
