//! Tenant networks (CIDR, gateway, VXLAN id) and overlay networks that
//! span hosts: this host is the home of the networks created here, gives
//! them to the hosts they span, hands out their addresses to those hosts'
//! VMs (one IPAM per network), and carries the networks other homes give
//! it. Everything here undoes its own steps when a later one fails: a
//! network is never kept half made on this host or its peers.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use nubis_api::{AddressGrant, AddressRequest, Network, NetworkCreate, NetworkReplica};

use super::{Result, Scope, ServiceError, Services};
use crate::cluster::networks::NetworkRecord;
use crate::cluster::view::{Member, View};
use crate::cluster::vms::ClusterVm;
use crate::cluster::{Cluster, ClusterError};
use crate::ipv4::Cidr;
use crate::network::host::host_resolvers;
use crate::network::nic_address;
use crate::network::vxlan::VXLAN_OVERHEAD;
use crate::store::{NetworkRow, PeerRow};
use crate::validate;

impl From<NetworkRow> for Network {
    fn from(row: NetworkRow) -> Self {
        Network {
            id: row.id,
            tenant_id: row.tenant_id,
            name: row.name,
            cidr: row.cidr,
            gateway: row.gateway,
            nat: row.nat,
            dhcp: row.dhcp,
            dns: row.dns,
            mtu: row.mtu,
            vni: row.vni,
            bridge: row.bridge,
            overlay: row.overlay,
            created_at: row.created_at,
        }
    }
}

/// An overlay network as its home host gives it (`adopt`); the store
/// derives this host's bridge and VXLAN names again.
impl From<Network> for NetworkRow {
    fn from(network: Network) -> Self {
        NetworkRow {
            id: network.id,
            tenant_id: network.tenant_id,
            name: network.name,
            cidr: network.cidr,
            gateway: network.gateway,
            nat: network.nat,
            dhcp: network.dhcp,
            dns: network.dns,
            mtu: network.mtu,
            vni: network.vni,
            bridge: network.bridge,
            overlay: network.overlay,
            created_at: network.created_at,
        }
    }
}

/// The MTUs a network may have: IPv4's guaranteed datagram size up to a
/// jumbo frame.
const MTU_RANGE: std::ops::RangeInclusive<u16> = 576..=9000;
const DEFAULT_MTU: u16 = 1500;
const MAX_DNS_SERVERS: usize = 4;

/// Creates `request` for `tenant_id`: the bridge, its rules and DHCP
/// server come up, then the spanned hosts take it on.
pub async fn create(svc: &Services, tenant_id: &str, request: &NetworkCreate) -> Result<Network> {
    validate::name("name", &request.name, false)?;
    if let Some(cluster) = &svc.cluster {
        return create_in_cluster(svc, cluster, tenant_id, request).await;
    }
    let _hold = svc.hold_tenant(tenant_id).await?;
    let cidr: Cidr = request
        .cidr
        .parse()
        .map_err(|err: String| ServiceError::invalid("cidr", err))?;
    if let Some(reason) = svc.host_network.shadowed(cidr).await? {
        // Well-formed, but this host's own networks have it.
        return Err(ServiceError::unprocessable("cidr", reason));
    }
    let quota = svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::Unauthorized("the token's tenant is gone".to_string()))?
        .quota;
    let dns = match &request.dns {
        Some(servers) => dns_servers(servers)?,
        None => host_resolvers(),
    };
    let peers = spanned_peers(svc, &request.hosts)?;
    let (mtu, overlay) = if peers.is_empty() {
        (request.mtu.unwrap_or(DEFAULT_MTU), None)
    } else {
        let local = local_underlay(svc)?;
        let max = max_overlay_mtu(svc, local).await?;
        let mtu = request.mtu.unwrap_or(max);
        if mtu > max {
            return Err(ServiceError::unprocessable(
                "mtu",
                format!("{mtu} does not fit the underlay: at most {max} with VXLAN's 50 bytes"),
            ));
        }
        let mut hosts = vec![local.to_string()];
        hosts.extend(peers.iter().map(|peer| peer.host.address.clone()));
        (mtu, Some((local.to_string(), hosts)))
    };
    check_mtu(mtu)?;
    let network = svc.store.create_network(
        tenant_id,
        request,
        cidr,
        dns,
        mtu,
        overlay,
        quota.max_networks,
    )?;
    // The bridge, its filter rules and DHCP server come up now, then the
    // other hosts take the network on; if any refuses, the network is not
    // kept half made.
    let made = match svc.host_network.reconcile().await {
        Ok(()) => replicate(svc, &network, &peers).await,
        Err(err) => Err(err.into()),
    };
    if let Err(err) = made {
        svc.store.delete_network(&network.id)?;
        if let Err(again) = svc.host_network.reconcile().await {
            tracing::error!(network = %network.id, "cannot undo the network on the host: {again}");
        }
        return Err(err);
    }
    tracing::info!(tenant = tenant_id, network = %network.id, cidr = %network.cidr, hosts = peers.len(), "network created");
    Ok(network.into())
}

