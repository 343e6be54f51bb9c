//! `/v1/overlay`: host to host, served to registered peers on the peer
//! listener (mutual TLS, `peer_tls`): each call carries the calling peer's
//! identity, and a peer may act only as itself (the home of the networks
//! it gives, the asker of its own addresses, the source of its own
//! migrations). The home host of an overlay network gives it to the
//! other hosts it spans (`PUT`, `DELETE /v1/overlay/networks/{id}`), and
//! hands out its addresses to their VMs (`.../addresses`): one IPAM per
//! network, so that no two hosts give a guest the same address.

use std::net::Ipv4Addr;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use nubis_api::{AddressGrant, AddressRequest, ApiError, ErrorCode, Network, NetworkReplica};
use serde::Deserialize;

use super::{AppState, Body, HttpError, PeerCaller, Result};
use crate::ipv4::Cidr;
use crate::network::nic_address;
use crate::service::networks;
use crate::supervisor::migration as handover;
use crate::validate;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/overlay/networks/{id}", put(adopt).delete(abandon))
        .route("/v1/overlay/networks/{id}/addresses", post(grant))
        .route(
            "/v1/overlay/networks/{id}/addresses/{address}",
            delete(release),
        )
        .route("/v1/overlay/migrations", post(incoming))
        .route(
            "/v1/overlay/migrations/{id}",
            get(incoming_show).put(incoming_done).delete(incoming_abort),
        )
}

/// A free TCP port on `address` in the host's migration port range (the
/// VMM binds it right after): never one a tenant's port forward may take.
fn free_port(address: Ipv4Addr, range: crate::config::PortRange) -> Result<u16> {
    let span = u32::from(range.high - range.low) + 1;
    let start = crate::store::random_hex(4)
        .ok()
        .and_then(|hex| u32::from_str_radix(&hex, 16).ok())
        .unwrap_or_default()
        % span;
    (0..span)
        .filter_map(|step| u16::try_from(u32::from(range.low) + (start + step) % span).ok())
        .find(|port| std::net::TcpListener::bind((address, *port)).is_ok())
        .ok_or_else(|| {
            HttpError::new(
                ErrorCode::Internal,
                format!("no free port on {address} in the migration range {range}"),
            )
        })
}

