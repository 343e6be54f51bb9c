//! Tenant networking on the host: Linux bridges and taps (made with `ip`),
//! the DHCP server (`dhcp`, `dhcp_server`) and the packet filter
//! (`firewall`). A virtual network is a bridge `nbn<vni>` with the gateway
//! address; a tenant's NICs without a network go on its default bridge
//! `nbrN` (10.88.N.0/24). Each NIC is a tap on its bridge with a MAC and an
//! address the agent assigned. Names are derived from ids, so a restarted
//! agent finds what it made.

pub mod dhcp;
pub mod dhcp_server;
pub mod firewall;
pub mod vxlan;

use std::collections::HashSet;
use std::process::Stdio;

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
}

/// The first two octets of every tenant subnet.
const PREFIX: &str = "10.88";

/// The bridge of tenant subnet `subnet`.
pub fn bridge_name(subnet: u8) -> String {
    format!("nbr{subnet}")
}

/// The name prefix of VM taps.
pub const TAP_PREFIX: &str = "nbt";

/// The tap of NIC `index` of `vm_id` (at most 15 bytes).
pub fn tap_name(vm_id: &str, index: usize) -> String {
    let hex: String = vm_id.trim_start_matches("vm-").chars().take(8).collect();
    format!("{TAP_PREFIX}{hex}{index}")
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
pub fn network_bridge_name(vni: u32) -> String {
    format!("{NETWORK_BRIDGE_PREFIX}{vni}")
}

/// The name prefix of overlay networks' VXLAN interfaces.
pub const VXLAN_PREFIX: &str = "nvx";

/// The VXLAN interface of an overlay network on its bridge.
pub fn vxlan_name(vni: u32) -> String {
    format!("{VXLAN_PREFIX}{vni}")
}

/// The MAC of a virtual network's gateway (its bridge), derived from the
/// VNI: the same on every host that carries the network, so that a guest
/// keeps its gateway's ARP entry wherever the gateway answers from.
pub fn gateway_mac(vni: u32) -> String {
    let [_, high, mid, low] = vni.to_be_bytes();
    format!("02:4e:47:{high:02x}:{mid:02x}:{low:02x}")
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
pub fn random_mac() -> String {
    let bytes = crate::store::random_hex(3);
    format!(
        "02:4e:42:{}:{}:{}",
        &bytes[0..2],
        &bytes[2..4],
        &bytes[4..6]
    )
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

async fn link_exists(name: &str) -> bool {
    ip(&["link", "show", "dev", name]).await.is_ok()
}

/// Creates `bridge` with the gateway address `gateway_cidr` (like
/// "10.88.4.1/24"), if missing; a virtual network's bridge also gets its
/// gateway MAC and MTU (`identity`), the same on every host.
pub async fn ensure_bridge(
    bridge: &str,
    gateway_cidr: &str,
    identity: Option<(&str, u16)>,
) -> Result<(), NetworkError> {
    if !link_exists(bridge).await {
        ip(&["link", "add", "name", bridge, "type", "bridge"]).await?;
        ip(&["addr", "add", gateway_cidr, "dev", bridge]).await?;
    }
    if let Some((mac, mtu)) = identity {
        let mtu = mtu.to_string();
        ip(&["link", "set", "dev", bridge, "address", mac, "mtu", &mtu]).await?;
    }
    ip(&["link", "set", "dev", bridge, "up"]).await
}

/// Creates a NIC's tap on `bridge` (replacing a stale one), with `mtu`
/// when given, owned by user and group `owner` (a jailed VMM's).
pub async fn create_tap(
    tap: &str,
    bridge: &str,
    mtu: Option<u16>,
    owner: u32,
) -> Result<(), NetworkError> {
    if link_exists(tap).await {
        ip(&["link", "del", "dev", tap]).await?;
    }
    let owner = owner.to_string();
    ip(&[
        "tuntap", "add", "dev", tap, "mode", "tap", "user", &owner, "group", &owner,
    ])
    .await?;
    if let Some(mtu) = mtu {
        ip(&["link", "set", "dev", tap, "mtu", &mtu.to_string()]).await?;
    }
    ip(&["link", "set", "dev", tap, "master", bridge]).await?;
    ip(&["link", "set", "dev", tap, "up"]).await
}

/// The host's bridges whose names start with `prefix`.
pub async fn bridges_named(prefix: &str) -> Result<Vec<String>, NetworkError> {
    let listing = ip_output(&["-o", "link", "show", "type", "bridge"]).await?;
    Ok(parse_link_names(&listing)
        .into_iter()
        .filter(|name| name.starts_with(prefix))
        .collect())
}

/// The host's links (of any kind) whose names start with `prefix`.
pub async fn links_named(prefix: &str) -> Result<Vec<String>, NetworkError> {
    let listing = ip_output(&["-o", "link", "show"]).await?;
    Ok(parse_link_names(&listing)
        .into_iter()
        .filter(|name| name.starts_with(prefix))
        .collect())
}

/// The names in `ip -o link show` output ("3: nbn4096: <BROADCAST...").
fn parse_link_names(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect()
}

/// Removes a link if it exists.
pub async fn delete_link(name: &str) -> Result<(), NetworkError> {
    if link_exists(name).await {
        ip(&["link", "del", "dev", name]).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit() {
        assert_eq!(tap_name("vm-0123456789abcdef", 3), "nbt012345673");
        assert!(tap_name("vm-0123456789abcdef", 7).len() <= 15);
        assert_eq!(bridge_name(255), "nbr255");
        assert_eq!(
            kernel_ip_arg("10.88.4.2/24", "eth0").as_deref(),
            Some("ip=10.88.4.2::10.88.4.1:255.255.255.0::eth0:off")
        );
        assert_eq!(
            kernel_ip_arg("10.77.0.130/25", "eth0").as_deref(),
            Some("ip=10.77.0.130::10.77.0.129:255.255.255.128::eth0:off")
        );
        assert_eq!(kernel_ip_arg("nonsense", "eth0"), None);
        assert_eq!(network_bridge_name(16777215), "nbn16777215");
        assert_eq!(vxlan_name(16777215), "nvx16777215");
        assert_eq!(gateway_mac(0x12_3456), "02:4e:47:12:34:56");
        assert_eq!(gateway_mac(4096), "02:4e:47:00:10:00");
        assert_eq!(kernel_dhcp_arg("eth0"), "ip=:::::eth0:dhcp");
    }

    #[test]
    fn link_listings_are_parsed() {
        let listing = "5: nbn4096: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue\n\
                       7: nbt012345670@if2: <BROADCAST> mtu 1500\n";
        assert_eq!(parse_link_names(listing), ["nbn4096", "nbt012345670"]);
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
        let mac = random_mac();
        assert!(mac.starts_with("02:4e:42:") && mac.len() == 17, "{mac}");
    }
}