/// Creates `request` in the cluster: checked here (the CIDR against this
/// host's own networks and every network of the cluster, the MTU against
/// the underlay), then defined in etcd with a VNI of its own; every host
/// carries it (`mirror`).
async fn create_in_cluster(
    svc: &Services,
    cluster: &Cluster,
    tenant_id: &str,
    request: &NetworkCreate,
) -> Result<Network> {
    if !request.hosts.is_empty() {
        return Err(ServiceError::invalid(
            "hosts",
            "in a cluster a network spans the hosts its VMs run on: leave hosts out",
        ));
    }
    let cidr: Cidr = request
        .cidr
        .parse()
        .map_err(|err: String| ServiceError::invalid("cidr", err))?;
    if let Some(reason) = svc.host_network.shadowed(cidr).await? {
        return Err(ServiceError::unprocessable("cidr", reason));
    }
    let reserved: Cidr = crate::store::RESERVED
        .parse()
        .map_err(|err: String| ServiceError::Internal(err))?;
    if cidr.overlaps(&reserved) {
        return Err(ServiceError::unprocessable(
            "cidr",
            format!("{cidr} overlaps {reserved}, which the agents keep for default tenant bridges"),
        ));
    }
    let quota = svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::Unauthorized("the token's tenant is gone".to_string()))?
        .quota;
    let dns = match &request.dns {
        Some(servers) => dns_servers(servers)?,
        None => host_resolvers(),
    };
    let local = local_underlay(svc)?;
    let max = max_overlay_mtu(svc, local).await?;
    let mtu = request.mtu.unwrap_or(max);
    if mtu > max {
        return Err(ServiceError::unprocessable(
            "mtu",
            format!("{mtu} does not fit the underlay: at most {max} with VXLAN's 50 bytes"),
        ));
    }
    check_mtu(mtu)?;
    let mut attempts = 0;
    loop {
        let (existing, checked) = cluster.networks_at().await?;
        if let Some(other) = existing.iter().find(|other| {
            other
                .cidr
                .parse::<Cidr>()
                .is_ok_and(|other| other.overlaps(&cidr))
        }) {
            return Err(ServiceError::unprocessable(
                "cidr",
                if other.tenant_id == tenant_id {
                    format!(
                        "{cidr} overlaps your network '{}' ({})",
                        other.name, other.cidr
                    )
                } else {
                    format!(
                        "{cidr} overlaps an address range in use in the cluster: choose another"
                    )
                },
            ));
        }
        let vnis: HashSet<u32> = existing.iter().map(|network| network.vni).collect();
        let record = NetworkRecord {
            id: crate::store::new_id("net")?,
            tenant_id: tenant_id.to_string(),
            name: request.name.clone(),
            cidr: cidr.to_string(),
            gateway: cidr.gateway().to_string(),
            nat: request.nat,
            dhcp: request.dhcp,
            dns: dns.clone(),
            mtu,
            vni: crate::store::random_overlay_vni(&vnis)?,
            created_at: crate::store::now(),
        };
        match cluster.define_network(&record, &quota, Some(checked)).await {
            Ok(()) => {
                tracing::info!(tenant = tenant_id, network = %record.id, cidr = %record.cidr, "network defined in the cluster");
                return Ok(record.network());
            }
            Err(ClusterError::Raced(_)) if attempts < 8 => attempts += 1,
            Err(err) => return Err(err.into()),
        }
    }
}

