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

#[utoipa::path(
    get,
    path = "/v1/port-forwards",
    tag = "port-forwards",
    responses(
        (status = 200, description = "the caller's port forwards (all for the operator)", body = Vec<PortForward>),
        Authenticated
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<PortForward>>> {
    Ok(Json(port_forwards::list(
        &state.services,
        caller.service_scope(),
    )?))
}

#[utoipa::path(
    get,
    path = "/v1/port-forwards/{id}",
    tag = "port-forwards",
    params(("id" = String, Path, description = "id")),
    responses(
        (status = 200, description = "success", body = PortForward),
        TenantResource
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PortForward>> {
    Ok(Json(port_forwards::get(
        &state.services,
        caller.service_scope(),
        &id,
    )?))
}

#[utoipa::path(
    delete,
    path = "/v1/port-forwards/{id}",
    tag = "port-forwards",
    params(("id" = String, Path, description = "id")),
    responses(
        (status = 204, description = "deleted"),
        TenantResource
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    port_forwards::delete(&state.services, caller.service_scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
