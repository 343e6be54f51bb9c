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
