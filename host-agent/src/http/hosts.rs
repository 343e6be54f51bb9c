//! `/v1/hosts`: the peer hosts this agent carries overlay networks with
//! (operator only). A peer is registered only once it answers with the
//! given token as its operator's, so that a typo fails here and not in the
//! middle of creating a network.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, ErrorCode, Host, HostCreate};

use super::{AppState, Body, HttpError, Operator, Result};
use crate::peers::PeerError;
use crate::store::Peer;
use crate::validate;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/hosts", get(list).post(create))
        .route("/v1/hosts/{name}", get(show).delete(remove))
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

fn check_api_url(url: &str) -> Result<()> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        ApiError::invalid(
            "api_url",
            format!("'{url}' is not an http:// URL (peers talk plain HTTP over the underlay)"),
        )
    })?;
    if rest.is_empty() || rest.starts_with('/') || url.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid("api_url", format!("'{url}' names no host")).into());
    }
    Ok(())
}

/// A peer's failure as this API's error: the peer's own refusals of bad
/// input keep their meaning, everything else is a failed peer.
pub(crate) fn peer_failed(err: PeerError) -> HttpError {
    let code = match err.code() {
        Some(ErrorCode::Conflict) => ErrorCode::Conflict,
        Some(ErrorCode::QuotaExceeded) => ErrorCode::QuotaExceeded,
        _ => ErrorCode::PeerFailed,
    };
    HttpError::new(code, err.to_string())
}

#[utoipa::path(
    post,
    path = "/v1/hosts",
    tag = "hosts",
    request_body = HostCreate,
    responses(
        (status = 201, description = "registered", body = Host),
        (status = 400, description = "invalid input, or the peer refused the token", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError),
        (status = 409, description = "the name or address is registered", body = ApiError),
        (status = 502, description = "the peer cannot be reached", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    _operator: Operator,
    Body(request): Body<HostCreate>,
) -> Result<(StatusCode, Json<Host>)> {
    validate::name("name", &request.name, false)?;
    let address = check_address(&state, &request.address)?;
    check_api_url(&request.api_url)?;
    if request.token.trim().len() < 16 || request.token.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid(
            "token",
            "an operator token is at least 16 characters, without spaces",
        )
        .into());
    }
    let candidate = Peer {
        host: Host {
            name: request.name.clone(),
            address: address.to_string(),
            api_url: request.api_url.clone(),
            created_at: 0,
        },
        token: request.token.clone(),
    };
    match state.peers.check(&candidate).await {
        Ok(()) => {}
        Err(PeerError::Refused {
            status: 401 | 403, ..
        }) => {
            return Err(ApiError::invalid(
                "token",
                format!(
                    "host '{}' does not take this token as its operator's",
                    request.name
                ),
            )
            .into())
        }
        Err(err) => return Err(peer_failed(err)),
    }
    let host = state.store.create_host(
        &request.name,
        &candidate.host.address,
        &request.api_url,
        &request.token,
    )?;
    tracing::info!(host = %host.name, address = %host.address, "peer host registered");
    Ok((StatusCode::CREATED, Json(host)))
}

#[utoipa::path(
    get,
    path = "/v1/hosts",
    tag = "hosts",
    responses(
        (status = 200, description = "the registered peers", body = Vec<Host>),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _operator: Operator,
) -> Result<Json<Vec<Host>>> {
    Ok(Json(state.store.list_hosts()?))
}

fn find(state: &AppState, name: &str) -> Result<Peer> {
    state
        .store
        .get_host(name)?
        .ok_or_else(|| HttpError::not_found("host", name))
}

#[utoipa::path(
    get,
    path = "/v1/hosts/{name}",
    tag = "hosts",
    params(("name" = String, Path, description = "name (or underlay address)")),
    responses(
        (status = 200, description = "success", body = Host),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError),
        (status = 404, description = "no such host", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    _operator: Operator,
    Path(name): Path<String>,
) -> Result<Json<Host>> {
    Ok(Json(find(&state, &name)?.host))
}

#[utoipa::path(
    delete,
    path = "/v1/hosts/{name}",
    tag = "hosts",
    params(("name" = String, Path, description = "name (or underlay address)")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator only", body = ApiError),
        (status = 404, description = "no such host", body = ApiError),
        (status = 409, description = "a network spans the host", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    _operator: Operator,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    let peer = find(&state, &name)?;
    state.store.delete_host(&peer.host.name)?;
    tracing::info!(host = %peer.host.name, "peer host removed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_are_plain_http_with_a_host() {
        assert!(check_api_url("http://192.0.2.2:8080").is_ok());
        assert!(check_api_url("http://b.example/").is_ok());
        for bad in [
            "https://192.0.2.2",
            "192.0.2.2:8080",
            "http://",
            "http:///x",
            "http://a b",
        ] {
            assert!(check_api_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_peer_refusal_keeps_its_meaning() {
        let refused = |code| PeerError::Refused {
            host: "b".into(),
            status: 409,
            code,
            message: "overlaps".into(),
        };
        assert_eq!(
            peer_failed(refused(Some(ErrorCode::Conflict))).0.error.code,
            ErrorCode::Conflict
        );
        assert_eq!(
            peer_failed(refused(Some(ErrorCode::Internal))).0.error.code,
            ErrorCode::PeerFailed
        );
        let down = PeerError::Unreachable {
            host: "b".into(),
            url: "http://b".into(),
            message: "refused".into(),
        };
        let err = peer_failed(down);
        assert_eq!(err.0.error.code, ErrorCode::PeerFailed);
        assert!(
            err.0.error.message.contains("host 'b'"),
            "{}",
            err.0.error.message
        );
    }
}
