//! Requests about one VM (`/v1/vms/{id}/...`: its state, actions,
//! console, events, snapshots, migration) are answered by the host it
//! runs on; those about a snapshot or a port forward (and a new port
//! forward, by its VM) by the host that has it. In a cluster, a tenant
//! may send them to any host: this layer finds the host and, when it is
//! another member that is up, sends the request there over the peer
//! channel (mutual TLS) and streams the answer back. The request is forwarded as the client sent it, bearer
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
use crate::auth::Principal;
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
    resource_of_path(path, "/v1/vms/")
}

/// The id a path names under `prefix` (`/v1/snapshots/{id}`...).
fn resource_of_path<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    let rest = path.strip_prefix(prefix)?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// What a request is about, when that lives on one host.
#[derive(Debug, PartialEq, Eq)]
enum About {
    /// A VM (id or name): its host answers; `migration` for its
    /// migration's status, which the host that drove it answers.
    Vm {
        id: String,
        migration: bool,
    },
    Snapshot(String),
    PortForward(String),
}

impl About {
    /// What `path` is about, `POST /v1/port-forwards` aside (its body
    /// names the VM).
    fn of(path: &str) -> Option<About> {
        if let Some(id) = vm_of_path(path) {
            return Some(About::Vm {
                id: id.to_string(),
                migration: path.ends_with("/migration"),
            });
        }
        if let Some(id) = resource_of_path(path, "/v1/snapshots/") {
            return Some(About::Snapshot(id.to_string()));
        }
        resource_of_path(path, "/v1/port-forwards/").map(|id| About::PortForward(id.to_string()))
    }
}

/// The middleware: forwards a request about something on another member
/// to it (see the module).
pub async fn to_owner(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.services.cluster.is_none() || request.extensions().get::<PeerHost>().is_some() {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let path = request.uri().path().to_string();
    let (request, about) =
        if request.method() == axum::http::Method::POST && path == "/v1/port-forwards" {
            // A new port forward goes where its VM runs (a body that does not
            // parse is the handler's to refuse).
            let (parts, body) = request.into_parts();
            let bytes = match axum::body::to_bytes(body, MAX_FORWARDED_BODY).await {
                Ok(bytes) => bytes,
                Err(err) => return too_large(err),
            };
            let about = serde_json::from_slice::<nubis_api::PortForwardCreate>(&bytes)
                .ok()
                .map(|create| About::Vm {
                    id: create.vm,
                    migration: false,
                });
            (Request::from_parts(parts, Body::from(bytes)), about)
        } else {
            (request, About::of(&path))
        };
    let destination = match about {
        Some(about) => destination(&state, &about, authorization.as_deref()).await,
        None => None,
    };
    match destination {
        Some((peer, principal)) => forward(&state, peer, &principal, request).await,
        None => next.run(request).await,
    }
}

/// The member to forward a request about `about` to, if it is another
/// member that is up.
async fn destination(
    state: &AppState,
    about: &About,
    authorization: Option<&str>,
) -> Option<(crate::store::PeerRow, Principal)> {
    let cluster = state.services.cluster.as_ref()?;
    // An unauthenticated request is refused here, by the handler.
    let principal = super::authenticate_request(state, authorization)
        .await
        .ok()?;
    let tenant = match &principal {
        Principal::Operator => None,
        Principal::Tenant(id) => Some(id.as_str()),
    };
    let host = match about {
        About::Vm { id, migration } => {
            let vm = cluster.vm(tenant, id).await.ok()?;
            // A VM still defined here (a migration that is handing it
            // over) is answered here; so is the migration this host drove
            // (its source keeps the record, the VM's new host knows
            // nothing of it).
            if matches!(state.store.get_vm(None, &vm.record.id), Ok(Some(_)))
                || (*migration && state.services.migrations.get(&vm.record.id).is_some())
            {
                return None;
            }
            vm.record.host?
        }
        About::Snapshot(id) => {
            if matches!(state.store.get_snapshot(None, id), Ok(Some(_))) {
                return None;
            }
            cluster.holder_of(|held| &held.snapshots, id).await.ok()??
        }
        About::PortForward(id) => {
            if matches!(state.store.get_port_forward(None, id), Ok(Some(_))) {
                return None;
            }
            cluster
                .holder_of(|held| &held.port_forwards, id)
                .await
                .ok()??
        }
    };
    if host == cluster.host_name().as_str() {
        return None;
    }
    let peer = state.services.peer_directory.get(&host).ok().flatten()?;
    Some((peer, principal))
}

/// A request body over [`MAX_FORWARDED_BODY`].
fn too_large(err: axum::Error) -> Response {
    HttpError::new(
        ErrorCode::PayloadTooLarge,
        format!("a request about something on another host carries at most {MAX_FORWARDED_BODY} bytes: {err}"),
    )
    .into_response()
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
        Err(err) => return too_large(err),
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
    fn what_a_path_is_about() {
        let vm = |id: &str, migration| About::Vm {
            id: id.to_string(),
            migration,
        };
        assert_eq!(About::of("/v1/vms/web/start"), Some(vm("web", false)));
        assert_eq!(About::of("/v1/vms/web/migration"), Some(vm("web", true)));
        assert_eq!(
            About::of("/v1/snapshots/snap-1/restore"),
            Some(About::Snapshot("snap-1".into()))
        );
        assert_eq!(
            About::of("/v1/port-forwards/pf-1"),
            Some(About::PortForward("pf-1".into()))
        );
        for path in [
            "/v1/vms",
            "/v1/snapshots",
            "/v1/port-forwards",
            "/v1/images/x",
        ] {
            assert_eq!(About::of(path), None, "{path}");
        }
    }

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
