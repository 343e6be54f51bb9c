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

impl Cluster {
    /// Publishes this host's inventory.
    pub async fn publish_inventory(&self, inventory: &Inventory) -> Result<(), ClusterError> {
        let key = self.inner.keys.inventory(&self.inner.settings.host_name);
        self.inner.etcd.put(&key, inventory, None).await
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
}