/// Carries the cluster's networks on this host: each is a network of this
/// host's store (its bridge, gateway, DHCP and rules made as for any
/// network) spanning, over VXLAN, the hosts that have VMs on it, or every
/// member for a network of service endpoints (`balanced`: flows to them
/// enter anywhere); those the cluster no longer has go (once no VM here
/// uses them). A member whose agent restarts stays in the flood lists
/// (`view` knows its address from its last join): its VMs run on, and a
/// broadcast that does not reach them is an ARP that fails.
pub async fn mirror(
    svc: &Services,
    cluster: &Cluster,
    view: &View,
    vms: &[ClusterVm],
    balanced: &HashSet<String>,
) -> Result<()> {
    let Some(local) = svc.host_network.underlay_address() else {
        // Without an underlay this host carries no network of the cluster;
        // its VMs on one fail to be defined, saying so.
        return Ok(());
    };
    let records = cluster.networks().await?;
    let underlay_of = |host: &str| view.member(host).and_then(Member::underlay_address);
    let mut changed = false;
    for record in &records {
        let mut hosts: Vec<String> = vms
            .iter()
            .filter(|vm| {
                vm.record
                    .nics
                    .iter()
                    .any(|nic| nic.network.as_deref() == Some(record.id.as_str()))
            })
            .filter_map(|vm| underlay_of(vm.record.host.as_deref()?))
            .chain(std::iter::once(local))
            .chain(
                view.members
                    .iter()
                    .filter(|_| balanced.contains(&record.id))
                    .filter_map(Member::underlay_address),
            )
            .map(|address| address.to_string())
            .collect();
        hosts.sort();
        hosts.dedup();
        let known = svc.store.get_network(None, &record.id)?;
        if known
            .as_ref()
            .and_then(|row| row.overlay.as_ref())
            .is_some_and(|overlay| overlay.hosts == hosts && overlay.home == local.to_string())
        {
            continue;
        }
        let row = NetworkRow {
            id: record.id.clone(),
            tenant_id: record.tenant_id.clone(),
            name: record.name.clone(),
            cidr: record.cidr.clone(),
            gateway: record.gateway.clone(),
            nat: record.nat,
            dhcp: record.dhcp,
            dns: record.dns.clone(),
            mtu: record.mtu,
            vni: record.vni,
            bridge: String::new(),
            overlay: Some(nubis_api::Overlay {
                home: local.to_string(),
                hosts,
                vxlan: String::new(),
            }),
            created_at: record.created_at,
        };
        match svc.store.adopt_network(&row) {
            Ok(_) => changed = true,
            Err(err) => {
                tracing::warn!(network = %record.id, "cannot carry a network of the cluster: {err}")
            }
        }
    }
    let wanted: HashSet<&str> = records.iter().map(|record| record.id.as_str()).collect();
    for row in svc.store.list_networks(None)? {
        if wanted.contains(row.id.as_str()) || check_unused(svc, &row).is_err() {
            continue;
        }
        svc.store.delete_network(&row.id)?;
        tracing::info!(network = %row.id, "network deleted from the cluster: dropped here");
        changed = true;
    }
    if changed {
        svc.host_network.reconcile().await?;
    }
    Ok(())
}

/// The registered peers named in a network's `hosts`.
fn spanned_peers(svc: &Services, names: &[String]) -> Result<Vec<PeerRow>> {
    let mut peers: Vec<PeerRow> = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let peer = svc.peer_directory.get(name)?.ok_or_else(|| {
            ServiceError::unprocessable(
                format!("hosts[{index}]"),
                format!("no host '{name}' (see /v1/peers)"),
            )
        })?;
        if peers.iter().any(|known| known.host.name == peer.host.name) {
            return Err(ServiceError::invalid(
                format!("hosts[{index}]"),
                format!("'{name}' is named twice"),
            ));
        }
        peers.push(peer);
    }
    Ok(peers)
}

/// Gives `network` to each of `peers`; on a refusal takes it back from
/// those that had taken it.
async fn replicate(svc: &Services, network: &NetworkRow, peers: &[PeerRow]) -> Result<()> {
    let replica = replica(svc, network)?;
    for (index, peer) in peers.iter().enumerate() {
        if let Err(err) = svc.peers.put_network(peer, &replica).await {
            // The one that failed may have taken it before failing.
            for taken in &peers[..=index] {
                if let Err(undo) = svc.peers.delete_network(taken, &network.id).await {
                    tracing::error!(network = %network.id, "cannot take the network back: {undo}");
                }
            }
            return Err(err.into());
        }
    }
    Ok(())
}

