//! A host as placement sees it: a snapshot the controller builds from etcd.
//!
//! Host names are the cluster's keys and are assumed unique; placement sorts
//! the hosts by name first, so the order they come in never matters.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::Resources;

/// The label that names a host's fault domain (hosts that fail together:
/// a rack, a power feed). A host without it is a fault domain of its own.
pub const FAULT_DOMAIN_LABEL: &str = "fault-domain";

/// Whether a host takes new VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Takes new VMs.
    #[default]
    Up,
    /// Keeps its VMs but takes no new ones (maintenance, draining).
    Cordoned,
    /// Not heard from: takes nothing.
    Down,
}

/// The tenant networks a host can put a VM's NICs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkReach {
    /// Every network (the host has an underlay and builds overlays on demand).
    Any,
    /// Only these networks (by id): the ones it has bridges for.
    Only(BTreeSet<String>),
}

impl NetworkReach {
    /// Whether the host can carry `network`.
    pub fn carries(&self, network: &str) -> bool {
        match self {
            NetworkReach::Any => true,
            NetworkReach::Only(networks) => networks.contains(network),
        }
    }
}

/// One host of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    pub state: HostState,
    /// Labels such as `zone=onprem`, `fault-domain=1`.
    pub labels: BTreeMap<String, String>,
    /// What the host offers VMs in all.
    pub capacity: Resources,
    /// What its VMs (placed or running) already take.
    pub allocated: Resources,
    pub networks: NetworkReach,
    /// How many VMs it holds.
    pub vms: u32,
}

impl HostView {
    /// What is left for new VMs (zero where allocation exceeds capacity).
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(self.allocated)
    }

    /// The fault domain the host is in.
    pub fn fault_domain(&self) -> FaultDomain<'_> {
        match self.labels.get(FAULT_DOMAIN_LABEL) {
            Some(label) => FaultDomain::Labelled(label),
            None => FaultDomain::Host(&self.name),
        }
    }
}

/// A host's fault domain: its `fault-domain` label, or, without one, the
/// host alone. The two never compare equal, so an unlabelled host `a` is not
/// in the domain of hosts labelled `fault-domain=a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultDomain<'a> {
    Labelled(&'a str),
    Host(&'a str),
}

/// A malformed label list.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LabelError {
    #[error("label {0:?} is not key=value (key: 1 to 63 of a-z 0-9 . - / starting with a letter or digit; value: up to 63 of A-Z a-z 0-9 . _ -)")]
    NotKeyValue(String),
    #[error("label key {0:?} is not 1 to 63 of a-z 0-9 . - / starting with a letter or digit")]
    BadKey(String),
    #[error("label value {0:?} is not up to 63 of A-Z a-z 0-9 . _ -")]
    BadValue(String),
    #[error("label {0:?} is given twice")]
    Duplicate(String),
}

/// Whether `key` is a label key: 1 to 63 of a-z 0-9 . - /, starting with a
/// letter or digit (labels come from operators and tenants and end up in
/// etcd keys' values, events and CLI tables: nothing else gets in).
pub fn is_label_key(key: &str) -> bool {
    (1..=63).contains(&key.len())
        && key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"./-".contains(&b))
}

/// Whether `value` is a label value: up to 63 of A-Z a-z 0-9 . _ -.
pub fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Parses labels written as `zone=onprem,fault-domain=1,update-domain=2`
/// (spaces around each pair are ignored; values may be empty; the empty
/// string is no labels).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, LabelError> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim) {
        if pair.is_empty() && text.trim().is_empty() {
            break;
        }
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| LabelError::NotKeyValue(pair.to_string()))?;
        if !is_label_key(key) {
            return Err(LabelError::BadKey(key.to_string()));
        }
        if !is_label_value(value) {
            return Err(LabelError::BadValue(value.to_string()));
        }
        if labels.insert(key.to_string(), value.to_string()).is_some() {
            return Err(LabelError::Duplicate(key.to_string()));
        }
    }
    Ok(labels)
}

