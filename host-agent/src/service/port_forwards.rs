//! Port forwards: a host port that leads to a port on one of a tenant's
//! VMs (DNAT). Only ports of the operator's range are given out (never the
//! API's, VXLAN's or the migrations'), and a forward whose rule the host
//! refused is not kept.

use nubis_api::{PortForward, PortForwardCreate};

use super::{Result, Scope, ServiceError, Services};
use crate::cluster::claims::{Claim, ClaimKind};
use crate::store::{new_id, PortForwardRow};

impl From<PortForwardRow> for PortForward {
    fn from(row: PortForwardRow) -> Self {
        PortForward {
            id: row.id,
            tenant_id: row.tenant_id,
            vm_id: row.vm_id,
            nic: row.nic,
            protocol: row.protocol,
            host_port: row.host_port,
            vm_port: row.vm_port,
            created_at: row.created_at,
        }
    }
}

/// Creates `request` for `tenant_id`, with its DNAT rule.
pub async fn create(
    svc: &Services,
    tenant_id: &str,
    request: &PortForwardCreate,
) -> Result<PortForward> {
    // Only the operator's range: never the API's, VXLAN's or the
    // migrations' ports, nor any other service of the host's.
    let range = svc.supervisor.config().port_forward_range;
    if !range.contains(request.host_port) {
        // A valid port, but not one this host forwards.
        return Err(ServiceError::unprocessable(
            "host_port",
            format!("must be in this host's port forward range, {range}"),
        ));
    }
    if let Some(cluster) = &svc.cluster {
        if cluster
            .host_port_taken(request.protocol, request.host_port)
            .await?
        {
            return Err(ServiceError::Conflict(format!(
                "{} port {} is a service endpoint's on every host",
                request.protocol.as_str(),
                request.host_port
            )));
        }
    }
    if request.vm_port == 0 {
        return Err(ServiceError::invalid("vm_port", "must be 1 to 65535"));
    }
    let vm = svc
        .store
        .get_vm(Some(tenant_id), &request.vm)?
        .ok_or_else(|| ServiceError::unprocessable("vm", format!("no VM '{}'", request.vm)))?;
    if vm.nics.get(request.nic).is_none() {
        return Err(ServiceError::unprocessable(
            "nic",
            format!("VM {} has {} NIC(s)", vm.name, vm.nics.len()),
        ));
    }
    let quota = svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::Unauthorized("the token's tenant is gone".to_string()))?
        .quota;
    let id = new_id("pf")?;
    let _claim = match &svc.cluster {
        Some(cluster) => {
            let claim = Claim {
                kind: ClaimKind::PortForward,
                storage_mib: 0,
            };
            Some(cluster.claim(tenant_id, &id, claim, &quota).await?)
        }
        None => None,
    };
    let forward = svc.store.create_port_forward(
        &id,
        tenant_id,
        &vm.id,
        request.nic,
        request.protocol,
        request.host_port,
        request.vm_port,
        quota.max_port_forwards,
    )?;
    if let Err(err) = svc.host_network.reconcile().await {
        svc.store.delete_port_forward(&forward.id)?;
        return Err(err.into());
    }
    tracing::info!(tenant = tenant_id, forward = %forward.id, host_port = forward.host_port, vm = %vm.id, "port forward created");
    super::placed::announce_host_local(svc).await;
    Ok(forward.into())
}

/// The port forwards `scope` sees: this host's, and in a cluster every
/// other member's as it last published them.
pub async fn list(svc: &Services, scope: Scope<'_>) -> Result<Vec<PortForward>> {
    let rows = svc.store.list_port_forwards(scope.tenant())?;
    let mut forwards: Vec<PortForward> = rows.into_iter().map(PortForward::from).collect();
    if let Some(cluster) = &svc.cluster {
        forwards.extend(
            cluster
                .held_elsewhere(scope.tenant(), |inventory| inventory.port_forwards)
                .await?,
        );
    }
    Ok(forwards)
}

/// Port forward `id` as `scope` sees it (in a cluster, on another member
/// as that member last published it).
pub async fn get(svc: &Services, scope: Scope<'_>, id: &str) -> Result<PortForward> {
    match find(svc, scope, id) {
        Ok(row) => Ok(row.into()),
        Err(err) => {
            let Some(cluster) = &svc.cluster else {
                return Err(err);
            };
            cluster
                .find_elsewhere(scope.tenant(), |held| held.port_forwards, id)
                .await?
                .ok_or(err)
        }
    }
}

fn find(svc: &Services, scope: Scope<'_>, id: &str) -> Result<PortForwardRow> {
    svc.store
        .get_port_forward(scope.tenant(), id)?
        .ok_or_else(|| ServiceError::not_found("port forward", id))
}

/// Deletes port forward `id` and its rule.
pub async fn delete(svc: &Services, scope: Scope<'_>, id: &str) -> Result<()> {
    let forward = find(svc, scope, id)?;
    svc.store.delete_port_forward(&forward.id)?;
    svc.host_network.reconcile().await?;
    if let Some(cluster) = &svc.cluster {
        // The sweep gives it back if this fails.
        cluster.release(&forward.tenant_id, &forward.id).await?;
    }
    super::placed::announce_host_local(svc).await;
    Ok(())
}
