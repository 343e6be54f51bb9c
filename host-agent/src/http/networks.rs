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

list_handler!(
    list,
    "/v1/networks",
    "networks",
    "the caller's networks (all for the operator)",
    Network,
    networks::list
);

show_handler!(
    show,
    "/v1/networks/{id}",
    "networks",
    "id (or name)",
    Network,
    networks::get,
    TenantResource
);

delete_handler!(remove, "/v1/networks/{id}", "networks", "id (or name)", "deleted",
    async networks::delete, TenantResource,
    (status = 409, description = "NICs are attached to it (here or on a spanned host), or another host is its home", body = ApiError),
    (status = 502, description = "a spanned host failed", body = ApiError));
