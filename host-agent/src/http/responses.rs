//! The error responses many endpoints share, as utoipa response sets
//! (`responses((status = 200, ...), TenantResource)`): one description per
//! meaning, so that the OpenAPI document says the same thing the same way
//! everywhere and a handler lists only what is its own.
//!
//! Why types that are never built: utoipa reads their `#[response]`
//! attributes only; the handlers answer with `HttpError` as ever.
#![allow(dead_code)]

use nubis_api::ApiError;
use utoipa::IntoResponses;

/// Any authenticated endpoint.
#[derive(IntoResponses)]
pub enum Authenticated {
    #[response(status = 401, description = "no or unknown token")]
    Unauthorized(ApiError),
}

/// An endpoint about one of the caller's resources.
#[derive(IntoResponses)]
pub enum TenantResource {
    #[response(status = 401, description = "no or unknown token")]
    Unauthorized(ApiError),
    #[response(status = 404, description = "no such resource (or another tenant's)")]
    NotFound(ApiError),
}

/// An endpoint for a tenant's token: what it creates is the tenant's, and
/// the operator owns nothing.
#[derive(IntoResponses)]
pub enum TenantOnly {
    #[response(status = 401, description = "no or unknown token")]
    Unauthorized(ApiError),
    #[response(status = 403, description = "operator token")]
    Forbidden(ApiError),
}

/// A change of one of the caller's resources that its state may forbid.
#[derive(IntoResponses)]
pub enum TenantChange {
    #[response(status = 401, description = "no or unknown token")]
    Unauthorized(ApiError),
    #[response(status = 404, description = "no such resource (or another tenant's)")]
    NotFound(ApiError),
    #[response(status = 409, description = "wrong state or already exists")]
    Conflict(ApiError),
}

/// An action that needs the VM's files (its disks, its image's).
#[derive(IntoResponses)]
pub enum CannotBeDone {
    #[response(status = 422, description = "cannot be done (e.g. a missing file)")]
    Unprocessable(ApiError),
}

/// A body or query that may be malformed.
#[derive(IntoResponses)]
pub enum Invalid {
    #[response(status = 400, description = "invalid input")]
    InvalidInput(ApiError),
}

/// An operator-only endpoint.
#[derive(IntoResponses)]
pub enum OperatorOnly {
    #[response(status = 401, description = "no or unknown token")]
    Unauthorized(ApiError),
    #[response(status = 403, description = "operator only")]
    Forbidden(ApiError),
}

/// An operator-only endpoint that asks the cluster (etcd).
#[derive(IntoResponses)]
pub enum ClusterCall {
    #[response(status = 401, description = "no or unknown token")]
    Unauthorized(ApiError),
    #[response(status = 403, description = "operator only")]
    Forbidden(ApiError),
    #[response(status = 503, description = "etcd cannot be reached")]
    Unavailable(ApiError),
}

/// An operator-only endpoint about one tenant.
#[derive(IntoResponses)]
pub enum OperatorResource {
    #[response(status = 401, description = "no or unknown token")]
    Unauthorized(ApiError),
    #[response(status = 403, description = "operator only")]
    Forbidden(ApiError),
    #[response(status = 404, description = "no such resource (or another tenant's)")]
    NotFound(ApiError),
}

/// A host-to-host endpoint that a peer calls on its own behalf.
#[derive(IntoResponses)]
pub enum PeerOnly {
    #[response(
        status = 403,
        description = "not a registered peer over mutual TLS, or a peer acting for another"
    )]
    Forbidden(ApiError),
}
