//! Live migration, the source's side: moves a running VM to another host
//! without stopping it. This host drives it: the destination agent
//! prepares the VM and a VMM that waits (`service::incoming`, over the
//! peer channel), this host's VMM sends RAM, disks and state (see
//! `vmm/src/migration`), and once the destination runs the guest the VM
//! is gone from here. Until then a failure leaves the VM running here and
//! nothing on the destination.
//!
//! Why the hand-over is recorded before the VMM may hand the VM over
//! (`supervisor::migration`): a VM must never run on two hosts, so an
//! agent that stops in the middle asks the destination at its next start
//! ([`resolve_interrupted_handovers`]) before it would start the VM again.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nubis_api::{IncomingMigration, Migration, MigrationCreate, VmState};
use nubis_contract::control::DiskMigration;
use nubis_contract::migration::{Phase, Progress};

use super::{networks, vms, Result, Scope, ServiceError, Services};
use crate::network::nic_address;
use crate::store::{PeerRow, VmRow};
use crate::supervisor::control::MigrateOptions;
use crate::supervisor::migration as handover;

/// The migrations this host drives (or drove), by VM id.
#[derive(Default)]
pub struct Migrations(Mutex<HashMap<String, Migration>>);

impl Migrations {
    pub fn get(&self, vm_id: &str) -> Option<Migration> {
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

    /// Whether a migration of `vm_id` runs (has not ended).
    fn runs(&self, vm_id: &str) -> bool {
        self.get(vm_id).is_some_and(|m| !m.is_over())
    }
}

/// A migration of `vm` to `host`, before anything was asked of anyone.
fn preparing(vm: &VmRow, host: &str) -> Migration {
    Migration {
        vm_id: vm.id.clone(),
        tenant_id: vm.tenant_id.clone(),
        host: host.to_string(),
        phase: "preparing".into(),
        rounds: 0,
        bytes_sent: 0,
        dirty_pages: 0,
        expected_downtime_ms: 0,
        downtime_ms: None,
        elapsed_ms: 0,
        error: None,
    }
}

/// What the VMM reports, taken into the migration's record.
fn take_progress(migration: &mut Migration, progress: &Progress, elapsed_ms: u64) {
    migration.phase = progress.phase.as_str().to_string();
    migration.rounds = progress.rounds;
    migration.bytes_sent = progress.bytes_sent;
    migration.dirty_pages = progress.dirty_pages;
    migration.expected_downtime_ms = progress.expected_downtime_ms;
    migration.downtime_ms = progress.downtime_ms;
    migration.error = progress.error.clone();
    migration.elapsed_ms = elapsed_ms;
}

/// How the driver ended, in the migration's record: a failure after the
/// VMM reported `completed` (the hand-over's last steps) is a failure; a
/// phase the VMM ended in otherwise (`cancelled`, `unconfirmed`) stays.
fn take_outcome(
    migration: &mut Migration,
    outcome: std::result::Result<(), &str>,
    elapsed_ms: u64,
) {
    match outcome {
        Ok(()) => migration.phase = "completed".into(),
        Err(error) => {
            if !migration.is_over() || migration.phase == "completed" {
                migration.phase = "failed".into();
            }
            migration.error = Some(error.to_string());
        }
    }
    migration.elapsed_ms = elapsed_ms;
}

/// Starts migrating the caller's running VM `id` to the host `request`
/// names; the migration goes on in the background ([`show`] follows it).
pub async fn start(
    svc: &Services,
    scope: Scope<'_>,
    id: &str,
    request: MigrationCreate,
) -> Result<Migration> {
    let vm = vms::find(svc, scope, id)?;
    if let Some((field, reason)) = request.out_of_bounds() {
        return Err(ServiceError::invalid(field, reason));
    }
    networks::local_underlay(svc)?;
    let peer = svc.peer_directory.get(&request.host)?.ok_or_else(|| {
        ServiceError::unprocessable(
            "host",
            format!("no host '{}' (see /v1/peers)", request.host),
        )
    })?;
    if vm.state != VmState::Running {
        return Err(ServiceError::Conflict(format!(
            "VM {} is {}: only a running VM migrates",
            vm.id,
            vm.state.as_str()
        )));
    }
    if svc.migrations.runs(&vm.id) {
        return Err(ServiceError::Conflict("a migration of this VM runs".into()));
    }
    for (index, nic) in vm.nics.iter().enumerate() {
        let spans = match &nic.network {
            // Every member carries the cluster's networks.
            Some(_) if svc.cluster.is_some() => true,
            Some(network) => svc
                .store
                .get_network(None, network)?
                .and_then(|net| net.overlay)
                .is_some_and(|overlay| overlay.hosts.contains(&peer.host.address)),
            None => false,
        };
        if !spans {
            return Err(ServiceError::Conflict(format!(
                "NIC {index} is on a network that host '{}' does not carry",
                peer.host.name
            )));
        }
    }
    let migration = preparing(&vm, &peer.host.name);
    svc.migrations.set(migration.clone());
    let task = svc.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let vm_id = vm.id.clone();
        let outcome = drive(&task, vm, &peer, &request, started).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let message = outcome.as_ref().err().map(|err| err.to_string());
        if let Some(message) = &message {
            tracing::warn!(vm = %vm_id, "migration failed: {message}");
        }
        task.migrations.update(&vm_id, |m| {
            take_outcome(m, message.as_deref().map_or(Ok(()), Err), elapsed_ms)
        });
    });
    Ok(migration)
}

