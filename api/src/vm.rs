//! microVMs: what a tenant asks for, and what the agent reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A device's rate limit: one definition with the VMM's (`nubis_contract`),
/// so that the agent hands a tenant's limit to the VMM as it is.
pub use nubis_contract::RateLimit;

/// An extra data disk, created empty (sparse) for the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDisk {
    /// 1 MiB to 16 TiB.
    #[schema(minimum = 1, maximum = 16777216)]
    pub size_mib: u64,
    #[serde(default)]
    pub rate_limit: RateLimit,
}

impl VmDisk {
    /// A disk of `size_mib` with no rate limit.
    pub fn new(size_mib: u64) -> Self {
        Self {
            size_mib,
            rate_limit: RateLimit::default(),
        }
    }
}

/// A NIC as a tenant asks for it. Its MAC, address and tap are the
/// agent's to assign: a request that names them is refused (they are in
/// [`VmNic`], the NIC as the agent reports it), so nothing a client sends
/// can choose an address outside its network or an unguarded MAC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmNicCreate {
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// A virtual network (id or name, see `/v1/networks`); the tenant's
    /// default bridge when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub network: Option<String>,
}

impl VmNicCreate {
    /// A NIC on virtual network `network` (id or name), with no rate limit.
    pub fn on_network(network: impl Into<String>) -> Self {
        Self {
            network: Some(network.into()),
            ..Self::default()
        }
    }
}

/// A VM's NIC as the agent reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmNic {
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// The virtual network's id; absent on the tenant's default bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Assigned by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Assigned by the agent (CIDR notation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The host tap device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// 1 to 63 characters: lower-case letters, digits and '-'.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// Image id or name (422 when the tenant has no such image).
    pub image: String,
    /// 1 to 254 (1 by default).
    #[serde(default = "default_vcpus")]
    #[schema(minimum = 1, maximum = 254)]
    pub vcpus: u32,
    /// At least 32 (128 by default).
    #[serde(default = "default_memory_mib")]
    #[schema(minimum = 32)]
    pub memory_mib: u64,
    /// Appended to the image's kernel command line: printable ASCII, at
    /// most 1024 bytes.
    #[serde(default)]
    #[schema(pattern = r"^[ -~]*$", max_length = 1024)]
    pub kernel_args: String,
    #[serde(default)]
    pub root_rate_limit: RateLimit,
    /// At most 8.
    #[serde(default)]
    #[schema(max_items = 8)]
    pub disks: Vec<VmDisk>,
    /// At most 4.
    #[serde(default)]
    #[schema(max_items = 4)]
    pub nics: Vec<VmNicCreate>,
    /// Where the cluster's controller may put the VM (cluster mode only:
    /// a standalone host refuses any constraint).
    #[serde(default, skip_serializing_if = "VmPlacement::is_empty")]
    pub placement: VmPlacement,
    /// Start the VM as soon as it is placed and defined on its host (as a
    /// cloud's "run instance" does); false defines it stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start: bool,
    /// The tenant's SSH keys (ids or names, see `/v1/ssh-keys`) the
    /// metadata service gives the guest; at most 10. The VM keeps them as
    /// they were at its creation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 10)]
    pub ssh_keys: Vec<String>,
    /// Labels the guest can read from the metadata service
    /// (`meta-data/tags/instance/KEY`): at most 32, keys 1 to 128
    /// characters of letters, digits and `_.:-` (starting with a letter
    /// or digit), values at most 256 printable ASCII characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = tags_schema)]
    pub tags: BTreeMap<String, String>,
    /// Given to the guest as `/latest/user-data` (base64 of at most 64
    /// KiB; a script starting with `#!` runs at the first boot of the
    /// Nubis images, cloud-init reads it on others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 87384,
        pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
    )]
    pub user_data: Option<String>,
}

/// The schema of `VmCreate::tags`: at most 32 properties, their names and
/// values as [`VmCreate::tags`] says.
fn tags_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let value = ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(MAX_TAG_VALUE))
        .pattern(Some(r"^[ -~]*$"));
    let name = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(value))
        .property_names(Some(name))
        .max_properties(Some(MAX_VM_TAGS))
        .build()
}

/// The most SSH keys, tags and user-data bytes a VM may carry.
pub const MAX_VM_SSH_KEYS: usize = 10;
pub const MAX_VM_TAGS: usize = 32;
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 256;
pub const MAX_USER_DATA: usize = 64 * 1024;

