//! The host side of tenant networking, made to match the database: each
//! network's bridge with its gateway address, the VMs' taps, the packet
//! filter (`network::firewall`), VXLAN tunnels and one DHCP server per
//! network. The database is the truth: `reconcile` renders everything from
//! it, at agent start and after every change, so a restarted agent
//! duplicates nothing and leftovers of a crash are removed.
//!
//! Why its own component: running VMMs (`supervisor`) and shaping the
//! host's network are different jobs with different state (a per-VM lock
//! and exit watchers there; the network lock and the DHCP servers here).
//! The VM runner holds an `Arc<LinuxNetwork>` to plug and unplug its taps;
//! this side knows nothing of the runner. The services reach it through the
//! [`crate::service::HostNetwork`] trait, which tests replace.

use std::net::Ipv4Addr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::OwnedMutexGuard;

use crate::config::AgentConfig;
use crate::ipv4::Cidr;
use crate::network::dhcp::Lease;
use crate::network::dhcp_server::{DhcpServerError, DhcpServers, LeaseLookup};
use crate::network::firewall::{
    self, FirewallError, Forward, GuardedNic, OverlayPort, Policy, Segment,
};
use crate::network::vxlan::{self, Tunnel};
use crate::network::{
    self, nic_address, IfName, MacAddr, NetworkError, NETWORK_BRIDGE_PREFIX, VXLAN_PREFIX,
};
use crate::store::{NetworkRow, Store, StoreError, VmRow};

/// Errors in making the host's network match the database.
#[derive(Debug, thiserror::Error)]
pub enum HostNetworkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Dhcp(#[from] DhcpServerError),
    #[error(
        "network {0} spans hosts, but this agent has no underlay address (--underlay-address)"
    )]
    NoUnderlay(String),
    #[error("the VM's network {0} is gone")]
    NetworkGone(String),
}

/// How long a DHCP lease lasts; the address is the NIC's for as long as the
/// VM exists, so this only sets how often guests renew.
const LEASE_SECS: u32 = 86_400;

fn corrupt(err: String) -> HostNetworkError {
    HostNetworkError::Store(StoreError::Corrupt(err))
}

fn parse_cidr(text: &str) -> Result<Cidr, HostNetworkError> {
    text.parse().map_err(corrupt)
}

/// A stored interface name, parsed before it reaches a rule or a command.
fn stored_name(what: &str, text: &str) -> Result<IfName, HostNetworkError> {
    text.parse()
        .map_err(|err| corrupt(format!("{what}: {err}")))
}

/// The segments, guarded NICs and forwards the rules are made of, with the
/// destinations NAT egress never reaches.
fn policy(
    store: &Store,
    egress_denied: Vec<Cidr>,
    metadata_port: Option<u16>,
) -> Result<Policy, HostNetworkError> {
    let mut policy = Policy {
        egress_denied,
        metadata_port,
        ..Policy::default()
    };
    for net in store.list_networks(None)? {
        let cidr = parse_cidr(&net.cidr)?;
        let overlay = match &net.overlay {
            Some(overlay) => Some(OverlayPort {
                vxlan: stored_name(&format!("network {} VXLAN", net.id), &overlay.vxlan)?,
                gateway_mac: network::gateway_mac(net.vni),
            }),
            None => None,
        };
        policy.segments.push(Segment {
            bridge: stored_name(&format!("network {} bridge", net.id), &net.bridge)?,
            cidr,
            gateway: cidr.gateway(),
            nat: net.nat,
            dhcp: net.dhcp,
            overlay,
        });
    }
    for (_tenant, subnet) in store.list_tenant_subnets()? {
        let cidr = parse_cidr(&format!("10.88.{subnet}.0/24"))?;
        policy.segments.push(Segment {
            bridge: network::bridge_name(subnet),
            cidr,
            gateway: cidr.gateway(),
            nat: false,
            dhcp: false,
            overlay: None,
        });
    }
    let vms = store.list_vms(None, None)?;
    for vm in &vms {
        for (index, nic) in vm.nics.iter().enumerate() {
            // Every NIC is guarded: one without a MAC or address (which the
            // agent always assigns) is a corrupt record, not a free pass.
            let mac = nic
                .mac
                .as_deref()
                .ok_or_else(|| corrupt(format!("VM {} NIC {index} has no MAC", vm.id)))?;
            let mac = MacAddr::parse_unicast(mac)
                .map_err(|err| corrupt(format!("VM {} NIC {index}: {err}", vm.id)))?;
            let address = nic
                .address
                .as_deref()
                .and_then(nic_address)
                .ok_or_else(|| corrupt(format!("VM {} NIC {index} has no address", vm.id)))?;
            policy.nics.push(GuardedNic {
                tap: network::tap_name(&vm.id, index),
                mac,
                address,
            });
        }
    }
    for forward in store.list_port_forwards(None)? {
        let address = vms
            .iter()
            .find(|vm| vm.id == forward.vm_id)
            .and_then(|vm| vm.nics.get(forward.nic))
            .and_then(|nic| nic.address.as_deref().and_then(nic_address));
        if let Some(address) = address {
            policy.forwards.push(Forward {
                protocol: forward.protocol,
                host_port: forward.host_port,
                address,
                port: forward.vm_port,
            });
        }
    }
    Ok(policy)
}

