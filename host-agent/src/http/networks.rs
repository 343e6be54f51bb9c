//! `/v1/networks`: a tenant's virtual networks (CIDR, gateway, VXLAN id).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, Network, NetworkCreate};

use super::{AppState, Body, Caller, HttpError, Result};
use crate::ipv4::Cidr;
use crate::supervisor::networking::host_resolvers;
use crate::validate;

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
        (status = 400, description = "invalid input", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator token", body = ApiError),
        (status = 409, description = "the name exists or the CIDR overlaps another network", body = ApiError),
        (status = 500, description = "the host refused the bridge or its rules", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<NetworkCreate>,
) -> Result<(StatusCode, Json<Network>)> {
    let tenant = caller.tenant()?;
    validate::name("name", &request.name, false)?;
    let cidr: Cidr = request
        .cidr
        .parse()
        .map_err(|err: String| ApiError::invalid("cidr", err))?;
    let dns = match &request.dns {
        Some(servers) => dns_servers(servers)?,
        None => host_resolvers(),
    };
    let mtu = request.mtu.unwrap_or(DEFAULT_MTU);
    if !MTU_RANGE.contains(&mtu) {
        return Err(ApiError::invalid(
            "mtu",
            format!(
                "{mtu} is outside {}..={}",
                MTU_RANGE.start(),
                MTU_RANGE.end()
            ),
        )
        .into());
    }
    let network = state
        .store
        .create_network(tenant, &request, cidr, dns, mtu)?;
    // The bridge, its filter rules and DHCP server come up now; if the host
    // refuses, the network is not kept half made.
    if let Err(err) = state.supervisor.reconcile_network().await {
        state.store.delete_network(&network.id)?;
        if let Err(again) = state.supervisor.reconcile_network().await {
            tracing::error!(network = %network.id, "cannot undo the network on the host: {again}");
        }
        return Err(err.into());
    }
    tracing::info!(tenant, network = %network.id, cidr = %network.cidr, "network created");
    Ok((StatusCode::CREATED, Json(network)))
}

/// The MTUs a network may have: IPv4's guaranteed datagram size up to a
/// jumbo frame.
const MTU_RANGE: std::ops::RangeInclusive<u16> = 576..=9000;
const DEFAULT_MTU: u16 = 1500;
const MAX_DNS_SERVERS: usize = 4;

fn dns_servers(servers: &[String]) -> std::result::Result<Vec<String>, ApiError> {
    if servers.len() > MAX_DNS_SERVERS {
        return Err(ApiError::invalid(
            "dns",
            format!("at most {MAX_DNS_SERVERS} servers"),
        ));
    }
    servers
        .iter()
        .enumerate()
        .map(|(index, server)| {
            server
                .parse::<std::net::Ipv4Addr>()
                .ok()
                .filter(|address| !address.is_unspecified() && !address.is_broadcast())
                .map(|address| address.to_string())
                .ok_or_else(|| {
                    ApiError::invalid(
                        &format!("dns[{index}]"),
                        format!("'{server}' is not a unicast IPv4 address"),
                    )
                })
        })
        .collect()
}

#[utoipa::path(
    get,
    path = "/v1/networks",
    tag = "networks",
    responses(
        (status = 200, description = "the caller's networks (all for the operator)", body = Vec<Network>),
        (status = 401, description = "no or unknown token", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Network>>> {
    Ok(Json(state.store.list_networks(caller.scope())?))
}

fn find(state: &AppState, caller: &Caller, id: &str) -> Result<Network> {
    state
        .store
        .get_network(caller.scope(), id)?
        .ok_or_else(|| HttpError::not_found("network", id))
}

#[utoipa::path(
    get,
    path = "/v1/networks/{id}",
    tag = "networks",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Network),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Network>> {
    Ok(Json(find(&state, &caller, &id)?))
}

#[utoipa::path(
    delete,
    path = "/v1/networks/{id}",
    tag = "networks",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError),
        (status = 409, description = "NICs are attached to it", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let network = find(&state, &caller, &id)?;
    let lock = state.supervisor.network_lock().await;
    let users: Vec<String> = state
        .store
        .list_vms(Some(&network.tenant_id), None)?
        .into_iter()
        .filter(|vm| {
            vm.nics
                .iter()
                .any(|nic| nic.network.as_deref() == Some(network.id.as_str()))
        })
        .map(|vm| vm.name)
        .collect();
    if !users.is_empty() {
        return Err(HttpError::new(
            nubis_api::ErrorCode::Conflict,
            format!(
                "network {} has NICs of VM(s) {}: delete them first",
                network.id,
                users.join(", ")
            ),
        ));
    }
    state.store.delete_network(&network.id)?;
    drop(lock);
    // Its bridge, rules and DHCP server go with it.
    state.supervisor.reconcile_network().await?;
    Ok(StatusCode::NO_CONTENT)
}