/// How often the VMM's progress is read.
const POLL: Duration = Duration::from_millis(100);

async fn drive(
    svc: &Services,
    vm: VmRow,
    peer: &PeerRow,
    limits: &MigrationCreate,
    started: Instant,
) -> Result<()> {
    let _guard = svc.supervisor.lock(&vm.id).await;
    let failed = ServiceError::Internal;
    let tenant = svc
        .store
        .get_tenant(&vm.tenant_id)?
        .ok_or_else(|| failed("the VM's tenant is gone".into()))?;
    let image = svc
        .store
        .get_image(&vm.tenant_id, &vm.image_id)?
        .ok_or_else(|| failed("the VM's image is gone".into()))?;
    let local = networks::local_underlay(svc)?;
    let ready = svc
        .peers
        .incoming(
            peer,
            &IncomingMigration {
                vm: vm.clone().into(),
                metadata: vm.metadata.clone(),
                tenant: tenant.into(),
                image: image.into(),
                source: local.to_string(),
            },
        )
        .await?;
    let vmm = svc.supervisor.vmm(&vm.id);
    let options = MigrateOptions {
        disks: DiskMigration::Copy,
        downtime_ms: Some(limits.downtime_ms.unwrap_or(100)),
        max_rounds: limits.max_rounds,
        max_seconds: limits.max_seconds,
    };
    // Recorded before the VMM may hand the VM over: from here on a
    // restarted agent does not start it again (see `supervisor::migration`).
    let paths = svc.supervisor.paths(&vm.id);
    handover::record_handover(&paths, &peer.host.name)?;
    if let Err(err) = vmm
        .migrate(&ready.listen, &ready.token, &ready.key, options)
        .await
    {
        handover::clear_handover(&paths)?;
        abort_destination(svc, peer, &vm.id).await;
        return Err(crate::supervisor::SupervisorError::from(err).into());
    }
    // Follow the VMM until its migration ends; the VMM exits right after a
    // hand-over, so a vanished control socket means "look at its exit".
    let phase = loop {
        tokio::time::sleep(POLL).await;
        match vmm.migration_status().await {
            Ok(progress) => {
                svc.migrations.update(&vm.id, |m| {
                    take_progress(m, &progress, started.elapsed().as_millis() as u64)
                });
                if progress.phase.is_over() {
                    break progress.phase;
                }
            }
            Err(_) => {
                let phase = exited_phase(svc, &vm.id).await;
                // The VMM is gone; its log has the pause the guest saw.
                let log = std::fs::read_to_string(svc.supervisor.paths(&vm.id).vmm_log)
                    .unwrap_or_default();
                if let Some(downtime) = downtime_in_log(&log) {
                    svc.migrations
                        .update(&vm.id, |m| m.downtime_ms = Some(downtime));
                }
                break phase;
            }
        }
    };
    match phase {
        Phase::Completed => {
            crate::crash::point("migration_handed_over");
            finish(svc, &vm, peer, local).await
        }
        Phase::Unconfirmed => {
            // Does the destination run it? Then it is there; otherwise it
            // runs on here.
            let there = svc.peers.vm(peer, &vm.id).await;
            if there.is_ok_and(|remote| remote.state.has_process()) {
                let _ = vmm.stop().await;
                finish(svc, &vm, peer, local).await
            } else {
                let _ = vmm.resume().await;
                handover::clear_handover(&paths)?;
                abort_destination(svc, peer, &vm.id).await;
                Err(failed(
                    "the hand-over was not confirmed; the VM runs on here".into(),
                ))
            }
        }
        _ => {
            handover::clear_handover(&paths)?;
            abort_destination(svc, peer, &vm.id).await;
            let error = svc
                .migrations
                .get(&vm.id)
                .and_then(|m| m.error)
                .unwrap_or_else(|| format!("the migration ended {}", phase.as_str()));
            svc.migrations
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
pub async fn resolve_interrupted_handovers(svc: Services) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let pending = match interrupted_handovers(&svc) {
            Ok(pending) => pending,
            Err(err) => {
                tracing::error!("cannot list interrupted hand-overs: {err}");
                return;
            }
        };
        if pending.is_empty() {
            return;
        }
        for (vm, host) in pending {
            match resolve_handover(&svc, &vm, &host).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(vm = %vm.id, host, "hand-over undecided: the destination cannot be asked yet")
                }
                Err(err) => {
                    tracing::warn!(vm = %vm.id, host, "hand-over unresolved: {err}")
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
fn interrupted_handovers(svc: &Services) -> Result<Vec<(VmRow, String)>> {
    Ok(svc
        .store
        .list_vms(None, None)?
        .into_iter()
        .filter(|vm| !svc.migrations.runs(&vm.id))
        .filter_map(|vm| {
            let host = handover::handed_over_to(&svc.supervisor.paths(&vm.id))?;
            Some((vm, host))
        })
        .collect())
}

/// Settles one interrupted hand-over; false when the destination could
/// not be asked.
async fn resolve_handover(svc: &Services, vm: &VmRow, host: &str) -> Result<bool> {
    let Some(peer) = svc.peer_directory.get(host)? else {
        return Err(ServiceError::Conflict(format!(
            "the destination '{host}' is no longer a registered host"
        )));
    };
    let local = networks::local_underlay(svc)?;
    let _guard = svc.supervisor.lock(&vm.id).await;
    match svc.peers.vm(&peer, &vm.id).await {
        Ok(there) if there.state.has_process() => {
            tracing::info!(vm = %vm.id, host, "the destination has the VM: completing the hand-over");
            finish(svc, vm, &peer, local).await?;
            Ok(true)
        }
        Ok(_) | Err(crate::peers::PeerError::Refused { status: 404, .. }) => {
            tracing::info!(vm = %vm.id, host, "the destination does not run the VM: it stays here");
            handover::clear_handover(&svc.supervisor.paths(&vm.id))?;
            abort_destination(svc, &peer, &vm.id).await;
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

/// The phase a VMM that exited left its migration in: completed when its
/// last exit says it left for the destination.
fn phase_of_exit(last_exit: Option<&str>) -> Phase {
    if last_exit.is_some_and(|exit| exit.contains("migrated to")) {
        Phase::Completed
    } else {
        Phase::Failed
    }
}

/// After the VMM went: completed when it left for the destination.
async fn exited_phase(svc: &Services, vm_id: &str) -> Phase {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(vm)) = svc.store.get_vm(None, vm_id) {
            if !vm.state.has_process() {
                return phase_of_exit(vm.last_exit.as_deref());
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Phase::Failed
}

async fn abort_destination(svc: &Services, peer: &PeerRow, vm_id: &str) {
    if let Err(err) = svc.peers.incoming_abort(peer, vm_id).await {
        tracing::error!(
            vm = vm_id,
            "cannot drop the VM on host '{}': {err}",
            peer.host.name
        );
    }
}

/// The VM runs on the destination: tell it, hand its addresses over, and
/// forget the VM here.
async fn finish(svc: &Services, vm: &VmRow, peer: &PeerRow, local: Ipv4Addr) -> Result<()> {
    svc.peers.incoming_done(peer, &vm.id).await?;
    // In a cluster the addresses are the cluster's (`ipam/`), whatever
    // host the VM runs on: nothing to hand over.
    let nics: &[nubis_api::VmNic] = if svc.cluster.is_some() { &[] } else { &vm.nics };
    for nic in nics {
        let (Some(network), Some(address)) =
            (&nic.network, nic.address.as_deref().and_then(nic_address))
        else {
            continue;
        };
        let Some(net) = svc.store.get_network(None, network)? else {
            continue;
        };
        let Some(home) = net.overlay.as_ref().map(|overlay| overlay.home.clone()) else {
            continue;
        };
        if home == local.to_string() {
            // This host keeps the network's addresses: this one is the
            // destination's now.
            svc.store
                .grant_address(&net.id, address, &peer.host.address, &vm.name)?;
        } else if home == peer.host.address {
            // The destination is the home: the address it granted to this
            // host is its own VM's again.
            if let Err(err) = svc
                .peers
                .release_address(peer, &net.id, address, local)
                .await
            {
                tracing::warn!(vm = %vm.id, "cannot return {address} to its home: {err}");
            }
        }
    }
    let vm = svc
        .store
        .get_vm(None, &vm.id)?
        .unwrap_or_else(|| vm.clone());
    if vm.state.has_process() {
        svc.supervisor.stop(&vm, true).await?;
    }
    svc.supervisor.remove_files(&vm)?;
    svc.store.delete_vm(&vm.id)?;
    svc.supervisor.reconcile_network().await?;
    tracing::info!(vm = %vm.id, host = %peer.host.name, "VM migrated away");
    Ok(())
}

/// The last migration of VM `id` from this host. The VM is gone from here
/// once migrated: the record is found by id; a tenant sees only its own.
pub fn show(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Migration> {
    let migration = svc
        .migrations
        .get(id)
        .ok_or_else(|| ServiceError::not_found("migration of VM", id))?;
    if scope
        .tenant()
        .is_some_and(|tenant| tenant != migration.tenant_id)
    {
        return Err(ServiceError::not_found("migration of VM", id));
    }
    Ok(migration)
}

/// Cancels the running migration of the caller's VM `id` (the VM runs on
/// here); for the operator, also forgets a hand-over an agent stopped in
/// the middle of, so that the VM may start here again.
pub async fn cancel(svc: &Services, scope: Scope<'_>, id: &str) -> Result<()> {
    let vm = vms::find(svc, scope, id)?;
    let paths = svc.supervisor.paths(&vm.id);
    let runs = svc.migrations.runs(&vm.id);
    if !runs && handover::handed_over_to(&paths).is_some() {
        // A hand-over this agent did not see to its end (it stopped): the
        // operator, having checked the destination, lets the VM start here.
        if scope != Scope::Operator {
            return Err(ServiceError::Forbidden(
                "this endpoint is for the operator".into(),
            ));
        }
        handover::clear_handover(&paths)?;
        return Ok(());
    }
    if !runs {
        return Err(ServiceError::Conflict(
            "no migration of this VM runs".into(),
        ));
    }
    svc.supervisor
        .vmm(&vm.id)
        .migrate_cancel()
        .await
        .map_err(crate::supervisor::SupervisorError::from)?;
    Ok(())
}

#[cfg(test)]
mod tests;
