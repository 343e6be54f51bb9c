//! Tenant networking on the host: Linux bridges and taps (made with `ip`),
//! the DHCP server (`dhcp`, `dhcp_server`) and the packet filter
//! (`firewall`). A virtual network is a bridge `nbn<vni>` with the gateway
//! address; a tenant's NICs without a network go on its default bridge
//! `nbrN` (10.88.N.0/24). Each NIC is a tap on its bridge with a MAC and an
//! address the agent assigned. Names are derived from ids, so a restarted
//! agent finds what it made.

pub mod balancer;
pub mod dhcp;
pub mod dhcp_server;
pub mod firewall;
pub mod host;
mod netdev;
pub use netdev::create_tap;
pub mod typed;
pub mod vxlan;

use std::collections::HashSet;
use std::process::Stdio;

pub use typed::{IfName, MacAddr};

/// Errors in setting up host networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("`{program} {args}` failed: {message}")]
    Command {
        program: &'static str,
        args: String,
        message: String,
    },
    #[error("no interface holds the underlay address {0} (see --underlay-address)")]
    NoUnderlay(std::net::Ipv4Addr),
    #[error("no free address left in {0}")]
    Exhausted(String),
    #[error("service endpoints: {0}")]
    Balancer(String),
    #[error("cannot {action} tap {tap}: {source}")]
    Tap {
        tap: String,
        action: &'static str,
        source: std::io::Error,
    },
}

/// The IPv4 address of a NIC's "A.B.C.D/N".
pub fn nic_address(address: &str) -> Option<std::net::Ipv4Addr> {
    address.split('/').next()?.parse().ok()
}

/// A NIC's address and prefix length from its "ADDRESS/PREFIX".
pub fn nic_cidr(text: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (address, prefix) = text.split_once('/')?;
    Some((
        address.parse().ok()?,
        prefix.parse().ok().filter(|p| *p <= 32)?,
    ))
}

/// The first two octets of every tenant subnet.
const PREFIX: &str = "10.88";

/// The bridge of tenant subnet `subnet`.
pub fn bridge_name(subnet: u8) -> IfName {
    IfName::generated("nbr", &subnet.to_string())
}

/// The name prefix of VM taps.
pub const TAP_PREFIX: &str = "nbt";

/// The tap of NIC `index` of `vm_id` (at most 15 bytes): the first 8
/// characters of the id's random part, which the store keeps unique among
/// the host's VMs (`store::vms`).
pub fn tap_name(vm_id: &str, index: usize) -> IfName {
    let hex: String = vm_id.trim_start_matches("vm-").chars().take(8).collect();
    IfName::generated(TAP_PREFIX, &format!("{hex}{index}"))
}

pub fn gateway(subnet: u8) -> String {
    format!("{PREFIX}.{subnet}.1")
}

/// Address `host` (2..=254) of a subnet.
pub fn address(subnet: u8, host: u8) -> String {
    format!("{PREFIX}.{subnet}.{host}")
}

/// The kernel's `ip=` argument for a NIC with `address_cidr` (like
/// "10.88.4.2/24"): the gateway is its network's first address, as on
/// every bridge the agent makes.
pub fn kernel_ip_arg(address_cidr: &str, device: &str) -> Option<String> {
    let (address, prefix) = address_cidr.split_once('/')?;
    let address: std::net::Ipv4Addr = address.parse().ok()?;
    let network = crate::ipv4::Cidr::of(address, prefix.parse().ok()?);
    Some(format!(
        "ip={address}::{}:{}::{device}:off",
        network.gateway(),
        network.netmask()
    ))
}

/// The name prefix of virtual networks' bridges.
pub const NETWORK_BRIDGE_PREFIX: &str = "nbn";

/// The bridge of a virtual network (see `/v1/networks`).
pub fn network_bridge_name(vni: u32) -> IfName {
    IfName::generated(NETWORK_BRIDGE_PREFIX, &vni.to_string())
}

/// The name prefix of overlay networks' VXLAN interfaces.
pub const VXLAN_PREFIX: &str = "nvx";

/// The VXLAN interface of an overlay network on its bridge.
pub fn vxlan_name(vni: u32) -> IfName {
    IfName::generated(VXLAN_PREFIX, &vni.to_string())
}

/// The MAC of a virtual network's gateway (its bridge), derived from the
/// VNI: the same on every host that carries the network, so that a guest
/// keeps its gateway's ARP entry wherever the gateway answers from.
pub fn gateway_mac(vni: u32) -> MacAddr {
    let [_, high, mid, low] = vni.to_be_bytes();
    MacAddr::new([0x02, 0x4e, 0x47, high, mid, low])
}

/// The kernel's `ip=` argument that makes it configure `device` by DHCP.
pub fn kernel_dhcp_arg(device: &str) -> String {
    format!("ip=:::::{device}:dhcp")
}

