//! `/v1/vms/{id}/migration`: moves a running VM to another host without
//! stopping it (`service::migrations` drives it). The handlers parse,
//! authorize and call one service function.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, Migration, MigrationCreate};

use super::responses::{Authenticated, Invalid};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::migrations;

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/vms/{id}/migration",
        get(show).post(create).delete(cancel),
    )
}

create_handler!(caller create, "/v1/vms/{id}/migration", "vms", "id" = "the VM's id (or name)",
    MigrationCreate, 202 "started; GET shows its progress", Migration, async migrations::start,
    Invalid, Authenticated,
    (status = 404, description = "no such VM (or another tenant's)", body = ApiError),
    (status = 409, description = "the VM is not running, a migration runs, or the destination does not carry its networks", body = ApiError),
    (status = 422, description = "this host has no underlay, or no host of that name", body = ApiError));

show_handler!(caller show, "/v1/vms/{id}/migration", "vms", "id" = "the VM's id",
    "the VM's last migration from this host", Migration, sync migrations::show, Authenticated,
    (status = 404, description = "no migration of this VM from this host", body = ApiError));

delete_handler!(caller cancel, "/v1/vms/{id}/migration", "vms", "id" = "the VM's id (or name)",
    "cancelled: the VM runs on here (or, for the operator, a hand-over that an agent stopped in the middle of is forgotten: the VM may start here again)",
    async migrations::cancel, Authenticated,
    (status = 404, description = "no such VM (or another tenant's)", body = ApiError),
    (status = 403, description = "a hand-over left by a stopped agent: operator only", body = ApiError),
    (status = 409, description = "no migration runs", body = ApiError));
