//! The filters: which hosts can take a VM at all.
//!
//! They run in a fixed order ([`Filter::ALL`]) and a host is excluded by
//! the first that refuses it, so an explanation names each host once, under
//! that filter. The order goes from what lasts to what changes: a host that
//! is down, or in the wrong zone, would not take the VM with any amount of
//! room, so saying it is full would mislead. Capacity comes last: the hosts
//! it lists are exactly those that would take the VM if they had room.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{FaultDomain, GroupMember, HostState, HostView, Request, Resources, Scope};

/// One filter, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Not the host the VM names.
    Pinned,
    /// The host is down.
    Down,
    /// The host is cordoned.
    Cordoned,
    /// The host lacks a required label.
    Label,
    /// The host cannot carry one of the VM's networks.
    Network,
    /// Another VM of the group is on the host (or in its fault domain).
    AntiAffinity,
    /// Not enough free vCPUs, memory or disk.
    Capacity,
}

impl Filter {
    /// Every filter, in the order they run.
    pub const ALL: [Filter; 7] = [
        Filter::Pinned,
        Filter::Down,
        Filter::Cordoned,
        Filter::Label,
        Filter::Network,
        Filter::AntiAffinity,
        Filter::Capacity,
    ];
}

/// Why a filter excluded a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The VM names another host.
    NotPinned,
    Down,
    Cordoned,
    /// The first required label (by key) the host lacks or has another
    /// value for (`have`).
    Label {
        key: String,
        want: String,
        have: Option<String>,
    },
    /// The VM's networks the host cannot carry.
    Network {
        missing: Vec<String>,
    },
    /// `member`, of `group`, is on `on`, which is this host or, with
    /// [`Scope::FaultDomain`], in its fault domain (`fault_domain`, the
    /// label's value; `None` when a host without the label is its own).
    AntiAffinity {
        group: String,
        scope: Scope,
        member: String,
        on: String,
        fault_domain: Option<String>,
    },
    /// What the host has free, and what the VM needs.
    Capacity {
        free: Resources,
        needs: Resources,
    },
}

impl Reason {
    /// The filter that gives this reason.
    pub fn filter(&self) -> Filter {
        match self {
            Reason::NotPinned => Filter::Pinned,
            Reason::Down => Filter::Down,
            Reason::Cordoned => Filter::Cordoned,
            Reason::Label { .. } => Filter::Label,
            Reason::Network { .. } => Filter::Network,
            Reason::AntiAffinity { .. } => Filter::AntiAffinity,
            Reason::Capacity { .. } => Filter::Capacity,
        }
    }
}

/// The filters for one request, with what they need from the rest of the
/// cluster worked out once.
pub(crate) struct Filters<'a> {
    request: &'a Request,
    /// The other members of the request's anti-affinity group, with the
    /// fault domain of the host each is on, in a fixed order (so the member
    /// an explanation names does not depend on the order they came in).
    members: Vec<(&'a GroupMember, FaultDomain<'a>)>,
}

impl<'a> Filters<'a> {
    pub(crate) fn new(
        hosts: &'a [HostView],
        members: &'a [GroupMember],
        request: &'a Request,
    ) -> Self {
        let by_name: BTreeMap<&str, &HostView> =
            hosts.iter().map(|h| (h.name.as_str(), h)).collect();
        let mut members: Vec<_> = match &request.anti_affinity {
            None => Vec::new(),
            Some(anti) => members
                .iter()
                .filter(|m| m.group == anti.group && m.vm != request.vm)
                .map(|m| {
                    // A member on a host the cluster no longer lists is in
                    // no other host's fault domain.
                    let domain = by_name
                        .get(m.host.as_str())
                        .map_or(FaultDomain::Host(&m.host), |h| h.fault_domain());
                    (m, domain)
                })
                .collect(),
        };
        members.sort();
        Filters { request, members }
    }

    /// `Ok` if `host` can take the VM, else the first filter's reason.
    pub(crate) fn check(&self, host: &HostView) -> Result<(), Reason> {
        self.pinned(host)
            .or_else(|| state(host))
            .or_else(|| self.label(host))
            .or_else(|| self.network(host))
            .or_else(|| self.anti_affinity(host))
            .or_else(|| self.capacity(host))
            .map_or(Ok(()), Err)
    }

    fn pinned(&self, host: &HostView) -> Option<Reason> {
        match &self.request.host {
            Some(name) if *name != host.name => Some(Reason::NotPinned),
            _ => None,
        }
    }

    fn label(&self, host: &HostView) -> Option<Reason> {
        self.request.require.iter().find_map(|(key, want)| {
            let have = host.labels.get(key);
            (have != Some(want)).then(|| Reason::Label {
                key: key.clone(),
                want: want.clone(),
                have: have.cloned(),
            })
        })
    }

    fn network(&self, host: &HostView) -> Option<Reason> {
        let missing: Vec<String> = self
            .request
            .networks
            .iter()
            .filter(|n| !host.networks.carries(n))
            .cloned()
            .collect();
        (!missing.is_empty()).then_some(Reason::Network { missing })
    }

    fn anti_affinity(&self, host: &HostView) -> Option<Reason> {
        let anti = self
            .request
            .anti_affinity
            .as_ref()
            .filter(|anti| !anti.preferred)?;
        let domain = host.fault_domain();
        let (member, _) = self
            .members
            .iter()
            .find(|(m, member_domain)| match anti.scope {
                Scope::Host => m.host == host.name,
                Scope::FaultDomain => *member_domain == domain,
            })?;
        Some(Reason::AntiAffinity {
            group: anti.group.clone(),
            scope: anti.scope,
            member: member.vm.clone(),
            on: member.host.clone(),
            fault_domain: match (anti.scope, domain) {
                (Scope::FaultDomain, FaultDomain::Labelled(label)) => Some(label.to_string()),
                _ => None,
            },
        })
    }

    /// How many other members of the request's group share `host` (or,
    /// with [`Scope::FaultDomain`], its fault domain): what a preferred
    /// anti-affinity keeps low.
    pub(crate) fn crowding(&self, host: &HostView) -> usize {
        let Some(anti) = &self.request.anti_affinity else {
            return 0;
        };
        let domain = host.fault_domain();
        self.members
            .iter()
            .filter(|(m, member_domain)| match anti.scope {
                Scope::Host => m.host == host.name,
                Scope::FaultDomain => *member_domain == domain,
            })
            .count()
    }

    fn capacity(&self, host: &HostView) -> Option<Reason> {
        let free = host.free();
        let needs = self.request.needs;
        (!needs.fits_in(free)).then_some(Reason::Capacity { free, needs })
    }
}

fn state(host: &HostView) -> Option<Reason> {
    match host.state {
        HostState::Up => None,
        HostState::Cordoned => Some(Reason::Cordoned),
        HostState::Down => Some(Reason::Down),
    }
}
