//! Tenant networks in the cluster: one definition in etcd
//! (`networks/{id}`), one IPAM (`ipam/{network}/{address}`, an address
//! taken by creating its key in the transaction that defines the VM), one
//! VNI space (`vnis/{vni}`). No host is a network's home: every host
//! carries the networks (`service::placed` mirrors them into its store,
//! where the bridges, DHCP and rules are made as for any network), and a
//! network's VXLAN flood list is the hosts that have VMs on it (every
//! member for a network of service endpoints).
//!
//! Two networks of the cluster may not overlap (each host routes every
//! network's gateway): a creation is checked against the networks the
//! cluster has; two overlapping creations racing through two hosts can
//! both be written, and the hosts then refuse to carry the second
//! (logged). A `cidrs/` index would close that, and is still to come.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use nubis_api::{Network, Quota};
use serde::{Deserialize, Serialize};

use super::etcd::encode;
use super::vms::{unchanged, TenantUsage, ATTEMPTS};
use super::{Cluster, ClusterError};

/// `networks/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub cidr: String,
    pub gateway: String,
    pub nat: bool,
    pub dhcp: bool,
    pub dns: Vec<String>,
    pub mtu: u16,
    pub vni: u32,
    pub created_at: u64,
}

impl NetworkRecord {
    /// The network as the API shows it (the bridge as every host names it).
    pub fn network(&self) -> Network {
        Network {
            id: self.id.clone(),
            tenant_id: self.tenant_id.clone(),
            name: self.name.clone(),
            cidr: self.cidr.clone(),
            gateway: self.gateway.clone(),
            nat: self.nat,
            dhcp: self.dhcp,
            dns: self.dns.clone(),
            mtu: self.mtu,
            vni: self.vni,
            bridge: crate::network::network_bridge_name(self.vni).to_string(),
            overlay: None,
            created_at: self.created_at,
        }
    }

    /// Whether this is network `wanted` (id or name) of `tenant` (any
    /// tenant's by id for None).
    pub fn is(&self, tenant: Option<&str>, wanted: &str) -> bool {
        match tenant {
            Some(tenant) => self.tenant_id == tenant && (self.id == wanted || self.name == wanted),
            None => self.id == wanted,
        }
    }
}

/// `network-names/{tenant}/{name}` and `vnis/{vni}`: whose it is.
#[derive(Serialize)]
struct Owner<'a> {
    id: &'a str,
}

/// What a network counts against its tenant's quota.
const ONE_NETWORK: TenantUsage = TenantUsage {
    vms: 0,
    vcpus: 0,
    memory_mib: 0,
    networks: 1,
    storage_mib: 0,
};

impl Cluster {
    /// Every network of the cluster.
    pub async fn networks(&self) -> Result<Vec<NetworkRecord>, ClusterError> {
        Ok(self.networks_at().await?.0)
    }

    /// Every network of the cluster, and the revision they were read at.
    pub async fn networks_at(&self) -> Result<(Vec<NetworkRecord>, i64), ClusterError> {
        let prefix = self.inner.keys.networks();
        let (mut read, revision) = self
            .inner
            .etcd
            .get_prefixes_at::<NetworkRecord>(&[&prefix])
            .await?;
        let mut networks: Vec<NetworkRecord> = read
            .pop()
            .unwrap_or_default()
            .into_iter()
            .map(|(_, stored)| stored.value)
            .collect();
        networks.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok((networks, revision))
    }

    /// Network `wanted` (id or name) as `tenant` sees it.
    pub async fn network(
        &self,
        tenant: Option<&str>,
        wanted: &str,
    ) -> Result<Option<NetworkRecord>, ClusterError> {
        Ok(self
            .networks()
            .await?
            .into_iter()
            .find(|network| network.is(tenant, wanted)))
    }

