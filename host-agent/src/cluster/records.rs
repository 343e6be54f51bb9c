//! The values of the membership keys (`keys.rs`), as JSON. Readers accept
//! fields they do not know, so that a cluster can run agents of two
//! versions during an upgrade; a value that does not decode is reported
//! with its key, never guessed at.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use nubis_api::{ClusterHost, HostResources, HostState};
use serde::{Deserialize, Serialize};

use super::settings::{HostName, Labels, Role};

/// `members/{host}`: a member as it lasts across restarts and outages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub name: HostName,
    /// The host's certificate: a second agent that takes the name of a
    /// member with another certificate is refused.
    pub fingerprint: String,
    pub roles: BTreeSet<Role>,
    pub labels: Labels,
    /// Seconds since the epoch.
    pub joined_at: u64,
    #[serde(default)]
    pub cordoned: bool,
    /// While an operator drains it (cordoned too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<super::drain::DrainRecord>,
    /// Its underlay address as of its last join: the overlay keeps
    /// sending to it while its agent restarts (its heartbeat is gone then,
    /// its VMs are not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_address: Option<Ipv4Addr>,
}

/// `alive/{host}`: a member's heartbeat, bound to its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliveRecord {
    pub api_address: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_address: Option<Ipv4Addr>,
    pub peer_port: u16,
    pub capacity: HostResources,
    pub usage: HostResources,
    pub vms: u32,
    pub agent_version: String,
    /// Seconds since the epoch: when this agent process joined.
    pub started_at: u64,
}

/// A member as `/v1/hosts` shows it: its lasting record, its heartbeat if
/// it is up, and whether it leads.
pub fn cluster_host(
    member: &MemberRecord,
    alive: Option<&AliveRecord>,
    controller: bool,
) -> ClusterHost {
    let state = match (alive, member.cordoned) {
        (None, _) => HostState::Down,
        (Some(_), true) => HostState::Cordoned,
        (Some(_), false) => HostState::Up,
    };
    ClusterHost {
        name: member.name.to_string(),
        state,
        cordoned: member.cordoned,
        controller: controller && alive.is_some(),
        roles: member
            .roles
            .iter()
            .map(|role| role.as_str().to_string())
            .collect(),
        labels: member.labels.clone(),
        fingerprint: member.fingerprint.clone(),
        api_address: alive.map(|a| a.api_address.to_string()),
        underlay_address: alive.and_then(|a| a.underlay_address.map(|u| u.to_string())),
        capacity: alive.map(|a| a.capacity),
        usage: alive.map(|a| a.usage),
        vms: alive.map(|a| a.vms),
        agent_version: alive.map(|a| a.agent_version.clone()),
        started_at: alive.map(|a| a.started_at),
        joined_at: member.joined_at,
        drain: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(cordoned: bool) -> MemberRecord {
        MemberRecord {
            name: "a".parse().expect("name"),
            fingerprint: "f".repeat(64),
            roles: [Role::Compute].into(),
            labels: [("zone".to_string(), "cloud".to_string())].into(),
            joined_at: 7,
            cordoned,
            drain: None,
            underlay_address: None,
        }
    }

    fn alive() -> AliveRecord {
        AliveRecord {
            api_address: "10.0.0.1:8080".parse().expect("address"),
            underlay_address: Some(Ipv4Addr::new(10, 0, 0, 1)),
            peer_port: 7443,
            capacity: HostResources {
                vcpus: 8,
                memory_mib: 4096,
                disk_mib: 10_000,
            },
            usage: HostResources::default(),
            vms: 0,
            agent_version: "0.1.0".into(),
            started_at: 9,
        }
    }

    #[test]
    fn a_host_is_up_cordoned_or_down() {
        assert_eq!(
            cluster_host(&member(false), Some(&alive()), true).state,
            HostState::Up
        );
        assert_eq!(
            cluster_host(&member(true), Some(&alive()), false).state,
            HostState::Cordoned
        );
        let down = cluster_host(&member(true), None, true);
        assert_eq!(down.state, HostState::Down);
        assert!(down.cordoned);
        assert!(!down.controller, "a down host leads nothing");
        assert_eq!(down.capacity, None);
        assert_eq!(down.labels["zone"], "cloud");
    }

    #[test]
    fn records_from_newer_agents_are_read() {
        let mut json = serde_json::to_value(member(false)).expect("encode");
        json["added_later"] = serde_json::json!(1);
        let back: MemberRecord = serde_json::from_value(json).expect("decode");
        assert_eq!(back, member(false));
        let mut json = serde_json::to_value(alive()).expect("encode");
        json["name"] = serde_json::json!("../../etc");
        assert!(serde_json::from_value::<AliveRecord>(json).is_ok());
        let bad = serde_json::json!({"name": "../x", "fingerprint": "", "roles": [],
            "labels": {}, "joined_at": 1});
        assert!(
            serde_json::from_value::<MemberRecord>(bad).is_err(),
            "a bad name is refused"
        );
    }
}
