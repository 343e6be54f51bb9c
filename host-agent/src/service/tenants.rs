//! Tenants and their API tokens (the operator's to manage). A tenant's
//! quotas are at least 1 each: a tenant that may run nothing is a deleted
//! tenant. Deleting one takes its default bridge off the host.

use nubis_api::{Quota, Tenant, TenantCreate, TokenCreated, TokenInfo};

use super::{Result, ServiceError, Services};
use crate::store::TenantRow;
use crate::validate;

impl From<TenantRow> for Tenant {
    fn from(row: TenantRow) -> Self {
        Tenant {
            id: row.id,
            name: row.name,
            quota: row.quota,
            created_at: row.created_at,
        }
    }
}

/// A tenant replicated from another host (with a network or a VM) is
/// stored as that host has it.
impl From<Tenant> for TenantRow {
    fn from(tenant: Tenant) -> Self {
        TenantRow {
            id: tenant.id,
            name: tenant.name,
            quota: tenant.quota,
            created_at: tenant.created_at,
        }
    }
}

fn check_quota(quota: &Quota) -> Result<()> {
    if quota.max_vcpus == 0 || quota.max_memory_mib == 0 || quota.max_vms == 0 {
        return Err(ServiceError::invalid(
            "quota",
            "every quota must be at least 1 (a tenant that may run nothing is a deleted tenant)",
        ));
    }
    Ok(())
}

/// Creates tenant `request` (with the default quota unless it has one).
/// In cluster mode the tenant is the cluster's: created in etcd, and
/// answered once this host mirrors it.
pub async fn create(svc: &Services, request: &TenantCreate) -> Result<Tenant> {
    validate::name("name", &request.name, false)?;
    let quota = request.quota.unwrap_or_default();
    check_quota(&quota)?;
    let tenant = match &svc.cluster {
        Some(cluster) => {
            let id = cluster.create_tenant(&request.name, quota).await?;
            svc.store.get_tenant(&id)?.ok_or_else(|| {
                ServiceError::Internal(format!("tenant {id} is not mirrored here"))
            })?
        }
        None => svc.store.create_tenant(&request.name, quota)?,
    };
    tracing::info!(tenant = %tenant.id, name = %tenant.name, "tenant created");
    Ok(tenant.into())
}

pub fn list(svc: &Services) -> Result<Vec<Tenant>> {
    Ok(svc
        .store
        .list_tenants()?
        .into_iter()
        .map(Tenant::from)
        .collect())
}

/// Tenant `id`.
pub fn get(svc: &Services, id: &str) -> Result<Tenant> {
    svc.store
        .get_tenant(id)?
        .map(Tenant::from)
        .ok_or_else(|| ServiceError::not_found("tenant", id))
}

/// Deletes tenant `id` (the store refuses while it owns resources here;
/// in cluster mode, while any member holds some or cannot say), and its
/// default bridge.
pub async fn delete(svc: &Services, id: &str) -> Result<()> {
    get(svc, id)?;
    let subnet = svc.store.existing_tenant_subnet(id)?;
    match &svc.cluster {
        Some(cluster) => {
            svc.store.check_tenant_empty(id)?;
            cluster.delete_tenant(id).await?;
            for key in cluster.ssh_keys(Some(id)).await? {
                cluster.delete_ssh_key(&key).await?;
            }
        }
        None => {
            svc.store.delete_tenant(id)?;
        }
    }
    if let Some(subnet) = subnet {
        if let Err(err) = svc.host_network.remove_tenant_bridge(subnet).await {
            tracing::warn!(tenant = %id, "cannot remove the tenant's bridge: {err}");
        }
        svc.host_network.reconcile().await?;
    }
    tracing::info!(tenant = %id, "tenant deleted");
    Ok(())
}

/// A new token of tenant `id` (its secret is shown only now).
pub async fn create_token(svc: &Services, id: &str) -> Result<TokenCreated> {
    get(svc, id)?;
    match &svc.cluster {
        Some(cluster) => Ok(cluster.create_token(id).await?),
        None => Ok(svc.store.create_token(id)?),
    }
}

pub fn list_tokens(svc: &Services, id: &str) -> Result<Vec<TokenInfo>> {
    get(svc, id)?;
    Ok(svc.store.list_tokens(id)?)
}

/// Revokes token `token_id` of tenant `id`.
pub async fn delete_token(svc: &Services, id: &str, token_id: &str) -> Result<()> {
    let deleted = match &svc.cluster {
        Some(cluster) => cluster.delete_token(id, token_id).await?,
        None => svc.store.delete_token(id, token_id)?,
    };
    if deleted {
        Ok(())
    } else {
        Err(ServiceError::not_found("token", token_id))
    }
}
