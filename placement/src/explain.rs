//! Why a VM could not be placed, for the VM's event log.
//!
//! An explanation names every host of the cluster once, with the first
//! filter that excluded it; its text groups them by filter:
//!
//! ```text
//! no host fits: down: d; cordoned: c; label zone=cloud: e (zone=onprem); capacity: a (needs 4 vCPUs, has 2 free)
//! ```
//!
//! Hosts excluded only for not being the one the VM names are not listed:
//! `pinned to b` says it all.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Reason, Scope};

/// Why no host could take a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The host the VM names, if any.
    pub pinned: Option<String>,
    /// Every host of the cluster, once, with the first filter that excluded
    /// it; in filter order, then by reason, then by host name.
    pub rejections: Vec<Rejection>,
}

/// One host and why it cannot take the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub host: String,
    pub reason: Reason,
}

impl Explanation {
    /// Puts `rejections` in their order (see [`Explanation::rejections`]).
    pub(crate) fn new(pinned: Option<String>, mut rejections: Vec<Rejection>) -> Self {
        rejections.sort_by_cached_key(|r| (r.reason.filter(), heading(&r.reason), r.host.clone()));
        Explanation { pinned, rejections }
    }

    /// Why `host` was excluded, if the cluster has it.
    pub fn reason(&self, host: &str) -> Option<&Reason> {
        self.rejections
            .iter()
            .find(|r| r.host == host)
            .map(|r| &r.reason)
    }

    /// Whether the VM names a host the cluster does not have.
    pub fn pinned_host_missing(&self) -> bool {
        self.pinned
            .as_ref()
            .is_some_and(|pinned| self.reason(pinned).is_none())
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no host fits: ")?;
        let mut parts: Vec<String> = Vec::new();
        match &self.pinned {
            Some(host) if self.pinned_host_missing() => {
                parts.push(format!("pinned host {host} does not exist"))
            }
            Some(host) => parts.push(format!("pinned to {host}")),
            None if self.rejections.is_empty() => {
                parts.push("the cluster has no hosts".to_string())
            }
            None => {}
        }
        let listed = self
            .rejections
            .iter()
            .filter(|r| r.reason != Reason::NotPinned);
        let mut last_heading = None;
        for rejection in listed {
            let heading = heading(&rejection.reason);
            let item = match detail(rejection) {
                Some(detail) => format!("{} ({detail})", rejection.host),
                None => rejection.host.clone(),
            };
            match parts.last_mut() {
                Some(part) if last_heading.as_ref() == Some(&heading) => {
                    part.push_str(", ");
                    part.push_str(&item);
                }
                _ => parts.push(format!("{heading}: {item}")),
            }
            last_heading = Some(heading);
        }
        f.write_str(&parts.join("; "))
    }
}

/// What hosts excluded for the same reason are listed under.
fn heading(reason: &Reason) -> String {
    match reason {
        Reason::NotPinned => "not pinned".to_string(),
        Reason::Down => "down".to_string(),
        Reason::Cordoned => "cordoned".to_string(),
        Reason::Label { key, want, .. } => format!("label {key}={want}"),
        Reason::Network { .. } => "networks".to_string(),
        Reason::AntiAffinity {
            group,
            scope: Scope::Host,
            ..
        } => format!("anti-affinity {group}"),
        Reason::AntiAffinity {
            group,
            scope: Scope::FaultDomain,
            ..
        } => format!("anti-affinity {group} per fault domain"),
        Reason::Capacity { .. } => "capacity".to_string(),
    }
}

/// What is said of one host after its name.
fn detail(rejection: &Rejection) -> Option<String> {
    match &rejection.reason {
        Reason::NotPinned | Reason::Down | Reason::Cordoned => None,
        Reason::Label {
            key,
            have: Some(value),
            ..
        } => Some(format!("{key}={value}")),
        Reason::Label {
            key, have: None, ..
        } => Some(format!("no {key}")),
        Reason::Network { missing } => Some(format!("lacks {}", missing.join(", "))),
        Reason::AntiAffinity {
            member,
            on,
            fault_domain,
            ..
        } => {
            let mut detail = member.clone();
            if *on != rejection.host {
                detail.push_str(&format!(" on {on}"));
            }
            if let Some(domain) = fault_domain {
                detail.push_str(&format!(", fault domain {domain}"));
            }
            Some(detail)
        }
        Reason::Capacity { free, needs } => {
            let short = [
                (needs.vcpus > free.vcpus).then(|| {
                    let unit = if needs.vcpus == 1 { " vCPU" } else { " vCPUs" };
                    (needs.vcpus.to_string(), free.vcpus.to_string(), unit)
                }),
                (needs.memory_mib > free.memory_mib).then(|| {
                    (
                        needs.memory_mib.to_string(),
                        free.memory_mib.to_string(),
                        " MiB memory",
                    )
                }),
                (needs.disk_mib > free.disk_mib).then(|| {
                    (
                        needs.disk_mib.to_string(),
                        free.disk_mib.to_string(),
                        " MiB disk",
                    )
                }),
            ];
            let short: Vec<_> = short.into_iter().flatten().collect();
            if short.is_empty() {
                return None;
            }
            let needed: Vec<String> = short
                .iter()
                .map(|(n, _, unit)| format!("{n}{unit}"))
                .collect();
            let free: Vec<&str> = short.iter().map(|(_, f, _)| f.as_str()).collect();
            Some(format!(
                "needs {}, has {} free",
                needed.join(" and "),
                free.join(" and ")
            ))
        }
    }
}
