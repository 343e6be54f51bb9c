//! `/v1/networks`: a tenant's virtual networks (CIDR, gateway, VXLAN id).
//! A network created with `hosts` spans them: this host is its home, gives
//! it to each of them (`/v1/overlay`) and deletes it from them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, Network, NetworkCreate};

use super::responses::{Authenticated, Invalid, TenantOnly, TenantResource};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::networks;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/networks", get(list).post(create))
        .route("/v1/networks/{id}", get(show).delete(remove))
}

create_handler!(tenant create, "/v1/networks", "networks", &NetworkCreate, 201 "created", Network,
    async networks::create, Invalid, TenantOnly,
    (status = 409, description = "the name exists or the CIDR overlaps another network (here or on a spanned host)", body = ApiError),
    (status = 422, description = "the CIDR overlaps the host's own networks, a host is not registered, the MTU does not fit the underlay, or hosts given but this host has no underlay", body = ApiError),
    (status = 429, description = "the tenant's network quota is used up", body = ApiError),
    (status = 500, description = "the host refused the bridge or its rules", body = ApiError),
    (status = 502, description = "a spanned host failed", body = ApiError));

list_handler!(caller list, "/v1/networks", "networks",
    "the caller's networks (all for the operator)", Network, async networks::list, Authenticated);

show_handler!(caller show, "/v1/networks/{id}", "networks", "id" = "id (or name)", "success",
    Network, async networks::get, TenantResource);

delete_handler!(caller remove, "/v1/networks/{id}", "networks", "id" = "id (or name)", "deleted",
    async networks::delete, TenantResource,
    (status = 409, description = "NICs are attached to it (here or on a spanned host), or another host is its home", body = ApiError),
    (status = 502, description = "a spanned host failed", body = ApiError));
