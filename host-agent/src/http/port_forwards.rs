//! `/v1/port-forwards`: a host port that leads to a port on one of the
//! tenant's VMs (DNAT), for clients outside the host, like a cloud's
//! public address.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, PortForward, PortForwardCreate};

use super::responses::{Authenticated, Invalid, TenantOnly, TenantResource};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::port_forwards;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/port-forwards", get(list).post(create))
        .route("/v1/port-forwards/{id}", get(show).delete(remove))
}

create_handler!(tenant create, "/v1/port-forwards", "port-forwards", &PortForwardCreate,
    201 "created", PortForward, async port_forwards::create, Invalid, TenantOnly,
    (status = 409, description = "the host port is taken", body = ApiError),
    (status = 422, description = "no such VM or NIC, or a host port outside this host's range", body = ApiError),
    (status = 429, description = "the tenant's port forward quota is used up", body = ApiError));

list_handler!(caller list, "/v1/port-forwards", "port-forwards",
    "the caller's port forwards (all for the operator)", PortForward, async port_forwards::list,
    Authenticated);

show_handler!(caller show, "/v1/port-forwards/{id}", "port-forwards", "id" = "id", "success",
    PortForward, async port_forwards::get, TenantResource);

delete_handler!(caller remove, "/v1/port-forwards/{id}", "port-forwards", "id" = "id", "deleted",
    async port_forwards::delete, TenantResource);