/// Networks no tenant network may overlap and NAT egress never reaches,
/// whatever the host: "this network", loopback, link-local (a cloud's
/// metadata service lives there), multicast and the reserved class E.
pub const ALWAYS_PROTECTED: [(&str, [u8; 4], u8); 5] = [
    ("\"this\" network", [0, 0, 0, 0], 8),
    ("loopback", [127, 0, 0, 0], 8),
    ("link-local", [169, 254, 0, 0], 16),
    ("multicast", [224, 0, 0, 0], 4),
    ("reserved", [240, 0, 0, 0], 4),
];

/// The host's tenant networking on Linux: bridges, taps, nftables rules,
/// VXLAN tunnels and DHCP servers.
pub struct LinuxNetwork {
    store: Arc<Store>,
    /// The peers, whose addresses tenants' egress never reaches.
    peers: Arc<crate::peer_directory::PeerDirectory>,
    /// This host's end of the overlay's tunnels, when configured.
    underlay: Option<Ipv4Addr>,
    /// The operator's `egress_deny`.
    egress_deny: Vec<Cidr>,
    /// Where the metadata service listens (None before it does).
    metadata_port: Option<u16>,
    /// Serializes address assignment and bridge creation.
    lock: Arc<tokio::sync::Mutex<()>>,
    /// One DHCP server per network that has DHCP.
    dhcp: DhcpServers,
}

impl LinuxNetwork {
    /// Changes nothing on the host until asked (see `reconcile`).
    pub fn new(
        store: Arc<Store>,
        config: &AgentConfig,
        peers: Arc<crate::peer_directory::PeerDirectory>,
    ) -> Arc<Self> {
        Arc::new(Self {
            peers,
            underlay: config.underlay_address,
            egress_deny: config.egress_deny.clone(),
            metadata_port: Some(config.metadata_port).filter(|port| *port != 0),
            lock: Arc::new(tokio::sync::Mutex::new(())),
            dhcp: DhcpServers::new(
                Arc::new(StoreLeases(store.clone())),
                config.dhcp_requests_per_s,
            ),
            store,
        })
    }

    /// This host's end of the overlay's tunnels, when configured.
    pub fn underlay_address(&self) -> Option<Ipv4Addr> {
        self.underlay
    }

    /// Held while addresses are assigned or bridges made.
    pub async fn lock(&self) -> OwnedMutexGuard<()> {
        self.lock.clone().lock_owned().await
    }

