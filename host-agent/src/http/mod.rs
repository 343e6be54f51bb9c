//! The REST API under `/v1`, one file per resource. Every request is
//! authenticated (`Caller`); bodies are strict JSON (`Body`), and every
//! failure is the one JSON error shape of `nubis_api::ApiError`, with the
//! field at fault named for bad input. A tenant asking for another
//! tenant's resource gets 404, exactly as for one that does not exist.
//!
//! Why every failure, axum's own included: clients are written against
//! the OpenAPI document (and checked against it by Schemathesis, see
//! scripts/schemathesis.sh), which promises that shape for every error.
//! Path and query rejections come through [`Path`] and [`Query`], which
//! name the parameter; whatever else axum or hyper answers with a plain
//! body (a 405 for a method a route lacks, a body over the limit) is
//! rewritten by [`json_errors`], keeping its status and headers (`Allow`).

#[macro_use]
mod handlers;
mod errors;
mod forward;
mod hosts;
mod peers;
pub use peers::refresh_registry;
mod images;
pub mod metrics;
mod migrations;
mod networks;
pub mod openapi;
mod overlay;
mod port_forwards;
mod responses;
pub mod server;
mod services;
mod snapshots;
mod ssh_keys;
mod system;
mod tenants;
mod uploads;
mod vms;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use nubis_api::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;

use crate::auth::{authenticate, AuthError, OperatorToken, Principal};
use crate::service::{Scope, Services};
use crate::store::Store;
use crate::supervisor::Supervisor;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub supervisor: Arc<Supervisor>,
    pub operator: Arc<OperatorToken>,
    /// Where image files may come from.
    pub image_dirs: Arc<Vec<std::path::PathBuf>>,
    pub metrics: Arc<metrics::ApiMetrics>,
    pub data_dir: std::path::PathBuf,
    /// Calls to peer hosts.
    pub peers: Arc<crate::peers::PeerClient>,
    /// The registered peers' certificates, as the TLS layer checks them.
    pub peer_registry: Arc<crate::peer_tls::PeerRegistry>,
    /// This host's certificate fingerprint.
    pub fingerprint: Arc<String>,
    /// The domain logic the handlers call.
    pub services: Services,
}

/// What the peer listener serves: the host-to-host API (`overlay`), and
/// in a cluster the whole API for requests other members forward to the
/// host where their VM lives (`forward.rs`; each is authenticated here by
/// its own bearer token, as if it came straight from the client).
pub fn peer_router(state: AppState) -> Router {
    if state.services.cluster.is_some() {
        return router(state);
    }
    Router::new()
        .merge(overlay::routes())
        .fallback(|| async { HttpError(ApiError::new(ErrorCode::NotFound, "no such endpoint")) })
        .with_state(state)
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(system::routes())
        .merge(tenants::routes())
        .merge(images::routes())
        .merge(vms::routes())
        .merge(metrics::routes())
        .merge(uploads::routes())
        .merge(networks::routes())
        .merge(port_forwards::routes())
        .merge(ssh_keys::routes())
        .merge(hosts::routes())
        .merge(peers::routes())
        .merge(snapshots::routes())
        .merge(services::routes())
        .merge(migrations::routes())
        .merge(overlay::routes())
        .fallback(|| async { HttpError(ApiError::new(ErrorCode::NotFound, "no such endpoint")) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forward::to_owner,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(state)
}

/// An API error as an HTTP response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl HttpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ApiError::new(code, message))
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("no {what} '{id}'"))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.error.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!("request failed: {}", self.0.error.message);
        }
        (status, Json(self.0)).into_response()
    }
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

pub type Result<T> = std::result::Result<T, HttpError>;

/// The authenticated caller of a request.
pub struct Caller(pub Principal);

impl Caller {
    /// The tenant whose resources the caller sees; None for the operator,
    /// who sees every tenant's.
    pub fn scope(&self) -> Option<&str> {
        match &self.0 {
            Principal::Operator => None,
            Principal::Tenant(id) => Some(id),
        }
    }

    /// What the caller sees, for the services.
    pub fn service_scope(&self) -> Scope<'_> {
        match &self.0 {
            Principal::Operator => Scope::Operator,
            Principal::Tenant(id) => Scope::Tenant(id),
        }
    }

    /// For a check that depends on the request: most operator-only
    /// endpoints take [`Operator`] instead.
    pub fn require_operator(&self) -> Result<()> {
        match self.0 {
            Principal::Operator => Ok(()),
            Principal::Tenant(_) => Err(HttpError::new(
                ErrorCode::Forbidden,
                "this endpoint is for the operator",
            )),
        }
    }

    /// The caller's tenant, for creating resources.
    pub fn tenant(&self) -> Result<&str> {
        self.scope().ok_or_else(|| {
            HttpError::new(
                ErrorCode::Forbidden,
                "images and VMs are created with a tenant's token, not the operator's",
            )
        })
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        if forward::vouched_operator(state, parts) {
            return Ok(Caller(Principal::Operator));
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        authenticate_request(state, header).await.map(Caller)
    }
}

