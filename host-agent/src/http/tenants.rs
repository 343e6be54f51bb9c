//! `/v1/tenants` and their tokens: operator only.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use nubis_api::{Quota, Tenant, TenantCreate, TokenCreated, TokenInfo};

use super::{AppState, Body, Caller, HttpError, Result};
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

async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<TenantCreate>,
) -> Result<(StatusCode, Json<Tenant>)> {
    caller.require_operator()?;
    validate::name("name", &request.name, false)?;
    let quota = request.quota.unwrap_or_default();
    check_quota(&quota)?;
    let tenant = state.store.create_tenant(&request.name, quota)?;
    tracing::info!(tenant = %tenant.id, name = %tenant.name, "tenant created");
    Ok((StatusCode::CREATED, Json(tenant)))
}

async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Vec<Tenant>>> {
    caller.require_operator()?;
    Ok(Json(state.store.list_tenants()?))
}

async fn find(state: &AppState, id: &str) -> Result<Tenant> {
    state
        .store
        .get_tenant(id)?
        .ok_or_else(|| HttpError::not_found("tenant", id))
}

async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Tenant>> {
    caller.require_operator()?;
    Ok(Json(find(&state, &id).await?))
}

async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    caller.require_operator()?;
    find(&state, &id).await?;
    let subnet = state.store.existing_tenant_subnet(&id)?;
    state.store.delete_tenant(&id)?;
    if let Some(subnet) = subnet {
        if let Err(err) = crate::network::delete_link(&crate::network::bridge_name(subnet)).await {
            tracing::warn!(tenant = %id, "cannot remove the tenant's bridge: {err}");
        }
    }
    tracing::info!(tenant = %id, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<TokenCreated>)> {
    caller.require_operator()?;
    find(&state, &id).await?;
    Ok((StatusCode::CREATED, Json(state.store.create_token(&id)?)))
}

async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<TokenInfo>>> {
    caller.require_operator()?;
    find(&state, &id).await?;
    Ok(Json(state.store.list_tokens(&id)?))
}

async fn remove_token(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, token_id)): Path<(String, String)>,
) -> Result<StatusCode> {
    caller.require_operator()?;
    if state.store.delete_token(&id, &token_id)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(HttpError::not_found("token", &token_id))
    }
}
