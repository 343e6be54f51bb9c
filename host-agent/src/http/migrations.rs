//! `/v1/vms/{id}/migration`: moves a running VM to another host without
//! stopping it. This host drives it: the destination agent prepares the VM
//! and a VMM that waits (`/v1/overlay/migrations`), this host's VMM sends
//! RAM, disks and state (see `vmm/src/migration`), and once the destination
//! runs the guest the VM is gone from here. Until then a failure leaves
//! the VM running here and nothing on the destination.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, ErrorCode, IncomingMigration, Migration, MigrationCreate, Vm, VmState};

use super::errors::peer_failed;
use super::{AppState, Body, Caller, HttpError, Path, Result};
use crate::network::nic_address;
use crate::service::{networks, vms};
use crate::store::Peer;
use crate::supervisor::control::MigrateOptions;
use crate::supervisor::migration as handover;
use nubis_contract::control::DiskMigration;
use nubis_contract::migration::Phase;

/// The migrations this host drives (or drove), by VM id.
#[derive(Default)]
pub struct Migrations(Mutex<HashMap<String, Migration>>);

impl Migrations {
    fn get(&self, vm_id: &str) -> Option<Migration> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm_id)
            .cloned()
    }

    fn set(&self, migration: Migration) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(migration.vm_id.clone(), migration);
    }

    fn update(&self, vm_id: &str, change: impl FnOnce(&mut Migration)) {
        if let Some(migration) = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(vm_id)
        {
            change(migration);
        }
    }
}

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/vms/{id}/migration",
        get(show).post(create).delete(cancel),
    )
}

#[utoipa::path(
    post,
    path = "/v1/vms/{id}/migration",
    tag = "vms",
    params(("id" = String, Path, description = "the VM's id (or name)")),
    request_body = MigrationCreate,
    responses(
        (status = 202, description = "started; GET shows its progress", body = Migration),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such VM (or another tenant's)", body = ApiError),
        (status = 409, description = "the VM is not running, a migration runs, or the destination does not carry its networks", body = ApiError),
        (status = 422, description = "this host has no underlay, or no host of that name", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(request): Body<MigrationCreate>,
) -> Result<(StatusCode, Json<Migration>)> {
    let vm = vms::get(&state.services, caller.service_scope(), &id)?;
    if let Some((field, reason)) = request.out_of_bounds() {
        return Err(ApiError::invalid(field, reason).into());
    }
    networks::local_underlay(&state.services)?;
    let peer = state.store.get_host(&request.host)?.ok_or_else(|| {
        HttpError::unprocessable(
            "host",
            format!("no host '{}' (see /v1/hosts)", request.host),
        )
    })?;
    if vm.state != VmState::Running {
        return Err(HttpError::new(
            ErrorCode::Conflict,
            format!(
                "VM {} is {}: only a running VM migrates",
                vm.id,
                vm.state.as_str()
            ),
        ));
    }
    if state.migrations.get(&vm.id).is_some_and(|m| !m.is_over()) {
        return Err(HttpError::new(
            ErrorCode::Conflict,
            "a migration of this VM runs",
        ));
    }
    for (index, nic) in vm.nics.iter().enumerate() {
        let spans = match &nic.network {
            Some(network) => state
                .store
                .get_network(None, network)?
                .and_then(|net| net.overlay)
                .is_some_and(|overlay| overlay.hosts.contains(&peer.host.address)),
            None => false,
        };
        if !spans {
            return Err(HttpError::new(
                ErrorCode::Conflict,
                format!(
                    "NIC {index} is on a network that host '{}' does not carry",
                    peer.host.name
                ),
            ));
        }
    }
    let migration = Migration {
        vm_id: vm.id.clone(),
        tenant_id: vm.tenant_id.clone(),
        host: peer.host.name.clone(),
        phase: "preparing".into(),
        rounds: 0,
        bytes_sent: 0,
        dirty_pages: 0,
        expected_downtime_ms: 0,
        downtime_ms: None,
        elapsed_ms: 0,
        error: None,
    };
    state.migrations.set(migration.clone());
    let task_state = state.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let vm_id = vm.id.clone();
        let outcome = drive(&task_state, vm, &peer, &request, started).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(()) => task_state.migrations.update(&vm_id, |m| {
                m.phase = "completed".into();
                m.elapsed_ms = elapsed_ms;
            }),
            Err(err) => {
                tracing::warn!(vm = %vm_id, "migration failed: {}", err.0.error.message);
                task_state.migrations.update(&vm_id, |m| {
                    if !m.is_over() || m.phase == "completed" {
                        m.phase = "failed".into();
                    }
                    m.error = Some(err.0.error.message.clone());
                    m.elapsed_ms = elapsed_ms;
                })
            }
        }
    });
    Ok((StatusCode::ACCEPTED, Json(migration)))
}

