//! `/v1/snapshots` and `POST /v1/vms/{id}/snapshots`: a tenant's snapshots
//! of its VMs, taken without stopping them, and restored into new VMs that
//! resume where the snapshot was taken.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use nubis_api::{ApiError, Snapshot, SnapshotRestore, Vm};

use super::responses::{Authenticated, Invalid};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::snapshots;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/vms/{id}/snapshots", post(create))
        .route("/v1/snapshots", get(list))
        .route("/v1/snapshots/{id}", get(show).delete(remove))
        .route("/v1/snapshots/{id}/restore", post(restore))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{id}/snapshots",
    tag = "snapshots",
    params(("id" = String, Path, description = "the VM's id (or name)")),
    responses(
        (status = 201, description = "taken; the VM runs on (or stays paused)", body = Snapshot),
        Authenticated,
        (status = 404, description = "no such VM (or another tenant's)", body = ApiError),
        (status = 409, description = "the VM is not running or paused", body = ApiError),
        (status = 429, description = "the tenant's snapshot or storage quota is used up", body = ApiError),
        (status = 507, description = "the host's disk would go below its reserve", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Snapshot>)> {
    let snapshot = snapshots::create(&state.services, caller.service_scope(), &id).await?;
    Ok((StatusCode::CREATED, Json(snapshot)))
}

list_handler!(caller list, "/v1/snapshots", "snapshots",
    "the caller's snapshots (all for the operator)", Snapshot, sync snapshots::list,
    Authenticated);

show_handler!(caller show, "/v1/snapshots/{id}", "snapshots", "id" = "the snapshot's id",
    "success", Snapshot, sync snapshots::get, Authenticated,
    (status = 404, description = "no such snapshot (or another tenant's)", body = ApiError));

delete_handler!(caller remove, "/v1/snapshots/{id}", "snapshots", "id" = "the snapshot's id",
    "deleted with its files", sync snapshots::delete, Authenticated,
    (status = 404, description = "no such snapshot (or another tenant's)", body = ApiError),
    (status = 409, description = "a VM restored from it has not started yet", body = ApiError));

#[utoipa::path(
    post,
    path = "/v1/snapshots/{id}/restore",
    tag = "snapshots",
    params(("id" = String, Path, description = "the snapshot's id")),
    request_body = SnapshotRestore,
    responses(
        (status = 201, description = "a new, stopped VM that resumes from the snapshot when started", body = Vm),
        Invalid,
        Authenticated,
        (status = 403, description = "operator token", body = ApiError),
        (status = 404, description = "no such snapshot (or another tenant's)", body = ApiError),
        (status = 409, description = "the name exists, or another VM holds the snapshot's MAC or address", body = ApiError),
        (status = 422, description = "the snapshot's image is gone", body = ApiError),
        (status = 429, description = "quota exceeded", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn restore(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(request): Body<SnapshotRestore>,
) -> Result<(StatusCode, Json<Vm>)> {
    let tenant_id = caller.tenant()?;
    let vm = snapshots::restore(&state.services, tenant_id, &id, request).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}