/// The lowest host number not in `used`.
pub fn free_host(used: &HashSet<u8>, subnet: u8) -> Result<u8, NetworkError> {
    (2..=254)
        .find(|host| !used.contains(host))
        .ok_or_else(|| NetworkError::Exhausted(format!("{PREFIX}.{subnet}.0/24")))
}

/// A random locally administered unicast MAC with the 02:4e:42 prefix.
pub fn random_mac() -> Result<MacAddr, crate::store::StoreError> {
    let hex = crate::store::random_hex(3)?;
    let byte = |at: usize| u8::from_str_radix(&hex[at..at + 2], 16).unwrap_or_default();
    Ok(MacAddr::new([0x02, 0x4e, 0x42, byte(0), byte(2), byte(4)]))
}

async fn ip(args: &[&str]) -> Result<(), NetworkError> {
    ip_output(args).await.map(|_| ())
}

async fn ip_output(args: &[&str]) -> Result<String, NetworkError> {
    run("ip", args).await
}

/// Runs an iproute2 tool; its standard output, or its complaint.
async fn run(program: &'static str, args: &[&str]) -> Result<String, NetworkError> {
    let failed = |message: String| NetworkError::Command {
        program,
        args: args.join(" "),
        message,
    };
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|err| failed(err.to_string()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }
}

async fn link_exists(name: &IfName) -> bool {
    link_index(name).is_some()
}

/// The interface index of `name`, if the interface exists (in this
/// process's network namespace): asked of the kernel, no program run.
pub fn link_index(name: &IfName) -> Option<u32> {
    let name = std::ffi::CString::new(name.as_str()).ok()?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Creates `bridge` with the gateway address `gateway_cidr` (like
/// "10.88.4.1/24"), if missing; a virtual network's bridge also gets its
/// gateway MAC and MTU (`identity`), the same on every host.
pub async fn ensure_bridge(
    bridge: &IfName,
    gateway: std::net::Ipv4Addr,
    prefix: u8,
    identity: Option<(MacAddr, u16)>,
) -> Result<(), NetworkError> {
    let name = bridge.as_str();
    if !link_exists(bridge).await {
        ip(&["link", "add", "name", name, "type", "bridge"]).await?;
        let gateway_cidr = format!("{gateway}/{prefix}");
        ip(&["addr", "add", &gateway_cidr, "dev", name]).await?;
    } else if let Ok(settings) = netdev::link_settings(bridge) {
        // Ready as it is (the usual case as a VM starts): nothing to run.
        let identity_kept =
            identity.is_none_or(|(mac, mtu)| settings.mac == mac.octets() && settings.mtu == mtu);
        if settings.up && identity_kept {
            return Ok(());
        }
    }
    if let Some((mac, mtu)) = identity {
        let (mac, mtu) = (mac.to_string(), mtu.to_string());
        ip(&["link", "set", "dev", name, "address", &mac, "mtu", &mtu]).await?;
    }
    ip(&["link", "set", "dev", name, "up"]).await
}

/// The host's bridges whose names start with `prefix`.
pub async fn bridges_named(prefix: &str) -> Result<Vec<IfName>, NetworkError> {
    let listing = ip_output(&["-o", "link", "show", "type", "bridge"]).await?;
    Ok(parse_link_names(&listing)
        .into_iter()
        .filter(|name| name.as_str().starts_with(prefix))
        .collect())
}

/// The host's links (of any kind) whose names start with `prefix`.
pub async fn links_named(prefix: &str) -> Result<Vec<IfName>, NetworkError> {
    let listing = ip_output(&["-o", "link", "show"]).await?;
    Ok(parse_link_names(&listing)
        .into_iter()
        .filter(|name| name.as_str().starts_with(prefix))
        .collect())
}

/// The names in `ip -o link show` output ("3: nbn4096: <BROADCAST...").
fn parse_link_names(listing: &str) -> Vec<IfName> {
    listing
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .filter_map(|name| name.split('@').next().unwrap_or(name).parse().ok())
        .collect()
}

/// Removes a link if it exists.
pub async fn delete_link(name: &IfName) -> Result<(), NetworkError> {
    if link_exists(name).await {
        ip(&["link", "del", "dev", name.as_str()]).await?;
    }
    Ok(())
}

/// An IPv4 destination the host routes or holds an address in, and the
/// device it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub destination: crate::ipv4::Cidr,
    pub device: Option<String>,
}

/// The host's IPv4 routes (main table, the default route left out) and the
/// networks of its own addresses: what a tenant network must not shadow.
pub async fn host_routes() -> Result<Vec<HostRoute>, NetworkError> {
    let routes = ip_output(&["-o", "-4", "route", "show", "table", "main"]).await?;
    let addresses = ip_output(&["-o", "-4", "addr", "show"]).await?;
    let mut all = parse_routes(&routes);
    all.extend(parse_addresses(&addresses));
    Ok(all)
}

/// "A.B.C.D/N" or "A.B.C.D" (a host route) as a network.
fn parse_destination(text: &str) -> Option<crate::ipv4::Cidr> {
    let (address, prefix) = text.split_once('/').unwrap_or((text, "32"));
    let prefix: u8 = prefix.parse().ok().filter(|prefix| *prefix <= 32)?;
    Some(crate::ipv4::Cidr::of(address.parse().ok()?, prefix))
}

/// `ip -o -4 route show` lines: "10.0.2.0/24 dev eth0 proto kernel ...",
/// "192.0.2.9 via 10.0.2.2 dev eth0"; the default route is skipped.
fn parse_routes(listing: &str) -> Vec<HostRoute> {
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let mut first = words.next()?;
            // Typed routes: "unreachable 10.9.0.0/16", "blackhole ...".
            if matches!(
                first,
                "unicast" | "unreachable" | "blackhole" | "prohibit" | "throw"
            ) {
                first = words.next()?;
            }
            let destination = parse_destination(first)?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let device = words
                .windows(2)
                .find(|pair| pair[0] == "dev")
                .map(|pair| pair[1].to_string());
            Some(HostRoute {
                destination,
                device,
            })
        })
        .collect()
}

