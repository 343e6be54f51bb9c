//! Tenant virtual networks: an IPv4 CIDR that VMs attach NICs to, like a
//! cloud VPC subnet; and port forwards from the host to a VM.

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
    /// The agent serves DHCP on the network (on by default); without it
    /// guests get their address from the kernel command line (`ip=`).
    #[serde(default = "default_true")]
    pub dhcp: bool,
    /// DNS servers handed out by DHCP (at most 4); the host's own
    /// (non-loopback) resolvers when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
    /// The guests' MTU, 576 to 9000; 1500 by default, and on an overlay
    /// network the underlay's MTU less the 50 bytes of VXLAN encapsulation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Peer hosts (names from `/v1/hosts`) that carry the network too: it
    /// becomes one L2 segment across them, over VXLAN. This host is its
    /// home and hands out its addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

fn default_true() -> bool {
    true
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
    pub dhcp: bool,
    pub dns: Vec<String>,
    pub mtu: u16,
    /// The VXLAN network identifier of the network's overlay.
    pub vni: u32,
    /// The host bridge that carries the network.
    pub bridge: String,
    /// Present when the network spans hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<Overlay>,
    pub created_at: u64,
}

/// How a network spans hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Overlay {
    /// Underlay address of the network's home host, which owns its
    /// addresses (IPAM) and its lifetime.
    pub home: String,
    /// Underlay addresses of every host that carries it, the home included.
    pub hosts: Vec<String>,
    /// This host's VXLAN interface for it (on the network's bridge).
    pub vxlan: String,
}

/// Transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardCreate {
    /// The VM (id or name).
    pub vm: String,
    /// The VM's NIC, by index; 0 by default.
    #[serde(default)]
    pub nic: usize,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// The port on the host's addresses, from the host's port forward
    /// range (30000 to 39999 unless the operator set another).
    pub host_port: u16,
    /// The port in the VM.
    pub vm_port: u16,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

/// Traffic that reaches `host_port` on one of the host's addresses from
/// outside the host goes to `vm_port` on the VM's NIC address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortForward {
    pub id: String,
    pub tenant_id: String,
    pub vm_id: String,
    pub nic: usize,
    pub protocol: Protocol,
    pub host_port: u16,
    pub vm_port: u16,
    pub created_at: u64,
}
