//! `/v1/snapshots` and `POST /v1/vms/{id}/snapshots`: a tenant's snapshots
//! of its VMs, taken without stopping them, and restored into new VMs that
//! resume where the snapshot was taken.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use nubis_api::{ApiError, ErrorCode, Snapshot, SnapshotRestore, Vm};

use super::{vms, AppState, Body, Caller, HttpError, Path, Result};
use crate::supervisor::networking::nic_address;
use crate::validate;

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
        (status = 401, description = "no or unknown token", body = ApiError),
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
    let vm = vms::find(&state, &caller, &id)?;
    let _guard = state.supervisor.lock(&vm.id).await;
    let vm = vms::find(&state, &caller, &vm.id)?;
    check_quota(&state, &vm)?;
    let snapshot_id = state.store.new_snapshot_id()?;
    let size = state.supervisor.snapshot(&vm, &snapshot_id).await?;
    // Files without a record are swept at the agent's next start.
    crate::crash::point("snapshot_written");
    let snapshot = match state.store.record_snapshot(&snapshot_id, &vm, size) {
        Ok(snapshot) => snapshot,
        Err(err) => {
            state.supervisor.remove_snapshot_files(&snapshot_id)?;
            return Err(err.into());
        }
    };
    tracing::info!(vm = %vm.id, snapshot = %snapshot.id, size, "snapshot taken");
    Ok((StatusCode::CREATED, Json(snapshot)))
}

/// A snapshot takes one of the tenant's snapshots and, at most, the VM's
/// memory and disks of its storage.
fn check_quota(state: &AppState, vm: &nubis_api::Vm) -> Result<()> {
    let quota = state
        .store
        .get_tenant(&vm.tenant_id)?
        .ok_or_else(|| HttpError::new(ErrorCode::NotFound, "the VM's tenant is gone"))?
        .quota;
    let kept = state.store.count_snapshots(&vm.tenant_id)?;
    if kept >= quota.max_snapshots {
        return Err(crate::store::StoreError::Quota(format!(
            "snapshots: {kept} kept + 1 requested exceeds the tenant's quota of {}",
            quota.max_snapshots
        ))
        .into());
    }
    let root_mib = state
        .store
        .get_image(&vm.tenant_id, &vm.image_id)?
        .map_or(0, |image| crate::quota::mib_of(image.rootfs_bytes));
    let asked = vm.memory_mib + root_mib + vm.disks.iter().map(|disk| disk.size_mib).sum::<u64>();
    crate::quota::check_storage(&state.store, &state.data_dir, &vm.tenant_id, &quota, asked)?;
    let reserve = state.supervisor.config().reserved_disk_mib;
    crate::quota::check_host_space(&state.data_dir, reserve, asked)?;
    Ok(())
}

#[utoipa::path(
    get,
    path = "/v1/snapshots",
    tag = "snapshots",
    responses(
        (status = 200, description = "the caller's snapshots (all for the operator)", body = Vec<Snapshot>),
        (status = 401, description = "no or unknown token", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Snapshot>>> {
    Ok(Json(state.store.list_snapshots(caller.scope())?))
}

fn find(state: &AppState, caller: &Caller, id: &str) -> Result<crate::store::SavedVm> {
    state
        .store
        .get_snapshot(caller.scope(), id)?
        .ok_or_else(|| HttpError::not_found("snapshot", id))
}

#[utoipa::path(
    get,
    path = "/v1/snapshots/{id}",
    tag = "snapshots",
    params(("id" = String, Path, description = "the snapshot's id")),
    responses(
        (status = 200, description = "success", body = Snapshot),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such snapshot (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Snapshot>> {
    Ok(Json(find(&state, &caller, &id)?.snapshot))
}

#[utoipa::path(
    delete,
    path = "/v1/snapshots/{id}",
    tag = "snapshots",
    params(("id" = String, Path, description = "the snapshot's id")),
    responses(
        (status = 204, description = "deleted with its files"),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such snapshot (or another tenant's)", body = ApiError),
        (status = 409, description = "a VM restored from it has not started yet", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let saved = find(&state, &caller, &id)?;
    let waiting: Vec<String> = state
        .store
        .list_vms(Some(&saved.snapshot.tenant_id), None)?
        .into_iter()
        .filter(|vm| vm.restore_from.as_deref() == Some(id.as_str()))
        .map(|vm| vm.name)
        .collect();
    if !waiting.is_empty() {
        return Err(HttpError::new(
            ErrorCode::Conflict,
            format!(
                "VM(s) {} resume from snapshot {id} at their first start: start or delete them first",
                waiting.join(", ")
            ),
        ));
    }
    state.store.delete_snapshot(&id)?;
    state.supervisor.remove_snapshot_files(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/snapshots/{id}/restore",
    tag = "snapshots",
    params(("id" = String, Path, description = "the snapshot's id")),
    request_body = SnapshotRestore,
    responses(
        (status = 201, description = "a new, stopped VM that resumes from the snapshot when started", body = Vm),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError),
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
    let tenant_id = caller.tenant()?.to_string();
    validate::name("name", &request.name, false)?;
    let saved = find(&state, &caller, &id)?;
    if state
        .store
        .get_image(&tenant_id, &saved.vm.image_id)?
        .is_none()
    {
        return Err(HttpError::new(
            ErrorCode::Unprocessable,
            format!("the snapshot's image {} is gone", saved.vm.image_id),
        ));
    }
    let tenant = state
        .store
        .get_tenant(&tenant_id)?
        .ok_or_else(|| HttpError::new(ErrorCode::Unauthorized, "the token's tenant is gone"))?;
    // The guest's memory holds its NICs' MACs and addresses: the new VM
    // keeps them, so no other VM may hold them.
    let network_lock = state.supervisor.network_lock().await;
    let others = state.store.list_vms(Some(&tenant_id), None)?;
    for nic in &saved.vm.nics {
        let holder = others.iter().find(|vm| {
            vm.nics.iter().any(|other| {
                (nic.mac.is_some() && other.mac == nic.mac)
                    || (other.network == nic.network
                        && nic.address.as_deref().and_then(nic_address).is_some()
                        && other.address.as_deref().and_then(nic_address)
                            == nic.address.as_deref().and_then(nic_address))
            })
        });
        if let Some(holder) = holder {
            return Err(HttpError::new(
                ErrorCode::Conflict,
                format!(
                    "VM {} holds the MAC or address of the snapshot's NIC ({}): delete it first",
                    holder.name,
                    nic.address.as_deref().unwrap_or("?")
                ),
            ));
        }
    }
    let mut new = saved.vm.clone();
    new.name = request.name;
    new.restore_from = Some(id.clone());
    let vm = state.store.create_vm(&new, tenant.quota)?;
    state
        .store
        .add_event(&vm.id, "created", &format!("restored from snapshot {id}"))?;
    drop(network_lock);
    if !vm.nics.is_empty() {
        if let Err(err) = state.supervisor.reconcile_network().await {
            state.store.delete_vm(&vm.id)?;
            return Err(err.into());
        }
    }
    Ok((StatusCode::CREATED, Json(vm)))
}
