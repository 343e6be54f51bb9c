//! The controller's work: while this host leads, every VM without a host
//! is placed with `nubis-placement` (the hosts from the membership view,
//! what each already carries and the anti-affinity groups from the VM
//! records) and its host written in a transaction conditioned on the
//! record being unchanged and this host's election key still existing,
//! so a deposed controller cannot place anything. A VM no host can take
//! gets the reason as an event (once per distinct reason) and is tried
//! again whenever the records or the membership change.
//!
//! Each pass first keeps the services' roles at their count and moves
//! their rollouts on (`service_control.rs`).
//!
//! Anti-affinity groups belong to a tenant: tenant A's group "web" and
//! tenant B's are different groups.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use nubis_api::{AntiAffinityScope, DrainPolicy, HostLossPolicy, PlacementStrategy};
use nubis_placement::{
    place_batch, AntiAffinity, Decision, GroupMember, HostState, HostView, NetworkReach, Request,
    Resources, Scope, Strategy,
};

use super::drain::{self, DrainRecord, Move};
use super::view::View;
use super::vms::{ClusterVm, VmRecord};
use super::{Cluster, ClusterError};

/// How long to wait after a failed pass.
const RETRY: Duration = Duration::from_secs(1);
/// A pass runs at least this often while leading, even without a change
/// (a missed watch event costs no more than this).
const RECHECK: Duration = Duration::from_secs(10);

/// Places pending VMs whenever this host leads, for as long as it runs.
pub(super) async fn run(cluster: Cluster) {
    let mut leading = cluster.controller_changes();
    let mut membership = cluster.view_changes();
    loop {
        let elected = leading.wait_for(|leads| *leads).await.is_ok();
        if !elected {
            return;
        }
        tracing::info!("cluster: placing VMs as the controller");
        // When this controller first saw each down host down: a new
        // controller starts counting afresh (never sooner).
        let mut down_since: HashMap<String, Instant> = HashMap::new();
        loop {
            let revision = match place_pending(&cluster, &mut down_since).await {
                Ok(revision) => Some(revision),
                Err(err) => {
                    tracing::warn!("cluster: cannot place the pending VMs: {err}");
                    None
                }
            };
            tokio::select! {
                changed = async {
                    match revision {
                        Some(revision) => cluster.vms_changed(revision).await,
                        None => { tokio::time::sleep(RETRY).await; Ok(()) }
                    }
                } => {
                    if let Err(err) = changed {
                        tracing::warn!("cluster: the VM records watch broke: {err}");
                        tokio::time::sleep(RETRY).await;
                    }
                }
                _ = membership.changed() => {}
                _ = async { drop(leading.wait_for(|leads| !*leads).await) } => break,
                _ = tokio::time::sleep(if down_since.is_empty() { RECHECK } else { RETRY }) => {}
            }
        }
    }
}

/// One pass: places what can be placed, restarts elsewhere the VMs of
/// lost hosts that ask for it, then starts the moves of the draining
/// hosts' VMs that can start; the revision it read at.
async fn place_pending(
    cluster: &Cluster,
    down_since: &mut HashMap<String, Instant>,
) -> Result<i64, ClusterError> {
    let (vms, revision) = cluster.vms().await?;
    let cached = cluster.view();
    // Services first: what they write (new instances, retirements) wakes
    // the next pass at once, which places it.
    if super::service_control::run_pass(cluster, &vms, &cached).await? {
        return Ok(revision);
    }
    let pending: Vec<&ClusterVm> = vms.iter().filter(|vm| vm.record.host.is_none()).collect();
    let draining = cached
        .members
        .iter()
        .any(|member| member.record.drain.is_some());
    let down = cached.members.iter().any(|member| member.alive.is_none());
    if pending.is_empty() && !draining && !down && down_since.is_empty() {
        return Ok(revision);
    }
    // Read now, not the cached view: a cordon written a moment ago holds.
    let view = super::view::read(&cluster.inner).await?;
    let now = Instant::now();
    down_since.retain(|host, _| {
        view.member(host)
            .is_some_and(|member| member.alive.is_none())
    });
    for member in view.members.iter().filter(|member| member.alive.is_none()) {
        down_since
            .entry(member.record.name.to_string())
            .or_insert(now);
    }
    let mut hosts = host_views(&view, &vms);
    let mut members = group_members(&vms);
    let requests: Vec<Request> = pending.iter().map(|vm| request(&vm.record)).collect();
    let decisions = place_batch(&mut hosts, &mut members, &requests);
    for (vm, decision) in pending.into_iter().zip(decisions) {
        let mut record = vm.record.clone();
        match decision {
            Decision::Placed { host } => {
                record.record_event("placed", format!("placed on host {host}"));
                record.assign_host(host);
            }
            Decision::Unplaceable(explanation) => {
                let message = explanation.to_string();
                let told = record
                    .events
                    .last()
                    .is_some_and(|last| last.kind == "unplaceable" && last.message == message);
                if told {
                    continue;
                }
                record.record_event("unplaceable", message);
            }
        }
        if !cluster.place_vm(&record, vm.revision).await? {
            // The record changed or this host no longer leads: the next
            // pass sees which.
            tracing::info!(vm = %record.id, "cluster: placement not written (record changed or leadership lost)");
        }
    }
    let grace = Duration::from_secs(cluster.inner.settings.lease_ttl_s.unsigned_abs() * 2);
    let lost: Vec<&str> = down_since
        .iter()
        .filter(|(_, since)| since.elapsed() >= grace)
        .map(|(host, _)| host.as_str())
        .collect();
    replace_lost(cluster, &lost, &vms, &mut hosts, &mut members).await?;
    start_moves(cluster, &view, &vms, &mut hosts, &mut members).await?;
    Ok(revision)
}

