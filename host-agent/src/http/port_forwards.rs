//! `/v1/port-forwards`: a host port that leads to a port on one of the
//! tenant's VMs (DNAT), for clients outside the host, like a cloud's
//! public address.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, PortForward, PortForwardCreate};

use super::responses::{Authenticated, Invalid, TenantResource};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::port_forwards;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/port-forwards", get(list).post(create))
        .route("/v1/port-forwards/{id}", get(show).delete(remove))
}

#[utoipa::path(
    post,
    path = "/v1/port-forwards",
    tag = "port-forwards",
    request_body = PortForwardCreate,
    responses(
        (status = 201, description = "created", body = PortForward),
        Invalid,
        Authenticated,
        (status = 403, description = "operator token", body = ApiError),
        (status = 409, description = "the host port is taken", body = ApiError),
        (status = 422, description = "no such VM or NIC, or a host port outside this host's range", body = ApiError),
        (status = 429, description = "the tenant's port forward quota is used up", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<PortForwardCreate>,
) -> Result<(StatusCode, Json<PortForward>)> {
    let tenant = caller.tenant()?;
    let forward = port_forwards::create(&state.services, tenant, &request).await?;
    Ok((StatusCode::CREATED, Json(forward)))
}

list_handler!(
    list,
    "/v1/port-forwards",
    "port-forwards",
    "the caller's port forwards (all for the operator)",
    PortForward,
    port_forwards::list
);

show_handler!(
    show,
    "/v1/port-forwards/{id}",
    "port-forwards",
    "id",
    PortForward,
    port_forwards::get,
    TenantResource
);

delete_handler!(remove, "/v1/port-forwards/{id}", "port-forwards", "id", "deleted",
    async port_forwards::delete, TenantResource);
