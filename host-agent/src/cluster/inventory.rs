//! What lives on one host only, and must still be seen from every host:
//! its snapshots (files on its disk) and port forwards (rules on its
//! uplink). Each host publishes its inventory (`inventory/{host}`) when it
//! changes; every host lists them all from there, and requests about one
//! of them are forwarded to the host that has it (`http/forward.rs`).

use nubis_api::{PortForward, Snapshot};
use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterError};

/// `inventory/{host}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
    #[serde(default)]
    pub port_forwards: Vec<PortForward>,
}

/// This host's inventory as last published, and how many times it
/// changed.
#[derive(Debug, Default)]
pub struct Published {
    inventory: Option<Inventory>,
    pub changes: u64,
}

impl Cluster {
    /// This host's inventory as last published, locked: held from reading
    /// the store to [`Cluster::publish_inventory`], so that the last
    /// inventory written is the last one read.
    pub async fn published_inventory(&self) -> tokio::sync::MutexGuard<'_, Published> {
        self.inner.published.lock().await
    }

    /// Publishes `inventory` (read under `published`) if it changed.
    pub async fn publish_inventory(
        &self,
        published: &mut Published,
        inventory: Inventory,
    ) -> Result<(), ClusterError> {
        if published.inventory.as_ref() == Some(&inventory) {
            return Ok(());
        }
        let key = self.inner.keys.inventory(&self.inner.settings.host_name);
        self.inner.etcd.put(&key, &inventory, None).await?;
        published.inventory = Some(inventory);
        published.changes += 1;
        Ok(())
    }

    /// The other hosts' inventories, by host name.
    pub async fn other_inventories(&self) -> Result<Vec<(String, Inventory)>, ClusterError> {
        let prefix = self.inner.keys.inventories();
        let me = self.inner.settings.host_name.as_str();
        Ok(self
            .inner
            .etcd
            .list::<Inventory>(&prefix)
            .await?
            .into_iter()
            .filter_map(|(key, inventory)| {
                let host = key.strip_prefix(&prefix)?.to_string();
                (host != me).then_some((host, inventory))
            })
            .collect())
    }

    /// What the other hosts hold of one kind (`pick`), of `tenant` only
    /// (all for None).
    pub async fn held_elsewhere<T: HostLocal>(
        &self,
        tenant: Option<&str>,
        pick: fn(Inventory) -> Vec<T>,
    ) -> Result<Vec<T>, ClusterError> {
        Ok(self
            .other_inventories()
            .await?
            .into_iter()
            .flat_map(|(_, inventory)| pick(inventory))
            .filter(|held| tenant.is_none_or(|tenant| held.tenant_id() == tenant))
            .collect())
    }
}

impl Cluster {
    /// Resource `id` of one kind (`pick`) as another host holds it, if
    /// one does and `tenant` (None: any) owns it.
    pub async fn find_elsewhere<T: HostLocal>(
        &self,
        tenant: Option<&str>,
        pick: fn(Inventory) -> Vec<T>,
        id: &str,
    ) -> Result<Option<T>, ClusterError> {
        Ok(self
            .held_elsewhere(tenant, pick)
            .await?
            .into_iter()
            .find(|held| held.id() == id))
    }

    /// The other host that holds resource `id` of one kind (`pick`).
    pub async fn holder_of<T: HostLocal>(
        &self,
        pick: fn(&Inventory) -> &[T],
        id: &str,
    ) -> Result<Option<String>, ClusterError> {
        Ok(self
            .other_inventories()
            .await?
            .into_iter()
            .find(|(_, inventory)| pick(inventory).iter().any(|held| held.id() == id))
            .map(|(host, _)| host))
    }
}

/// A resource that lives on one host.
pub trait HostLocal {
    fn id(&self) -> &str;
    fn tenant_id(&self) -> &str;
}

impl HostLocal for Snapshot {
    fn id(&self) -> &str {
        &self.id
    }
    fn tenant_id(&self) -> &str {
        &self.tenant_id
    }
}

impl HostLocal for PortForward {
    fn id(&self) -> &str {
        &self.id
    }
    fn tenant_id(&self) -> &str {
        &self.tenant_id
    }
}