/// The VMs of `lost` hosts (down for two lease TTLs: a lost host paused
/// them one TTL after its last renewal): those that ask for it are placed
/// anew as a new generation and started afresh from their image; the
/// others say that they wait for their host.
async fn replace_lost(
    cluster: &Cluster,
    lost: &[&str],
    vms: &[ClusterVm],
    hosts: &mut [HostView],
    members: &mut Vec<GroupMember>,
) -> Result<(), ClusterError> {
    let stranded: Vec<&ClusterVm> = vms
        .iter()
        .filter(|vm| {
            vm.record
                .host
                .as_deref()
                .is_some_and(|host| lost.contains(&host))
        })
        .collect();
    let (restart, wait): (Vec<&ClusterVm>, Vec<&ClusterVm>) = stranded
        .into_iter()
        .partition(|vm| vm.record.spec.placement.on_host_loss == HostLossPolicy::Restart);
    for vm in wait {
        let host = vm.record.host.clone().unwrap_or_default();
        let message = format!("host {host} is lost: the VM waits for it (its disks are there)");
        write_once(cluster, vm, HOST_LOST_EVENT, message).await?;
    }
    if restart.is_empty() {
        return Ok(());
    }
    let requests: Vec<Request> = restart.iter().map(|vm| request(&vm.record)).collect();
    let decisions = place_batch(hosts, members, &requests);
    for (vm, decision) in restart.into_iter().zip(decisions) {
        let lost_host = vm.record.host.clone().unwrap_or_default();
        match decision {
            Decision::Placed { host } => {
                let mut record = vm.record.clone();
                record.record_event(
                    HOST_LOST_EVENT,
                    format!("host {lost_host} is lost: started afresh on host {host} from its image (its disks start empty)"),
                );
                record.assign_host(host);
                record.spec.start = true;
                record.moving = None;
                record.failed_moves = 0;
                if !cluster.place_vm(&record, vm.revision).await? {
                    tracing::info!(vm = %record.id, "cluster: restart elsewhere not written (record changed or leadership lost)");
                }
            }
            Decision::Unplaceable(explanation) => {
                let message = format!(
                    "host {lost_host} is lost and no other host can take the VM: {explanation}"
                );
                write_once(cluster, vm, HOST_LOST_EVENT, message).await?;
            }
        }
    }
    Ok(())
}

/// The event a VM gets when its host is lost.
const HOST_LOST_EVENT: &str = "host-lost";

/// Adds event `kind: message` to `vm`'s record unless it is the last one
/// already.
async fn write_once(
    cluster: &Cluster,
    vm: &ClusterVm,
    kind: &str,
    message: String,
) -> Result<(), ClusterError> {
    let told = vm
        .record
        .events
        .last()
        .is_some_and(|last| last.kind == kind && last.message == message);
    if told {
        return Ok(());
    }
    let mut record = vm.record.clone();
    record.record_event(kind, message);
    cluster.place_vm(&record, vm.revision).await?;
    Ok(())
}