/// How often the VMM's progress is read.
const POLL: Duration = Duration::from_millis(100);

async fn drive(
    state: &AppState,
    vm: Vm,
    peer: &Peer,
    limits: &MigrationCreate,
    started: Instant,
) -> Result<()> {
    let _guard = state.supervisor.lock(&vm.id).await;
    let failed = |message: String| HttpError::new(ErrorCode::Internal, message);
    let tenant = state
        .store
        .get_tenant(&vm.tenant_id)?
        .ok_or_else(|| failed("the VM's tenant is gone".into()))?;
    let image = state
        .store
        .get_image(&vm.tenant_id, &vm.image_id)?
        .ok_or_else(|| failed("the VM's image is gone".into()))?;
    let local = networks::local_underlay(&state.services)?;
    let ready = state
        .peers
        .incoming(
            peer,
            &IncomingMigration {
                vm: vm.clone(),
                tenant: tenant.into(),
                image: image.into(),
                source: local.to_string(),
            },
        )
        .await
        .map_err(peer_failed)?;
    let vmm = state.supervisor.vmm(&vm.id);
    let options = MigrateOptions {
        disks: DiskMigration::Copy,
        downtime_ms: Some(limits.downtime_ms.unwrap_or(100)),
        max_rounds: limits.max_rounds,
        max_seconds: limits.max_seconds,
    };
    // Recorded before the VMM may hand the VM over: from here on a
    // restarted agent does not start it again (see `supervisor::migration`).
    let paths = state.supervisor.paths(&vm.id);
    handover::record_handover(&paths, &peer.host.name)?;
    if let Err(err) = vmm
        .migrate(&ready.listen, &ready.token, &ready.key, options)
        .await
    {
        handover::clear_handover(&paths)?;
        abort_destination(state, peer, &vm.id).await;
        return Err(crate::supervisor::SupervisorError::from(err).into());
    }
    // Follow the VMM until its migration ends; the VMM exits right after a
    // hand-over, so a vanished control socket means "look at its exit".
    let phase = loop {
        tokio::time::sleep(POLL).await;
        match vmm.migration_status().await {
            Ok(progress) => {
                state.migrations.update(&vm.id, |m| {
                    m.phase = progress.phase.as_str().to_string();
                    m.rounds = progress.rounds;
                    m.bytes_sent = progress.bytes_sent;
                    m.dirty_pages = progress.dirty_pages;
                    m.expected_downtime_ms = progress.expected_downtime_ms;
                    m.downtime_ms = progress.downtime_ms;
                    m.error = progress.error.clone();
                    m.elapsed_ms = started.elapsed().as_millis() as u64;
                });
                if progress.phase.is_over() {
                    break progress.phase;
                }
            }
            Err(_) => {
                let phase = exited_phase(state, &vm.id).await;
                // The VMM is gone; its log has the pause the guest saw.
                let log = std::fs::read_to_string(state.supervisor.paths(&vm.id).vmm_log)
                    .unwrap_or_default();
                if let Some(downtime) = downtime_in_log(&log) {
                    state
                        .migrations
                        .update(&vm.id, |m| m.downtime_ms = Some(downtime));
                }
                break phase;
            }
        }
    };
    match phase {
        Phase::Completed => {
            crate::crash::point("migration_handed_over");
            finish(state, &vm, peer, local).await
        }
        Phase::Unconfirmed => {
            // Does the destination run it? Then it is there; otherwise it
            // runs on here.
            let there = state.peers.vm(peer, &vm.id).await;
            if there.is_ok_and(|remote| remote.state.has_process()) {
                let _ = vmm.stop().await;
                finish(state, &vm, peer, local).await
            } else {
                let _ = vmm.resume().await;
                handover::clear_handover(&paths)?;
                abort_destination(state, peer, &vm.id).await;
                Err(failed(
                    "the hand-over was not confirmed; the VM runs on here".into(),
                ))
            }
        }
        _ => {
            handover::clear_handover(&paths)?;
            abort_destination(state, peer, &vm.id).await;
            let error = state
                .migrations
                .get(&vm.id)
                .and_then(|m| m.error)
                .unwrap_or_else(|| format!("the migration ended {}", phase.as_str()));
            state
                .migrations
                .update(&vm.id, |m| m.phase = phase.as_str().to_string());
            Err(failed(error))
        }
    }
}

