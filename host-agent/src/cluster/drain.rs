//! Draining a host: cordoned, then its running VMs moved away, each as
//! its `placement.on_drain` says. The operator marks the member
//! (`members/{host}`: [`DrainRecord`]); the controller picks which VMs
//! move now (at most `max_parallel` from each draining host and
//! [`CLUSTER_LIMIT`] in the cluster) and where to (`nubis-placement`, as
//! for a new VM), writing [`Move`] into their records; the VM's host
//! carries each move out (`service/placed.rs`): a live migration whose
//! destination takes the record over, or a stop here and a start there.
//! A move that fails is counted; after [`MAX_FAILURES`] the VM is left
//! where it is and the drain says so.

use nubis_api::{DrainPolicy, DrainProgress, VmState};
use serde::{Deserialize, Serialize};

use super::vms::ClusterVm;

/// Moves at once from one draining host, unless the drain says.
pub const DEFAULT_PARALLEL: u32 = 2;
/// Moves at once from one draining host, at most.
pub const MAX_PARALLEL: u32 = 16;
/// Moves at once in the whole cluster.
pub const CLUSTER_LIMIT: usize = 4;
/// Failed moves after which a VM is left where it is.
pub const MAX_FAILURES: u32 = 3;
/// The event a VM gets when no other host can take it for a drain.
pub const UNPLACEABLE_EVENT: &str = "drain-unplaceable";

/// In `members/{host}` while the host is drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    /// Seconds since the epoch.
    pub started_at: u64,
    pub max_parallel: u32,
}

/// In `vms/{id}` while the VM is moved away from its host by a drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The destination the controller chose.
    pub to: String,
    pub policy: DrainPolicy,
    /// Seconds since the epoch.
    pub since: u64,
}

/// Whether a drain of its host moves `vm` (it runs there and its policy
/// is not to stop), moving or not.
fn to_move(vm: &ClusterVm, host: &str) -> bool {
    let running = vm
        .status
        .as_ref()
        .is_some_and(|status| status.host == host && status.vm.state == VmState::Running);
    vm.record.host.as_deref() == Some(host)
        && (running || vm.record.moving.is_some())
        && vm.record.spec.placement.on_drain != DrainPolicy::Stop
}

/// Whether the drain gave `vm` up: too many failed moves, or no host can
/// take it (until the cluster changes: it is tried again, after the
/// others).
fn stuck(vm: &ClusterVm) -> bool {
    vm.record.moving.is_none() && (gave_up(vm) || unplaceable(vm))
}

fn gave_up(vm: &ClusterVm) -> bool {
    vm.record.failed_moves >= MAX_FAILURES
}

fn unplaceable(vm: &ClusterVm) -> bool {
    vm.record
        .events
        .last()
        .is_some_and(|event| event.kind == UNPLACEABLE_EVENT)
}

/// How the drain of `host` goes.
pub fn progress(host: &str, drain: &DrainRecord, vms: &[ClusterVm]) -> DrainProgress {
    let mut progress = DrainProgress {
        started_at: drain.started_at,
        max_parallel: drain.max_parallel,
        ..DrainProgress::default()
    };
    for vm in vms.iter().filter(|vm| to_move(vm, host)) {
        let id = vm.record.id.clone();
        if vm.record.moving.is_some() {
            progress.moving.push(id.clone());
        }
        if stuck(vm) {
            progress.stuck.push(id);
        } else {
            progress.remaining.push(id);
        }
    }
    progress.done = progress.remaining.is_empty();
    progress
}

