//! `/v1/snapshots` and `POST /v1/vms/{id}/snapshots`: a tenant's snapshots
//! of its VMs, taken without stopping them, and restored into new VMs that
//! resume where the snapshot was taken.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use nubis_api::{ApiError, Snapshot, SnapshotClones, SnapshotClonesMade, SnapshotRestore, Vm};

use super::responses::{Authenticated, Invalid, TenantOnly};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::snapshots;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/vms/{id}/snapshots", post(create))
        .route("/v1/snapshots", get(list))
        .route("/v1/snapshots/{id}", get(show).delete(remove))
        .route("/v1/snapshots/{id}/restore", post(restore))
        .route("/v1/snapshots/{id}/clones", post(clones))
}

create_handler!(caller create, "/v1/vms/{id}/snapshots", "snapshots",
    "id" = "the VM's id (or name)", 201 "taken; the VM runs on (or stays paused)", Snapshot,
    async snapshots::create, Authenticated,
    (status = 404, description = "no such VM (or another tenant's)", body = ApiError),
    (status = 409, description = "the VM is not running or paused", body = ApiError),
    (status = 429, description = "the tenant's snapshot or storage quota is used up", body = ApiError),
    (status = 507, description = "the host's disk would go below its reserve", body = ApiError));

list_handler!(caller list, "/v1/snapshots", "snapshots",
    "the caller's snapshots (all for the operator)", Snapshot, async snapshots::list,
    Authenticated);

show_handler!(caller show, "/v1/snapshots/{id}", "snapshots", "id" = "the snapshot's id",
    "success", Snapshot, async snapshots::get, Authenticated,
    (status = 404, description = "no such snapshot (or another tenant's)", body = ApiError));

delete_handler!(caller remove, "/v1/snapshots/{id}", "snapshots", "id" = "the snapshot's id",
    "deleted with its files", async snapshots::delete, Authenticated,
    (status = 404, description = "no such snapshot (or another tenant's)", body = ApiError),
    (status = 409, description = "a VM restored from it has not started yet", body = ApiError));

create_handler!(tenant restore, "/v1/snapshots/{id}/restore", "snapshots",
    "id" = "the snapshot's id", SnapshotRestore, 201 "a new, stopped VM that resumes from the snapshot when started", Vm,
    async snapshots::restore, Invalid, TenantOnly,
    (status = 404, description = "no such snapshot (or another tenant's)", body = ApiError),
    (status = 409, description = "the name exists, or another VM holds the snapshot's MAC or address", body = ApiError),
    (status = 422, description = "the snapshot's image is gone", body = ApiError),
    (status = 429, description = "quota exceeded", body = ApiError));

create_handler!(tenant clones, "/v1/snapshots/{id}/clones", "snapshots",
    "id" = "the snapshot's id", &SnapshotClones, 201 "the clones, started", SnapshotClonesMade,
    async snapshots::clones, Invalid, TenantOnly,
    (status = 404, description = "no such snapshot (or another tenant's)", body = ApiError),
    (status = 409, description = "a clone's name exists, or the host is cordoned", body = ApiError),
    (status = 422, description = "the snapshot's image is gone, or a NIC is on a network this host does not hold", body = ApiError),
    (status = 429, description = "quota exceeded, or no free address left", body = ApiError));
