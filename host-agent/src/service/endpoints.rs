//! The service endpoints this host balances, made from the cluster's
//! records on every pass of the follow loop (`placed.rs`): each role with
//! endpoints has a virtual address on its first network, and its backends
//! are its instances that are healthy, not retiring, on a host that is
//! up, at their address on that network. The kernel does the balancing
//! (`network::balancer`); this only says what it balances, and applies it
//! when that changes, so an instance that fails its probe or leaves with
//! its host stops getting new flows within a pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use nubis_api::InstanceHealth;

use crate::cluster::networks::NetworkRecord;
use crate::cluster::service_control::instance_health;
use crate::cluster::services::StoredService;
use crate::cluster::view::View;
use crate::cluster::vms::ClusterVm;
use crate::cluster::Cluster;
use crate::network::balancer::{self, Balancer, Entry, Frontend, Segment};
use crate::network::typed::MacAddr;

/// What this host balances now, and its balancing addresses.
#[derive(Default)]
pub struct Endpoints {
    applied: Option<Balancer>,
    lb_addresses: HashMap<String, Ipv4Addr>,
}

/// The networks that endpoints balance onto: every host carries them
/// (with a VXLAN port to every other host), since flows to an endpoint may
/// enter anywhere.
pub fn balanced_networks(services: &[StoredService]) -> HashSet<String> {
    services
        .iter()
        .flat_map(|service| &service.record.roles)
        .filter(|role| role.virtual_address.is_some() && !role.spec.endpoints.is_empty())
        .filter_map(|role| role.endpoint_network().map(str::to_string))
        .collect()
}

/// Brings this host's balancing in line with the cluster's services.
pub async fn sync(
    cluster: &Cluster,
    view: &View,
    services: &[StoredService],
    vms: &[ClusterVm],
    state: &mut Endpoints,
) {
    let networks = match cluster.networks().await {
        Ok(networks) => networks,
        Err(err) => {
            tracing::warn!("cannot read the networks for the service endpoints: {err}");
            return;
        }
    };
    for id in balanced_networks(services) {
        if state.lb_addresses.contains_key(&id) {
            continue;
        }
        let Some(record) = networks.iter().find(|record| record.id == id) else {
            continue;
        };
        match cluster.lb_address(record).await {
            Ok(address) => {
                state.lb_addresses.insert(id, address);
            }
            Err(err) => tracing::warn!(network = %id, "cannot take a balancing address: {err}"),
        }
    }
    let wanted = desired(services, vms, view, &networks, &state.lb_addresses);
    if state.applied.as_ref() == Some(&wanted) {
        return;
    }
    // A backend's address may have been another instance's, or its VM may
    // have moved to another host (a live migration takes it out while it
    // moves): the host must not keep sending its flows to the old MAC or
    // the old host. What this agent saw come back is looked up afresh (an
    // ARP broadcast, which also tells the overlay where the VM now is);
    // after a restart, when it saw nothing, only what names another MAC.
    let backends: HashSet<Ipv4Addr> = wanted
        .frontends
        .iter()
        .flat_map(|frontend| frontend.backends.iter().copied())
        .collect();
    let before: Option<HashSet<Ipv4Addr>> = state.applied.as_ref().map(|applied| {
        applied
            .frontends
            .iter()
            .flat_map(|frontend| frontend.backends.iter().copied())
            .collect()
    });
    for segment in &wanted.segments {
        let macs = backend_macs(vms, segment, &backends);
        let returned: Vec<Ipv4Addr> = match &before {
            Some(before) => backends
                .iter()
                .copied()
                .filter(|address| segment.cidr.contains(*address) && !before.contains(address))
                .collect(),
            None => Vec::new(),
        };
        balancer::forget_neighbors(segment, &macs, &returned).await;
    }
    match balancer::apply(&wanted).await {
        Ok(()) => {
            let backends: Vec<String> = wanted
                .frontends
                .iter()
                .map(|frontend| {
                    let to: Vec<String> = frontend.backends.iter().map(|b| b.to_string()).collect();
                    format!("{:?} -> [{}]", frontend.entry, to.join(" "))
                })
                .collect();
            tracing::info!("service endpoints programmed: {}", backends.join("; "));
            state.applied = Some(wanted);
        }
        Err(err) => tracing::warn!("cannot program the service endpoints: {err}"),
    }
}

