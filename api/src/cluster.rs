//! The cluster's hosts as `/v1/hosts` shows them: every member, whether it
//! is up, what it offers and what it runs. A standalone agent shows itself
//! alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a host offers to VMs, or what they take of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostResources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

/// Whether a host takes new VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeating and taking new VMs.
    Up,
    /// Heartbeating; its VMs run on, but no new ones are placed on it.
    Cordoned,
    /// Its lease expired: the host or its link to etcd is gone.
    Down,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Cordoned => "cordoned",
            HostState::Down => "down",
        }
    }
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterHost {
    pub name: String,
    pub state: HostState,
    /// Set by an operator (`POST /v1/hosts/{name}/cordon`); a cordoned host
    /// that is down stays cordoned when it comes back.
    pub cordoned: bool,
    /// Whether this host is the elected controller now.
    pub controller: bool,
    /// "compute" (runs VMs), "controller" (may be elected).
    pub roles: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// The SHA-256 fingerprint of the host's certificate (host-to-host TLS).
    pub fingerprint: String,
    /// Where the host serves the API (while it is up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_address: Option<String>,
    /// The host's address between hosts: VXLAN and peer API (while up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_address: Option<String>,
    /// What it offers VMs (while up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<HostResources>,
    /// What its VMs take (while up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<HostResources>,
    /// How many VMs it holds (while up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u32>,
    /// The agent's version (while up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// When its agent process joined, seconds since the epoch (while up):
    /// a restarted agent shows a later one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Seconds since the epoch.
    pub joined_at: u64,
    /// While the host is drained (`POST /v1/hosts/{name}/drain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainProgress>,
}

/// `POST /v1/hosts/{name}/drain`: cordons the host and moves its running
/// VMs away, each as its `placement.on_drain` says (paused and stopped
/// VMs stay).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostDrain {
    /// Moves from this host at once, 1 to 16 (2 by default); the
    /// controller also keeps to its cluster-wide limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 16)]
    pub max_parallel: Option<u32>,
}

/// How a drain goes: the VMs it must still move, those moving now, those
/// it cannot move (and why, in their events).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainProgress {
    /// Seconds since the epoch.
    pub started_at: u64,
    pub max_parallel: u32,
    /// Running VMs still on the host that the drain moves (ids), moving
    /// ones included.
    pub remaining: Vec<String>,
    /// VMs being moved now (ids).
    pub moving: Vec<String>,
    /// VMs whose moves failed too often, or that no other host can take
    /// (ids; their events say why): the drain does not wait for them.
    pub stuck: Vec<String>,
    /// Nothing left to move: every running VM moved, stopped or stuck.
    pub done: bool,
}