/// Starts moving the draining hosts' VMs that may move now: each gets a
/// destination from the placement (as a new VM would, its own host being
/// cordoned) written into its record for its host to carry out, or says
/// why no host can take it.
async fn start_moves(
    cluster: &Cluster,
    view: &View,
    vms: &[ClusterVm],
    hosts: &mut [HostView],
    members: &mut Vec<GroupMember>,
) -> Result<(), ClusterError> {
    let draining: Vec<(String, DrainRecord)> = view
        .members
        .iter()
        .filter(|member| member.alive.is_some())
        .filter_map(|member| Some((member.record.name.to_string(), member.record.drain?)))
        .collect();
    let moving = drain::next_moves(&draining, vms, drain::CLUSTER_LIMIT);
    if moving.is_empty() {
        return Ok(());
    }
    let requests: Vec<Request> = moving.iter().map(|vm| request(&vm.record)).collect();
    let decisions = place_batch(hosts, members, &requests);
    for (vm, decision) in moving.into_iter().zip(decisions) {
        let host = match decision {
            Decision::Placed { host } => host,
            Decision::Unplaceable(explanation) => {
                let message = format!("no other host can take it: {explanation}");
                write_once(cluster, vm, drain::UNPLACEABLE_EVENT, message).await?;
                continue;
            }
        };
        let mut record = vm.record.clone();
        let policy = record.spec.placement.on_drain;
        let how = match policy {
            DrainPolicy::Restart => "stopped here, started there",
            _ => "live migration",
        };
        record.record_event("drain", format!("moving to host {host} ({how})"));
        record.moving = Some(Move {
            to: host,
            policy,
            since: crate::store::now(),
        });
        if !cluster.place_vm(&record, vm.revision).await? {
            tracing::info!(vm = %record.id, "cluster: move not written (record changed or leadership lost)");
        }
    }
    Ok(())
}

/// The members as the placement sees them, with what the VM records
/// already put on each.
fn host_views(view: &View, vms: &[ClusterVm]) -> Vec<HostView> {
    view.members
        .iter()
        .map(|member| {
            let name = member.record.name.to_string();
            // A VM moving here takes its room already.
            let placed: Vec<&VmRecord> = vms
                .iter()
                .map(|vm| &vm.record)
                .filter(|record| {
                    record.host.as_deref() == Some(name.as_str())
                        || record.moving.as_ref().is_some_and(|to| to.to == name)
                })
                .collect();
            let allocated = placed.iter().fold(Resources::ZERO, |sum, record| {
                sum.saturating_add(needs(record))
            });
            let state = match (&member.alive, member.record.cordoned) {
                (None, _) => HostState::Down,
                (Some(_), true) => HostState::Cordoned,
                (Some(_), false) => HostState::Up,
            };
            let capacity = member.alive.as_ref().map_or(Resources::ZERO, |alive| {
                Resources::new(
                    alive.capacity.vcpus,
                    alive.capacity.memory_mib,
                    alive.capacity.disk_mib,
                )
            });
            HostView {
                name,
                state,
                labels: member.record.labels.clone(),
                capacity,
                allocated,
                networks: NetworkReach::Any,
                vms: u32::try_from(placed.len()).unwrap_or(u32::MAX),
            }
        })
        .collect()
}

/// What a VM takes of its host: vCPUs, memory and its data disks.
fn needs(record: &VmRecord) -> Resources {
    let disks = record
        .spec
        .disks
        .iter()
        .fold(0u64, |sum, disk| sum.saturating_add(disk.size_mib));
    Resources::new(record.spec.vcpus, record.spec.memory_mib, disks)
}

/// A tenant's anti-affinity group, as the placement names it.
fn group_name(record: &VmRecord, group: &str) -> String {
    format!("{}/{group}", record.tenant_id)
}

/// The placed VMs that are in anti-affinity groups.
fn group_members(vms: &[ClusterVm]) -> Vec<GroupMember> {
    vms.iter()
        .filter_map(|vm| {
            let record = &vm.record;
            let anti = record.spec.placement.anti_affinity.as_ref()?;
            Some(GroupMember {
                vm: record.id.clone(),
                group: group_name(record, &anti.group),
                host: record.host.clone()?,
            })
        })
        .collect()
}