    /// What tenants' NAT egress never reaches: link-local, the underlay's
    /// network, every peer host (its underlay address, where its peer API
    /// and migration listeners are) and the
    /// operator's `egress_deny`. (The host's own addresses are guarded by
    /// the input chain.)
    pub async fn egress_denied(&self) -> Result<Vec<Cidr>, HostNetworkError> {
        let mut denied = vec![Cidr::of(Ipv4Addr::new(169, 254, 0, 0), 16)];
        if let Some(underlay) = self.underlay_address() {
            let routes = network::host_routes().await?;
            denied.extend(
                routes
                    .iter()
                    .filter(|route| route.destination.contains(underlay))
                    .filter(|route| route.destination.prefix() > 0)
                    .map(|route| route.destination),
            );
            denied.push(Cidr::of(underlay, 32));
        }
        for host in self.peers.list()? {
            if let Ok(address) = host.address.parse::<Ipv4Addr>() {
                denied.push(Cidr::of(address, 32));
            }
        }
        denied.extend(self.egress_deny.iter().copied());
        denied.sort_by_key(|cidr| (u32::from(cidr.base()), cidr.prefix()));
        denied.dedup();
        Ok(denied)
    }

    /// Why `cidr` may not be a tenant network here, if it may not: it
    /// overlaps a network of [`ALWAYS_PROTECTED`], a route or address of
    /// the host (other than the default route and the agent's own tenant
    /// bridges, which the store checks without revealing them), or what
    /// NAT egress never reaches. The reason names only the host's side.
    pub async fn shadowed_host_network(
        &self,
        cidr: Cidr,
    ) -> Result<Option<String>, HostNetworkError> {
        for (what, octets, prefix) in ALWAYS_PROTECTED {
            let protected = Cidr::of(Ipv4Addr::from(octets), prefix);
            if protected.overlaps(&cidr) {
                return Ok(Some(format!("{cidr} overlaps {protected} ({what})")));
            }
        }
        let ours =
            |device: &str| device.starts_with(NETWORK_BRIDGE_PREFIX) || device.starts_with("nbr");
        for route in network::host_routes().await? {
            if route.destination.prefix() == 0 || route.device.as_deref().is_some_and(ours) {
                continue;
            }
            if route.destination.overlaps(&cidr) {
                return Ok(Some(format!(
                    "{cidr} overlaps the host's network {}{}",
                    route.destination,
                    route
                        .device
                        .as_deref()
                        .map(|device| format!(" on {device}"))
                        .unwrap_or_default()
                )));
            }
        }
        for denied in self.egress_denied().await? {
            if denied.overlaps(&cidr) {
                return Ok(Some(format!(
                    "{cidr} overlaps {denied}, which the host keeps for itself and its peers"
                )));
            }
        }
        Ok(None)
    }

    /// Brings the packet filter in line with the database when only VMs
    /// were added on networks the host already carries (clones): their
    /// anti-spoofing and address rules, without going over every link as
    /// [`HostNetwork::reconcile`] does (their taps and bridges are made
    /// when they start).
    pub async fn refresh_vm_rules(&self) -> Result<(), HostNetworkError> {
        let _network = self.lock().await;
        let denied = self.egress_denied().await?;
        firewall::apply(&policy(&self.store, denied, self.metadata_port)?).await?;
        Ok(())
    }

    /// Makes the host's bridges, packet filter and DHCP servers match the
    /// database.
    pub async fn reconcile(&self) -> Result<(), HostNetworkError> {
        let _network = self.lock().await;
        self.reconcile_locked().await
    }