/// A VM definition a peer sent: every value that reaches a command line, a
/// rule or a path is checked as if a tenant had sent it. NICs keep their
/// MAC and address (a migrating VM keeps its identity), but only a unicast
/// MAC and an address inside the NIC's own network are taken.
fn check_incoming_vm(state: &AppState, vm: &nubis_api::Vm) -> Result<()> {
    validate::name("vm.name", &vm.name, false)?;
    validate::id("vm.id", &vm.id, "vm")?;
    validate::kernel_args("vm.kernel_args", &vm.kernel_args)?;
    for (index, nic) in vm.nics.iter().enumerate() {
        let field = |name: &str| format!("vm.nics[{index}].{name}");
        let mac = nic.mac.as_deref().unwrap_or_default();
        crate::network::MacAddr::parse_unicast(mac)
            .map_err(|err| ApiError::invalid(&field("mac"), err.to_string()))?;
        let address = nic
            .address
            .as_deref()
            .and_then(nic_address)
            .ok_or_else(|| ApiError::invalid(&field("address"), "an IPv4 address is needed"))?;
        let inside = match &nic.network {
            Some(id) => state
                .store
                .get_network(None, id)?
                .and_then(|net| net.cidr.parse::<Cidr>().ok())
                .is_some_and(|cidr| {
                    cidr.contains(address)
                        && address != cidr.gateway()
                        && address != cidr.base()
                        && address != cidr.broadcast_address()
                }),
            None => false,
        };
        if !inside {
            return Err(ApiError::invalid(
                &field("address"),
                format!("{address} is not a NIC address of the NIC's network"),
            )
            .into());
        }
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/v1/overlay/migrations",
    tag = "overlay",
    request_body = nubis_api::IncomingMigration,
    responses(
        (status = 201, description = "a VMM waits for the source", body = nubis_api::IncomingReady),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 403, description = "not a registered peer over mutual TLS, or a peer acting for another", body = ApiError),
        (status = 409, description = "the VM exists here, its image is not registered here, or this host does not carry its networks", body = ApiError),
        (status = 422, description = "this host has no underlay", body = ApiError),
        (status = 429, description = "the tenant's quota here is exceeded", body = ApiError)
    ),
)]
pub(crate) async fn incoming(
    State(state): State<AppState>,
    peer: PeerCaller,
    Body(request): Body<nubis_api::IncomingMigration>,
) -> Result<(StatusCode, Json<nubis_api::IncomingReady>)> {
    let local = networks::local_underlay(&state.services)?;
    peer.acts_as("source", &request.source)?;
    let vm = &request.vm;
    check_incoming_vm(&state, vm)?;
    let conflict = |message: String| HttpError::new(ErrorCode::Conflict, message);
    if let Some(known) = state.store.get_vm(None, &vm.id)? {
        // What a migration that failed while this agent was down left: a
        // VM that never ran here. A new attempt replaces it.
        let leftover = !known.state.has_process() && state.supervisor.never_ran_here(&known.id)?;
        if !leftover {
            return Err(conflict(format!("VM {} exists here", vm.id)));
        }
        state.supervisor.remove_files(&known)?;
        state.store.delete_vm(&known.id)?;
    }
    let tenant = &request.tenant;
    match state.store.get_tenant(&tenant.id)? {
        Some(known) if known.name != tenant.name => {
            return Err(conflict(format!(
                "tenant {} is '{}' here, not '{}'",
                tenant.id, known.name, tenant.name
            )))
        }
        Some(_) => {}
        None => state.store.create_tenant_with_id(&tenant.clone().into())?,
    }
    let image = state
        .store
        .get_image(&tenant.id, &request.image.name)?
        .ok_or_else(|| {
            conflict(format!(
                "the tenant has no image '{}' on this host: register it here first",
                request.image.name
            ))
        })?;
    for (index, nic) in vm.nics.iter().enumerate() {
        let carried = match &nic.network {
            Some(id) => state
                .store
                .get_network(None, id)?
                .and_then(|net| net.overlay)
                .is_some_and(|overlay| overlay.hosts.contains(&local.to_string())),
            None => false,
        };
        if !carried {
            return Err(conflict(format!(
                "NIC {index} is on {}, which this host does not carry",
                nic.network
                    .as_deref()
                    .unwrap_or("the tenant's default bridge")
            )));
        }
    }
    let quota = state
        .store
        .get_tenant(&tenant.id)?
        .map(|tenant| tenant.quota)
        .unwrap_or(tenant.quota);
    let created = state.store.create_vm_with_id(
        &vm.id,
        &crate::store::NewVm {
            tenant_id: tenant.id.clone(),
            name: vm.name.clone(),
            image_id: image.id.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel_args: vm.kernel_args.clone(),
            root_rate_limit: vm.root_rate_limit,
            disks: vm.disks.clone(),
            nics: vm.nics.clone(),
            restore_from: None,
        },
        quota,
    )?;
    state.store.add_event(
        &created.id,
        "created",
        &format!("{}{}", handover::RECEIVED_FROM, request.source),
    )?;
    let port = free_port(local, state.supervisor.config().migration_port_range)?;
    let listen = format!("{local}:{port}");
    let token = crate::store::random_hex(24)?;
    // The stream's key, one per migration: the VMMs encrypt and
    // authenticate every byte between them with it.
    let key = crate::store::random_hex(32)?;
    let prepared = async {
        state.supervisor.reconcile_network().await?;
        state
            .supervisor
            .receive(&created, &image, &listen, &token, &key)
            .await
    };
    if let Err(err) = prepared.await {
        state.supervisor.remove_files(&created)?;
        state.store.delete_vm(&created.id)?;
        if let Err(again) = state.supervisor.reconcile_network().await {
            tracing::error!(vm = %created.id, "cannot undo the VM's network rules: {again}");
        }
        return Err(err.into());
    }
    tracing::info!(vm = %created.id, %listen, source = %request.source, "receiving a VM");
    Ok((
        StatusCode::CREATED,
        Json(nubis_api::IncomingReady { listen, token, key }),
    ))
}