/// What this host balances: pure, from the records.
pub fn desired(
    services: &[StoredService],
    vms: &[ClusterVm],
    view: &View,
    networks: &[NetworkRecord],
    lb_addresses: &HashMap<String, Ipv4Addr>,
) -> Balancer {
    let mut segments: BTreeMap<String, Segment> = BTreeMap::new();
    let mut frontends = Vec::new();
    for service in services {
        let record = &service.record;
        for role in &record.roles {
            let (Some(address), Some(network)) = (role.virtual_address, role.endpoint_network())
            else {
                continue;
            };
            if role.spec.endpoints.is_empty() {
                continue;
            }
            let (Some(net), Some(lb_address)) = (
                networks.iter().find(|net| net.id == network),
                lb_addresses.get(network),
            ) else {
                continue;
            };
            let Ok(cidr) = net.cidr.parse::<crate::ipv4::Cidr>() else {
                continue;
            };
            let segment = segments
                .entry(network.to_string())
                .or_insert_with(|| Segment {
                    vni: net.vni,
                    bridge: crate::network::network_bridge_name(net.vni),
                    cidr,
                    mtu: net.mtu,
                    lb_address: *lb_address,
                    virtual_addresses: Vec::new(),
                });
            segment.virtual_addresses.push(address);
            let mut backends: Vec<Ipv4Addr> =
                vms.iter()
                    .filter(|vm| {
                        vm.record.retiring.is_none()
                            && vm.record.instance.as_ref().is_some_and(|of| {
                                of.service == record.id && of.role == role.spec.name
                            })
                            && host_up(view, vm)
                            && instance_health(vm) == InstanceHealth::Healthy
                    })
                    .filter_map(|vm| {
                        vm.record
                            .nics
                            .iter()
                            .find(|nic| nic.network.as_deref() == Some(network))
                            .and_then(|nic| nic.address.as_deref())
                            .and_then(crate::network::nic_address)
                    })
                    .collect();
            backends.sort();
            backends.dedup();
            for endpoint in &role.spec.endpoints {
                let mut entries = vec![Entry::Virtual {
                    address,
                    port: endpoint.port,
                }];
                entries.extend(endpoint.host_port.map(Entry::HostPort));
                for entry in entries {
                    frontends.push(Frontend {
                        protocol: endpoint.protocol,
                        entry,
                        target_port: endpoint.target(),
                        backends: backends.clone(),
                    });
                }
            }
        }
    }
    let mut segments: Vec<Segment> = segments.into_values().collect();
    for segment in &mut segments {
        segment.virtual_addresses.sort();
        segment.virtual_addresses.dedup();
    }
    frontends.sort_by_key(|frontend| (frontend.entry, frontend.protocol.as_str()));
    Balancer {
        segments,
        frontends,
    }
}

/// The MACs of the NICs that have `backends`' addresses on `segment`.
fn backend_macs(
    vms: &[ClusterVm],
    segment: &Segment,
    backends: &HashSet<Ipv4Addr>,
) -> Vec<(Ipv4Addr, MacAddr)> {
    vms.iter()
        .flat_map(|vm| &vm.record.nics)
        .filter_map(|nic| {
            let address = nic
                .address
                .as_deref()
                .and_then(crate::network::nic_address)?;
            let mac = nic.mac.as_deref()?.parse().ok()?;
            (segment.cidr.contains(address) && backends.contains(&address))
                .then_some((address, mac))
        })
        .collect()
}

/// Whether `vm`'s host is up (a lost host's instances get no new flows).
fn host_up(view: &View, vm: &ClusterVm) -> bool {
    vm.record
        .host
        .as_deref()
        .and_then(|host| view.member(host))
        .is_some_and(|member| member.alive.is_some())
}

#[cfg(test)]
mod tests {
    use nubis_api::{RoleSpec, ServiceEndpoint, VmNic, VmState};

    use super::*;
    use crate::cluster::services::{InstanceOf, RoleRecord, ServiceRecord};
    use crate::cluster::view::test_member;
    use crate::cluster::vms::{VmRecord, VmStatus};

    fn network() -> NetworkRecord {
        NetworkRecord {
            id: "net-1".into(),
            tenant_id: "t-1".into(),
            name: "lan".into(),
            cidr: "10.71.0.0/24".into(),
            gateway: "10.71.0.1".into(),
            nat: false,
            dhcp: true,
            dns: Vec::new(),
            mtu: 1450,
            vni: 4096,
            created_at: 1,
        }
    }

