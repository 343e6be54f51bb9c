//! `/v1/tenants` and their tokens: operator only.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use nubis_api::{ApiError, Quota, Tenant, TenantCreate, TokenCreated, TokenInfo};

use super::{AppState, Body, HttpError, Operator, Path, Result};
use crate::validate;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tenants", get(list).post(create))
        .route("/v1/tenants/{id}", get(show).delete(remove))
        .route(
            "/v1/tenants/{id}/tokens",
            get(list_tokens).post(create_token),
        )
        .route("/v1/tenants/{id}/tokens/{token_id}", delete(remove_token))
}

fn check_quota(quota: &Quota) -> Result<()> {
    if quota.max_vcpus == 0 || quota.max_memory_mib == 0 || quota.max_vms == 0 {
        return Err(nubis_api::ApiError::invalid(
            "quota",
            "every quota must be at least 1 (a tenant that may run nothing is a deleted tenant)",
        )
        .into());
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/v1/tenants",
    tag = "tenants",
    request_body = TenantCreate,
    responses(
        (status = 201, description = "success", body = Tenant),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError),
        (status = 409, description = "wrong state or already exists", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    _operator: Operator,
    Body(request): Body<TenantCreate>,
) -> Result<(StatusCode, Json<Tenant>)> {
    validate::name("name", &request.name, false)?;
    let quota = request.quota.unwrap_or_default();
    check_quota(&quota)?;
    let tenant = state.store.create_tenant(&request.name, quota)?;
    tracing::info!(tenant = %tenant.id, name = %tenant.name, "tenant created");
    Ok((StatusCode::CREATED, Json(tenant)))
}

#[utoipa::path(
    get,
    path = "/v1/tenants",
    tag = "tenants",
    responses(
        (status = 200, description = "success", body = Vec<Tenant>),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _operator: Operator,
) -> Result<Json<Vec<Tenant>>> {
    Ok(Json(state.store.list_tenants()?))
}

async fn find(state: &AppState, id: &str) -> Result<Tenant> {
    state
        .store
        .get_tenant(id)?
        .ok_or_else(|| HttpError::not_found("tenant", id))
}

#[utoipa::path(
    get,
    path = "/v1/tenants/{id}",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Tenant),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<String>,
) -> Result<Json<Tenant>> {
    Ok(Json(find(&state, &id).await?))
}

#[utoipa::path(
    delete,
    path = "/v1/tenants/{id}",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError),
        (status = 409, description = "wrong state or already exists", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    find(&state, &id).await?;
    let subnet = state.store.existing_tenant_subnet(&id)?;
    state.store.delete_tenant(&id)?;
    if let Some(subnet) = subnet {
        if let Err(err) = crate::network::delete_link(&crate::network::bridge_name(subnet)).await {
            tracing::warn!(tenant = %id, "cannot remove the tenant's bridge: {err}");
        }
        state.supervisor.reconcile_network().await?;
    }
    tracing::info!(tenant = %id, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/tenants/{id}/tokens",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 201, description = "the token; its secret is shown only here", body = TokenCreated),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<TokenCreated>)> {
    find(&state, &id).await?;
    Ok((StatusCode::CREATED, Json(state.store.create_token(&id)?)))
}

#[utoipa::path(
    get,
    path = "/v1/tenants/{id}/tokens",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Vec<TokenInfo>),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_tokens(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<String>,
) -> Result<Json<Vec<TokenInfo>>> {
    find(&state, &id).await?;
    Ok(Json(state.store.list_tokens(&id)?))
}

#[utoipa::path(
    delete,
    path = "/v1/tenants/{id}/tokens/{token_id}",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)"), ("token_id" = String, Path, description = "token id")),
    responses(
        (status = 204, description = "revoked"),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove_token(
    State(state): State<AppState>,
    _operator: Operator,
    Path((id, token_id)): Path<(String, String)>,
) -> Result<StatusCode> {
    if state.store.delete_token(&id, &token_id)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(HttpError::not_found("token", &token_id))
    }
}