/// VM `id`, received from `peer`: another peer's VMs (or this host's own)
/// are not this one's to see or finish.
fn incoming_from(state: &AppState, peer: &PeerCaller, id: &str) -> Result<nubis_api::Vm> {
    let vm = incoming_vm(state, id)?;
    let from = format!("{}{}", handover::RECEIVED_FROM, peer.address);
    let received = state
        .store
        .events(&vm.id)?
        .iter()
        .any(|event| event.kind == "created" && event.message == from);
    if !received {
        return Err(HttpError::not_found("VM", id));
    }
    Ok(vm)
}

#[utoipa::path(
    get,
    path = "/v1/overlay/migrations/{id}",
    tag = "overlay",
    params(("id" = String, Path, description = "the VM's id")),
    responses(
        (status = 200, description = "the VM as this host has it", body = nubis_api::Vm),
        (status = 403, description = "not a registered peer over mutual TLS", body = ApiError),
        (status = 404, description = "no VM received from the caller", body = ApiError)
    )
)]
pub(crate) async fn incoming_show(
    State(state): State<AppState>,
    peer: PeerCaller,
    Path(id): Path<String>,
) -> Result<Json<nubis_api::Vm>> {
    Ok(Json(incoming_from(&state, &peer, &id)?))
}

fn incoming_vm(state: &AppState, id: &str) -> Result<nubis_api::Vm> {
    state
        .store
        .get_vm(None, id)?
        .ok_or_else(|| HttpError::not_found("VM", id))
}

#[utoipa::path(
    put,
    path = "/v1/overlay/migrations/{id}",
    tag = "overlay",
    params(("id" = String, Path, description = "the VM's id")),
    responses(
        (status = 204, description = "the VM runs here now"),
        (status = 403, description = "not a registered peer over mutual TLS, or a peer acting for another", body = ApiError),
        (status = 404, description = "no such VM here", body = ApiError),
        (status = 409, description = "its VMM is not running", body = ApiError)
    ),
)]
pub(crate) async fn incoming_done(
    State(state): State<AppState>,
    peer: PeerCaller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let vm = incoming_from(&state, &peer, &id)?;
    if !vm.state.has_process() {
        return Err(HttpError::new(
            ErrorCode::Conflict,
            format!("VM {id} has no VMM here ({})", vm.state.as_str()),
        ));
    }
    state.supervisor.incoming_done(&vm, "its source")?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    delete,
    path = "/v1/overlay/migrations/{id}",
    tag = "overlay",
    params(("id" = String, Path, description = "the VM's id")),
    responses(
        (status = 204, description = "the VM being received is gone"),
        (status = 403, description = "not a registered peer over mutual TLS, or a peer acting for another", body = ApiError),
        (status = 404, description = "no such VM here", body = ApiError),
        (status = 409, description = "the VM runs here (the hand-over happened)", body = ApiError)
    ),
)]
pub(crate) async fn incoming_abort(
    State(state): State<AppState>,
    peer: PeerCaller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let vm = incoming_from(&state, &peer, &id)?;
    let _guard = state.supervisor.lock(&vm.id).await;
    let vm = incoming_vm(&state, &id)?;
    if vm.state == nubis_api::VmState::Running {
        return Err(HttpError::new(
            ErrorCode::Conflict,
            format!("VM {id} runs here: it was handed over"),
        ));
    }
    state.supervisor.incoming_abort(&vm).await?;
    state.store.delete_vm(&vm.id)?;
    state.supervisor.reconcile_network().await?;
    tracing::info!(vm = %id, "migration in abandoned");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    put,
    path = "/v1/overlay/networks/{id}",
    tag = "overlay",
    params(("id" = String, Path, description = "the network's id on its home host")),
    request_body = NetworkReplica,
    responses(
        (status = 200, description = "this host carries the network", body = Network),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 403, description = "not a registered peer over mutual TLS, or a peer acting for another", body = ApiError),
        (status = 409, description = "it clashes with a network or tenant of this host, or its home is not registered", body = ApiError),
        (status = 422, description = "this host has no underlay", body = ApiError)
    ),
)]
pub(crate) async fn adopt(
    State(state): State<AppState>,
    peer: PeerCaller,
    Path(id): Path<String>,
    Body(replica): Body<NetworkReplica>,
) -> Result<Json<Network>> {
    let home = replica
        .network
        .overlay
        .as_ref()
        .map(|overlay| overlay.home.as_str());
    peer.acts_as("network.overlay.home", home.unwrap_or_default())?;
    Ok(Json(networks::adopt(&state.services, &id, &replica).await?))
}

