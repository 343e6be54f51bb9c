//! Tenants' SSH public keys in the cluster (`ssh-keys/{id}`, names unique
//! per tenant through `ssh-key-names/{tenant}/{name}`), so that a VM
//! created through any host can name any of its tenant's keys. They are
//! few and small: read whole, never mirrored.

use etcd_client::{Txn, TxnOp};
use nubis_api::SshKey;

use super::{Cluster, ClusterError, NamedRecord};

impl Cluster {
    /// The keys of `tenant` (every tenant's for None), oldest first.
    pub async fn ssh_keys(&self, tenant: Option<&str>) -> Result<Vec<SshKey>, ClusterError> {
        let prefix = self.inner.keys.ssh_keys();
        let mut keys: Vec<SshKey> = self
            .inner
            .etcd
            .list(&prefix)
            .await?
            .into_iter()
            .map(|(_, key)| key)
            .filter(|key: &SshKey| tenant.is_none_or(|tenant| key.tenant_id == tenant))
            .collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(keys)
    }

    /// Records `key` unless its tenant is gone, the name is taken, or the
    /// tenant holds `limit` keys already.
    pub async fn define_ssh_key(&self, key: &SshKey, limit: usize) -> Result<(), ClusterError> {
        let held = self.ssh_keys(Some(&key.tenant_id)).await?.len();
        if held >= limit {
            return Err(ClusterError::Quota(format!(
                "the tenant holds {held} SSH keys, the most it may"
            )));
        }
        let keys = &self.inner.keys;
        self.define_named(
            NamedRecord {
                what: "SSH key",
                id: &key.id,
                tenant: &key.tenant_id,
                name: &key.name,
            },
            (&keys.ssh_key(&key.id), key),
            &keys.ssh_key_name(&key.tenant_id, &key.name),
        )
        .await
    }

    /// Deletes `key`.
    pub async fn delete_ssh_key(&self, key: &SshKey) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let txn = Txn::new().and_then([
            TxnOp::delete(keys.ssh_key(&key.id), None),
            TxnOp::delete(keys.ssh_key_name(&key.tenant_id, &key.name), None),
        ]);
        self.inner
            .etcd
            .txn(&format!("delete SSH key {}", key.id), txn)
            .await?;
        Ok(())
    }
}
