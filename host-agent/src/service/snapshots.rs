//! Snapshots of a tenant's VMs, taken without stopping them, and restored
//! into new VMs that resume where the snapshot was taken. A snapshot costs
//! one of the tenant's snapshots and, at most, the VM's memory and disks
//! of its storage; files written without a record are removed (or swept
//! at the agent's next start).

use nubis_api::snapshot::MAX_CLONES;
use nubis_api::{Quota, Snapshot, SnapshotClones, SnapshotClonesMade, SnapshotRestore, Vm, VmNic};

use super::{vms, Result, Scope, ServiceError, Services};
use crate::cluster::claims::{Claim, ClaimKind};
use crate::network::nic_address;
use crate::store::{SavedVm, SnapshotRow, StoreError, VmRow};
use crate::validate;

impl From<SnapshotRow> for Snapshot {
    fn from(row: SnapshotRow) -> Self {
        Snapshot {
            id: row.id,
            tenant_id: row.tenant_id,
            vm_id: row.vm_id,
            vm_name: row.vm_name,
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            size_bytes: row.size_bytes,
            created_at: row.created_at,
        }
    }
}

/// Snapshots VM `id` (it runs on, or stays paused).
pub async fn create(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Snapshot> {
    let vm = vms::find(svc, scope, id)?;
    let _guard = svc.supervisor.lock(&vm.id).await;
    let vm = vms::find(svc, scope, &vm.id)?;
    let (quota, asked_mib) = check_quota(svc, &vm)?;
    let snapshot_id = svc.store.new_snapshot_id()?;
    // In a cluster the quota is the tenant's on every host: the snapshot
    // is claimed there first (given back by this host's sweep if it never
    // comes to be).
    let _claim = match &svc.cluster {
        Some(cluster) => {
            let claim = Claim {
                kind: ClaimKind::Snapshot,
                storage_mib: asked_mib,
            };
            Some(
                cluster
                    .claim(&vm.tenant_id, &snapshot_id, claim, &quota)
                    .await?,
            )
        }
        None => None,
    };
    let size = svc.supervisor.snapshot(&vm, &snapshot_id).await?;
    // Files without a record are swept at the agent's next start.
    crate::crash::point("snapshot_written");
    let snapshot = match svc.store.record_snapshot(&snapshot_id, &vm, size) {
        Ok(snapshot) => snapshot,
        Err(err) => {
            svc.supervisor.remove_snapshot_files(&snapshot_id)?;
            return Err(err.into());
        }
    };
    tracing::info!(vm = %vm.id, snapshot = %snapshot.id, size, "snapshot taken");
    super::placed::announce_host_local(svc).await;
    Ok(snapshot.into())
}

/// A snapshot takes one of the tenant's snapshots and, at most, the VM's
/// memory and disks of its storage: the tenant's quota and that bound.
fn check_quota(svc: &Services, vm: &VmRow) -> Result<(Quota, u64)> {
    let quota = svc
        .store
        .get_tenant(&vm.tenant_id)?
        .ok_or_else(|| ServiceError::Gone("the VM's tenant is gone".to_string()))?
        .quota;
    let kept = svc.store.count_snapshots(&vm.tenant_id)?;
    if kept >= quota.max_snapshots {
        return Err(StoreError::Quota(format!(
            "snapshots: {kept} kept + 1 requested exceeds the tenant's quota of {}",
            quota.max_snapshots
        ))
        .into());
    }
    let asked = vm.memory_mib + crate::quota::disks_mib(&svc.store, vm)?;
    crate::quota::check_storage(&svc.store, &svc.data_dir, &vm.tenant_id, &quota, asked)?;
    let reserve = svc.supervisor.config().reserved_disk_mib;
    crate::quota::check_host_space(&svc.data_dir, reserve, asked)?;
    Ok((quota, asked))
}

/// The snapshots `scope` sees: this host's, and in a cluster every other
/// member's as it last published them.
pub async fn list(svc: &Services, scope: Scope<'_>) -> Result<Vec<Snapshot>> {
    let mut snapshots: Vec<Snapshot> = svc
        .store
        .list_snapshots(scope.tenant())?
        .into_iter()
        .map(Snapshot::from)
        .collect();
    if let Some(cluster) = &svc.cluster {
        snapshots.extend(
            cluster
                .held_elsewhere(scope.tenant(), |inventory| inventory.snapshots)
                .await?,
        );
    }
    Ok(snapshots)
}

/// Snapshot `id` as `scope` sees it, with the VM it saved.
fn find(svc: &Services, scope: Scope<'_>, id: &str) -> Result<SavedVm> {
    svc.store
        .get_snapshot(scope.tenant(), id)?
        .ok_or_else(|| ServiceError::not_found("snapshot", id))
}

/// Snapshot `id` as `scope` sees it (in a cluster, on another member as
/// that member last published it: a request about one that member can
/// answer is forwarded there).
pub async fn get(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Snapshot> {
    match find(svc, scope, id) {
        Ok(saved) => Ok(saved.snapshot.into()),
        Err(err) => {
            let Some(cluster) = &svc.cluster else {
                return Err(err);
            };
            cluster
                .find_elsewhere(scope.tenant(), |held| held.snapshots, id)
                .await?
                .ok_or(err)
        }
    }
}

/// Deletes snapshot `id` with its files, unless a VM restored from it has
/// yet to start.
pub async fn delete(svc: &Services, scope: Scope<'_>, id: &str) -> Result<()> {
    let saved = find(svc, scope, id)?;
    let waiting: Vec<String> = svc
        .store
        .list_vms(Some(&saved.snapshot.tenant_id), None)?
        .into_iter()
        .filter(|vm| vm.restore_from.as_deref() == Some(id))
        .map(|vm| vm.name)
        .collect();
    if !waiting.is_empty() {
        return Err(ServiceError::Conflict(format!(
            "VM(s) {} resume from snapshot {id} at their first start: start or delete them first",
            waiting.join(", ")
        )));
    }
    svc.store.delete_snapshot(id)?;
    svc.supervisor.remove_snapshot_files(id)?;
    if let Some(cluster) = &svc.cluster {
        // The sweep gives it back if this fails.
        cluster.release(&saved.snapshot.tenant_id, id).await?;
    }
    super::placed::announce_host_local(svc).await;
    Ok(())
}

/// A new, stopped VM of `tenant_id` that resumes from snapshot `id` when
/// started. It keeps the snapshot's MACs and addresses (the guest's memory
/// holds them), so no other VM may hold them.
pub async fn restore(
    svc: &Services,
    tenant_id: &str,
    id: &str,
    request: SnapshotRestore,
) -> Result<Vm> {
    validate::name("name", &request.name, false)?;
    let saved = find(svc, Scope::Tenant(tenant_id), id)?;
    svc.refuse_if_cordoned().await?;
    let _hold = svc.hold_tenant(tenant_id).await?;
    let quota = restorable(svc, tenant_id, &saved)?;
    let network_lock = svc.host_network.lock().await;
    let others = svc.store.list_vms(Some(tenant_id), None)?;
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
            return Err(ServiceError::Conflict(format!(
                "VM {} holds the MAC or address of the snapshot's NIC ({}): delete it first",
                holder.name,
                nic.address.as_deref().unwrap_or("?")
            )));
        }
    }
    let mut new = saved.vm.clone();
    new.name = request.name;
    new.restore_from = Some(id.to_string());
    let vm = svc.store.create_vm(&new, quota)?;
    svc.store
        .add_event(&vm.id, "created", &format!("restored from snapshot {id}"))?;
    drop(network_lock);
    define_restored(svc, std::slice::from_ref(&vm), &quota).await?;
    Ok(svc.vm_view(vm))
}