/// Resolves a request's `Authorization` header. In a cluster, a token
/// this host has not mirrored yet (made a moment ago through another
/// member) is looked up in etcd before it is refused, so a tenant's new
/// token works on every member as soon as its creation returned.
pub async fn authenticate_request(state: &AppState, header: Option<&str>) -> Result<Principal> {
    let refused = |err: AuthError| match err {
        AuthError::Store(err) => HttpError::from(err),
        err => HttpError::new(ErrorCode::Unauthorized, err.to_string()),
    };
    match authenticate(&state.operator, &state.store, header) {
        Err(AuthError::Unknown) => {}
        known => return known.map_err(refused),
    }
    let token = header
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    if let (Some(cluster), Some(token)) = (state.services.cluster.as_ref(), token) {
        if cluster.catch_up_token(token).await? {
            return authenticate(&state.operator, &state.store, header).map_err(refused);
        }
    }
    Err(refused(AuthError::Unknown))
}

/// The operator, for operator-only endpoints: a tenant's token is a 403
/// before anything else of the request (its body included) is looked at.
pub struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        match Caller::from_request_parts(parts, state).await?.0 {
            Principal::Operator => Ok(Operator),
            Principal::Tenant(_) => Err(HttpError::new(
                ErrorCode::Forbidden,
                "this endpoint is for the operator",
            )),
        }
    }
}

/// A registered peer host calling over the peer listener (mutual TLS):
/// the host-to-host endpoints take nothing else, not even the operator.
pub struct PeerCaller {
    pub name: String,
    /// Its underlay address, as registered.
    pub address: String,
}

impl PeerCaller {
    /// Refuses a request in which the peer speaks for another host
    /// (`claimed`, in `field`, must be its own address).
    pub fn acts_as(&self, field: &str, claimed: &str) -> Result<()> {
        if claimed == self.address {
            return Ok(());
        }
        Err(HttpError(ApiError {
            error: nubis_api::error::ErrorBody {
                code: ErrorCode::Forbidden,
                message: format!(
                    "peer '{}' ({}) cannot act for {claimed}",
                    self.name, self.address
                ),
                field: Some(field.to_string()),
            },
        }))
    }
}

impl FromRequestParts<AppState> for PeerCaller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let refused = || {
            HttpError::new(
                ErrorCode::Forbidden,
                "this endpoint is for registered peer hosts, over mutual TLS on the peer port",
            )
        };
        let Some(crate::peer_tls::PeerHost(name)) = parts.extensions.get().cloned() else {
            return Err(refused());
        };
        let peer = state
            .services
            .peer_directory
            .get(&name)?
            .ok_or_else(refused)?;
        Ok(PeerCaller {
            name,
            address: peer.host.address,
        })
    }
}

/// Rewrites an error response whose body is not JSON (axum's 405 for a
/// method a route lacks, its plain-text rejections) into the API's error
/// shape, with the code of its status; status and headers stay.
async fn json_errors(request: Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Its text is the best message there is; bounded, as any body read.
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let code = error_code_of(status);
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_lowercase()
    } else {
        text
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&ApiError::new(code, message)).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The error code of an HTTP status that axum chose; one the API has no
/// code for is an `invalid_input` (a 4xx) or `internal` (a 5xx).
fn error_code_of(status: StatusCode) -> ErrorCode {
    [
        ErrorCode::InvalidInput,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::Unprocessable,
        ErrorCode::QuotaExceeded,
        ErrorCode::Internal,
        ErrorCode::PeerFailed,
        ErrorCode::HostFull,
    ]
    .into_iter()
    .find(|code| code.http_status() == status.as_u16())
    .unwrap_or(if status.is_server_error() {
        ErrorCode::Internal
    } else {
        ErrorCode::InvalidInput
    })
}

/// Path parameters; one that does not decode (bad percent-encoding, not
/// UTF-8, not of its type) is a 400 in the API's error shape.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(HttpError::new(
                ErrorCode::InvalidInput,
                rejection.body_text(),
            )),
        }
    }
}

/// Query parameters, strict like bodies: an unknown or ill-typed one is a
/// 400 naming it.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => {
                let message = rejection.body_text();
                let mut error = ApiError::new(ErrorCode::InvalidInput, message.clone());
                error.error.field = rejected_field(&message);
                Err(HttpError(error))
            }
        }
    }
}

