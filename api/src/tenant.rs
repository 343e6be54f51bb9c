//! Tenants (operator only), their quotas and their API tokens.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a tenant may use on this host at once: everything that costs the
/// host. Fields left out of a request take their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default = "defaults::vcpus")]
    #[schema(minimum = 1)]
    pub max_vcpus: u32,
    #[serde(default = "defaults::memory_mib")]
    #[schema(minimum = 1)]
    pub max_memory_mib: u64,
    #[serde(default = "defaults::vms")]
    #[schema(minimum = 1)]
    pub max_vms: u32,
    /// Virtual networks.
    #[serde(default = "defaults::networks")]
    pub max_networks: u32,
    /// Port forwards (host ports).
    #[serde(default = "defaults::port_forwards")]
    pub max_port_forwards: u32,
    /// Snapshots kept.
    #[serde(default = "defaults::snapshots")]
    pub max_snapshots: u32,
    /// Disk space in MiB: the VMs' root and data disks (at their full
    /// size), uploaded files and snapshots.
    #[serde(default = "defaults::storage_mib")]
    pub max_storage_mib: u64,
}

mod defaults {
    pub fn vcpus() -> u32 {
        8
    }
    pub fn memory_mib() -> u64 {
        4096
    }
    pub fn vms() -> u32 {
        8
    }
    pub fn networks() -> u32 {
        8
    }
    pub fn port_forwards() -> u32 {
        16
    }
    pub fn snapshots() -> u32 {
        16
    }
    pub fn storage_mib() -> u64 {
        64 * 1024
    }
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_vcpus: defaults::vcpus(),
            max_memory_mib: defaults::memory_mib(),
            max_vms: defaults::vms(),
            max_networks: defaults::networks(),
            max_port_forwards: defaults::port_forwards(),
            max_snapshots: defaults::snapshots(),
            max_storage_mib: defaults::storage_mib(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantCreate {
    /// 1 to 63 characters: lower-case letters, digits and '-'.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    #[serde(default)]
    pub quota: Option<Quota>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub quota: Quota,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// A new API token. `token` is shown once: the agent keeps only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub id: String,
    pub tenant_id: String,
    pub token: String,
    pub created_at: u64,
}

/// A token as listed: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub tenant_id: String,
    pub created_at: u64,
}
