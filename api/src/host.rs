//! Peer hosts: the other agents this host carries overlay networks with.
//! The operator registers each peer with its underlay address (the VXLAN
//! tunnel endpoint), its API URL and that agent's operator token; the
//! agents then replicate networks and hand out addresses between them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Network, Tenant};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostCreate {
    /// 1 to 63 characters: lower-case letters, digits and '-'.
    pub name: String,
    /// The peer's underlay IPv4 address: where its VXLAN tunnels end.
    pub address: String,
    /// The peer agent's API, e.g. "http://192.0.2.2:8080".
    pub api_url: String,
    /// The peer agent's operator token (kept in this host's database).
    pub token: String,
}

/// A registered peer (its token is never shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub name: String,
    pub address: String,
    pub api_url: String,
    pub created_at: u64,
}

/// Host to host: the home host of an overlay network gives it to a peer
/// (`PUT /v1/overlay/networks/{id}`), with the tenant that owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkReplica {
    pub network: Network,
    pub tenant: Tenant,
}

/// Host to host: a peer asks an overlay network's home host for an address
/// for one of its VMs' NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressRequest {
    /// The asking host's underlay address (a member of the network).
    pub host: String,
    /// The name of the VM the address is for, on the asking host.
    pub vm: String,
}

/// An address granted by the home host, "A.B.C.D/N".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AddressGrant {
    pub address: String,
}
