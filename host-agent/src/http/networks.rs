//! `/v1/networks`: a tenant's virtual networks (CIDR, gateway, VXLAN id).
//! A network created with `hosts` spans them: this host is its home, gives
//! it to each of them (`/v1/overlay`) and deletes it from them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, Network, NetworkCreate};

use super::responses::{Authenticated, Invalid, TenantResource};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::networks;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/networks", get(list).post(create))
        .route("/v1/networks/{id}", get(show).delete(remove))
}

#[utoipa::path(
    post,
    path = "/v1/networks",
    tag = "networks",
    request_body = NetworkCreate,
    responses(
        (status = 201, description = "created", body = Network),
        Invalid,
        Authenticated,
        (status = 403, description = "operator token", body = ApiError),
        (status = 409, description = "the name exists or the CIDR overlaps another network (here or on a spanned host)", body = ApiError),
        (status = 422, description = "the CIDR overlaps the host's own networks, a host is not registered, the MTU does not fit the underlay, or hosts given but this host has no underlay", body = ApiError),
        (status = 429, description = "the tenant's network quota is used up", body = ApiError),
        (status = 500, description = "the host refused the bridge or its rules", body = ApiError),
        (status = 502, description = "a spanned host failed", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<NetworkCreate>,
) -> Result<(StatusCode, Json<Network>)> {
    let tenant = caller.tenant()?;
    let network = networks::create(&state.services, tenant, &request).await?;
    Ok((StatusCode::CREATED, Json(network)))
}

#[utoipa::path(
    get,
    path = "/v1/networks",
    tag = "networks",
    responses(
        (status = 200, description = "the caller's networks (all for the operator)", body = Vec<Network>),
        Authenticated
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Network>>> {
    Ok(Json(networks::list(
        &state.services,
        caller.service_scope(),
    )?))
}

#[utoipa::path(
    get,
    path = "/v1/networks/{id}",
    tag = "networks",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Network),
        TenantResource
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Network>> {
    Ok(Json(networks::get(
        &state.services,
        caller.service_scope(),
        &id,
    )?))
}

#[utoipa::path(
    delete,
    path = "/v1/networks/{id}",
    tag = "networks",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 204, description = "deleted"),
        TenantResource,
        (status = 409, description = "NICs are attached to it (here or on a spanned host), or another host is its home", body = ApiError),
        (status = 502, description = "a spanned host failed", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    networks::delete(&state.services, caller.service_scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