    /// Defines `record` within `quota`: refused when the name or the VNI is
    /// taken (the caller draws another VNI) or the tenant is gone; and,
    /// with `checked` (the revision of the networks the caller checked its
    /// range against), when another network was defined since (the caller
    /// checks again): two overlapping networks racing through two hosts
    /// cannot both be defined.
    pub async fn define_network(
        &self,
        record: &NetworkRecord,
        quota: &Quota,
        checked: Option<i64>,
    ) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let tenant = &record.tenant_id;
        let (key, name_key) = (
            keys.network(&record.id),
            keys.network_name(tenant, &record.name),
        );
        let (vni_key, usage_key, tenant_key) = (
            keys.vni(record.vni),
            keys.usage(tenant),
            keys.tenant(tenant),
        );
        for _ in 0..ATTEMPTS {
            let (current, seen) = self.usage(&usage_key).await?;
            let usage = current.with(ONE_NETWORK, quota)?;
            let owner = Owner { id: &record.id };
            let mut conditions = vec![
                Compare::create_revision(tenant_key.as_str(), CompareOp::Greater, 0),
                Compare::create_revision(name_key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(vni_key.as_str(), CompareOp::Equal, 0),
                unchanged(&usage_key, seen),
            ];
            if let Some(checked) = checked {
                conditions.push(
                    Compare::mod_revision(keys.networks().as_str(), CompareOp::Less, checked + 1)
                        .with_prefix(),
                );
            }
            let txn = Txn::new().when(conditions).and_then([
                TxnOp::put(key.as_str(), encode(&key, record)?, None),
                TxnOp::put(name_key.as_str(), encode(&name_key, &owner)?, None),
                TxnOp::put(vni_key.as_str(), encode(&vni_key, &owner)?, None),
                TxnOp::put(usage_key.as_str(), encode(&usage_key, &usage)?, None),
            ]);
            let (done, _) = self
                .inner
                .etcd
                .txn(&format!("define network {}", record.id), txn)
                .await?;
            if done {
                return Ok(());
            }
            let etcd = &self.inner.etcd;
            self.require_tenant(tenant).await?;
            if etcd.get::<serde_json::Value>(&name_key).await?.is_some() {
                return Err(ClusterError::Exists(format!(
                    "a network named '{}' of this tenant",
                    record.name
                )));
            }
            if etcd.get::<serde_json::Value>(&vni_key).await?.is_some() {
                return Err(ClusterError::Raced(format!("VNI {}", record.vni)));
            }
            if let Some(checked) = checked {
                let (now, _) = etcd
                    .get_prefixes_at::<serde_json::Value>(&[&keys.networks()])
                    .await?;
                let defined_since = now
                    .iter()
                    .flatten()
                    .any(|(_, stored)| stored.mod_revision > checked);
                if defined_since {
                    return Err(ClusterError::Raced("the cluster's networks".to_string()));
                }
            }
        }
        Err(ClusterError::Contended {
            key: usage_key,
            attempts: ATTEMPTS,
        })
    }

    /// Deletes network `record`, refused while any address of it is a
    /// VM's or a service's (the hosts' balancing addresses go with it).
    pub async fn delete_network(&self, record: &NetworkRecord) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let key = keys.network(&record.id);
        let usage_key = keys.usage(&record.tenant_id);
        let addresses = keys.addresses_of(&record.id);
        let lb_hosts = keys.lb_hosts_of(&record.id);
        for _ in 0..ATTEMPTS {
            let (current, seen) = self.usage(&usage_key).await?;
            let usage = current.without(ONE_NETWORK);
            let (mut held, revision) = self
                .inner
                .etcd
                .get_prefixes_at::<serde_json::Value>(&[&addresses])
                .await?;
            let held = held.pop().unwrap_or_default();
            if held
                .iter()
                .any(|(_, stored)| serde_json::from_value::<LbHost>(stored.value.clone()).is_err())
            {
                return Err(ClusterError::Held(format!(
                    "network {} has NICs of VMs or addresses of services in the cluster: delete them first",
                    record.id
                )));
            }
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.as_str(), CompareOp::Greater, 0),
                    // Nothing took an address since the read.
                    Compare::mod_revision(addresses.as_str(), CompareOp::Less, revision + 1)
                        .with_prefix(),
                    unchanged(&usage_key, seen),
                ])
                .and_then(
                    [
                        TxnOp::delete(key.as_str(), None),
                        TxnOp::delete(keys.network_name(&record.tenant_id, &record.name), None),
                        TxnOp::delete(keys.vni(record.vni), None),
                        TxnOp::put(usage_key.as_str(), encode(&usage_key, &usage)?, None),
                        TxnOp::delete(
                            lb_hosts.as_str(),
                            Some(etcd_client::DeleteOptions::new().with_prefix()),
                        ),
                    ]
                    .into_iter()
                    .chain(held.into_iter().map(|(key, _)| TxnOp::delete(key, None)))
                    .collect::<Vec<_>>(),
                );
            let (done, _) = self
                .inner
                .etcd
                .txn(&format!("delete network {}", record.id), txn)
                .await?;
            if done {
                return Ok(());
            }
            if self
                .inner
                .etcd
                .get::<serde_json::Value>(&key)
                .await?
                .is_none()
            {
                return Ok(());
            }
        }
        Err(ClusterError::Contended {
            key: usage_key,
            attempts: ATTEMPTS,
        })
    }

    /// The addresses of network `id` that VMs hold.
    pub async fn used_addresses(&self, id: &str) -> Result<HashSet<Ipv4Addr>, ClusterError> {
        let prefix = self.inner.keys.addresses_of(id);
        let found = self.inner.etcd.list::<serde_json::Value>(&prefix).await?;
        Ok(found
            .iter()
            .filter_map(|(key, _)| key.strip_prefix(&prefix)?.parse().ok())
            .collect())
    }
}

