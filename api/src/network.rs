//! Tenant virtual networks: an IPv4 CIDR that VMs attach NICs to, like a
//! cloud VPC subnet; and port forwards from the host to a VM.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    /// 1 to 63 characters: lower-case letters, digits and '-'.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// IPv4 network in CIDR notation, /16 to /29, e.g. "10.10.0.0/24": a
    /// unicast network without host bits set, outside 0/8, 127/8,
    /// 169.254/16 and 224/3 (the document's pattern says exactly which);
    /// 422 when it overlaps the host's own networks.
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
    #[schema(max_items = 4, inline, value_type = Option<Vec<DnsServer>>)]
    pub dns: Option<Vec<String>>,
    /// The guests' MTU, 576 to 9000; 1500 by default, and on an overlay
    /// network the underlay's MTU less the 50 bytes of VXLAN encapsulation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 576, maximum = 9000)]
    pub mtu: Option<u16>,
    /// Peer hosts (names from `/v1/hosts`) that carry the network too: it
    /// becomes one L2 segment across them, over VXLAN. This host is its
    /// home and hands out its addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

impl NetworkCreate {
    /// Network `name` on `cidr` with every other field at its default
    /// (DHCP on, no NAT, the host's DNS servers, the default MTU, this
    /// host only).
    pub fn new(name: impl Into<String>, cidr: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            cidr: cidr.into(),
            nat: false,
            dhcp: default_true(),
            dns: None,
            mtu: None,
            hosts: Vec::new(),
        }
    }
}

/// A DNS server: an IPv4 address in dotted decimal whose first octet is 1
/// to 254 (not "this network" 0/8, nor 255/8).
#[derive(ToSchema)]
#[schema(
    pattern = r"^(?:25[0-4]|2[0-4][0-9]|1[0-9]{2}|[1-9][0-9]?)(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}$"
)]
pub struct DnsServer(pub String);

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
    /// The VM (id or name; 422 when the tenant has none of that name).
    pub vm: String,
    /// The VM's NIC, by index; 0 by default (422 when the VM has no such
    /// NIC).
    #[serde(default)]
    #[schema(maximum = 3)]
    pub nic: usize,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// The port on the host's addresses, from the host's port forward
    /// range (30000 to 39999 unless the operator set another; 422 for a
    /// port outside it).
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: u16,
    /// The port in the VM.
    #[schema(minimum = 1, maximum = 65535)]
    pub vm_port: u16,
}

impl PortForwardCreate {
    /// TCP from `host_port` to `vm_port` on `vm`'s first NIC (the
    /// defaults).
    pub fn new(vm: impl Into<String>, host_port: u16, vm_port: u16) -> Self {
        Self {
            vm: vm.into(),
            nic: 0,
            protocol: default_protocol(),
            host_port,
            vm_port,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constructors_ask_for_the_defaults() {
        let parsed: NetworkCreate =
            serde_json::from_str(r#"{"name":"lan","cidr":"10.0.0.0/24"}"#).unwrap();
        assert_eq!(NetworkCreate::new("lan", "10.0.0.0/24"), parsed);
        let parsed: PortForwardCreate =
            serde_json::from_str(r#"{"vm":"web","host_port":30080,"vm_port":80}"#).unwrap();
        assert_eq!(PortForwardCreate::new("web", 30080, 80), parsed);
    }
}