    async fn reconcile_locked(&self) -> Result<(), HostNetworkError> {
        let networks = self.store.list_networks(None)?;
        // Tunnels of networks no longer carried here (their bridge port
        // would outlive the bridge otherwise).
        for link in network::links_named(VXLAN_PREFIX).await? {
            let known = networks.iter().any(|net| {
                net.overlay
                    .as_ref()
                    .is_some_and(|overlay| overlay.vxlan == link.as_str())
            });
            if !known {
                tracing::info!("removing {link}: it belongs to no network");
                network::delete_link(&link).await?;
            }
        }
        for net in &networks {
            let cidr = parse_cidr(&net.cidr)?;
            let bridge = stored_name(&format!("network {} bridge", net.id), &net.bridge)?;
            network::ensure_bridge(
                &bridge,
                cidr.gateway(),
                cidr.prefix(),
                Some((network::gateway_mac(net.vni), net.mtu)),
            )
            .await?;
            if let Some(tunnel) = self.tunnel(net)? {
                vxlan::ensure(&tunnel).await?;
            }
        }
        // Bridges of networks deleted while the agent was down.
        for bridge in network::bridges_named(NETWORK_BRIDGE_PREFIX).await? {
            if !networks.iter().any(|net| net.bridge == bridge.as_str()) {
                tracing::info!("removing {bridge}: it belongs to no network");
                network::delete_link(&bridge).await?;
            }
        }
        // Taps of VMs this agent does not know (a crash between creating a
        // tap and recording the VM, or a database restored from backup).
        let known: Vec<IfName> = self
            .store
            .list_vms(None, None)?
            .iter()
            .flat_map(|vm| (0..vm.nics.len()).map(|index| network::tap_name(&vm.id, index)))
            .collect();
        for tap in network::links_named(network::TAP_PREFIX).await? {
            if !known.contains(&tap) {
                tracing::info!("removing {tap}: it belongs to no VM");
                network::delete_link(&tap).await?;
            }
        }
        let denied = self.egress_denied().await?;
        firewall::apply(&policy(&self.store, denied, self.metadata_port)?).await?;
        let served: Vec<(String, String, Ipv4Addr)> = networks
            .iter()
            .filter(|net| net.dhcp)
            .filter_map(|net| {
                let cidr: Cidr = net.cidr.parse().ok()?;
                Some((net.id.clone(), net.bridge.clone(), cidr.gateway()))
            })
            .collect();
        self.dhcp.reconcile(&served)?;
        Ok(())
    }

    /// The VXLAN interface `net` needs on this host, if it spans hosts.
    fn tunnel(&self, net: &NetworkRow) -> Result<Option<Tunnel>, HostNetworkError> {
        let Some(overlay) = &net.overlay else {
            return Ok(None);
        };
        let local = self
            .underlay_address()
            .ok_or_else(|| HostNetworkError::NoUnderlay(net.id.clone()))?;
        let peers = overlay
            .hosts
            .iter()
            .map(|host| {
                host.parse::<Ipv4Addr>()
                    .map_err(|_| corrupt(format!("network {}: host '{host}'", net.id)))
            })
            .filter(|peer| peer.as_ref().map_or(true, |peer| *peer != local))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Tunnel {
            name: stored_name(&format!("network {} VXLAN", net.id), &overlay.vxlan)?,
            vni: net.vni,
            local,
            bridge: stored_name(&format!("network {} bridge", net.id), &net.bridge)?,
            mtu: net.mtu,
            peers,
        }))
    }

    /// Makes `vm`'s taps, on their virtual network's bridge or on the
    /// tenant's default bridge, owned by its jail's user `uid` (who may then
    /// attach to them without any capability).
    pub async fn plug_nics(&self, vm: &VmRow, uid: u32) -> Result<(), HostNetworkError> {
        let _network = self.lock().await;
        for (index, nic) in vm.nics.iter().enumerate() {
            let (bridge, cidr, identity) = match &nic.network {
                Some(id) => {
                    let net = self
                        .store
                        .get_network(None, id)?
                        .ok_or_else(|| HostNetworkError::NetworkGone(id.clone()))?;
                    (
                        stored_name(&format!("network {} bridge", net.id), &net.bridge)?,
                        parse_cidr(&net.cidr)?,
                        Some((network::gateway_mac(net.vni), net.mtu)),
                    )
                }
                None => {
                    let subnet = self.store.tenant_subnet(&vm.tenant_id)?;
                    (
                        network::bridge_name(subnet),
                        parse_cidr(&format!("10.88.{subnet}.0/24"))?,
                        None,
                    )
                }
            };
            network::ensure_bridge(&bridge, cidr.gateway(), cidr.prefix(), identity).await?;
            let mtu = identity.map(|(_, mtu)| mtu);
            network::create_tap(&network::tap_name(&vm.id, index), &bridge, mtu, uid).await?;
        }
        Ok(())
    }

    /// Removes the taps of `vm_id`'s NICs.
    pub async fn unplug_nics(&self, vm_id: &str, count: usize) {
        for index in 0..count {
            let tap = network::tap_name(vm_id, index);
            if let Err(err) = network::delete_link(&tap).await {
                tracing::warn!(vm = vm_id, "cannot remove tap {tap}: {err}");
            }
        }
    }
}