impl Cluster {
    /// The NICs of `spec` with a MAC and a free address on each of the
    /// cluster's networks they name (checked against `ipam/`; taken for
    /// good by the transaction that defines the VM). NICs on the tenant's
    /// default bridge get theirs from the host the VM is placed on.
    pub async fn assign_nics(
        &self,
        tenant_id: &str,
        spec: &nubis_api::VmCreate,
        networks: &[NetworkRecord],
    ) -> Result<Vec<nubis_api::VmNic>, ClusterError> {
        let mut nics = Vec::with_capacity(spec.nics.len());
        let mut chosen: std::collections::HashMap<String, HashSet<Ipv4Addr>> =
            std::collections::HashMap::new();
        for (index, asked) in spec.nics.iter().enumerate() {
            let mut nic = nubis_api::VmNic {
                rate_limit: asked.rate_limit,
                ..nubis_api::VmNic::default()
            };
            if let Some(wanted) = &asked.network {
                let network = networks
                    .iter()
                    .find(|network| network.is(Some(tenant_id), wanted))
                    .ok_or_else(|| ClusterError::NoNetwork {
                        index,
                        name: wanted.clone(),
                    })?;
                let cidr: crate::ipv4::Cidr =
                    network
                        .cidr
                        .parse()
                        .map_err(|reason: String| ClusterError::Corrupt {
                            key: self.inner.keys.network(&network.id),
                            reason,
                        })?;
                let taken = chosen.entry(network.id.clone()).or_default();
                let mut used = self.used_addresses(&network.id).await?;
                used.extend(taken.iter().copied());
                let address = cidr.allocate(&used).ok_or_else(|| {
                    ClusterError::AddressesExhausted(format!(
                        "no free address left in {}",
                        network.cidr
                    ))
                })?;
                taken.insert(address);
                nic.network = Some(network.id.clone());
                nic.address = Some(format!("{address}/{}", cidr.prefix()));
                let mac = crate::network::random_mac().map_err(|err| {
                    ClusterError::AddressesExhausted(format!("no random MAC: {err}"))
                })?;
                nic.mac = Some(mac.to_string());
            }
            nics.push(nic);
        }
        Ok(nics)
    }
}

/// The value of a host's balancing address in `ipam/` (`lb-hosts/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbHost {
    pub host: String,
    pub address: Ipv4Addr,
}

impl Cluster {
    /// This host's balancing address on network `record` (taken in
    /// `ipam/` the first time it is asked for): the source of the flows it
    /// balances to the network's instances, so that their answers come
    /// back through it.
    pub async fn lb_address(&self, record: &NetworkRecord) -> Result<Ipv4Addr, ClusterError> {
        let keys = &self.inner.keys;
        let me = self.inner.settings.host_name.to_string();
        let index_key = keys.lb_host(&record.id, &me);
        if let Some(stored) = self.inner.etcd.get::<LbHost>(&index_key).await? {
            return Ok(stored.value.address);
        }
        let cidr: crate::ipv4::Cidr =
            record
                .cidr
                .parse()
                .map_err(|reason: String| ClusterError::Corrupt {
                    key: keys.network(&record.id),
                    reason,
                })?;
        for _ in 0..ATTEMPTS {
            let used = self.used_addresses(&record.id).await?;
            let address = cidr.allocate(&used).ok_or_else(|| {
                ClusterError::AddressesExhausted(format!("no free address left in {}", record.cidr))
            })?;
            let value = LbHost {
                host: me.clone(),
                address,
            };
            let address_key = keys.address(&record.id, address);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(keys.network(&record.id), CompareOp::Greater, 0),
                    Compare::create_revision(address_key.as_str(), CompareOp::Equal, 0),
                    Compare::create_revision(index_key.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(address_key.as_str(), encode(&address_key, &value)?, None),
                    TxnOp::put(index_key.as_str(), encode(&index_key, &value)?, None),
                ]);
            let (done, _) = self
                .inner
                .etcd
                .txn(&format!("take a balancing address on {}", record.id), txn)
                .await?;
            if done {
                return Ok(address);
            }
            if let Some(stored) = self.inner.etcd.get::<LbHost>(&index_key).await? {
                return Ok(stored.value.address);
            }
        }
        Err(ClusterError::Contended {
            key: index_key,
            attempts: ATTEMPTS,
        })
    }
}
