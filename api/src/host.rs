//! Peer hosts: the other agents this host carries overlay networks with.
//! Hosts talk to each other over mutual TLS on the underlay: the operator
//! registers each peer by its underlay address (the VXLAN tunnel endpoint,
//! where its peer API listens) and its certificate's SHA-256 fingerprint
//! (`GET /v1/host-identity` on that host); no operator token crosses.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Network, Tenant};

/// The port a host's peer API listens on by default.
pub const DEFAULT_PEER_PORT: u16 = 7443;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerCreate {
    /// 1 to 63 characters: lower-case letters, digits and '-'.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// The peer's underlay IPv4 address: where its VXLAN tunnels end and
    /// its peer API listens.
    pub address: String,
    /// The SHA-256 fingerprint of the peer's certificate, 64 lower-case
    /// hex digits (its `GET /v1/host-identity`).
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub fingerprint: String,
    /// The port of the peer's peer API (7443 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65535)]
    pub peer_port: Option<u16>,
}

/// A registered peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Peer {
    pub name: String,
    pub address: String,
    pub peer_port: u16,
    pub fingerprint: String,
    pub created_at: u64,
}

/// This host as its peers see it: what their operators register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostIdentity {
    /// The SHA-256 fingerprint of this host's certificate.
    pub fingerprint: String,
    /// This host's underlay address, where its peer API listens (absent:
    /// this host carries no overlay and takes no peer calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub peer_port: u16,
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
