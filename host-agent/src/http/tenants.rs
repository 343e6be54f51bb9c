//! `/v1/tenants` and their tokens: operator only.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use nubis_api::{ApiError, Tenant, TenantCreate, TokenCreated, TokenInfo};

use super::responses::{Invalid, OperatorOnly, OperatorResource, TenantChange};
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

create_handler!(operator create, "/v1/tenants", "tenants", &TenantCreate, 201 "success", Tenant,
    async tenants::create, Invalid, OperatorOnly,
    (status = 409, description = "wrong state or already exists", body = ApiError));

list_handler!(operator list, "/v1/tenants", "tenants", "success", Tenant, sync tenants::list,
    OperatorOnly);

show_handler!(operator show, "/v1/tenants/{id}", "tenants", "id" = "id (or name)", "success",
    Tenant, sync tenants::get, OperatorResource);

delete_handler!(operator remove, "/v1/tenants/{id}", "tenants", "id" = "id (or name)", "deleted",
    async tenants::delete, TenantChange,
    (status = 403, description = "operator only", body = ApiError));

create_handler!(operator create_token, "/v1/tenants/{id}/tokens", "tenants", "id" = "id (or name)",
    201 "the token; its secret is shown only here", TokenCreated, async tenants::create_token,
    OperatorResource);

show_handler!(operator list_tokens, "/v1/tenants/{id}/tokens", "tenants", "id" = "id (or name)",
    "success", Vec<TokenInfo>, sync tenants::list_tokens, OperatorResource);

#[utoipa::path(
    delete,
    path = "/v1/tenants/{id}/tokens/{token_id}",
    tag = "tenants",
    params(("id" = String, Path, description = "id (or name)"), ("token_id" = String, Path, description = "token id")),
    responses(
        (status = 204, description = "revoked"),
        OperatorResource
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove_token(
    State(state): State<AppState>,
    _operator: Operator,
    Path((id, token_id)): Path<(String, String)>,
) -> Result<StatusCode> {
    tenants::delete_token(&state.services, &id, &token_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