/// A network's MTU: IPv4's guaranteed datagram size up to a jumbo frame.
pub fn check_mtu(mtu: u16) -> Result<()> {
    if MTU_RANGE.contains(&mtu) {
        return Ok(());
    }
    Err(ServiceError::invalid(
        "mtu",
        format!(
            "{mtu} is outside {}..={}",
            MTU_RANGE.start(),
            MTU_RANGE.end()
        ),
    ))
}

fn dns_servers(servers: &[String]) -> Result<Vec<String>> {
    if servers.len() > MAX_DNS_SERVERS {
        return Err(ServiceError::invalid(
            "dns",
            format!("at most {MAX_DNS_SERVERS} servers"),
        ));
    }
    servers
        .iter()
        .enumerate()
        .map(|(index, server)| {
            server
                .parse::<Ipv4Addr>()
                .ok()
                // 0/8 is "this network" and 255/8 reserved: as the
                // document's pattern, the first octet is 1 to 254.
                .filter(|address| !matches!(address.octets()[0], 0 | 255))
                .map(|address| address.to_string())
                .ok_or_else(|| {
                    ServiceError::invalid(
                        format!("dns[{index}]"),
                        format!("'{server}' is not a unicast IPv4 address (first octet 1 to 254)"),
                    )
                })
        })
        .collect()
}

/// The networks `scope` sees (in a cluster, the cluster's).
pub async fn list(svc: &Services, scope: Scope<'_>) -> Result<Vec<Network>> {
    if let Some(cluster) = &svc.cluster {
        return Ok(cluster
            .networks()
            .await?
            .iter()
            .filter(|network| {
                scope
                    .tenant()
                    .is_none_or(|tenant| network.tenant_id == tenant)
            })
            .map(NetworkRecord::network)
            .collect());
    }
    Ok(svc
        .store
        .list_networks(scope.tenant())?
        .into_iter()
        .map(Network::from)
        .collect())
}

