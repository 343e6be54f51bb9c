//! Services (cluster mode): a tenant describes roles (an image, a size, how
//! many instances, how they are spread, how their health is probed) and
//! the controller keeps each role at its count through host failures,
//! drains and upgrades. Instances are VMs of the tenant, named
//! `{service}-{role}-{index}-{suffix}`, each in an update domain
//! (`index % update_domains`) that rolling upgrades take one at a time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::vm::{VmEvent, VmState};

/// `POST /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceCreate {
    /// 1 to 20 lower-case letters, digits and '-'.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,19}$")]
    pub name: String,
    /// 1 to 8 roles with distinct names.
    pub roles: Vec<RoleSpec>,
}

/// A role: identical instances of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// 1 to 20 lower-case letters, digits and '-'.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,19}$")]
    pub name: String,
    /// The image's id or name (the service shows its id).
    pub image: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Appended to the kernel command line of every instance.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel_args: String,
    /// How many instances to keep (0 to 64).
    pub instances: u32,
    /// Networks (names or ids): each instance has a NIC on each, in this
    /// order. None: one NIC on the tenant's default bridge of its host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// 1 to 20 (default 2): a rolling upgrade replaces one domain's
    /// instances at a time.
    #[serde(default = "default_update_domains")]
    pub update_domains: u32,
    /// How instances spread over fault domains (the hosts' `fault-domain`
    /// label; a host without one is a domain of its own).
    #[serde(default)]
    pub fault_domains: FaultDomainSpread,
    /// Host labels the instances' hosts must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub require: BTreeMap<String, String>,
    /// Whether failed and lost instances are replaced (default: always).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How an instance's health is checked; without one an instance is
    /// healthy while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
    /// Ports load-balanced over the role's healthy instances, at a virtual
    /// address on its first network (at most 4; fixed at creation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ServiceEndpoint>,
}

/// A port of a role's endpoint: new flows to the role's virtual address
/// (and to `host_port` on every host) go to one of its healthy
/// instances, wherever it runs; the kernel does it (nftables), on the
/// host where the flow enters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceEndpoint {
    pub protocol: crate::network::Protocol,
    /// The port at the virtual address (1 to 65535).
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    /// The instances' port (`port` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65535)]
    pub target_port: Option<u16>,
    /// A port open on every host (in the hosts' port forward range), as a
    /// cloud load balancer's public port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: Option<u16>,
}

impl ServiceEndpoint {
    /// A TCP endpoint on `port`, to the same port of the instances.
    pub fn tcp(port: u16) -> Self {
        ServiceEndpoint {
            protocol: crate::network::Protocol::Tcp,
            port,
            target_port: None,
            host_port: None,
        }
    }

    /// The instances' port.
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    128
}

fn default_update_domains() -> u32 {
    2
}

impl RoleSpec {
    /// Role `name` of `instances` instances of `image`, every other field
    /// at its default.
    pub fn new(name: impl Into<String>, image: impl Into<String>, instances: u32) -> Self {
        RoleSpec {
            name: name.into(),
            image: image.into(),
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            kernel_args: String::new(),
            instances,
            networks: Vec::new(),
            update_domains: default_update_domains(),
            fault_domains: FaultDomainSpread::default(),
            require: BTreeMap::new(),
            restart: RestartPolicy::default(),
            probe: None,
            endpoints: Vec::new(),
        }
    }

    /// The update domain of instance `index`.
    pub fn update_domain(&self, index: u32) -> u32 {
        index % self.update_domains.max(1)
    }
}

/// How a role's instances spread over fault domains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FaultDomainSpread {
    /// As evenly as the hosts allow; more instances than domains share.
    #[default]
    Preferred,
    /// Never two in one domain: an instance no free domain can take stays
    /// pending.
    Required,
}

/// Whether a role's failed or lost instances are replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// An instance that fails its probe or stops is replaced by a new one;
    /// one whose host is lost is started afresh elsewhere.
    #[default]
    Always,
    /// Failed instances stay as they are, for a look.
    Never,
}

/// A health probe, run by the host of each instance against the
/// instance's first address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub protocol: ProbeProtocol,
    /// The instance's port (1 to 65535).
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    /// HTTP only: the path to GET (default "/"); any 2xx or 3xx passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Seconds between checks (1 to 60, default 2).
    #[serde(default = "default_interval_s")]
    pub interval_s: u32,
    /// Milliseconds a check may take (100 to 10000, default 1000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// Failures in a row that make a healthy instance unhealthy (1 to 10,
    /// default 3).
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    /// Seconds a started instance has to pass its first check before it
    /// counts as unhealthy (0 to 600, default 120).
    #[serde(default = "default_start_grace_s")]
    pub start_grace_s: u32,
}