/// A key as a VM keeps it: its name and the key line, copied at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedSshKey {
    pub name: String,
    pub public_key: String,
}

/// What the metadata service tells a VM beyond its definition, kept with
/// the VM (and moved with it between hosts): its tags, its SSH keys as
/// they were at creation, and its user data (base64).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<NamedSshKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

impl VmMetadata {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Constraints on where a VM runs in a cluster: the controller filters
/// the hosts by them, then spreads (or packs) the VM onto one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPlacement {
    /// Labels a host must carry, e.g. `{"zone": "cloud"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub require: BTreeMap<String, String>,
    /// No two VMs of this group on one host (or in one fault domain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<AntiAffinity>,
    /// The member to run on; the controller still checks it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "PlacementStrategy::is_spread")]
    pub strategy: PlacementStrategy,
    /// What a drain of its host does with it while it runs.
    #[serde(default, skip_serializing_if = "DrainPolicy::is_live_migrate")]
    pub on_drain: DrainPolicy,
    /// What the cluster does with it when its host is lost.
    #[serde(default, skip_serializing_if = "HostLossPolicy::is_wait")]
    pub on_host_loss: HostLossPolicy,
}

/// What the cluster does with a VM whose host is lost (down for two lease
/// TTLs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostLossPolicy {
    /// It waits for its host to come back (the default): its disks are
    /// there.
    #[default]
    Wait,
    /// It is started afresh from its image on another host (its disks
    /// start empty there). Its lost host pauses it as soon as it loses the
    /// cluster and deletes it when it comes back: never two running
    /// copies.
    Restart,
}

impl HostLossPolicy {
    pub fn is_wait(&self) -> bool {
        *self == Self::Wait
    }
}

/// What draining a host (`POST /v1/hosts/{name}/drain`) does with a
/// running VM of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DrainPolicy {
    /// Moved to another host by live migration, disks and all (the
    /// default).
    #[default]
    LiveMigrate,
    /// Stopped, and started on another host from its image: its disks
    /// start afresh there.
    Restart,
    /// Stopped where it is; it stays on the host.
    Stop,
}

impl DrainPolicy {
    pub fn is_live_migrate(&self) -> bool {
        *self == Self::LiveMigrate
    }
}

impl VmPlacement {
    /// Whether nothing is asked (any host, spread).
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// An anti-affinity group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AntiAffinity {
    /// 1 to 63 characters: lower-case letters, digits and '-'.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    pub group: String,
    /// `host` (default) or `fault_domain` (the hosts' `fault-domain`
    /// label; a host without one is a domain of its own).
    #[serde(default)]
    pub scope: AntiAffinityScope,
    /// Spread as far as the hosts allow, but place anyway when they
    /// cannot (default false: never two in one host or domain).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preferred: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AntiAffinityScope {
    #[default]
    Host,
    FaultDomain,
}

/// How the controller picks among the hosts that can take a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlacementStrategy {
    /// The host with the most room left (the default).
    #[default]
    Spread,
    /// The fullest host that still fits, keeping others free.
    BinPack,
}

impl PlacementStrategy {
    pub fn is_spread(&self) -> bool {
        *self == Self::Spread
    }
}

impl VmCreate {
    /// VM `name` of `image` with every other field at its default: what a
    /// request with only these two fields asks for.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            kernel_args: String::new(),
            root_rate_limit: RateLimit::default(),
            disks: Vec::new(),
            nics: Vec::new(),
            placement: VmPlacement::default(),
            start: false,
            ssh_keys: Vec::new(),
            tags: BTreeMap::new(),
            user_data: None,
        }
    }
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    128
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// In a cluster: defined, waiting to be placed on a host and defined
    /// there (its events say why it waits).
    Pending,
    /// Defined, never started or stopped since.
    Stopped,
    /// The VMM process is starting.
    Starting,
    Running,
    Paused,
    /// A graceful stop is in progress.
    Stopping,
    /// The VMM exited with an error or the guest crashed; `last_exit` says why.
    Failed,
}

