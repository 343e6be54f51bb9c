//! A tenant's SSH public keys: parsed and normalized when registered,
//! chosen per VM at creation and copied into the VM's metadata then (a key
//! deleted later stays with the VMs created with it, as on a public
//! cloud). In SQLite on a standalone host, in etcd in a cluster.

use nubis_api::ssh_key::MAX_SSH_KEYS_PER_TENANT;
use nubis_api::vm::MAX_VM_SSH_KEYS;
use nubis_api::{NamedSshKey, SshKey, SshKeyCreate};

use super::{Result, Scope, ServiceError, Services};
use crate::metadata::inputs::PublicKey;
use crate::store::{new_id, now};
use crate::validate;

/// Registers `request` for `tenant_id`.
pub async fn create(svc: &Services, tenant_id: &str, request: &SshKeyCreate) -> Result<SshKey> {
    validate::name("name", &request.name, false)?;
    let parsed = PublicKey::parse("public_key", &request.public_key)?;
    let key = SshKey {
        id: new_id("key")?,
        tenant_id: tenant_id.to_string(),
        name: request.name.clone(),
        public_key: parsed.line(),
        fingerprint: parsed.fingerprint(),
        created_at: now(),
    };
    let limit = MAX_SSH_KEYS_PER_TENANT;
    match &svc.cluster {
        Some(cluster) => cluster.define_ssh_key(&key, limit).await?,
        None => svc.store.create_ssh_key(&key, limit)?,
    }
    tracing::info!(key = %key.id, tenant = tenant_id, fingerprint = %key.fingerprint, "SSH key registered");
    Ok(key)
}

/// The keys `scope` sees.
pub async fn list(svc: &Services, scope: Scope<'_>) -> Result<Vec<SshKey>> {
    match &svc.cluster {
        Some(cluster) => Ok(cluster.ssh_keys(scope.tenant()).await?),
        None => Ok(svc.store.list_ssh_keys(scope.tenant())?),
    }
}

/// Key `id_or_name` as `scope` sees it (the operator by id only).
pub async fn get(svc: &Services, scope: Scope<'_>, id_or_name: &str) -> Result<SshKey> {
    let found = match &svc.cluster {
        Some(cluster) => cluster
            .ssh_keys(scope.tenant())
            .await?
            .into_iter()
            .find(|key| {
                key.id == id_or_name || (scope.tenant().is_some() && key.name == id_or_name)
            }),
        None => svc.store.get_ssh_key(scope.tenant(), id_or_name)?,
    };
    found.ok_or_else(|| ServiceError::not_found("SSH key", id_or_name))
}

/// Deletes key `id_or_name` (VMs created with it keep it).
pub async fn delete(svc: &Services, scope: Scope<'_>, id_or_name: &str) -> Result<()> {
    let key = get(svc, scope, id_or_name).await?;
    match &svc.cluster {
        Some(cluster) => cluster.delete_ssh_key(&key).await?,
        None => {
            svc.store.delete_ssh_key(&key.id)?;
        }
    }
    tracing::info!(key = %key.id, tenant = %key.tenant_id, "SSH key deleted");
    Ok(())
}

/// The keys `wanted` (ids or names of `tenant_id`'s keys) as a VM keeps
/// them; an unknown one is refused naming it.
pub async fn resolve(
    svc: &Services,
    tenant_id: &str,
    wanted: &[String],
) -> Result<Vec<NamedSshKey>> {
    if wanted.len() > MAX_VM_SSH_KEYS {
        return Err(ServiceError::invalid(
            "ssh_keys",
            format!("{} keys: at most {MAX_VM_SSH_KEYS}", wanted.len()),
        ));
    }
    let mut keys: Vec<NamedSshKey> = Vec::with_capacity(wanted.len());
    for (index, name) in wanted.iter().enumerate() {
        let key = get(svc, Scope::Tenant(tenant_id), name)
            .await
            .map_err(|err| match err {
                ServiceError::NotFound { .. } => ServiceError::unprocessable(
                    format!("ssh_keys[{index}]"),
                    format!("no SSH key '{name}'"),
                ),
                other => other,
            })?;
        if !keys.iter().any(|kept| kept.name == key.name) {
            keys.push(NamedSshKey {
                name: key.name,
                public_key: key.public_key,
            });
        }
    }
    Ok(keys)
}