/// The VMs to start moving now, in the order they were created (those no
/// host could take last): those of the draining hosts (name, drain) that
/// are to move, not moving, not given up, within each host's
/// `max_parallel` and the cluster's `limit` (moves under way count
/// against both).
pub fn next_moves<'v>(
    draining: &[(String, DrainRecord)],
    vms: &'v [ClusterVm],
    limit: usize,
) -> Vec<&'v ClusterVm> {
    let moving_from = |host: &str| {
        vms.iter()
            .filter(|vm| vm.record.moving.is_some() && vm.record.host.as_deref() == Some(host))
            .count()
    };
    let mut room = limit.saturating_sub(vms.iter().filter(|vm| vm.record.moving.is_some()).count());
    let mut chosen = Vec::new();
    for (host, drain) in draining {
        let mut host_room = (drain.max_parallel as usize).saturating_sub(moving_from(host));
        let mut candidates: Vec<&ClusterVm> = vms
            .iter()
            .filter(|vm| to_move(vm, host) && vm.record.moving.is_none() && !gave_up(vm))
            .collect();
        candidates.sort_by_key(|vm| (unplaceable(vm), vm.record.created_at, &vm.record.id));
        for vm in candidates {
            if room == 0 || host_room == 0 {
                break;
            }
            chosen.push(vm);
            room -= 1;
            host_room -= 1;
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::vms::{VmRecord, VmStatus};
    use nubis_api::VmCreate;

    fn vm(id: &str, host: &str, state: VmState, policy: DrainPolicy) -> ClusterVm {
        let mut spec = VmCreate::new(id, "img");
        spec.placement.on_drain = policy;
        let record = VmRecord {
            id: id.to_string(),
            tenant_id: "t-1".into(),
            spec,
            host: Some(host.to_string()),
            created_at: id.len() as u64,
            nics: Vec::new(),
            events: Vec::new(),
            storage_mib: 0,
            moving: None,
            failed_moves: 0,
            generation: 1,
            instance: None,
            retiring: None,
            ssh_keys: Vec::new(),
        };
        let mut shown = record.pending();
        shown.state = state;
        ClusterVm {
            record,
            revision: 1,
            status: Some(VmStatus {
                host: host.to_string(),
                vm: shown,
                health: None,
            }),
        }
    }

    fn moving(mut vm: ClusterVm, to: &str) -> ClusterVm {
        vm.record.moving = Some(Move {
            to: to.to_string(),
            policy: vm.record.spec.placement.on_drain,
            since: 1,
        });
        vm
    }

    const DRAIN: DrainRecord = DrainRecord {
        started_at: 100,
        max_parallel: 2,
    };

    #[test]
    fn a_drain_moves_the_running_vms_of_its_host_but_those_that_stop() {
        let vms = vec![
            vm("a1", "a", VmState::Running, DrainPolicy::LiveMigrate),
            vm("a2", "a", VmState::Running, DrainPolicy::Restart),
            vm("a5", "a", VmState::Paused, DrainPolicy::LiveMigrate),
            vm("a3", "a", VmState::Stopped, DrainPolicy::LiveMigrate),
            vm("a4", "a", VmState::Running, DrainPolicy::Stop),
            vm("b1", "b", VmState::Running, DrainPolicy::LiveMigrate),
        ];
        let progress = progress("a", &DRAIN, &vms);
        assert_eq!(progress.remaining, ["a1", "a2"]);
        assert!(progress.moving.is_empty() && progress.stuck.is_empty());
        assert!(!progress.done);
        let chosen: Vec<&str> = next_moves(&[("a".into(), DRAIN)], &vms, 4)
            .iter()
            .map(|vm| vm.record.id.as_str())
            .collect();
        assert_eq!(chosen, ["a1", "a2"]);
    }

    #[test]
    fn moves_keep_to_the_host_and_cluster_limits() {
        let vms: Vec<ClusterVm> = ["a1", "a22", "a333", "b1", "b22", "b333"]
            .iter()
            .map(|id| vm(id, &id[..1], VmState::Running, DrainPolicy::LiveMigrate))
            .collect();
        let draining = [("a".to_string(), DRAIN), ("b".to_string(), DRAIN)];
        let ids = |chosen: Vec<&ClusterVm>| -> Vec<String> {
            chosen.iter().map(|vm| vm.record.id.clone()).collect()
        };
        assert_eq!(
            ids(next_moves(&draining, &vms, 4)),
            ["a1", "a22", "b1", "b22"]
        );
        assert_eq!(ids(next_moves(&draining, &vms, 3)), ["a1", "a22", "b1"]);
        // One move from a under way: one more from a, two from b.
        let mut under_way = vms.clone();
        under_way[0] = moving(under_way[0].clone(), "c");
        assert_eq!(
            ids(next_moves(&draining, &under_way, 4)),
            ["a22", "b1", "b22"]
        );
        let progress = progress("a", &DRAIN, &under_way);
        assert_eq!(progress.moving, ["a1"]);
        assert_eq!(progress.remaining, ["a1", "a22", "a333"]);
    }

    #[test]
    fn a_vm_that_cannot_move_is_stuck_and_the_drain_ends_without_it() {
        let mut failed = vm("a1", "a", VmState::Running, DrainPolicy::LiveMigrate);
        failed.record.failed_moves = MAX_FAILURES;
        let mut nowhere = vm("a22", "a", VmState::Running, DrainPolicy::LiveMigrate);
        nowhere
            .record
            .record_event(UNPLACEABLE_EVENT, "no host fits");
        let vms = vec![failed, nowhere];
        let progress = progress("a", &DRAIN, &vms);
        assert_eq!(progress.stuck, ["a1", "a22"]);
        assert!(progress.remaining.is_empty() && progress.done);
        // The one no host could take is tried again (the cluster may have
        // changed); the one that failed too often is not.
        let again: Vec<&str> = next_moves(&[("a".into(), DRAIN)], &vms, 4)
            .iter()
            .map(|vm| vm.record.id.as_str())
            .collect();
        assert_eq!(again, ["a22"]);
    }

    #[test]
    fn a_moved_vm_leaves_the_drain() {
        // Its destination took the record over: it is b's now.
        let moved = vm("a1", "b", VmState::Running, DrainPolicy::LiveMigrate);
        let progress = progress("a", &DRAIN, &[moved]);
        assert!(progress.done && progress.remaining.is_empty());
    }
}