/// The placement request of a VM record.
fn request(record: &VmRecord) -> Request {
    let placement = &record.spec.placement;
    let mut request = Request::new(record.id.clone(), needs(record));
    request.require = placement
        .require
        .clone()
        .into_iter()
        .collect::<BTreeMap<_, _>>();
    request.host = placement.host.clone();
    request.strategy = match placement.strategy {
        PlacementStrategy::Spread => Strategy::Spread,
        PlacementStrategy::BinPack => Strategy::BinPack,
    };
    request.anti_affinity = placement.anti_affinity.as_ref().map(|anti| AntiAffinity {
        group: group_name(record, &anti.group),
        scope: match anti.scope {
            AntiAffinityScope::Host => Scope::Host,
            AntiAffinityScope::FaultDomain => Scope::FaultDomain,
        },
        preferred: anti.preferred,
    });
    request
}

#[cfg(test)]
mod tests {
    use nubis_api::{AntiAffinity as ApiAntiAffinity, VmCreate, VmDisk};

    use super::super::view::test_member;

    use super::*;

    fn record(id: &str, tenant: &str, host: Option<&str>, group: Option<&str>) -> VmRecord {
        let mut spec = VmCreate::new(id, "img");
        spec.vcpus = 2;
        spec.memory_mib = 256;
        spec.disks = vec![VmDisk::new(100)];
        spec.placement.anti_affinity = group.map(|group| ApiAntiAffinity {
            group: group.to_string(),
            scope: AntiAffinityScope::FaultDomain,
            preferred: false,
        });
        VmRecord {
            id: id.to_string(),
            tenant_id: tenant.to_string(),
            spec,
            host: host.map(str::to_string),
            created_at: 0,
            nics: Vec::new(),
            events: Vec::new(),
            storage_mib: 0,
            moving: None,
            failed_moves: 0,
            generation: 0,
            instance: None,
            retiring: None,
            ssh_keys: Vec::new(),
        }
    }

    fn cluster_vm(record: VmRecord) -> ClusterVm {
        ClusterVm {
            record,
            revision: 1,
            status: None,
        }
    }

    #[test]
    fn a_request_carries_the_vms_needs_and_its_tenants_group() {
        let mut vm = record("vm-1", "t-1", None, Some("web"));
        vm.spec
            .placement
            .require
            .insert("zone".into(), "cloud".into());
        vm.spec.placement.strategy = PlacementStrategy::BinPack;
        let request = request(&vm);
        assert_eq!(request.needs, Resources::new(2, 256, 100));
        assert_eq!(
            request.require.get("zone").map(String::as_str),
            Some("cloud")
        );
        assert_eq!(request.strategy, Strategy::BinPack);
        let anti = request.anti_affinity.unwrap();
        assert_eq!(
            (anti.group.as_str(), anti.scope),
            ("t-1/web", Scope::FaultDomain)
        );
    }

    #[test]
    fn only_placed_grouped_vms_are_group_members() {
        let vms = [
            cluster_vm(record("a", "t-1", Some("h1"), Some("web"))),
            cluster_vm(record("b", "t-1", None, Some("web"))),
            cluster_vm(record("c", "t-2", Some("h2"), None)),
        ];
        assert_eq!(
            group_members(&vms),
            [GroupMember {
                vm: "a".into(),
                group: "t-1/web".into(),
                host: "h1".into()
            }]
        );
    }

    #[test]
    fn a_vm_moving_takes_room_on_both_hosts_and_states_follow_the_members() {
        let view = View {
            members: vec![
                test_member("a", true, true),
                test_member("b", true, false),
                test_member("c", false, false),
            ],
            leader: None,
            revision: 1,
        };
        let mut moving = record("vm-1", "t-1", Some("a"), None);
        moving.moving = Some(Move {
            to: "b".into(),
            policy: DrainPolicy::LiveMigrate,
            since: 1,
        });
        let hosts = host_views(&view, &[cluster_vm(moving)]);
        let by_name = |name: &str| {
            hosts
                .iter()
                .find(|host| host.name == name)
                .expect("a host view")
        };
        let (a, b, c) = (by_name("a"), by_name("b"), by_name("c"));
        assert_eq!(
            (a.state, b.state, c.state),
            (HostState::Cordoned, HostState::Up, HostState::Down)
        );
        // 2 vCPUs, 256 MiB and a 100 MiB disk: on the source and the
        // destination while it moves.
        assert_eq!(a.allocated, Resources::new(2, 256, 100));
        assert_eq!(b.allocated, Resources::new(2, 256, 100));
        assert_eq!(c.allocated, Resources::ZERO);
        assert_eq!(c.capacity, Resources::ZERO);
    }
}