impl crate::service::HostNetwork for LinuxNetwork {
    fn lock(&self) -> BoxFuture<'_, OwnedMutexGuard<()>> {
        Box::pin(LinuxNetwork::lock(self))
    }

    fn reconcile(&self) -> BoxFuture<'_, Result<(), HostNetworkError>> {
        Box::pin(LinuxNetwork::reconcile(self))
    }

    fn refresh_vm_rules(&self) -> BoxFuture<'_, Result<(), HostNetworkError>> {
        Box::pin(LinuxNetwork::refresh_vm_rules(self))
    }

    fn shadowed(&self, cidr: Cidr) -> BoxFuture<'_, Result<Option<String>, HostNetworkError>> {
        Box::pin(self.shadowed_host_network(cidr))
    }

    fn underlay_address(&self) -> Option<Ipv4Addr> {
        self.underlay
    }

    fn underlay_mtu(&self, local: Ipv4Addr) -> BoxFuture<'_, Result<u16, String>> {
        Box::pin(async move {
            vxlan::underlay_mtu(local)
                .await
                .map_err(|err| err.to_string())
        })
    }

    fn remove_tenant_bridge(&self, subnet: u8) -> BoxFuture<'_, Result<(), NetworkError>> {
        Box::pin(async move { network::delete_link(&network::bridge_name(subnet)).await })
    }
}

/// The host's own DNS resolvers (`/etc/resolv.conf`), except loopback
/// ones, which a guest cannot reach: what a network hands out by default.
pub fn host_resolvers() -> Vec<String> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| parse_resolvers(&text))
        .unwrap_or_default()
}

fn parse_resolvers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .filter(|address| !address.is_loopback() && !address.is_unspecified())
        .map(|address| address.to_string())
        .take(4)
        .collect()
}

/// DHCP leases come from the VMs' records: a MAC gets the address the
/// agent assigned to that NIC, on that NIC's network only.
pub struct StoreLeases(pub Arc<Store>);

impl StoreLeases {
    fn lease_of(network: &NetworkRow, vm: &VmRow, mac: &str) -> Option<Lease> {
        let nic = vm.nics.iter().find(|nic| {
            nic.network.as_deref() == Some(network.id.as_str())
                && nic
                    .mac
                    .as_deref()
                    .is_some_and(|own| own.eq_ignore_ascii_case(mac))
        })?;
        let cidr: Cidr = network.cidr.parse().ok()?;
        Some(Lease {
            address: nic_address(nic.address.as_deref()?)?,
            prefix: cidr.prefix(),
            gateway: cidr.gateway(),
            dns: network
                .dns
                .iter()
                .filter_map(|server| server.parse().ok())
                .collect(),
            mtu: Some(network.mtu),
            lease_secs: LEASE_SECS,
        })
    }
}

