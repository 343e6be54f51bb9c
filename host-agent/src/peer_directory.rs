//! Who this host's peers are: the hosts it may call and take calls from
//! over mutual TLS. Standalone, the operator registers them (`/v1/peers`,
//! the store); in cluster mode every other member that is up is one, with
//! the address, port and certificate its heartbeat and record carry, and
//! nothing is registered. Everything that resolves a peer (migrations,
//! overlay networks, the TLS layer, the egress rules) asks here.

use std::sync::{Arc, OnceLock};

use nubis_api::Peer;

use crate::cluster::Cluster;
use crate::store::{PeerRow, Store, StoreError};

pub struct PeerDirectory {
    store: Arc<Store>,
    cluster: OnceLock<Cluster>,
}

impl PeerDirectory {
    pub fn new(store: Arc<Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            cluster: OnceLock::new(),
        })
    }

    /// From now on the peers are `cluster`'s members.
    pub fn use_cluster(&self, cluster: Cluster) {
        if self.cluster.set(cluster).is_err() {
            tracing::warn!("the peer directory already follows a cluster");
        }
    }

    /// The cluster the peers come from, in cluster mode.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.get()
    }

    /// Every peer.
    pub fn list(&self) -> Result<Vec<Peer>, StoreError> {
        match self.cluster.get() {
            Some(cluster) => Ok(cluster.peers()),
            None => self.store.list_hosts(),
        }
    }

    /// A peer by name or underlay address.
    pub fn get(&self, name_or_address: &str) -> Result<Option<PeerRow>, StoreError> {
        match self.cluster.get() {
            Some(cluster) => Ok(cluster
                .peers()
                .into_iter()
                .find(|peer| peer.name == name_or_address || peer.address == name_or_address)
                .map(|host| PeerRow { host })),
            None => self.store.get_host(name_or_address),
        }
    }
}
