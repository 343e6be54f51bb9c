//! The REST API under `/v1`, one file per resource. Every request is
//! authenticated (`Caller`); bodies are strict JSON (`Body`), and every
//! failure is the one JSON error shape of `nubis_api::ApiError`, with the
//! field at fault named for bad input. A tenant asking for another
//! tenant's resource gets 404, exactly as for one that does not exist.

mod hosts;
mod images;
pub mod metrics;
mod migrations;
mod networks;
pub mod openapi;
mod overlay;
mod port_forwards;
mod snapshots;
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
use crate::store::{Store, StoreError};
use crate::supervisor::{Supervisor, SupervisorError};

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
    /// Migrations this host drives.
    pub migrations: Arc<migrations::Migrations>,
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
        .merge(hosts::routes())
        .merge(snapshots::routes())
        .merge(migrations::routes())
        .merge(overlay::routes())
        .fallback(|| async { HttpError(ApiError::new(ErrorCode::NotFound, "no such endpoint")) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
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

impl From<StoreError> for HttpError {
    fn from(error: StoreError) -> Self {
        let code = match &error {
            StoreError::Exists(_) | StoreError::InUse(_) => ErrorCode::Conflict,
            StoreError::Quota(_) => ErrorCode::QuotaExceeded,
            _ => ErrorCode::Internal,
        };
        Self::new(code, error.to_string())
    }
}

impl From<SupervisorError> for HttpError {
    fn from(error: SupervisorError) -> Self {
        let code = match &error {
            SupervisorError::WrongState(_) | SupervisorError::MigratedAway(_) => {
                ErrorCode::Conflict
            }
            SupervisorError::VmFiles(crate::supervisor::vmfs::VmFsError::Unsafe { .. }) => {
                ErrorCode::Conflict
            }
            SupervisorError::StartFailed(_) | SupervisorError::Disk(_) => ErrorCode::Unprocessable,
            SupervisorError::Store(StoreError::Quota(_)) => ErrorCode::QuotaExceeded,
            SupervisorError::NoUnderlay(_) => ErrorCode::Unprocessable,
            _ => ErrorCode::Internal,
        };
        Self::new(code, error.to_string())
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

    /// The caller's tenant, for creating resources.
    pub fn tenant(&self) -> Result<&str> {
        self.scope().ok_or_else(|| {
            HttpError::new(
                ErrorCode::Forbidden,
                "images and VMs are created with a tenant's token, not the operator's",
            )
        })
    }

    pub fn require_operator(&self) -> Result<()> {
        match self.0 {
            Principal::Operator => Ok(()),
            Principal::Tenant(_) => Err(HttpError::new(
                ErrorCode::Forbidden,
                "this endpoint is for the operator",
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        match authenticate(&state.operator, &state.store, header) {
            Ok(principal) => Ok(Caller(principal)),
            Err(AuthError::Store(err)) => Err(err.into()),
            Err(err) => Err(HttpError::new(ErrorCode::Unauthorized, err.to_string())),
        }
    }
}

/// A strict JSON body; a bad one is a 400 naming the field when serde does.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, state: &S) -> Result<Self> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> HttpError {
    let message = rejection.body_text();
    let mut error = ApiError::new(ErrorCode::InvalidInput, message.clone());
    // serde names the field in backquotes: "missing field `name`",
    // "unknown field `cpus`"; a type error says "at line ... column".
    if let Some(field) = message.split('`').nth(1) {
        error.error.field = Some(field.to_string());
    }
    HttpError(error)
}
