//! Requests about one VM (`/v1/vms/{id}/...`: its state, actions,
//! console, events, snapshots, migration) are answered by the host it
//! runs on. In a cluster, a tenant may send them to any host: this layer
//! finds the VM's host and, when it is another member that is up, sends
//! the request there over the peer channel (mutual TLS) and streams the
//! answer back. The request is forwarded as the client sent it, bearer
//! token included: the VM's host authenticates and authorizes it itself
//! (every host mirrors the tenants' token hashes), so forwarding grants
//! nothing. The operator's token is each host's own: for the operator the
//! forwarding member vouches instead (`FORWARDED_FOR`, believed only over
//! the peer channel). A request that arrived over the peer channel is
//! never forwarded again.
//!
//! When the VM's host is down or cannot be reached, the request is
//! answered here from the cluster's records (the VM's last reported
//! state; actions are refused with 503).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use nubis_api::ErrorCode;

use super::{AppState, HttpError};
use crate::auth::{authenticate, Principal};
use crate::peer_tls::PeerHost;
use crate::peers::Forwarded;

/// The largest request body forwarded (VM requests carry small JSON).
const MAX_FORWARDED_BODY: usize = 1 << 20;

/// The request headers that travel with a forwarded request.
const FORWARDED_HEADERS: [HeaderName; 3] = [
    axum::http::header::AUTHORIZATION,
    axum::http::header::CONTENT_TYPE,
    axum::http::header::ACCEPT,
];

/// The header with which a member vouches for the caller of a request it
/// forwards, when that caller is the operator (see [`vouched_operator`]).
pub const FORWARDED_FOR: &str = "x-nubis-forwarded-for";
const OPERATOR: &str = "operator";

/// Whether a request is the operator's, vouched for by the member that
/// forwarded it: it came over the peer channel (mutual TLS, a member's
/// certificate) with [`FORWARDED_FOR`] saying so. Only in a cluster,
/// where the members are one trust domain (each can write etcd).
pub fn vouched_operator(state: &AppState, parts: &axum::http::request::Parts) -> bool {
    state.services.cluster.is_some()
        && parts.extensions.get::<PeerHost>().is_some()
        && parts
            .headers
            .get(FORWARDED_FOR)
            .is_some_and(|value| value.as_bytes() == OPERATOR.as_bytes())
}

/// The answer headers that come back.
const ANSWER_HEADERS: [&str; 4] = ["content-type", "x-console-offset", "location", "allow"];

/// The VM a path is about: `/v1/vms/{id}` and everything under it.
pub fn vm_of_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/vms/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// The middleware: forwards a VM's requests to its host (see the module).
pub async fn to_vm_host(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let from_peer = request.extensions().get::<PeerHost>().is_some();
    let wanted = vm_of_path(request.uri().path()).map(str::to_string);
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let about_migration = request.uri().path().ends_with("/migration");
    let destination = match wanted {
        Some(wanted) if !from_peer => {
            destination(&state, &wanted, authorization.as_deref(), about_migration).await
        }
        _ => None,
    };
    match destination {
        Some((peer, principal)) => forward(&state, peer, &principal, request).await,
        None => next.run(request).await,
    }
}

/// The member to forward a request about VM `wanted` to, if it is
/// another member that is up.
async fn destination(
    state: &AppState,
    wanted: &str,
    authorization: Option<&str>,
    about_migration: bool,
) -> Option<(crate::store::PeerRow, Principal)> {
    let cluster = state.services.cluster.as_ref()?;
    // An unauthenticated request is refused here, by the handler.
    let principal = authenticate(&state.operator, &state.store, authorization).ok()?;
    let tenant = match &principal {
        Principal::Operator => None,
        Principal::Tenant(id) => Some(id.as_str()),
    };
    let vm = cluster.vm(tenant, wanted).await.ok()?;
    let host = vm.record.host.as_deref()?;
    if host == cluster.host_name().as_str() {
        return None;
    }
    // A VM still defined here (a migration that is handing it over) is
    // answered here; so is the migration this host drove (its source
    // keeps the record, and the VM's new host knows nothing of it).
    if matches!(state.store.get_vm(None, &vm.record.id), Ok(Some(_)))
        || (about_migration && state.services.migrations.get(&vm.record.id).is_some())
    {
        return None;
    }
    let peer = state.services.peer_directory.get(host).ok().flatten()?;
    Some((peer, principal))
}

async fn forward(
    state: &AppState,
    peer: crate::store::PeerRow,
    principal: &Principal,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_FORWARDED_BODY).await {
        Ok(bytes) => bytes.to_vec(),
        Err(err) => {
            return HttpError::new(
                ErrorCode::PayloadTooLarge,
                format!("a request about a VM on another host carries at most {MAX_FORWARDED_BODY} bytes: {err}"),
            )
            .into_response()
        }
    };
    let mut headers = reqwest::header::HeaderMap::new();
    for name in FORWARDED_HEADERS {
        if let Some(value) = parts.headers.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    if matches!(principal, Principal::Operator) {
        // Each host has its own operator token: this host vouches for the
        // operator it authenticated, over the mutually authenticated
        // channel, and the token stays here.
        headers.remove(axum::http::header::AUTHORIZATION);
        headers.insert(
            FORWARDED_FOR,
            reqwest::header::HeaderValue::from_static(OPERATOR),
        );
    }
    let path = parts.uri.path_and_query().map_or_else(
        || parts.uri.path().to_string(),
        |pq| pq.as_str().to_string(),
    );
    let forwarded = Forwarded {
        method: parts.method.clone(),
        path,
        headers,
        body,
    };
    let answer = match state.peers.forward(&peer, forwarded).await {
        Ok(answer) => answer,
        Err(err) => {
            return HttpError::new(
                ErrorCode::Unavailable,
                format!("the VM's host cannot answer: {err}"),
            )
            .into_response()
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut kept = HeaderMap::new();
    for name in ANSWER_HEADERS {
        if let Some(value) = answer.headers().get(name) {
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                kept.insert(name, value.clone());
            }
        }
    }
    // The answer's body as it comes (a console stream may last).
    let stream = futures_util::stream::unfold(Some(answer), |answer| async move {
        let mut answer = answer?;
        match answer.chunk().await {
            Ok(Some(bytes)) => Some((Ok(bytes), Some(answer))),
            Ok(None) => None,
            Err(err) => Some((Err(std::io::Error::other(err)), None)),
        }
    });
    (status, kept, Body::from_stream(stream)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_of_a_path() {
        assert_eq!(vm_of_path("/v1/vms/vm-1"), Some("vm-1"));
        assert_eq!(vm_of_path("/v1/vms/web/console"), Some("web"));
        assert_eq!(vm_of_path("/v1/vms/vm-1/snapshots"), Some("vm-1"));
        assert_eq!(vm_of_path("/v1/vms"), None);
        assert_eq!(vm_of_path("/v1/vms/"), None);
        assert_eq!(vm_of_path("/v1/images/x"), None);
    }
}
