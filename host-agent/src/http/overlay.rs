//! `/v1/overlay`: host to host, served to registered peers on the peer
//! listener (mutual TLS, `peer_tls`): each call carries the calling peer's
//! identity, and a peer may act only as itself (the home of the networks
//! it gives, the asker of its own addresses, the source of its own
//! migrations). The home host of an overlay network gives it to the
//! other hosts it spans (`PUT`, `DELETE /v1/overlay/networks/{id}`), and
//! hands out its addresses to their VMs (`.../addresses`): one IPAM per
//! network, so that no two hosts give a guest the same address. A
//! migration's source has this host receive a VM
//! (`/v1/overlay/migrations`, `service::incoming`).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use nubis_api::{AddressGrant, AddressRequest, ApiError, Network, NetworkReplica};
use serde::Deserialize;

use super::responses::{Invalid, PeerOnly};
use super::{AppState, Body, PeerCaller, Result};
use crate::service::{incoming, networks};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/overlay/networks/{id}", put(adopt).delete(abandon))
        .route("/v1/overlay/networks/{id}/addresses", post(grant))
        .route(
            "/v1/overlay/networks/{id}/addresses/{address}",
            delete(release),
        )
        .route("/v1/overlay/images/{id}/files/{file}", get(image_file))
        .route("/v1/overlay/migrations", post(incoming))
        .route(
            "/v1/overlay/migrations/{id}",
            get(incoming_show).put(incoming_done).delete(incoming_abort),
        )
}

#[utoipa::path(
    post,
    path = "/v1/overlay/migrations",
    tag = "overlay",
    request_body = nubis_api::IncomingMigration,
    responses(
        (status = 201, description = "a VMM waits for the source", body = nubis_api::IncomingReady),
        Invalid,
        PeerOnly,
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
    // A host without an underlay says so before it looks at the caller.
    let local = networks::local_underlay(&state.services)?;
    peer.acts_as("source", &request.source)?;
    let ready = incoming::receive(&state.services, local, &request).await?;
    Ok((StatusCode::CREATED, Json(ready)))
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
    Ok(Json(incoming::received_from(
        &state.services,
        &peer.address,
        &id,
    )?))
}

peer_handler!(incoming_done, put, "/v1/overlay/migrations/{id}", "the VM's id",
    "the VM runs here now", async incoming::done, PeerOnly,
    (status = 404, description = "no such VM here", body = ApiError),
    (status = 409, description = "its VMM is not running", body = ApiError));

peer_handler!(incoming_abort, delete, "/v1/overlay/migrations/{id}", "the VM's id",
    "the VM being received is gone", async incoming::abort, PeerOnly,
    (status = 404, description = "no such VM here", body = ApiError),
    (status = 409, description = "the VM runs here (the hand-over happened)", body = ApiError));

#[utoipa::path(
    put,
    path = "/v1/overlay/networks/{id}",
    tag = "overlay",
    params(("id" = String, Path, description = "the network's id on its home host")),
    request_body = NetworkReplica,
    responses(
        (status = 200, description = "this host carries the network", body = Network),
        Invalid,
        PeerOnly,
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

peer_handler!(abandon, delete, "/v1/overlay/networks/{id}", "the network's id",
    "this host no longer carries it", async networks::abandon, PeerOnly,
    (status = 404, description = "this host does not carry it", body = ApiError),
    (status = 409, description = "VMs here are attached to it, or this host is its home", body = ApiError));

#[utoipa::path(
    post,
    path = "/v1/overlay/networks/{id}/addresses",
    tag = "overlay",
    params(("id" = String, Path, description = "the network's id")),
    request_body = AddressRequest,
    responses(
        (status = 201, description = "granted", body = AddressGrant),
        Invalid,
        PeerOnly,
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
        Invalid,
        PeerOnly,
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

/// An image file of this host, for a member that must start a VM from the
/// image (`service::images::ensure`); it checks the file's SHA-256.
#[utoipa::path(
    get,
    path = "/v1/overlay/images/{id}/files/{file}",
    tag = "overlay",
    params(
        ("id" = String, Path, description = "the image's id"),
        ("file" = String, Path, description = "kernel, rootfs or initrd")
    ),
    responses(
        (status = 200, description = "the file", content_type = "application/octet-stream"),
        PeerOnly,
        (status = 404, description = "no such image or file here", body = ApiError)
    )
)]
pub(crate) async fn image_file(
    State(state): State<AppState>,
    _peer: PeerCaller,
    Path((id, file)): Path<(String, String)>,
) -> Result<axum::response::Response> {
    use axum::response::IntoResponse;
    let path = crate::service::images::file_for_peer(&state.services, &id, &file)?;
    let opened = tokio::fs::File::open(&path).await.map_err(|err| {
        super::HttpError::new(
            nubis_api::ErrorCode::Internal,
            format!("cannot open {}: {err}", path.display()),
        )
    })?;
    let stream = futures_util::stream::unfold(Some(opened), |file| async move {
        let mut file = file?;
        let mut buffer = vec![0u8; 256 * 1024];
        match tokio::io::AsyncReadExt::read(&mut file, &mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok::<_, std::io::Error>(buffer), Some(file)))
            }
            Err(err) => Some((Err(err), None)),
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}
