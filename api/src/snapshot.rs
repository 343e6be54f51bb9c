//! Snapshots of VMs: memory, device and vCPU state and disks, taken from a
//! running or paused VM without stopping it, and restored into a new VM
//! that resumes where the snapshot was taken.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: String,
    pub tenant_id: String,
    /// The VM it was taken of (which may be gone since).
    pub vm_id: String,
    pub vm_name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Bytes the snapshot takes on the host's disk.
    pub size_bytes: u64,
    pub created_at: u64,
}

/// `POST /v1/snapshots/{id}/restore`: a new VM from the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRestore {
    /// The new VM's name: 1 to 63 characters, lower-case letters, digits
    /// and '-'.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
}

/// The most clones one request makes.
pub const MAX_CLONES: u32 = 32;

/// `POST /v1/snapshots/{id}/clones`: new VMs restored from the snapshot at
/// once, each with its own MAC, address, hostname and random seed; their
/// guest memory is the snapshot's file mapped copy-on-write, shared until
/// written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotClones {
    /// 1 to 32.
    #[schema(minimum = 1, maximum = 32)]
    pub count: u32,
    /// The clones are named `PREFIX-1` ... `PREFIX-N`: 1 to 59 characters,
    /// lower-case letters, digits and '-'.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,58}$")]
    pub name_prefix: String,
}

/// What `POST /v1/snapshots/{id}/clones` made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotClonesMade {
    /// The clones, in the order of their names; each running unless its
    /// start failed (`state` and `last_exit` say why). Their guests take
    /// their identity right after (the VM's events say when).
    pub vms: Vec<crate::Vm>,
    /// For each clone, milliseconds from the request's arrival to its VMM
    /// answering with the vCPUs running.
    pub running_after_ms: Vec<u64>,
}
