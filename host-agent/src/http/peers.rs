//! `/v1/peers`: the peer hosts this agent carries overlay networks with
//! (operator only), registered by underlay address and certificate
//! fingerprint; `/v1/host-identity`: this host's, for the peers' operators.
//! Registration is one-sided: the two hosts talk once each has registered
//! the other (mutual TLS, `peer_tls`); until then calls fail naming the
//! refused certificate.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, HostIdentity, Peer, PeerCreate};

use super::responses::{Invalid, OperatorOnly};
use super::{AppState, Body, HttpError, Operator, Result};
use crate::service::Services;
use crate::store::PeerRow;
use crate::validate;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/peers", get(list).post(create))
        .route("/v1/peers/{name}", get(show).delete(remove))
        .route("/v1/host-identity", get(identity))
}

/// Makes the TLS layer's view of the peers the directory's (the
/// registered peers, or the cluster's other members).
pub fn refresh_registry(state: &AppState) -> Result<()> {
    let peers = state
        .services
        .peer_directory
        .list()?
        .into_iter()
        .filter_map(|host| {
            let address = host.address.parse().ok()?;
            Some((host.name, address, host.fingerprint))
        });
    state.peer_registry.replace(peers);
    Ok(())
}

#[utoipa::path(
    get,
    path = "/v1/host-identity",
    tag = "peers",
    responses(
        (status = 200, description = "this host's certificate fingerprint and peer address", body = HostIdentity),
        OperatorOnly
    ),
    security(("bearer" = []))
)]
pub(crate) async fn identity(
    State(state): State<AppState>,
    _operator: Operator,
) -> Result<Json<HostIdentity>> {
    Ok(Json(HostIdentity {
        fingerprint: state.fingerprint.to_string(),
        address: state.supervisor.underlay_address().map(|a| a.to_string()),
        peer_port: state.supervisor.config().peer_port,
    }))
}

/// A peer's underlay address: a unicast IPv4 address other than ours.
fn check_address(state: &AppState, address: &str) -> Result<std::net::Ipv4Addr> {
    let parsed: std::net::Ipv4Addr = address
        .parse()
        .map_err(|_| ApiError::invalid("address", format!("'{address}' is not an IPv4 address")))?;
    if parsed.is_unspecified()
        || parsed.is_broadcast()
        || parsed.is_multicast()
        || parsed.is_loopback()
    {
        return Err(ApiError::invalid(
            "address",
            format!("{parsed} is not a unicast host address"),
        )
        .into());
    }
    if state.supervisor.underlay_address() == Some(parsed) {
        return Err(ApiError::invalid(
            "address",
            format!("{parsed} is this host's own underlay address"),
        )
        .into());
    }
    Ok(parsed)
}

#[utoipa::path(
    post,
    path = "/v1/peers",
    tag = "peers",
    request_body = PeerCreate,
    responses(
        (status = 201, description = "registered", body = Peer),
        Invalid,
        OperatorOnly,
        (status = 409, description = "the name, address or fingerprint is registered, or this host is a cluster member (its peers are the members)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    _operator: Operator,
    Body(request): Body<PeerCreate>,
) -> Result<(StatusCode, Json<Peer>)> {
    refuse_in_cluster(&state)?;
    validate::name("name", &request.name, false)?;
    let address = check_address(&state, &request.address)?;
    if !crate::peer_tls::is_fingerprint(&request.fingerprint) {
        return Err(ApiError::invalid(
            "fingerprint",
            "a certificate fingerprint is 64 lower-case hex digits (the peer's GET /v1/host-identity)",
        )
        .into());
    }
    if request.fingerprint == *state.fingerprint {
        return Err(ApiError::invalid("fingerprint", "this is this host's own certificate").into());
    }
    let peer_port = request
        .peer_port
        .unwrap_or(nubis_api::host::DEFAULT_PEER_PORT);
    if peer_port == 0 {
        return Err(ApiError::invalid("peer_port", "must be 1 to 65535").into());
    }
    let host = state.store.create_host(
        &request.name,
        &address.to_string(),
        peer_port,
        &request.fingerprint,
    )?;
    refresh_registry(&state)?;
    tracing::info!(host = %host.name, address = %host.address, "peer host registered");
    Ok((StatusCode::CREATED, Json(host)))
}

/// Every peer (in cluster mode: the other members that are up).
fn all(services: &Services) -> Result<Vec<Peer>> {
    Ok(services.peer_directory.list()?)
}

/// A peer, by name (or underlay address).
fn find(services: &Services, name: &str) -> Result<PeerRow> {
    services
        .peer_directory
        .get(name)?
        .ok_or_else(|| HttpError::not_found("host", name))
}

fn named(services: &Services, name: &str) -> Result<Peer> {
    Ok(find(services, name)?.host)
}

/// A cluster member's peers are the other members: none is registered or
/// removed by hand.
fn refuse_in_cluster(state: &AppState) -> Result<()> {
    if state.services.cluster.is_some() {
        return Err(HttpError::new(
            nubis_api::ErrorCode::Conflict,
            "this host is a cluster member: its peers are the other members (see /v1/hosts)",
        ));
    }
    Ok(())
}

list_handler!(operator list, "/v1/peers", "peers", "the registered peers (in cluster mode: the other members that are up)", Peer, sync all,
    OperatorOnly);

show_handler!(operator show, "/v1/peers/{name}", "peers", "name" = "name (or underlay address)",
    "success", Peer, sync named, OperatorOnly,
    (status = 404, description = "no such host", body = ApiError));

#[utoipa::path(
    delete,
    path = "/v1/peers/{name}",
    tag = "peers",
    params(("name" = String, Path, description = "name (or underlay address)")),
    responses(
        (status = 204, description = "deleted"),
        OperatorOnly,
        (status = 404, description = "no such host", body = ApiError),
        (status = 409, description = "a network spans the host, or this host is a cluster member", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    _operator: Operator,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    refuse_in_cluster(&state)?;
    let peer = find(&state.services, &name)?;
    state.store.delete_host(&peer.host.name)?;
    refresh_registry(&state)?;
    tracing::info!(host = %peer.host.name, "peer host removed");
    Ok(StatusCode::NO_CONTENT)
}