impl VmState {
    /// Every state, in the order of a VM's life.
    pub const ALL: [VmState; 7] = [
        VmState::Pending,
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    /// Whether a VMM process exists in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Paused | Self::Stopping
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub image_id: String,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel_args: String,
    pub root_rate_limit: RateLimit,
    pub disks: Vec<VmDisk>,
    pub nics: Vec<VmNic>,
    /// The VMM's process id while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Why the VMM last exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// The snapshot the VM resumes from at its next start (a VM restored
    /// from a snapshot and not started yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<String>,
    pub created_at: u64,
    /// In a cluster: the member it is placed on (absent while pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// In a cluster: the constraints it was created with.
    #[serde(default, skip_serializing_if = "VmPlacement::is_empty")]
    pub placement: VmPlacement,
    /// The names of the SSH keys it was created with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Bytes of user data it was given (the data itself is the guest's:
    /// the metadata service answers it, the API does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_bytes: Option<u64>,
}

/// One entry of a VM's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmEvent {
    pub at: u64,
    pub kind: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_defaults_and_strictness() {
        let vm: VmCreate = serde_json::from_str(r#"{"name":"web-1","image":"debian"}"#).unwrap();
        assert_eq!((vm.vcpus, vm.memory_mib), (1, 128));
        assert!(vm.disks.is_empty() && vm.nics.is_empty());
        assert!(serde_json::from_str::<VmCreate>(r#"{"name":"a","image":"b","cpus":2}"#).is_err());
    }

    #[test]
    fn the_constructor_asks_for_the_defaults() {
        let parsed: VmCreate =
            serde_json::from_str(r#"{"name":"web-1","image":"debian"}"#).unwrap();
        assert_eq!(VmCreate::new("web-1", "debian"), parsed);
        let parsed: VmCreate = serde_json::from_str(
            r#"{"name":"a","image":"b","disks":[{"size_mib":4}],"nics":[{"network":"lan"}]}"#,
        )
        .unwrap();
        assert_eq!(parsed.disks, [VmDisk::new(4)]);
        assert_eq!(parsed.nics, [VmNicCreate::on_network("lan")]);
    }

    #[test]
    fn nic_fields_the_agent_assigns_are_refused_in_requests() {
        for field in ["mac", "address", "tap"] {
            let body = format!(r#"{{"name":"a","image":"b","nics":[{{"{field}":"x"}}]}}"#);
            let err = serde_json::from_str::<VmCreate>(&body).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("unknown field `{field}`")),
                "{err}"
            );
        }
        let vm: VmCreate =
            serde_json::from_str(r#"{"name":"a","image":"b","nics":[{"network":"lan"},{}]}"#)
                .unwrap();
        assert_eq!(vm.nics[0].network.as_deref(), Some("lan"));
        assert_eq!(vm.nics[1], VmNicCreate::default());
    }

    #[test]
    fn states_round_trip_as_text() {
        for state in VmState::ALL {
            assert_eq!(VmState::parse(state.as_str()), Some(state));
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
        }
        assert_eq!(VmState::parse("zombie"), None);
    }
}

/// The most characters of a command for the guest agent (at most 64 KiB
/// of UTF-8, the guest agent's bound).
pub const MAX_EXEC_COMMAND: usize = 16 * 1024;
/// The longest a command may run, in seconds.
pub const MAX_EXEC_TIMEOUT_S: u32 = 3600;
/// How long a command runs when no timeout is given, in seconds.
pub const DEFAULT_EXEC_TIMEOUT_S: u32 = 60;

/// `POST /v1/vms/{id}/exec`: a command for the VM's guest agent (the Nubis
/// images' `nubis-guest-agent`, over vsock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmExec {
    /// Run with the guest's `/bin/sh -c`, stdin empty: 1 to 16384
    /// characters, no NUL.
    #[schema(min_length = 1, max_length = 16384, pattern = r"^[^\x00]+$")]
    pub command: String,
    /// Seconds the command may run (1 to 3600; 60 when absent): past
    /// them the answer ends with an `error` event (the command is left
    /// to run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_s: Option<u32>,
}

/// One line of `POST /v1/vms/{id}/exec`'s answer (newline-delimited
/// JSON), in the order the guest sent them; the last is `exit`, `signal`
/// or `error`. Output is text (bytes that are not UTF-8 are replaced).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExecEvent {
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// The command exited with this status.
    Exit {
        code: i32,
    },
    /// A signal ended the command.
    Signal {
        number: i32,
    },
    /// The command's status will not come: why.
    Error {
        message: String,
    },
}