/// `ip -o -4 addr show` lines: "4: eth0    inet 192.0.2.2/24 brd ...".
fn parse_addresses(listing: &str) -> Vec<HostRoute> {
    listing
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|word| *word == "inet")?;
            let destination = parse_destination(words.get(at + 1)?)?;
            Some(HostRoute {
                destination,
                device: words.get(1).map(|device| device.to_string()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_routes_and_addresses_are_parsed() {
        let routes = "default via 192.0.2.1 dev eth0 \n\
                      192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2 \n\
                      198.51.100.7 via 192.0.2.1 dev eth0 \n\
                      unreachable 10.9.0.0/16 \n\
                      garbage\n";
        let parsed = parse_routes(routes);
        let shown: Vec<String> = parsed
            .iter()
            .map(|route| format!("{} {:?}", route.destination, route.device))
            .collect();
        assert_eq!(
            shown,
            [
                "192.0.2.0/24 Some(\"eth0\")",
                "198.51.100.7/32 Some(\"eth0\")",
                "10.9.0.0/16 None"
            ]
        );
        let addresses = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                         4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\n";
        let parsed = parse_addresses(addresses);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].destination.to_string(), "192.0.2.0/24");
        assert_eq!(parsed[1].device.as_deref(), Some("eth0"));
    }

    #[test]
    fn names_fit_the_kernel_limit() {
        assert_eq!(tap_name("vm-0123456789abcdef", 3).as_str(), "nbt012345673");
        assert!(tap_name("vm-0123456789abcdef", 7).as_str().len() <= 15);
        assert_eq!(bridge_name(255).as_str(), "nbr255");
        assert_eq!(
            kernel_ip_arg("10.88.4.2/24", "eth0").as_deref(),
            Some("ip=10.88.4.2::10.88.4.1:255.255.255.0::eth0:off")
        );
        assert_eq!(
            kernel_ip_arg("10.77.0.130/25", "eth0").as_deref(),
            Some("ip=10.77.0.130::10.77.0.129:255.255.255.128::eth0:off")
        );
        assert_eq!(kernel_ip_arg("nonsense", "eth0"), None);
        assert_eq!(network_bridge_name(16777215).as_str(), "nbn16777215");
        assert_eq!(vxlan_name(16777215).as_str(), "nvx16777215");
        assert_eq!(gateway_mac(0x12_3456).to_string(), "02:4e:47:12:34:56");
        assert_eq!(gateway_mac(4096).to_string(), "02:4e:47:00:10:00");
        // Whatever an id holds, a tap name is a plain interface name.
        assert_eq!(tap_name("vm-ab\" x;y", 0).as_str(), "nbtabxy0");
        assert_eq!(kernel_dhcp_arg("eth0"), "ip=:::::eth0:dhcp");
    }

    #[test]
    fn link_listings_are_parsed() {
        let listing = "5: nbn4096: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue\n\
                       7: nbt012345670@if2: <BROADCAST> mtu 1500\n";
        let names = parse_link_names(listing);
        let names: Vec<&str> = names.iter().map(IfName::as_str).collect();
        assert_eq!(names, ["nbn4096", "nbt012345670"]);
        assert!(parse_link_names("").is_empty());
    }

    #[test]
    fn addresses_are_allocated_lowest_first_without_duplicates() {
        let mut used = HashSet::new();
        assert_eq!(free_host(&used, 1).unwrap(), 2);
        used.extend([2, 3, 5]);
        assert_eq!(free_host(&used, 1).unwrap(), 4);
        let full: HashSet<u8> = (2..=254).collect();
        assert!(free_host(&full, 1).is_err());
        let mac = random_mac().unwrap().to_string();
        assert!(mac.starts_with("02:4e:42:") && mac.len() == 17, "{mac}");
    }
}