/// Network `id` (id or name) as `scope` sees it.
pub async fn get(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Network> {
    if let Some(cluster) = &svc.cluster {
        return cluster
            .network(scope.tenant(), id)
            .await?
            .map(|record| record.network())
            .ok_or_else(|| ServiceError::not_found("network", id));
    }
    find(svc, scope, id).map(Network::from)
}

/// The stored network `id` (id or name) as `scope` sees it.
fn find(svc: &Services, scope: Scope<'_>, id: &str) -> Result<NetworkRow> {
    svc.store
        .get_network(scope.tenant(), id)?
        .ok_or_else(|| ServiceError::not_found("network", id))
}

/// Deletes network `id` (id or name), here and on the hosts it spans.
/// In a cluster, refused while any VM has a NIC on it; every host drops
/// it as it mirrors the cluster.
pub async fn delete(svc: &Services, scope: Scope<'_>, id: &str) -> Result<()> {
    if let Some(cluster) = &svc.cluster {
        let record = cluster
            .network(scope.tenant(), id)
            .await?
            .ok_or_else(|| ServiceError::not_found("network", id))?;
        cluster.delete_network(&record).await?;
        tracing::info!(network = %record.id, "network deleted from the cluster");
        return Ok(());
    }
    let network = find(svc, scope, id)?;
    if let Some(home) = remote_home(svc, &network)? {
        return Err(ServiceError::Conflict(format!(
            "network {} belongs to host '{}': delete it there",
            network.id, home.host.name
        )));
    }
    let peers = member_peers(svc, &network)?;
    check_unused(svc, &network)?;
    // The other hosts let go first (each refuses while its VMs use the
    // network); if one cannot, those that had let go take it on again.
    for (index, peer) in peers.iter().enumerate() {
        if let Err(err) = svc.peers.delete_network(peer, &network.id).await {
            let replica = replica(svc, &network)?;
            for undone in &peers[..index] {
                if let Err(again) = svc.peers.put_network(undone, &replica).await {
                    tracing::error!(network = %network.id, "cannot give the network back: {again}");
                }
            }
            return Err(err.into());
        }
    }
    delete_unused(svc, &network).await
}

/// Refuses while VMs on this host have NICs on `network`.
fn check_unused(svc: &Services, network: &NetworkRow) -> Result<()> {
    let users: Vec<String> = svc
        .store
        .list_vms(Some(&network.tenant_id), None)?
        .into_iter()
        .filter(|vm| {
            vm.nics
                .iter()
                .any(|nic| nic.network.as_deref() == Some(network.id.as_str()))
        })
        .map(|vm| vm.name)
        .collect();
    if !users.is_empty() {
        return Err(ServiceError::Conflict(format!(
            "network {} has NICs of VM(s) {}: delete them first",
            network.id,
            users.join(", ")
        )));
    }
    Ok(())
}

/// Deletes `network` here, unless a VM uses it; its bridge, tunnel, rules
/// and DHCP server go with it.
async fn delete_unused(svc: &Services, network: &NetworkRow) -> Result<()> {
    let lock = svc.host_network.lock().await;
    check_unused(svc, network)?;
    svc.store.delete_network(&network.id)?;
    drop(lock);
    svc.host_network.reconcile().await?;
    tracing::info!(network = %network.id, "network deleted");
    Ok(())
}

/// This host's underlay address, which overlay networks need.
pub fn local_underlay(svc: &Services) -> Result<Ipv4Addr> {
    svc.host_network
        .underlay_address()
        .ok_or_else(|| ServiceError::Unprocessable {
            field: None,
            message: "this agent has no underlay address (--underlay-address): it carries no network across hosts".to_string(),
        })
}

/// The largest guest MTU the underlay carries once VXLAN has wrapped it.
async fn max_overlay_mtu(svc: &Services, local: Ipv4Addr) -> Result<u16> {
    let underlay = svc
        .host_network
        .underlay_mtu(local)
        .await
        .map_err(|message| ServiceError::Unprocessable {
            field: None,
            message,
        })?;
    Ok(underlay.saturating_sub(VXLAN_OVERHEAD))
}

/// The registered peer for an underlay address.
fn peer_at(svc: &Services, address: &str) -> Result<PeerRow> {
    svc.peer_directory.get(address)?.ok_or_else(|| {
        ServiceError::Conflict(format!(
            "host {address} is not registered here (see /v1/peers)"
        ))
    })
}

/// The network's home host when it is another host; None when this host
/// is its home, or it does not span hosts.
pub fn remote_home(svc: &Services, net: &NetworkRow) -> Result<Option<PeerRow>> {
    let Some(overlay) = &net.overlay else {
        return Ok(None);
    };
    if svc.host_network.underlay_address().map(|a| a.to_string()) == Some(overlay.home.clone()) {
        return Ok(None);
    }
    peer_at(svc, &overlay.home).map(Some)
}

/// The peers an overlay network of this home host spans.
fn member_peers(svc: &Services, net: &NetworkRow) -> Result<Vec<PeerRow>> {
    let Some(overlay) = &net.overlay else {
        return Ok(Vec::new());
    };
    let local = svc.host_network.underlay_address().map(|a| a.to_string());
    overlay
        .hosts
        .iter()
        .filter(|host| Some(*host) != local.as_ref())
        .map(|host| peer_at(svc, host))
        .collect()
}

/// What a peer gets of an overlay network.
fn replica(svc: &Services, net: &NetworkRow) -> Result<NetworkReplica> {
    let tenant = svc.store.get_tenant(&net.tenant_id)?.ok_or_else(|| {
        ServiceError::Internal(format!("the tenant of network {} is gone", net.id))
    })?;
    Ok(NetworkReplica {
        network: net.clone().into(),
        tenant: tenant.into(),
    })
}

/// Addresses of `net` that this host must not hand out: its VMs' NICs on
/// it, and those granted to other hosts.
pub fn used_addresses(svc: &Services, net: &NetworkRow) -> Result<HashSet<Ipv4Addr>> {
    let mut used: HashSet<Ipv4Addr> = svc
        .store
        .list_vms(Some(&net.tenant_id), None)?
        .iter()
        .flat_map(|vm| vm.nics.iter())
        .filter(|nic| nic.network.as_deref() == Some(net.id.as_str()))
        .filter_map(|nic| nic.address.as_deref().and_then(nic_address))
        .collect();
    used.extend(svc.store.granted_addresses(&net.id)?);
    Ok(used)
}

/// The stored CIDR of `net`.
pub fn stored_cidr(net: &NetworkRow) -> Result<Cidr> {
    net.cidr
        .parse()
        .map_err(|err: String| ServiceError::Internal(format!("stored network {}: {err}", net.id)))
}

/// Gives back to their home hosts the addresses of NICs on overlay
/// networks homed elsewhere (after their VM is gone here, or was never
/// made). A home that cannot be reached keeps the address until the
/// network is deleted.
pub async fn release_remote_addresses(svc: &Services, nics: &[(NetworkRow, Ipv4Addr)]) {
    let Some(local) = svc.host_network.underlay_address() else {
        return;
    };
    for (net, address) in nics {
        let home = match remote_home(svc, net) {
            Ok(Some(home)) => home,
            Ok(None) => continue,
            Err(err) => {
                tracing::warn!(network = %net.id, %address, "cannot give the address back: {err}");
                continue;
            }
        };
        if let Err(err) = svc
            .peers
            .release_address(&home, &net.id, *address, local)
            .await
        {
            tracing::warn!(network = %net.id, %address, "cannot give the address back: {err}");
        }
    }
}

/// Asks `net`'s home host for an address for VM `vm` (its name).
pub async fn remote_address(
    svc: &Services,
    home: &PeerRow,
    net: &NetworkRow,
    vm: &str,
) -> Result<String> {
    let local = local_underlay(svc)?;
    let grant = svc
        .peers
        .request_address(
            home,
            &net.id,
            &AddressRequest {
                host: local.to_string(),
                vm: vm.to_string(),
            },
        )
        .await?;
    let valid = grant
        .address
        .split_once('/')
        .and_then(|(address, _)| address.parse::<Ipv4Addr>().ok())
        .zip(net.cidr.parse::<Cidr>().ok())
        .is_some_and(|(address, cidr)| cidr.contains(address));
    if !valid {
        return Err(ServiceError::PeerAnswer(format!(
            "host '{}' granted '{}', which is not in {}",
            home.host.name, grant.address, net.cidr
        )));
    }
    Ok(grant.address)
}

/// Overlay network `id` as this host carries it (any tenant's: peers ask).
fn find_overlay(svc: &Services, id: &str) -> Result<NetworkRow> {
    svc.store
        .get_network(None, id)?
        .filter(|net| net.overlay.is_some())
        .ok_or_else(|| ServiceError::not_found("overlay network", id))
}

/// What a replica must be for this host to carry it.
async fn check_replica(svc: &Services, id: &str, replica: &NetworkReplica) -> Result<()> {
    let net = &replica.network;
    if net.id != id {
        return Err(ServiceError::invalid(
            "network.id",
            format!("'{}' is not the network of the path, '{id}'", net.id),
        ));
    }
    if net.tenant_id != replica.tenant.id {
        return Err(ServiceError::invalid(
            "tenant.id",
            "not the network's tenant",
        ));
    }
    validate::name("network.name", &net.name, false)?;
    validate::name("tenant.name", &replica.tenant.name, false)?;
    let cidr: Cidr = net
        .cidr
        .parse()
        .map_err(|err: String| ServiceError::invalid("network.cidr", err))?;
    if net.gateway != cidr.gateway().to_string() {
        return Err(ServiceError::invalid(
            "network.gateway",
            "not the CIDR's first address",
        ));
    }
    let overlay = net.overlay.as_ref().ok_or_else(|| {
        ServiceError::invalid("network.overlay", "the network does not span hosts")
    })?;
    let local = local_underlay(svc)?;
    if !overlay.hosts.contains(&local.to_string()) {
        return Err(ServiceError::invalid(
            "network.overlay.hosts",
            format!("this host ({local}) is not among them"),
        ));
    }
    if overlay.home == local.to_string() {
        return Err(ServiceError::invalid(
            "network.overlay.home",
            "this host is the network's home",
        ));
    }
    // This host asks the home for addresses: it must know it.
    peer_at(svc, &overlay.home)?;
    check_mtu(net.mtu)?;
    let max = max_overlay_mtu(svc, local).await?;
    if net.mtu > max {
        return Err(ServiceError::invalid(
            "network.mtu",
            format!(
                "{} does not fit this host's underlay (at most {max} with VXLAN)",
                net.mtu
            ),
        ));
    }
    Ok(())
}

/// Carries network `id` that its home gave (`replica`), with its tenant;
/// the home's own checks (it acts as the network's home) are the caller's.
pub async fn adopt(svc: &Services, id: &str, replica: &NetworkReplica) -> Result<Network> {
    check_replica(svc, id, replica).await?;
    let tenant = &replica.tenant;
    let _hold = svc.hold_tenant(&tenant.id).await?;
    match svc.store.get_tenant(&tenant.id)? {
        Some(known) if known.name != tenant.name => {
            return Err(ServiceError::Conflict(format!(
                "tenant {} is '{}' here, not '{}'",
                tenant.id, known.name, tenant.name
            )))
        }
        Some(_) => {}
        None => {
            svc.store.create_tenant_with_id(&tenant.clone().into())?;
            tracing::info!(tenant = %tenant.id, name = %tenant.name, "tenant replicated from its network's home");
        }
    }
    let existed = svc.store.get_network(None, id)?.is_some();
    let network = svc.store.adopt_network(&replica.network.clone().into())?;
    if let Err(err) = svc.host_network.reconcile().await {
        if !existed {
            svc.store.delete_network(id)?;
            if let Err(again) = svc.host_network.reconcile().await {
                tracing::error!(network = %id, "cannot undo the network on the host: {again}");
            }
        }
        return Err(err.into());
    }
    tracing::info!(network = %id, vni = network.vni, "carrying overlay network");
    Ok(network.into())
}

/// Stops carrying overlay network `id`, at the request of the peer at
/// underlay address `caller`, which must be its home.
pub async fn abandon(svc: &Services, caller: &str, id: &str) -> Result<()> {
    let net = find_overlay(svc, id)?;
    let home = net.overlay.as_ref().map(|overlay| overlay.home.as_str());
    if home != Some(caller) {
        return Err(ServiceError::Forbidden(format!(
            "only network {id}'s home takes it off this host"
        )));
    }
    if remote_home(svc, &net)?.is_none() {
        return Err(ServiceError::Conflict(format!(
            "this host is the home of network {id}: delete it through /v1/networks"
        )));
    }
    delete_unused(svc, &net).await
}

/// Grants an address of overlay network `id`, whose home this host is, to
/// a VM of the member host that asks.
pub async fn grant(svc: &Services, id: &str, request: &AddressRequest) -> Result<AddressGrant> {
    let net = find_overlay(svc, id)?;
    if remote_home(svc, &net)?.is_some() {
        return Err(ServiceError::Conflict(format!(
            "this host is not the home of network {id}"
        )));
    }
    let member = net
        .overlay
        .as_ref()
        .is_some_and(|overlay| overlay.hosts.contains(&request.host));
    if !member
        || svc.host_network.underlay_address().map(|a| a.to_string()) == Some(request.host.clone())
    {
        return Err(ServiceError::Conflict(format!(
            "host '{}' does not carry network {id}",
            request.host
        )));
    }
    validate::name("vm", &request.vm, false)?;
    let cidr = stored_cidr(&net)?;
    // The same lock as the local VMs' allocation.
    let _lock = svc.host_network.lock().await;
    let used = used_addresses(svc, &net)?;
    let address = cidr
        .allocate(&used)
        .ok_or_else(|| ServiceError::Exhausted(format!("no free address left in {}", net.cidr)))?;
    svc.store
        .grant_address(id, address, &request.host, &request.vm)?;
    tracing::info!(network = %id, %address, host = %request.host, vm = %request.vm, "address granted");
    Ok(AddressGrant {
        address: format!("{address}/{}", cidr.prefix()),
    })
}

/// Takes back `address` of network `id`, granted to the host at `host`.
pub fn release(svc: &Services, id: &str, address: &str, host: &str) -> Result<()> {
    let parsed: Ipv4Addr = address.parse().map_err(|_| {
        ServiceError::invalid("address", format!("'{address}' is not an IPv4 address"))
    })?;
    if svc.store.release_address(id, parsed, host)? {
        tracing::info!(network = %id, %address, host = %host, "address released");
        Ok(())
    } else {
        Err(ServiceError::not_found("granted address", address))
    }
}
