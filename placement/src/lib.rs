//! Where the cluster controller puts a VM (issue #16).
//!
//! Scheduling as in Nomad or Kubernetes: filters drop the hosts that cannot
//! take the VM ([`filter`]), a score picks one of the rest ([`Strategy`]),
//! and when none is left the decision says which filter excluded which host
//! ([`Explanation`]), for the VM's event log; the VM stays pending and is
//! tried again when the cluster changes.
//!
//! Pure functions of their inputs: no I/O, no clock, no randomness, and the
//! order hosts come in does not matter (ties go to the first name). The
//! controller builds the inputs from etcd and applies the decision, so all
//! of this is tested without a cluster. Inputs are not trusted to be
//! consistent: any numbers, a host allocated beyond its capacity, a group
//! member on a host that is gone, give a decision, never a panic.

pub mod explain;
pub mod filter;
pub mod host;
pub mod request;
pub mod resources;
mod score;

use serde::{Deserialize, Serialize};

pub use explain::{Explanation, Rejection};
pub use filter::{Filter, Reason};
pub use host::{
    format_labels, is_label_key, is_label_value, parse_labels, FaultDomain, HostState, HostView,
    LabelError, NetworkReach, FAULT_DOMAIN_LABEL,
};
pub use request::{AntiAffinity, GroupMember, Request, Scope, Strategy};
pub use resources::Resources;

/// Where a VM goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Placed {
        host: String,
    },
    /// No host can take it now.
    Unplaceable(Explanation),
}

/// Places `request` on one of `hosts`, given the VMs already in
/// anti-affinity groups (`members`; the request's own VM among them is
/// ignored, so a VM can be placed again).
pub fn place(hosts: &[HostView], members: &[GroupMember], request: &Request) -> Decision {
    let filters = filter::Filters::new(hosts, members, request);
    let mut feasible = Vec::new();
    let mut rejections = Vec::new();
    for host in hosts {
        match filters.check(host) {
            Ok(()) => feasible.push(host),
            Err(reason) => rejections.push(Rejection {
                host: host.name.clone(),
                reason,
            }),
        }
    }
    // A preferred anti-affinity narrows the choice to the least crowded.
    let least = feasible.iter().map(|host| filters.crowding(host)).min();
    feasible.retain(|host| Some(filters.crowding(host)) == least);
    match score::choose(&feasible, request.needs, request.strategy) {
        Some(host) => Decision::Placed {
            host: host.name.clone(),
        },
        None => Decision::Unplaceable(Explanation::new(request.host.clone(), rejections)),
    }
}

/// Places `requests` one after the other, as [`place`] does, each seeing
/// the ones before it: a placed VM's needs are added to its host's
/// allocation and VM count, and it becomes a member of its group (any
/// earlier entry for the same VM is dropped). `hosts` and `members` are
/// left as they are after the last request.
pub fn place_batch(
    hosts: &mut [HostView],
    members: &mut Vec<GroupMember>,
    requests: &[Request],
) -> Vec<Decision> {
    requests
        .iter()
        .map(|request| {
            let decision = place(hosts, members, request);
            if let Decision::Placed { host: name } = &decision {
                if let Some(host) = hosts.iter_mut().find(|h| h.name == *name) {
                    host.allocated = host.allocated.saturating_add(request.needs);
                    host.vms = host.vms.saturating_add(1);
                }
                members.retain(|m| m.vm != request.vm);
                if let Some(anti) = &request.anti_affinity {
                    members.push(GroupMember {
                        vm: request.vm.clone(),
                        group: anti.group.clone(),
                        host: name.clone(),
                    });
                }
            }
            decision
        })
        .collect()
}

#[cfg(test)]
mod tests;
