//! A draining host's side of its drain (`cluster/drain.rs`): it carries
//! out the moves the controller wrote into its VMs' records, and stops the
//! running VMs whose policy is to stop.
//!
//! - Live migration: the migration starts here (as the operator's would);
//!   its destination takes the record over when it is handed over. One
//!   that fails clears the move and counts the failure (the controller
//!   tries again, elsewhere maybe, up to `drain::MAX_FAILURES`).
//! - Restart: the VM is deleted here first (never two running copies),
//!   then its record names the destination, which defines it afresh from
//!   its image and starts it. An agent killed in between finds the move
//!   still written and the VM gone, and writes the record then.

use std::collections::HashSet;

use nubis_api::{DrainPolicy, MigrationCreate, VmState};

use super::vms::{self, Action};
use super::{Scope, ServiceError, Services};
use crate::cluster::drain::Move;
use crate::cluster::vms::ClusterVm;
use crate::cluster::Cluster;

/// Carries out the moves of this host's VMs; `started`: the moves whose
/// migration this agent started (VM id and the move's start).
pub async fn carry_out(
    svc: &Services,
    cluster: &Cluster,
    vms: &[ClusterVm],
    started: &mut HashSet<(String, u64)>,
) {
    let me = cluster.host_name().as_str();
    let draining = cluster.is_draining();
    for vm in vms
        .iter()
        .filter(|vm| vm.record.host.as_deref() == Some(me))
    {
        let id = &vm.record.id;
        let outcome = match &vm.record.moving {
            Some(to) => match to.policy {
                DrainPolicy::Restart => restart_elsewhere(svc, cluster, vm, to).await,
                _ => migrate(svc, cluster, vm, to, started).await,
            },
            None if draining && vm.record.spec.placement.on_drain == DrainPolicy::Stop => {
                stop_here(svc, id)
            }
            None => Ok(()),
        };
        if let Err(err) = outcome {
            tracing::warn!(vm = %id, "drain: cannot move the VM: {err}");
        }
    }
    let moving: HashSet<&str> = vms
        .iter()
        .filter(|vm| vm.record.moving.is_some())
        .map(|vm| vm.record.id.as_str())
        .collect();
    started.retain(|(id, _)| moving.contains(id.as_str()));
}

/// A live migration to `to`: started once; when it failed, the move is
/// cleared and counted.
async fn migrate(
    svc: &Services,
    cluster: &Cluster,
    vm: &ClusterVm,
    to: &Move,
    started: &mut HashSet<(String, u64)>,
) -> super::Result<()> {
    let id = &vm.record.id;
    let key = (id.clone(), to.since);
    if !started.contains(&key) {
        let running = svc
            .store
            .get_vm(None, id)?
            .is_some_and(|local| local.state == VmState::Running);
        if !running {
            // Stopped, paused or gone since the controller chose it: it
            // stays (counted, should its report still say it runs).
            return end_move(cluster, id, "no longer running: not moved", true).await;
        }
        started.insert(key);
        let request = MigrationCreate::new(to.to.clone());
        if let Err(err) = super::migrations::start(svc, Scope::Operator, id, request).await {
            started.retain(|(started_id, _)| started_id != id);
            let message = format!("live migration to host {} failed to start: {err}", to.to);
            return end_move(cluster, id, &message, true).await;
        }
        tracing::info!(vm = %id, to = %to.to, "drain: live migration started");
        return Ok(());
    }
    let Some(migration) = svc.migrations.get(id) else {
        return Ok(());
    };
    match migration.phase.as_str() {
        // Handed over: the destination writes the record.
        "completed" => Ok(()),
        "failed" | "cancelled" | "unconfirmed" => {
            started.retain(|(started_id, _)| started_id != id);
            let message = format!(
                "live migration to host {} {}: {}",
                to.to,
                migration.phase,
                migration.error.as_deref().unwrap_or("no reason given")
            );
            end_move(cluster, id, &message, true).await
        }
        _ => Ok(()),
    }
}

/// Clears VM `id`'s move with an event; `failed` counts it.
async fn end_move(cluster: &Cluster, id: &str, message: &str, failed: bool) -> super::Result<()> {
    tracing::info!(vm = %id, "drain: {message}");
    cluster
        .update_vm(id, |record| {
            record.moving = None;
            if failed {
                record.failed_moves = record.failed_moves.saturating_add(1);
            }
            record.record_event("drain", message);
            Ok(())
        })
        .await?;
    Ok(())
}

/// Deletes the VM here, then hands its record to `to`, which starts it.
async fn restart_elsewhere(
    svc: &Services,
    cluster: &Cluster,
    vm: &ClusterVm,
    to: &Move,
) -> super::Result<()> {
    let id = &vm.record.id;
    if svc.store.get_vm(None, id)?.is_some() {
        vms::delete_here(svc, id).await?;
    }
    let since = to.since;
    let destination = to.to.clone();
    cluster
        .update_vm(id, |record| {
            // Only the move read: not one the controller wrote since.
            if record.moving.as_ref().map(|moving| moving.since) != Some(since) {
                return Err(crate::cluster::ClusterError::Raced(format!(
                    "the move of VM {}",
                    record.id
                )));
            }
            record.assign_host(destination.clone());
            record.moving = None;
            record.failed_moves = 0;
            record.spec.start = true;
            record.record_event(
                "drain",
                format!("stopped here, to start on host {destination} from its image (its disks start afresh there)"),
            );
            Ok(())
        })
        .await?;
    tracing::info!(vm = %id, to = %destination, "drain: VM restarts elsewhere");
    Ok(())
}

/// Stops a running VM whose policy is to stay, stopped, on its host: in
/// the background (a guest may take the agent's stop timeout to shut
/// down), once (a stopping VM is not running).
fn stop_here(svc: &Services, id: &str) -> super::Result<()> {
    let running = svc
        .store
        .get_vm(None, id)?
        .is_some_and(|local| matches!(local.state, VmState::Running | VmState::Paused));
    if !running {
        return Ok(());
    }
    let (svc, id) = (svc.clone(), id.to_string());
    tokio::spawn(async move {
        match vms::act(&svc, Scope::Operator, &id, Action::Stop).await {
            Ok(_) => tracing::info!(vm = %id, "drain: VM stopped where it is (its policy)"),
            Err(ServiceError::Conflict(_)) => {}
            Err(err) => tracing::warn!(vm = %id, "drain: cannot stop the VM: {err}"),
        }
    });
    Ok(())
}