/// Hand-overs this agent stopped in the middle of (it was killed after
/// recording one, `handover::MIGRATION_MARK`): for each, asks the
/// destination. A destination that has the VM with its VMM gets the VM
/// for good (told as the migration would have told it) and it is forgotten
/// here; one that does not have it leaves it here, free to start again. A
/// destination that cannot be reached is asked again, every few seconds
/// for ten minutes, and after that the operator decides
/// (`DELETE /v1/vms/{id}/migration`).
pub async fn resolve_interrupted_handovers(state: AppState) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let pending = match interrupted_handovers(&state) {
            Ok(pending) => pending,
            Err(err) => {
                tracing::error!(
                    "cannot list interrupted hand-overs: {}",
                    err.0.error.message
                );
                return;
            }
        };
        if pending.is_empty() {
            return;
        }
        for (vm, host) in pending {
            match resolve_handover(&state, &vm, &host).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(vm = %vm.id, host, "hand-over undecided: the destination cannot be asked yet")
                }
                Err(err) => {
                    tracing::warn!(vm = %vm.id, host, "hand-over unresolved: {}", err.0.error.message)
                }
            }
        }
        if Instant::now() > deadline {
            tracing::warn!("hand-overs left for the operator (DELETE /v1/vms/{{id}}/migration)");
            return;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// VMs with a recorded hand-over and no migration running here.
fn interrupted_handovers(state: &AppState) -> Result<Vec<(Vm, String)>> {
    Ok(state
        .store
        .list_vms(None, None)?
        .into_iter()
        .filter(|vm| state.migrations.get(&vm.id).is_none_or(|m| m.is_over()))
        .filter_map(|vm| {
            let host = handover::handed_over_to(&state.supervisor.paths(&vm.id))?;
            Some((vm, host))
        })
        .collect())
}

/// Settles one interrupted hand-over; false when the destination could
/// not be asked.
async fn resolve_handover(state: &AppState, vm: &Vm, host: &str) -> Result<bool> {
    let Some(peer) = state.store.get_host(host)? else {
        return Err(HttpError::new(
            ErrorCode::Conflict,
            format!("the destination '{host}' is no longer a registered host"),
        ));
    };
    let local = networks::local_underlay(&state.services)?;
    let _guard = state.supervisor.lock(&vm.id).await;
    match state.peers.vm(&peer, &vm.id).await {
        Ok(there) if there.state.has_process() => {
            tracing::info!(vm = %vm.id, host, "the destination has the VM: completing the hand-over");
            finish(state, vm, &peer, local).await?;
            Ok(true)
        }
        Ok(_) | Err(crate::peers::PeerError::Refused { status: 404, .. }) => {
            tracing::info!(vm = %vm.id, host, "the destination does not run the VM: it stays here");
            handover::clear_handover(&state.supervisor.paths(&vm.id))?;
            abort_destination(state, &peer, &vm.id).await;
            Ok(true)
        }
        Err(_) => Ok(false),
    }
}

/// The pause of a completed migration, from the VMM's last log line about
/// it ("migrated to ADDR in N ms, guest paused D ms").
fn downtime_in_log(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|line| line.split("guest paused ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|ms| ms.parse().ok())
}

/// After the VMM went: completed when it left for the destination.
async fn exited_phase(state: &AppState, vm_id: &str) -> Phase {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(vm)) = state.store.get_vm(None, vm_id) {
            if !vm.state.has_process() {
                let migrated = vm
                    .last_exit
                    .as_deref()
                    .is_some_and(|exit| exit.contains("migrated to"));
                return if migrated {
                    Phase::Completed
                } else {
                    Phase::Failed
                };
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Phase::Failed
}

async fn abort_destination(state: &AppState, peer: &Peer, vm_id: &str) {
    if let Err(err) = state.peers.incoming_abort(peer, vm_id).await {
        tracing::error!(
            vm = vm_id,
            "cannot drop the VM on host '{}': {err}",
            peer.host.name
        );
    }
}

/// The VM runs on the destination: tell it, hand its addresses over, and
/// forget the VM here.
async fn finish(state: &AppState, vm: &Vm, peer: &Peer, local: std::net::Ipv4Addr) -> Result<()> {
    state
        .peers
        .incoming_done(peer, &vm.id)
        .await
        .map_err(peer_failed)?;
    for nic in &vm.nics {
        let (Some(network), Some(address)) =
            (&nic.network, nic.address.as_deref().and_then(nic_address))
        else {
            continue;
        };
        let Some(net) = state.store.get_network(None, network)? else {
            continue;
        };
        let Some(home) = net.overlay.as_ref().map(|overlay| overlay.home.clone()) else {
            continue;
        };
        if home == local.to_string() {
            // This host keeps the network's addresses: this one is the
            // destination's now.
            state
                .store
                .grant_address(&net.id, address, &peer.host.address, &vm.name)?;
        } else if home == peer.host.address {
            // The destination is the home: the address it granted to this
            // host is its own VM's again.
            if let Err(err) = state
                .peers
                .release_address(peer, &net.id, address, local)
                .await
            {
                tracing::warn!(vm = %vm.id, "cannot return {address} to its home: {err}");
            }
        }
    }
    let vm = state
        .store
        .get_vm(None, &vm.id)?
        .unwrap_or_else(|| vm.clone());
    if vm.state.has_process() {
        state.supervisor.stop(&vm, true).await?;
    }
    state.supervisor.remove_files(&vm)?;
    state.store.delete_vm(&vm.id)?;
    state.supervisor.reconcile_network().await?;
    tracing::info!(vm = %vm.id, host = %peer.host.name, "VM migrated away");
    Ok(())
}

#[utoipa::path(
    get,
    path = "/v1/vms/{id}/migration",
    tag = "vms",
    params(("id" = String, Path, description = "the VM's id")),
    responses(
        (status = 200, description = "the VM's last migration from this host", body = Migration),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no migration of this VM from this host", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Migration>> {
    // The VM is gone from here once migrated: the record of its migration
    // is found by id; a tenant sees only its own.
    let migration = state
        .migrations
        .get(&id)
        .ok_or_else(|| HttpError::not_found("migration of VM", &id))?;
    if caller
        .scope()
        .is_some_and(|tenant| tenant != migration.tenant_id)
    {
        return Err(HttpError::not_found("migration of VM", &id));
    }
    Ok(Json(migration))
}

#[utoipa::path(
    delete,
    path = "/v1/vms/{id}/migration",
    tag = "vms",
    params(("id" = String, Path, description = "the VM's id (or name)")),
    responses(
        (status = 204, description = "cancelled: the VM runs on here (or, for the operator, a hand-over that an agent stopped in the middle of is forgotten: the VM may start here again)"),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such VM (or another tenant's)", body = ApiError),
        (status = 403, description = "a hand-over left by a stopped agent: operator only", body = ApiError),
        (status = 409, description = "no migration runs", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let vm = vms::get(&state.services, caller.service_scope(), &id)?;
    let paths = state.supervisor.paths(&vm.id);
    let runs = state.migrations.get(&vm.id).is_some_and(|m| !m.is_over());
    if !runs && handover::handed_over_to(&paths).is_some() {
        // A hand-over this agent did not see to its end (it stopped): the
        // operator, having checked the destination, lets the VM start here.
        caller.require_operator()?;
        handover::clear_handover(&paths)?;
        return Ok(StatusCode::NO_CONTENT);
    }
    if !runs {
        return Err(HttpError::new(
            ErrorCode::Conflict,
            "no migration of this VM runs",
        ));
    }
    state
        .supervisor
        .vmm(&vm.id)
        .migrate_cancel()
        .await
        .map_err(crate::supervisor::SupervisorError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_downtime_is_read_from_the_vmm_log() {
        let log = "[nubis-vmm 1.0 ms INFO ] migrating to 10.0.0.2:7100\n\
                   [nubis-vmm 812.2 ms INFO ] migrated to 10.0.0.2:7100 in 640 ms, guest paused 37 ms\n\
                   [nubis-vmm 812.9 ms INFO ] VM stopped: migrated to 10.0.0.2:7100\n";
        assert_eq!(downtime_in_log(log), Some(37));
        assert_eq!(downtime_in_log("no migration here"), None);
        assert_eq!(downtime_in_log("guest paused lots ms"), None);
    }
}
