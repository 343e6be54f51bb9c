//! Tenant virtual networks: an IPv4 CIDR that VMs attach NICs to, like a
//! cloud VPC subnet.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    /// 1 to 63 characters: lower-case letters, digits and '-'.
    pub name: String,
    /// IPv4 network in CIDR notation, /16 to /29, e.g. "10.10.0.0/24".
    pub cidr: String,
    /// NAT egress to the host's uplink (off by default).
    #[serde(default)]
    pub nat: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub cidr: String,
    /// The network's first address, held by the host's bridge.
    pub gateway: String,
    pub nat: bool,
    /// The VXLAN network identifier of the network's overlay.
    pub vni: u32,
    pub created_at: u64,
}
