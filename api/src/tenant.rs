//! Tenants (operator only), their quotas and their API tokens.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a tenant may use on this host at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    pub max_vms: u32,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_vcpus: 8,
            max_memory_mib: 4096,
            max_vms: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantCreate {
    /// 1 to 63 characters: lower-case letters, digits and '-'.
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
