//! `/v1/services`: a tenant's services (cluster mode): roles whose
//! instances the controller keeps at their count, spread over fault
//! domains, replaced when unhealthy or lost, upgraded one update domain
//! at a time.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use nubis_api::{ApiError, RoleRollback, RoleScale, RoleUpgrade, Service, ServiceCreate};

use super::responses::{Authenticated, Invalid, TenantOnly};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::services;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/services", get(list).post(create))
        .route("/v1/services/{id}", get(show).delete(remove))
        .route("/v1/services/{id}/scale", post(scale))
        .route("/v1/services/{id}/upgrade", post(upgrade))
        .route("/v1/services/{id}/rollback", post(rollback))
}

create_handler!(tenant create, "/v1/services", "services", ServiceCreate,
    201 "defined; the controller makes its instances", Service, async services::create,
    Invalid, TenantOnly,
    (status = 409, description = "the name exists", body = ApiError),
    (status = 422, description = "no such image or network, or the host is standalone", body = ApiError),
    (status = 429, description = "the instances would exceed the tenant's quota", body = ApiError));

list_handler!(caller list, "/v1/services", "services",
    "the caller's services (all for the operator)", Service, async services::list,
    Authenticated);

show_handler!(caller show, "/v1/services/{id}", "services", "id" = "id (or name)",
    "the service, its roles' instances and rollouts", Service, async services::get, Authenticated,
    (status = 404, description = "no such service (or another tenant's)", body = ApiError));

delete_handler!(caller remove, "/v1/services/{id}", "services", "id" = "id (or name)",
    "deleted; the controller retires its instances", async services::delete, Authenticated,
    (status = 404, description = "no such service (or another tenant's)", body = ApiError));

create_handler!(caller scale, "/v1/services/{id}/scale", "services", "id" = "id (or name)",
    RoleScale, 202 "the role's count is set; the controller adds or retires instances", Service,
    async services::scale, Invalid, Authenticated,
    (status = 404, description = "no such service (or another tenant's)", body = ApiError),
    (status = 422, description = "no such role", body = ApiError),
    (status = 429, description = "the instances would exceed the tenant's quota", body = ApiError));

create_handler!(caller upgrade, "/v1/services/{id}/upgrade", "services", "id" = "id (or name)",
    RoleUpgrade, 202 "a new revision; its rollout started", Service,
    async services::upgrade, Invalid, Authenticated,
    (status = 404, description = "no such service (or another tenant's)", body = ApiError),
    (status = 409, description = "the role is at that already", body = ApiError),
    (status = 422, description = "no such role or image", body = ApiError),
    (status = 429, description = "the instances would exceed the tenant's quota", body = ApiError));

create_handler!(caller rollback, "/v1/services/{id}/rollback", "services", "id" = "id (or name)",
    RoleRollback, 202 "back to the revision before; its rollout started", Service,
    async services::rollback, Invalid, Authenticated,
    (status = 404, description = "no such service (or another tenant's)", body = ApiError),
    (status = 409, description = "the role has no earlier revision", body = ApiError),
    (status = 422, description = "no such role", body = ApiError));