impl LeaseLookup for StoreLeases {
    fn lease(&self, network_id: &str, mac: &str) -> Option<Lease> {
        let network = self.0.get_network(None, network_id).ok()??;
        let vms = self.0.list_vms(Some(&network.tenant_id), None).ok()?;
        vms.iter().find_map(|vm| Self::lease_of(&network, vm, mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::{NetworkCreate, Protocol, Quota, RateLimit, VmNic};

    #[test]
    fn resolvers_skip_loopback_and_junk() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver nonsense\n nameserver 192.0.2.1 \nsearch example\n";
        assert_eq!(parse_resolvers(text), ["10.255.255.53", "192.0.2.1"]);
        assert!(parse_resolvers("").is_empty());
    }

    /// A store with a network, a VM with a NIC on it and one on the
    /// tenant's default bridge, and a port forward.
    fn populated() -> (Arc<Store>, NetworkRow, VmRow) {
        let (store, tenant, image) = crate::store::fixture();
        let store = Arc::new(store);
        let net = store
            .create_network(
                &tenant,
                &NetworkCreate {
                    name: "front".into(),
                    cidr: "10.30.0.0/24".into(),
                    nat: true,
                    dhcp: true,
                    dns: None,
                    mtu: None,
                    hosts: vec![],
                },
                "10.30.0.0/24".parse().unwrap(),
                vec!["192.0.2.53".into()],
                1450,
                None,
                8,
            )
            .unwrap();
        let subnet = store.tenant_subnet(&tenant).unwrap();
        let vm = store
            .create_vm(
                &crate::store::NewVm {
                    tenant_id: tenant.clone(),
                    name: "web".into(),
                    image_id: image,
                    vcpus: 1,
                    memory_mib: 128,
                    kernel_args: String::new(),
                    root_rate_limit: RateLimit::default(),
                    disks: vec![],
                    nics: vec![
                        VmNic {
                            network: Some(net.id.clone()),
                            mac: Some("02:4e:42:00:00:01".into()),
                            address: Some("10.30.0.2/24".into()),
                            ..VmNic::default()
                        },
                        VmNic {
                            mac: Some("02:4e:42:00:00:02".into()),
                            address: Some(format!("10.88.{subnet}.2/24")),
                            ..VmNic::default()
                        },
                    ],
                    restore_from: None,
                    restore_as_clone: false,
                    metadata: Default::default(),
                },
                Quota::default(),
            )
            .unwrap();
        store
            .create_port_forward(
                &crate::store::new_id("pf").unwrap(),
                &tenant,
                &vm.id,
                0,
                Protocol::Tcp,
                31080,
                8080,
                16,
            )
            .unwrap();
        (store, net, vm)
    }

    #[test]
    fn the_policy_covers_every_bridge_nic_and_forward() {
        let (store, net, vm) = populated();
        let policy = policy(&store, vec![], None).unwrap();
        let bridges: Vec<&str> = policy.segments.iter().map(|s| s.bridge.as_str()).collect();
        assert_eq!(bridges, [net.bridge.as_str(), "nbr1"]);
        assert!(policy.segments[0].nat && policy.segments[0].dhcp);
        assert!(!policy.segments[1].nat && !policy.segments[1].dhcp);
        assert_eq!(policy.nics.len(), 2);
        assert_eq!(policy.nics[0].tap, network::tap_name(&vm.id, 0));
        assert_eq!(policy.nics[0].address, Ipv4Addr::new(10, 30, 0, 2));
        assert_eq!(policy.nics[1].address, Ipv4Addr::new(10, 88, 1, 2));
        assert_eq!(
            policy.forwards,
            [Forward {
                protocol: Protocol::Tcp,
                host_port: 31080,
                address: Ipv4Addr::new(10, 30, 0, 2),
                port: 8080,
            }]
        );
    }

    #[test]
    fn leases_are_the_nics_own_addresses_on_their_own_network() {
        let (store, net, _vm) = populated();
        let leases = StoreLeases(store);
        let lease = leases.lease(&net.id, "02:4E:42:00:00:01").unwrap();
        assert_eq!(lease.address, Ipv4Addr::new(10, 30, 0, 2));
        assert_eq!(lease.gateway, Ipv4Addr::new(10, 30, 0, 1));
        assert_eq!(lease.prefix, 24);
        assert_eq!(lease.mtu, Some(1450));
        assert_eq!(lease.dns, [Ipv4Addr::new(192, 0, 2, 53)]);
        // The NIC on the default bridge, an unknown MAC, an unknown network.
        assert_eq!(leases.lease(&net.id, "02:4e:42:00:00:02"), None);
        assert_eq!(leases.lease(&net.id, "02:4e:42:00:00:99"), None);
        assert_eq!(leases.lease("net-nope", "02:4e:42:00:00:01"), None);
    }
}
