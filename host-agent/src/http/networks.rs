//! `/v1/networks`: a tenant's virtual networks (CIDR, gateway, VXLAN id).
//! A network created with `hosts` spans them: this host is its home, gives
//! it to each of them (`/v1/overlay`) and deletes it from them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, ErrorCode, Network, NetworkCreate};

use super::hosts::peer_failed;
use super::{overlay, AppState, Body, Caller, HttpError, Path, Result};
use crate::ipv4::Cidr;
use crate::store::Peer;
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
    validate::name("name", &request.name, false)?;
    let cidr: Cidr = request
        .cidr
        .parse()
        .map_err(|err: String| ApiError::invalid("cidr", err))?;
    if let Some(reason) = state.supervisor.shadowed_host_network(cidr).await? {
        // Well-formed, but this host's own networks have it.
        return Err(unprocessable("cidr", reason));
    }
    let quota = state
        .store
        .get_tenant(tenant)?
        .ok_or_else(|| HttpError::new(ErrorCode::Unauthorized, "the token's tenant is gone"))?
        .quota;
    let dns = match &request.dns {
        Some(servers) => dns_servers(servers)?,
        None => host_resolvers(),
    };
    let peers = spanned_peers(&state, &request.hosts)?;
    let (mtu, overlay) = if peers.is_empty() {
        (request.mtu.unwrap_or(DEFAULT_MTU), None)
    } else {
        let local = overlay::local_underlay(&state)?;
        let max = overlay::max_overlay_mtu(local).await?;
        let mtu = request.mtu.unwrap_or(max);
        if mtu > max {
            return Err(unprocessable(
                "mtu",
                format!("{mtu} does not fit the underlay: at most {max} with VXLAN's 50 bytes"),
            ));
        }
        let mut hosts = vec![local.to_string()];
        hosts.extend(peers.iter().map(|peer| peer.host.address.clone()));
        (mtu, Some((local.to_string(), hosts)))
    };
    check_mtu(mtu)?;
    let network = state.store.create_network(
        tenant,
        &request,
        cidr,
        dns,
        mtu,
        overlay,
        quota.max_networks,
    )?;
    // The bridge, its filter rules and DHCP server come up now, then the
    // other hosts take the network on; if any refuses, the network is not
    // kept half made.
    let made = match state.supervisor.reconcile_network().await {
        Ok(()) => replicate(&state, &network, &peers).await,
        Err(err) => Err(err.into()),
    };
    if let Err(err) = made {
        state.store.delete_network(&network.id)?;
        if let Err(again) = state.supervisor.reconcile_network().await {
            tracing::error!(network = %network.id, "cannot undo the network on the host: {again}");
        }
        return Err(err);
    }
    tracing::info!(tenant, network = %network.id, cidr = %network.cidr, hosts = peers.len(), "network created");
    Ok((StatusCode::CREATED, Json(network)))
}

/// A 422 naming `field`: valid by the document, not doable on this host.
pub(super) fn unprocessable(field: &str, message: String) -> HttpError {
    HttpError(ApiError {
        error: nubis_api::error::ErrorBody {
            code: ErrorCode::Unprocessable,
            message,
            field: Some(field.to_string()),
        },
    })
}

/// The registered peers named in a network's `hosts`.
fn spanned_peers(state: &AppState, names: &[String]) -> Result<Vec<Peer>> {
    let mut peers: Vec<Peer> = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let peer = state.store.get_host(name)?.ok_or_else(|| {
            unprocessable(
                &format!("hosts[{index}]"),
                format!("no host '{name}' (see /v1/hosts)"),
            )
        })?;
        if peers.iter().any(|known| known.host.name == peer.host.name) {
            return Err(ApiError::invalid(
                &format!("hosts[{index}]"),
                format!("'{name}' is named twice"),
            )
            .into());
        }
        peers.push(peer);
    }
    Ok(peers)
}

/// Gives `network` to each of `peers`; on a refusal takes it back from
/// those that had taken it.
async fn replicate(state: &AppState, network: &Network, peers: &[Peer]) -> Result<()> {
    let replica = overlay::replica(state, network)?;
    for (index, peer) in peers.iter().enumerate() {
        if let Err(err) = state.peers.put_network(peer, &replica).await {
            // The one that failed may have taken it before failing.
            for taken in &peers[..=index] {
                if let Err(undo) = state.peers.delete_network(taken, &network.id).await {
                    tracing::error!(network = %network.id, "cannot take the network back: {undo}");
                }
            }
            return Err(peer_failed(err));
        }
    }
    Ok(())
}

/// A network's MTU: IPv4's guaranteed datagram size up to a jumbo frame.
pub(super) fn check_mtu(mtu: u16) -> Result<()> {
    if MTU_RANGE.contains(&mtu) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "mtu",
        format!(
            "{mtu} is outside {}..={}",
            MTU_RANGE.start(),
            MTU_RANGE.end()
        ),
    )
    .into())
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
                // 0/8 is "this network" and 255/8 reserved: as the
                // document's pattern, the first octet is 1 to 254.
                .filter(|address| !matches!(address.octets()[0], 0 | 255))
                .map(|address| address.to_string())
                .ok_or_else(|| {
                    ApiError::invalid(
                        &format!("dns[{index}]"),
                        format!("'{server}' is not a unicast IPv4 address (first octet 1 to 254)"),
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
    let network = find(&state, &caller, &id)?;
    if let Some(home) = overlay::remote_home(&state, &network)? {
        return Err(HttpError::new(
            nubis_api::ErrorCode::Conflict,
            format!(
                "network {} belongs to host '{}': delete it there",
                network.id, home.host.name
            ),
        ));
    }
    let peers = overlay::member_peers(&state, &network)?;
    check_unused(&state, &network)?;
    // The other hosts let go first (each refuses while its VMs use the
    // network); if one cannot, those that had let go take it on again.
    for (index, peer) in peers.iter().enumerate() {
        if let Err(err) = state.peers.delete_network(peer, &network.id).await {
            let replica = overlay::replica(&state, &network)?;
            for undone in &peers[..index] {
                if let Err(again) = state.peers.put_network(undone, &replica).await {
                    tracing::error!(network = %network.id, "cannot give the network back: {again}");
                }
            }
            return Err(peer_failed(err));
        }
    }
    delete_unused(&state, &network).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Refuses while VMs on this host have NICs on `network`.
fn check_unused(state: &AppState, network: &Network) -> Result<()> {
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
    Ok(())
}

/// Deletes `network` here, unless a VM uses it; its bridge, tunnel, rules
/// and DHCP server go with it.
pub(super) async fn delete_unused(state: &AppState, network: &Network) -> Result<()> {
    let lock = state.supervisor.network_lock().await;
    check_unused(state, network)?;
    state.store.delete_network(&network.id)?;
    drop(lock);
    state.supervisor.reconcile_network().await?;
    tracing::info!(network = %network.id, "network deleted");
    Ok(())
}