    fn service() -> StoredService {
        let mut spec = RoleSpec::new("web", "img-1", 3);
        spec.networks = vec!["net-1".into()];
        spec.endpoints = vec![ServiceEndpoint {
            host_port: Some(30080),
            target_port: Some(8080),
            ..ServiceEndpoint::tcp(80)
        }];
        StoredService {
            record: ServiceRecord {
                id: "svc-1".into(),
                tenant_id: "t-1".into(),
                name: "shop".into(),
                created_at: 1,
                roles: vec![RoleRecord {
                    spec,
                    revision: 1,
                    storage_mib: 0,
                    previous: None,
                    rollout: None,
                    virtual_address: Some(Ipv4Addr::new(10, 71, 0, 100)),
                }],
                events: Vec::new(),
            },
            revision: 1,
        }
    }

    /// Instance `index` on `host` at 10.71.0.(10 + index), running and
    /// reported with `health`.
    fn instance(index: u32, host: &str, health: InstanceHealth) -> ClusterVm {
        let mut spec = nubis_api::VmCreate::new(format!("shop-web-{index}"), "img-1");
        spec.placement.anti_affinity = None;
        let record = VmRecord {
            id: format!("vm-{index}"),
            tenant_id: "t-1".into(),
            spec,
            host: Some(host.into()),
            created_at: 1,
            nics: vec![VmNic {
                network: Some("net-1".into()),
                address: Some(format!("10.71.0.{}/24", 10 + index)),
                ..VmNic::default()
            }],
            events: Vec::new(),
            storage_mib: 0,
            moving: None,
            failed_moves: 0,
            generation: 1,
            instance: Some(InstanceOf {
                service: "svc-1".into(),
                role: "web".into(),
                index,
                revision: 1,
                probe: Some(nubis_api::Probe::new(nubis_api::ProbeProtocol::Tcp, 8080)),
            }),
            retiring: None,
            ssh_keys: Vec::new(),
        };
        let mut shown = record.pending();
        shown.state = VmState::Running;
        ClusterVm {
            status: Some(VmStatus {
                host: host.into(),
                vm: shown,
                health: Some(health),
            }),
            record,
            revision: 1,
        }
    }

    #[test]
    fn only_healthy_instances_on_live_hosts_get_flows() {
        let view = View {
            members: vec![
                test_member("a", true, false),
                test_member("b", true, false),
                test_member("c", false, false),
            ],
            leader: None,
            revision: 1,
        };
        let mut retiring = instance(3, "a", InstanceHealth::Healthy);
        retiring.record.retiring = Some("scaled down".into());
        let vms = [
            instance(0, "a", InstanceHealth::Healthy),
            instance(1, "b", InstanceHealth::Unhealthy),
            instance(2, "c", InstanceHealth::Healthy),
            retiring,
            instance(4, "b", InstanceHealth::Healthy),
        ];
        let lb = HashMap::from([("net-1".to_string(), Ipv4Addr::new(10, 71, 0, 9))]);
        let balancer = desired(&[service()], &vms, &view, &[network()], &lb);
        assert_eq!(balancer.segments.len(), 1);
        let segment = &balancer.segments[0];
        assert_eq!(segment.lb_address, Ipv4Addr::new(10, 71, 0, 9));
        assert_eq!(segment.virtual_addresses, [Ipv4Addr::new(10, 71, 0, 100)]);
        assert_eq!(segment.bridge.as_str(), "nbn4096");
        assert_eq!(balancer.frontends.len(), 2);
        for frontend in &balancer.frontends {
            assert_eq!(frontend.target_port, 8080);
            assert_eq!(
                frontend.backends,
                [Ipv4Addr::new(10, 71, 0, 10), Ipv4Addr::new(10, 71, 0, 14)]
            );
        }
        assert!(balancer
            .frontends
            .iter()
            .any(|frontend| frontend.entry == Entry::HostPort(30080)));
        // Without its balancing address, a network is not balanced yet.
        let none = desired(&[service()], &vms, &view, &[network()], &HashMap::new());
        assert!(none.is_empty());
        assert_eq!(
            balanced_networks(&[service()]),
            HashSet::from(["net-1".to_string()])
        );
    }
}
