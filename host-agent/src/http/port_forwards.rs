//! `/v1/port-forwards`: a host port that leads to a port on one of the
//! tenant's VMs (DNAT), for clients outside the host, like a cloud's
//! public address.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, ErrorCode, PortForward, PortForwardCreate};

use super::networks::unprocessable;
use super::{AppState, Body, Caller, HttpError, Path, Result};

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
        (status = 400, description = "invalid input", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError),
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
    // Only the operator's range: never the API's, VXLAN's or the
    // migrations' ports, nor any other service of the host's.
    let range = state.supervisor.config().port_forward_range;
    if !range.contains(request.host_port) {
        // A valid port, but not one this host forwards.
        return Err(unprocessable(
            "host_port",
            format!("must be in this host's port forward range, {range}"),
        ));
    }
    if request.vm_port == 0 {
        return Err(ApiError::invalid("vm_port", "must be 1 to 65535").into());
    }
    let vm = state
        .store
        .get_vm(Some(tenant), &request.vm)?
        .ok_or_else(|| unprocessable("vm", format!("no VM '{}'", request.vm)))?;
    if vm.nics.get(request.nic).is_none() {
        return Err(unprocessable(
            "nic",
            format!("VM {} has {} NIC(s)", vm.name, vm.nics.len()),
        ));
    }
    let quota = state
        .store
        .get_tenant(tenant)?
        .ok_or_else(|| HttpError::new(ErrorCode::Unauthorized, "the token's tenant is gone"))?
        .quota;
    let forward = state.store.create_port_forward(
        tenant,
        &vm.id,
        request.nic,
        request.protocol,
        request.host_port,
        request.vm_port,
        quota.max_port_forwards,
    )?;
    if let Err(err) = state.supervisor.reconcile_network().await {
        state.store.delete_port_forward(&forward.id)?;
        return Err(err.into());
    }
    tracing::info!(tenant, forward = %forward.id, host_port = forward.host_port, vm = %vm.id, "port forward created");
    Ok((StatusCode::CREATED, Json(forward)))
}

#[utoipa::path(
    get,
    path = "/v1/port-forwards",
    tag = "port-forwards",
    responses(
        (status = 200, description = "the caller's port forwards (all for the operator)", body = Vec<PortForward>),
        (status = 401, description = "no or unknown token", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<PortForward>>> {
    Ok(Json(state.store.list_port_forwards(caller.scope())?))
}

fn find(state: &AppState, caller: &Caller, id: &str) -> Result<PortForward> {
    state
        .store
        .get_port_forward(caller.scope(), id)?
        .ok_or_else(|| HttpError::not_found("port forward", id))
}

#[utoipa::path(
    get,
    path = "/v1/port-forwards/{id}",
    tag = "port-forwards",
    params(("id" = String, Path, description = "id")),
    responses(
        (status = 200, description = "success", body = PortForward),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PortForward>> {
    Ok(Json(find(&state, &caller, &id)?))
}

#[utoipa::path(
    delete,
    path = "/v1/port-forwards/{id}",
    tag = "port-forwards",
    params(("id" = String, Path, description = "id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let forward = find(&state, &caller, &id)?;
    state.store.delete_port_forward(&forward.id)?;
    state.supervisor.reconcile_network().await?;
    Ok(StatusCode::NO_CONTENT)
}
