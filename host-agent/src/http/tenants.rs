//! `/v1/tenants` and their tokens: operator only.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use nubis_api::{ApiError, Tenant, TenantCreate, TokenCreated, TokenInfo};

use super::responses::{Invalid, OperatorOnly, TenantChange, TenantResource};
use super::{AppState, Body, Operator, Path, Result};
use crate::service::tenants;

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

#[utoipa::path(
    post,
    path = "/v1/tenants",
    tag = "tenants",
    request_body = TenantCreate,
    responses(
        (status = 201, description = "success", body = Tenant),
        Invalid,
        OperatorOnly,
        (status = 409, description = "wrong state or already exists", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    _operator: Operator,
    Body(request): Body<TenantCreate>,
) -> Result<(StatusCode, Json<Tenant>)> {
    let tenant = tenants::create(&state.services, &request)?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

#[utoipa::path(
    get,
    path = "/v1/tenants",
    tag = "tenants",
    responses(
        (status = 200, description = "success", body = Vec<Tenant>),
        OperatorOnly
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _operator: Operator,
) -> Result<Json<Vec<Tenant>>> {
    Ok(Json(tenants::list(&state.services)?))
}

#[utoipa::path(
    get,
    path = "/v1/tenants/{id}",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Tenant),
        TenantResource,
        (status = 403, description = "operator only", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<String>,
) -> Result<Json<Tenant>> {
    Ok(Json(tenants::get(&state.services, &id)?))
}

#[utoipa::path(
    delete,
    path = "/v1/tenants/{id}",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 204, description = "deleted"),
        TenantChange,
        (status = 403, description = "operator only", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    tenants::delete(&state.services, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/tenants/{id}/tokens",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 201, description = "the token; its secret is shown only here", body = TokenCreated),
        TenantResource,
        (status = 403, description = "operator only", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<TokenCreated>)> {
    let token = tenants::create_token(&state.services, &id)?;
    Ok((StatusCode::CREATED, Json(token)))
}

#[utoipa::path(
    get,
    path = "/v1/tenants/{id}/tokens",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Vec<TokenInfo>),
        TenantResource,
        (status = 403, description = "operator only", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_tokens(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<String>,
) -> Result<Json<Vec<TokenInfo>>> {
    Ok(Json(tenants::list_tokens(&state.services, &id)?))
}

#[utoipa::path(
    delete,
    path = "/v1/tenants/{id}/tokens/{token_id}",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)"), ("token_id" = String, Path, description = "token id")),
    responses(
        (status = 204, description = "revoked"),
        TenantResource,
        (status = 403, description = "operator only", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove_token(
    State(state): State<AppState>,
    _operator: Operator,
    Path((id, token_id)): Path<(String, String)>,
) -> Result<StatusCode> {
    tenants::delete_token(&state.services, &id, &token_id)?;
    Ok(StatusCode::NO_CONTENT)
}