/// Writes labels the way [`parse_labels`] reads them, or refuses a key or
/// value it could not read back.
pub fn format_labels(labels: &BTreeMap<String, String>) -> Result<String, LabelError> {
    let mut pairs = Vec::with_capacity(labels.len());
    for (key, value) in labels {
        if !is_label_key(key) {
            return Err(LabelError::BadKey(key.clone()));
        }
        if !is_label_value(value) {
            return Err(LabelError::BadValue(value.clone()));
        }
        pairs.push(format!("{key}={value}"));
    }
    Ok(pairs.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_the_issue_example() {
        assert_eq!(
            parse_labels("zone=onprem,fault-domain=1,update-domain=2"),
            Ok(labels(&[
                ("zone", "onprem"),
                ("fault-domain", "1"),
                ("update-domain", "2")
            ]))
        );
        assert_eq!(parse_labels(""), Ok(BTreeMap::new()));
        assert_eq!(parse_labels("  "), Ok(BTreeMap::new()));
        assert_eq!(
            parse_labels(" zone=cloud , gpu=,topology.io/rack=r-7"),
            Ok(labels(&[
                ("zone", "cloud"),
                ("gpu", ""),
                ("topology.io/rack", "r-7")
            ]))
        );
    }

    #[test]
    fn refuses_malformed_labels() {
        assert_eq!(
            parse_labels("zone"),
            Err(LabelError::NotKeyValue("zone".into()))
        );
        assert_eq!(
            parse_labels("zone=a,,b=c"),
            Err(LabelError::NotKeyValue("".into()))
        );
        assert_eq!(parse_labels("=a"), Err(LabelError::BadKey("".into())));
        for bad in [
            "Zone=x",
            "zone =x",
            "zone=a b",
            "zone=\"x\"",
            "zone=x;y",
            "-a=b",
        ] {
            assert!(parse_labels(bad).is_err(), "{bad}");
        }
        assert!(parse_labels(&format!("k={}", "v".repeat(64))).is_err());
        assert_eq!(
            parse_labels("zone=a,zone=b"),
            Err(LabelError::Duplicate("zone".into()))
        );
    }

    #[test]
    fn formats_what_it_parses() {
        let text = "fault-domain=1,zone=onprem";
        assert_eq!(format_labels(&parse_labels(text).unwrap()).unwrap(), text);
        assert_eq!(format_labels(&BTreeMap::new()).unwrap(), "");
        assert_eq!(
            format_labels(&labels(&[("a,b", "c")])),
            Err(LabelError::BadKey("a,b".into()))
        );
        assert_eq!(
            format_labels(&labels(&[("a", "b,c")])),
            Err(LabelError::BadValue("b,c".into()))
        );
        assert_eq!(
            format_labels(&labels(&[("", "c")])),
            Err(LabelError::BadKey("".into()))
        );
    }

    #[test]
    fn a_host_without_a_fault_domain_is_its_own() {
        let mut host = HostView {
            name: "a".into(),
            state: HostState::Up,
            labels: BTreeMap::new(),
            capacity: Resources::ZERO,
            allocated: Resources::ZERO,
            networks: NetworkReach::Any,
            vms: 0,
        };
        assert_eq!(host.fault_domain(), FaultDomain::Host("a"));
        host.labels = labels(&[(FAULT_DOMAIN_LABEL, "a")]);
        assert_eq!(host.fault_domain(), FaultDomain::Labelled("a"));
        assert_ne!(FaultDomain::Labelled("a"), FaultDomain::Host("a"));
    }

    #[test]
    fn free_stops_at_zero() {
        let host = HostView {
            name: "a".into(),
            state: HostState::Up,
            labels: BTreeMap::new(),
            capacity: Resources::new(4, 1024, 10),
            allocated: Resources::new(6, 512, 10),
            networks: NetworkReach::Only(BTreeSet::from(["n1".to_string()])),
            vms: 3,
        };
        assert_eq!(host.free(), Resources::new(0, 512, 0));
        assert!(host.networks.carries("n1"));
        assert!(!host.networks.carries("n2"));
        assert!(NetworkReach::Any.carries("n2"));
    }
}