/// The tenant's quota, once the snapshot's image is known still there.
fn restorable(svc: &Services, tenant_id: &str, saved: &SavedVm) -> Result<Quota> {
    if svc
        .store
        .get_image(tenant_id, &saved.vm.image_id)?
        .is_none()
    {
        return Err(ServiceError::Unprocessable {
            field: None,
            message: format!("the snapshot's image {} is gone", saved.vm.image_id),
        });
    }
    Ok(svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::Unauthorized("the token's tenant is gone".to_string()))?
        .quota)
}

/// Publishes VMs just restored here (in a cluster) and guards their NICs;
/// none is kept if either fails.
async fn define_restored(svc: &Services, vms: &[VmRow], quota: &Quota) -> Result<()> {
    for (published, vm) in vms.iter().enumerate() {
        if let Err(err) = super::placed::publish_here(svc, vm, quota).await {
            forget_restored(svc, vms, published).await?;
            return Err(err);
        }
    }
    if vms.iter().any(|vm| !vm.nics.is_empty()) {
        if let Err(err) = svc.host_network.refresh_vm_rules().await {
            forget_restored(svc, vms, vms.len()).await?;
            return Err(err.into());
        }
    }
    Ok(())
}

/// Undoes VMs just restored here: the cluster's records of the first
/// `published` (a record left behind would be placed here again), then
/// this host's rows of all.
async fn forget_restored(svc: &Services, vms: &[VmRow], published: usize) -> Result<()> {
    if let Some(cluster) = &svc.cluster {
        for vm in vms.iter().take(published) {
            if let Err(err) = cluster.delete_vm(&vm.id).await {
                tracing::warn!(vm = %vm.id, "cannot remove the record of a VM not made: {err}");
            }
        }
    }
    for vm in vms {
        svc.store.delete_vm(&vm.id)?;
    }
    Ok(())
}