#[utoipa::path(
    delete,
    path = "/v1/overlay/networks/{id}",
    tag = "overlay",
    params(("id" = String, Path, description = "the network's id")),
    responses(
        (status = 204, description = "this host no longer carries it"),
        (status = 403, description = "not a registered peer over mutual TLS, or a peer acting for another", body = ApiError),
        (status = 404, description = "this host does not carry it", body = ApiError),
        (status = 409, description = "VMs here are attached to it, or this host is its home", body = ApiError)
    ),
)]
pub(crate) async fn abandon(
    State(state): State<AppState>,
    peer: PeerCaller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    networks::abandon(&state.services, &peer.address, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/overlay/networks/{id}/addresses",
    tag = "overlay",
    params(("id" = String, Path, description = "the network's id")),
    request_body = AddressRequest,
    responses(
        (status = 201, description = "granted", body = AddressGrant),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 403, description = "not a registered peer over mutual TLS, or a peer acting for another", body = ApiError),
        (status = 404, description = "no such overlay network here", body = ApiError),
        (status = 409, description = "this host is not the network's home, or the asker is no member", body = ApiError),
        (status = 429, description = "the network has no free address", body = ApiError)
    ),
)]
pub(crate) async fn grant(
    State(state): State<AppState>,
    peer: PeerCaller,
    Path(id): Path<String>,
    Body(request): Body<AddressRequest>,
) -> Result<(StatusCode, Json<AddressGrant>)> {
    peer.acts_as("host", &request.host)?;
    let grant = networks::grant(&state.services, &id, &request).await?;
    Ok((StatusCode::CREATED, Json(grant)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseQuery {
    host: String,
}

#[utoipa::path(
    delete,
    path = "/v1/overlay/networks/{id}/addresses/{address}",
    tag = "overlay",
    params(
        ("id" = String, Path, description = "the network's id"),
        ("address" = String, Path, description = "the granted address"),
        ("host" = String, Query, description = "the underlay address of the host that holds it")
    ),
    responses(
        (status = 204, description = "released"),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 403, description = "not a registered peer over mutual TLS, or a peer acting for another", body = ApiError),
        (status = 404, description = "not granted to that host", body = ApiError)
    ),
)]
pub(crate) async fn release(
    State(state): State<AppState>,
    peer: PeerCaller,
    Path((id, address)): Path<(String, String)>,
    Query(query): Query<ReleaseQuery>,
) -> Result<StatusCode> {
    peer.acts_as("host", &query.host)?;
    networks::release(&state.services, &id, &address, &query.host)?;
    Ok(StatusCode::NO_CONTENT)
}