fn default_interval_s() -> u32 {
    2
}

fn default_timeout_ms() -> u32 {
    1000
}

fn default_threshold() -> u32 {
    3
}

fn default_start_grace_s() -> u32 {
    120
}

impl Probe {
    /// A probe of `protocol` on `port`, every other field at its default.
    pub fn new(protocol: ProbeProtocol, port: u16) -> Self {
        Probe {
            protocol,
            port,
            path: None,
            interval_s: default_interval_s(),
            timeout_ms: default_timeout_ms(),
            threshold: default_threshold(),
            start_grace_s: default_start_grace_s(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProbeProtocol {
    /// Passes when a TCP connection opens.
    Tcp,
    /// Passes on an HTTP/1.1 GET answered 2xx or 3xx.
    Http,
}

/// A service as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Service {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub roles: Vec<Role>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// What the controller did (instances replaced, rollouts), oldest
    /// first.
    pub events: Vec<VmEvent>,
}

/// A role, with its instances as they are now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Role {
    /// As asked, with the image's id.
    pub spec: RoleSpec,
    /// One more with each upgrade or rollback.
    pub revision: u64,
    pub instances: Vec<ServiceInstance>,
    /// How many of them are healthy.
    pub healthy: u32,
    /// The last rollout, while it runs and after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Whether a rollback can go back to an earlier revision.
    pub can_roll_back: bool,
    /// The address of its endpoints on its first network (with
    /// endpoints only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_address: Option<String>,
}

/// One instance of a role: a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceInstance {
    pub vm_id: String,
    pub name: String,
    pub index: u32,
    pub update_domain: u32,
    /// The role revision it was made from.
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_domain: Option<String>,
    /// Its first address, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub state: VmState,
    pub health: InstanceHealth,
    /// Being removed (scaled down, replaced, upgraded).
    pub retiring: bool,
}

/// What an instance's probe says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceHealth {
    /// Not running yet, or running and not yet past its first check.
    Starting,
    Healthy,
    /// Failed its probe `threshold` times in a row, never passed within
    /// its start grace, or stopped.
    Unhealthy,
}

impl InstanceHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceHealth::Starting => "starting",
            InstanceHealth::Healthy => "healthy",
            InstanceHealth::Unhealthy => "unhealthy",
        }
    }
}

/// A rolling upgrade (or rollback) of a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Rollout {
    /// The revision it goes from and to.
    pub from_revision: u64,
    pub to_revision: u64,
    pub rollback: bool,
    pub state: RolloutState,
    /// The update domain being replaced (while in progress), or where it
    /// stopped.
    pub domain: u32,
    pub domains: u32,
    pub message: String,
    pub started_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    InProgress,
    Done,
    /// An instance of the domain being replaced failed: the rollout
    /// stopped there (roll back, or upgrade again).
    Failed,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::InProgress => "in_progress",
            RolloutState::Done => "done",
            RolloutState::Failed => "failed",
        }
    }
}

/// `POST /v1/services/{id}/scale`: a role's new instance count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleScale {
    pub role: String,
    /// 0 to 64.
    pub instances: u32,
}

/// `POST /v1/services/{id}/rollback`: a role goes back to the revision
/// before its current one, one update domain at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleRollback {
    pub role: String,
}

/// `POST /v1/services/{id}/upgrade`: what changes in a role (at least one
/// field); its instances are replaced one update domain at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleUpgrade {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_role_takes_the_defaults() {
        let role: RoleSpec =
            serde_json::from_str(r#"{"name":"web","image":"busybox","instances":3}"#).unwrap();
        assert_eq!(role, RoleSpec::new("web", "busybox", 3));
        assert_eq!(
            (
                role.update_domain(0),
                role.update_domain(1),
                role.update_domain(2)
            ),
            (0, 1, 0)
        );
        let probe: Probe = serde_json::from_str(r#"{"protocol":"http","port":80}"#).unwrap();
        assert_eq!(probe, Probe::new(ProbeProtocol::Http, 80));
    }

    #[test]
    fn unknown_and_response_only_fields_are_refused() {
        for body in [
            r#"{"name":"web","image":"b","instances":1,"revision":2}"#,
            r#"{"name":"web","image":"b","instances":1,"healthy":1}"#,
        ] {
            assert!(serde_json::from_str::<RoleSpec>(body).is_err(), "{body}");
        }
        assert!(
            serde_json::from_str::<ServiceCreate>(r#"{"name":"s","roles":[],"id":"x"}"#).is_err()
        );
    }
}
