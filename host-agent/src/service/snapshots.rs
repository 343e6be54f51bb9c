//! Snapshots of a tenant's VMs, taken without stopping them, and restored
//! into new VMs that resume where the snapshot was taken. A snapshot costs
//! one of the tenant's snapshots and, at most, the VM's memory and disks
//! of its storage; files written without a record are removed (or swept
//! at the agent's next start).

use nubis_api::{Quota, Snapshot, SnapshotRestore, Vm};

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
    let tenant = svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::Unauthorized("the token's tenant is gone".to_string()))?;
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
    let vm = svc.store.create_vm(&new, tenant.quota)?;
    svc.store
        .add_event(&vm.id, "created", &format!("restored from snapshot {id}"))?;
    drop(network_lock);
    if let Err(err) = super::placed::publish_here(svc, &vm, &tenant.quota).await {
        svc.store.delete_vm(&vm.id)?;
        return Err(err);
    }
    if !vm.nics.is_empty() {
        if let Err(err) = svc.host_network.reconcile().await {
            svc.store.delete_vm(&vm.id)?;
            return Err(err.into());
        }
    }
    Ok(svc.vm_view(vm))
}