/// A strict JSON body; a bad one is a 400 naming the field when serde does.
/// A number with no fraction is an integer wherever one is due (`2.0` for
/// 2): JSON has one number type, and JSON Schema's `integer` is any number
/// without a fraction, so a client may send either.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, state: &S) -> Result<Self> {
        let value = match Json::<serde_json::Value>::from_request(request, state).await {
            Ok(Json(value)) => whole_numbers_as_integers(value),
            Err(rejection) => return Err(json_rejection(rejection)),
        };
        serde_path_to_error::deserialize(value)
            .map(Body)
            .map_err(|err| {
                let message =
                    format!("Failed to deserialize the JSON body into the target type: {err}");
                let mut error = ApiError::new(ErrorCode::InvalidInput, message.clone());
                error.error.field = rejected_field(&message);
                HttpError(error)
            })
    }
}

/// `value` with every number that has no fraction (and fits a double
/// exactly) as an integer.
fn whole_numbers_as_integers(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    /// 2^53: beyond it a double no longer holds every integer.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(number) if number.is_f64() => match number.as_f64() {
            Some(float) if float.fract() == 0.0 && float.abs() <= EXACT => {
                if float >= 0.0 {
                    Value::from(float as u64)
                } else {
                    Value::from(float as i64)
                }
            }
            _ => Value::Number(number),
        },
        Value::Array(items) => {
            Value::Array(items.into_iter().map(whole_numbers_as_integers).collect())
        }
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(key, value)| (key, whole_numbers_as_integers(value)))
                .collect(),
        ),
        other => other,
    }
}

fn json_rejection(rejection: JsonRejection) -> HttpError {
    let message = rejection.body_text();
    let mut error = ApiError::new(ErrorCode::InvalidInput, message.clone());
    error.error.field = rejected_field(&message);
    HttpError(error)
}

/// The field a serde error is about, with its path: "nics[0].mac" for
/// "...: nics[0]: unknown field `mac`, expected ...", "nics[0].network"
/// for "...: nics[0].network: invalid type: ...", "name" for "missing
/// field `name`".
fn rejected_field(message: &str) -> Option<String> {
    // axum: "Failed to deserialize the JSON body into the target type: "
    // (or "Failed to deserialize query string: ") then
    // serde_path_to_error's "PATH: ERROR" (no path at the top level).
    let detail = ["target type: ", "query string: "]
        .iter()
        .find_map(|prefix| message.split_once(prefix).map(|(_, rest)| rest))
        .unwrap_or(message);
    let (path, error) = match detail.split_once(": ") {
        Some((path, error)) if !path.contains(' ') && path != "." => (Some(path), error),
        _ => (None, detail),
    };
    // serde_path_to_error's path already ends with an unknown field's name.
    let named = error
        .strip_prefix("unknown field `")
        .or_else(|| error.strip_prefix("missing field `"))
        .and_then(|rest| rest.split('`').next());
    match (path, named) {
        (Some(path), Some(field)) if path == field || path.ends_with(&format!(".{field}")) => {
            Some(path.to_string())
        }
        (Some(path), Some(field)) => Some(format!("{path}.{field}")),
        (None, Some(field)) => Some(field.to_string()),
        (Some(path), None) => Some(path.to_string()),
        (None, None) => None,
    }
}

#[cfg(test)]
mod router_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_are_integers() {
        let value = serde_json::json!({"a": 2.0, "b": [-3.0, 1.5], "c": 1e300, "d": "4.0"});
        assert_eq!(
            whole_numbers_as_integers(value),
            serde_json::json!({"a": 2, "b": [-3, 1.5], "c": 1e300, "d": "4.0"})
        );
    }

    #[test]
    fn rejections_name_the_field_with_its_path() {
        let prefix = "Failed to deserialize the JSON body into the target type: ";
        for (message, field) in [
            ("nics[0]: unknown field `mac`, expected `rate_limit` or `network` at line 1 column 40", Some("nics[0].mac")),
            ("nics[0].mac: unknown field `mac`, expected `rate_limit` or `network` at line 1 column 40", Some("nics[0].mac")),
            ("quota.max_vms: invalid type: string \"x\", expected u32 at line 1 column 9", Some("quota.max_vms")),
            ("missing field `name` at line 1 column 2", Some("name")),
            ("unknown field `cpus`, expected one of ... at line 1 column 9", Some("cpus")),
            ("nics[1].network: invalid type: integer `3`, expected a string at line 1 column 60", Some("nics[1].network")),
            ("vcpus: invalid value: integer `-1`, expected u32 at line 1 column 12", Some("vcpus")),
            ("expected value at line 1 column 1", None),
        ] {
            assert_eq!(rejected_field(&format!("{prefix}{message}")).as_deref(), field, "{message}");
        }
        assert_eq!(
            rejected_field("Failed to parse the request body as JSON: EOF while parsing"),
            None
        );
    }
}