/// `request.count` new VMs of `tenant_id` restored from snapshot `id` at
/// once and started: each with its own MACs and addresses (this host's
/// IPAM), named `PREFIX-N`, its memory the snapshot's file mapped
/// copy-on-write, and a new identity for its guest (hostname, addresses,
/// RNG seed: `supervisor::give_identity`).
pub async fn clones(
    svc: &Services,
    tenant_id: &str,
    id: &str,
    request: &SnapshotClones,
) -> Result<SnapshotClonesMade> {
    let arrived = std::time::Instant::now();
    validate::name("name_prefix", &request.name_prefix, false)?;
    if request.name_prefix.len() > 59 {
        return Err(ServiceError::invalid(
            "name_prefix",
            "at most 59 characters (the clones' names add '-N')",
        ));
    }
    if !(1..=MAX_CLONES).contains(&request.count) {
        return Err(ServiceError::invalid(
            "count",
            format!("must be 1 to {MAX_CLONES}"),
        ));
    }
    let saved = find(svc, Scope::Tenant(tenant_id), id)?;
    svc.refuse_if_cordoned().await?;
    let made = {
        let _hold = svc.hold_tenant(tenant_id).await?;
        let quota = restorable(svc, tenant_id, &saved)?;
        for (index, nic) in saved.vm.nics.iter().enumerate() {
            let Some(network) = &nic.network else {
                continue;
            };
            let net = svc.store.get_network(Some(tenant_id), network)?;
            let elsewhere = match &net {
                Some(net) => super::networks::remote_home(svc, net)?.is_some(),
                None => true,
            };
            if elsewhere || svc.cluster.is_some() {
                return Err(ServiceError::unprocessable(
                    format!("nics[{index}].network"),
                    "clones take their addresses from this host: their NICs must be on the tenant's default bridge or a network of this host",
                ));
            }
        }
        let network_lock = svc.host_network.lock().await;
        let mut made: Vec<VmRow> = Vec::new();
        for index in 1..=request.count {
            let mut new = saved.vm.clone();
            new.name = format!("{}-{index}", request.name_prefix);
            new.restore_from = Some(id.to_string());
            new.restore_as_clone = true;
            new.nics = saved
                .vm
                .nics
                .iter()
                .map(|nic| VmNic {
                    rate_limit: nic.rate_limit,
                    network: nic.network.clone(),
                    ..VmNic::default()
                })
                .collect();
            let created = vms::assign_addresses(svc, tenant_id, &mut new.nics)
                .and_then(|()| Ok(svc.store.create_vm(&new, quota)?));
            match created {
                Ok(vm) => {
                    svc.store.add_event(
                        &vm.id,
                        "created",
                        &format!("cloned from snapshot {id}"),
                    )?;
                    made.push(vm);
                }
                Err(err) => {
                    forget_restored(svc, &made, 0).await?;
                    return Err(err);
                }
            }
        }
        drop(network_lock);
        define_restored(svc, &made, &quota).await?;
        made
    };
    tracing::debug!(
        snapshot = id,
        "{} clone(s) defined {} ms after the request",
        made.len(),
        arrived.elapsed().as_millis()
    );
    // All at once: starts of different VMs run in parallel.
    let starts = made.iter().map(|vm| async {
        let started = vms::act(svc, Scope::Tenant(tenant_id), &vm.id, vms::Action::Start).await;
        (started, arrived.elapsed())
    });
    let mut clones = SnapshotClonesMade {
        vms: Vec::new(),
        running_after_ms: Vec::new(),
    };
    for ((started, after), vm) in futures_util::future::join_all(starts)
        .await
        .into_iter()
        .zip(&made)
    {
        match started {
            Ok(view) => clones.vms.push(view),
            Err(err) => {
                tracing::warn!(vm = %vm.id, "a clone did not start: {err}");
                clones
                    .vms
                    .push(vms::get(svc, Scope::Tenant(tenant_id), &vm.id).await?);
            }
        }
        clones.running_after_ms.push(after.as_millis() as u64);
    }
    tracing::info!(snapshot = id, count = request.count, "clones made");
    Ok(clones)
}
