//! The host's packet filter for tenant networks, as nftables rules that
//! the agent renders from its database and replaces atomically (one
//! `nft -f` transaction) whenever networks, NICs or port forwards change
//! and at start: a restarted agent reproduces the same rules, never a
//! second copy, and with nothing to enforce the tables are gone.
//!
//! Two tables, both named `nubis`:
//! - `bridge nubis`: anti-spoofing on every VM tap: a frame from a VM must
//!   carry the MAC the agent assigned and, for IPv4 and ARP, its address
//!   (DHCP's 0.0.0.0 excepted); other protocols are dropped.
//!   On an overlay network's VXLAN port the gateway's frames, ARP for the
//!   gateway and DHCP are dropped both ways: each host is its own gateway.
//! - `inet nubis`: isolation. A VM reaches its own network (bridged), the
//!   gateway's DHCP and ping, and the uplink only when its network has NAT
//!   egress (masqueraded); nothing from one network or the outside reaches
//!   another network except replies and port forwards (DNAT to a VM).
//!   NAT egress is to the outside world only: never to the host's
//!   neighbours that a VM has no business with (`Policy::egress_denied`:
//!   the underlay, peer hosts, link-local addresses such as a cloud's
//!   metadata service, and what the operator adds).
//!
//! Every name, address and MAC in the script is a typed value
//! (`super::typed`, `Ipv4Addr`, `Cidr`): the script cannot carry text that
//! a tenant or a peer chose.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use nubis_api::Protocol;

use super::typed::{IfName, MacAddr};
use crate::ipv4::Cidr;
use crate::metadata::server::METADATA_ADDRESS;

/// Errors in applying the rules.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run nft (is the nftables package installed?): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
    #[error("cannot enable IPv4 forwarding: {0}")]
    Forwarding(std::io::Error),
}

/// One bridge the agent made: a virtual network or a tenant's default
/// bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub bridge: IfName,
    pub cidr: Cidr,
    pub gateway: Ipv4Addr,
    /// NAT egress to the host's uplink.
    pub nat: bool,
    /// The agent serves DHCP on the bridge.
    pub dhcp: bool,
    /// The network spans hosts through this VXLAN port of the bridge.
    pub overlay: Option<OverlayPort>,
}

/// A bridge's VXLAN port to the other hosts of an overlay network. Every
/// host has the same gateway (address and MAC) on the network, so the
/// gateway's own traffic, ARP for it and DHCP stay on each host: a guest
/// always talks to its local gateway, never to a remote one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayPort {
    pub vxlan: IfName,
    pub gateway_mac: MacAddr,
}

/// A VM's NIC: frames from its tap must carry these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedNic {
    pub tap: IfName,
    pub mac: MacAddr,
    pub address: Ipv4Addr,
}

/// Traffic to `host_port` on any of the host's addresses goes to
/// `address:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub protocol: Protocol,
    pub host_port: u16,
    pub address: Ipv4Addr,
    pub port: u16,
}

/// Everything the rules are made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub segments: Vec<Segment>,
    pub nics: Vec<GuardedNic>,
    pub forwards: Vec<Forward>,
    /// Destinations NAT egress never reaches (see the module doc).
    pub egress_denied: Vec<Cidr>,
    /// The metadata service's port on the host: a VM's TCP to
    /// 169.254.169.254:80 goes to its network's gateway on it, and nothing
    /// else reaches that port.
    pub metadata_port: Option<u16>,
}

impl Policy {
    /// Nothing to enforce.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.nics.is_empty() && self.forwards.is_empty()
    }

    /// Whether the host must route between interfaces (NAT or forwards).
    pub fn needs_forwarding(&self) -> bool {
        !self.forwards.is_empty() || self.segments.iter().any(|segment| segment.nat)
    }
}

/// Interface name prefixes of every bridge the agent makes.
const BRIDGE_PATTERNS: [&str; 2] = ["nbn*", "nbr*"];

/// The nft script that replaces both tables with `policy`'s rules (or
/// only removes them when the policy is empty).
pub fn render(policy: &Policy) -> String {
    // Declaring a table before deleting it makes the delete succeed
    // whether or not the table exists; the whole file is one transaction.
    let mut out = String::from(
        "table inet nubis {}\ndelete table inet nubis\ntable bridge nubis {}\ndelete table bridge nubis\n",
    );
    if policy.is_empty() {
        return out;
    }
    render_inet(policy, &mut out);
    render_bridge(policy, &mut out);
    out
}

fn render_inet(policy: &Policy, out: &mut String) {
    out.push_str("table inet nubis {\n");
    // From a VM to the host itself.
    out.push_str("  chain input {\n    type filter hook input priority filter; policy accept;\n");
    for segment in &policy.segments {
        let _ = writeln!(
            out,
            "    iifname \"{}\" jump from_{}",
            segment.bridge, segment.bridge
        );
    }
    if let Some(port) = policy.metadata_port {
        // Only VMs reach the metadata service, and only through the DNAT.
        let _ = writeln!(out, "    tcp dport {port} drop");
    }
    out.push_str("  }\n");
    for segment in &policy.segments {
        let _ = writeln!(out, "  chain from_{} {{", segment.bridge);
        out.push_str("    ct state established,related accept\n");
        if segment.dhcp {
            out.push_str("    udp sport 68 udp dport 67 accept\n");
        }
        if let Some(port) = policy.metadata_port {
            let _ = writeln!(
                out,
                "    ip daddr {} tcp dport {port} ct status dnat accept",
                segment.gateway
            );
        }
        let _ = writeln!(
            out,
            "    ip daddr {} icmp type echo-request accept",
            segment.gateway
        );
        out.push_str("    drop\n  }\n");
    }
    // Through the host: within a network, out through NAT, replies, forwards.
    out.push_str(
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n",
    );
    for segment in &policy.segments {
        // Bridged traffic passes here too when br_netfilter is loaded.
        let _ = writeln!(
            out,
            "    iifname \"{0}\" oifname \"{0}\" accept",
            segment.bridge
        );
    }
    out.push_str("    ct state established,related accept\n");
    out.push_str("    ct status dnat accept\n");
    if !policy.egress_denied.is_empty() {
        let denied: Vec<String> = policy.egress_denied.iter().map(Cidr::to_string).collect();
        for segment in policy.segments.iter().filter(|segment| segment.nat) {
            let _ = writeln!(
                out,
                "    iifname \"{}\" ip daddr {{ {} }} counter drop",
                segment.bridge,
                denied.join(", ")
            );
        }
    }
    for segment in policy.segments.iter().filter(|segment| segment.nat) {
        let _ = write!(out, "    iifname \"{}\"", segment.bridge);
        for pattern in BRIDGE_PATTERNS {
            let _ = write!(out, " oifname != \"{pattern}\"");
        }
        out.push_str(" accept\n");
    }
    for segment in &policy.segments {
        let _ = writeln!(out, "    iifname \"{}\" drop", segment.bridge);
        let _ = writeln!(out, "    oifname \"{}\" drop", segment.bridge);
    }
    out.push_str("  }\n");
    out.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n",
    );
    if let Some(port) = policy.metadata_port {
        for segment in &policy.segments {
            let _ = writeln!(
                out,
                "    iifname \"{}\" ip daddr {METADATA_ADDRESS} tcp dport 80 dnat ip to {}:{port}",
                segment.bridge, segment.gateway
            );
        }
    }
    for forward in &policy.forwards {
        let _ = writeln!(
            out,
            "    fib daddr type local {proto} dport {} dnat ip to {}:{}",
            forward.host_port,
            forward.address,
            forward.port,
            proto = forward.protocol.as_str()
        );
    }
    out.push_str("  }\n");
    out.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    for segment in policy.segments.iter().filter(|segment| segment.nat) {
        let _ = writeln!(
            out,
            "    ip saddr {0} ip daddr != {0} oifname != \"{1}\" masquerade",
            segment.cidr, segment.bridge
        );
    }
    out.push_str("  }\n}\n");
}

fn render_bridge(policy: &Policy, out: &mut String) {
    out.push_str("table bridge nubis {\n");
    out.push_str(
        "  chain prerouting {\n    type filter hook prerouting priority filter; policy accept;\n",
    );
    for nic in &policy.nics {
        let _ = writeln!(out, "    iifname \"{}\" jump nic_{}", nic.tap, nic.tap);
    }
    for port in policy.segments.iter().filter_map(|s| s.overlay.as_ref()) {
        let _ = writeln!(
            out,
            "    iifname \"{}\" jump overlay_{}",
            port.vxlan, port.vxlan
        );
    }
    out.push_str("  }\n");
    for nic in &policy.nics {
        // Counters on the drops show spoofing attempts (`nft list table
        // bridge nubis`).
        let _ = writeln!(out, "  chain nic_{} {{", nic.tap);
        let _ = writeln!(out, "    ether saddr != {} counter drop", nic.mac);
        let _ = writeln!(out, "    arp saddr ether != {} counter drop", nic.mac);
        // 0.0.0.0: ARP probes (address conflict detection).
        let _ = writeln!(
            out,
            "    arp saddr ip != {{ 0.0.0.0, {} }} counter drop",
            nic.address
        );
        out.push_str("    ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept\n");
        let _ = writeln!(out, "    ip saddr != {} counter drop", nic.address);
        out.push_str("    ether type { ip, arp } accept\n    counter drop\n  }\n");
    }
    let overlays: Vec<(&Segment, &OverlayPort)> = policy
        .segments
        .iter()
        .filter_map(|segment| Some((segment, segment.overlay.as_ref()?)))
        .collect();
    if !overlays.is_empty() {
        for (hook, direction) in [("forward", "oifname"), ("output", "oifname")] {
            let _ = writeln!(
                out,
                "  chain {hook} {{\n    type filter hook {hook} priority filter; policy accept;"
            );
            for (_, port) in &overlays {
                let _ = writeln!(
                    out,
                    "    {direction} \"{}\" jump overlay_{}",
                    port.vxlan, port.vxlan
                );
            }
            out.push_str("  }\n");
        }
        for (segment, port) in &overlays {
            let _ = writeln!(out, "  chain overlay_{} {{", port.vxlan);
            let _ = writeln!(out, "    ether saddr {} counter drop", port.gateway_mac);
            let _ = writeln!(out, "    arp daddr ip {} counter drop", segment.gateway);
            out.push_str("    udp dport { 67, 68 } counter drop\n  }\n");
        }
    }
    out.push_str("}\n");
}

/// Replaces the host's rules with `policy`'s, and enables IPv4 forwarding
/// when the policy needs it (it is left on afterwards: other software on
/// the host may rely on it too).
pub async fn apply(policy: &Policy) -> Result<(), FirewallError> {
    if policy.needs_forwarding() {
        tokio::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
            .await
            .map_err(FirewallError::Forwarding)?;
    }
    let script = render(policy);
    let spawned = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        // Without nftables there are no tables of ours to remove either: a
        // host without networks runs without it; one with networks cannot.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && policy.is_empty() => {
            return Ok(())
        }
        Err(err) => return Err(FirewallError::Spawn(err)),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(FirewallError::Spawn)?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(FirewallError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(FirewallError::Refused(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            segments: vec![
                Segment {
                    bridge: name("nbn4096"),
                    cidr: "10.30.0.0/24".parse().unwrap(),
                    gateway: Ipv4Addr::new(10, 30, 0, 1),
                    nat: true,
                    dhcp: true,
                    overlay: None,
                },
                Segment {
                    bridge: name("nbn4097"),
                    cidr: "10.40.0.0/24".parse().unwrap(),
                    gateway: Ipv4Addr::new(10, 40, 0, 1),
                    nat: false,
                    dhcp: false,
                    overlay: None,
                },
            ],
            nics: vec![GuardedNic {
                tap: name("nbt0123abcd0"),
                mac: "02:4e:42:00:00:01".parse().unwrap(),
                address: Ipv4Addr::new(10, 30, 0, 2),
            }],
            forwards: vec![Forward {
                protocol: Protocol::Tcp,
                host_port: 18080,
                address: Ipv4Addr::new(10, 30, 0, 2),
                port: 8080,
            }],
            egress_denied: vec![
                "169.254.0.0/16".parse().unwrap(),
                Cidr::of(Ipv4Addr::new(192, 0, 2, 7), 32),
            ],
            metadata_port: Some(8775),
        }
    }

    #[test]
    fn each_network_reaches_the_metadata_service_at_its_own_gateway_only() {
        let script = render(&policy());
        let lines = lines(&script);
        for (bridge, gateway) in [("nbn4096", "10.30.0.1"), ("nbn4097", "10.40.0.1")] {
            assert!(lines.contains(&&*format!(
                "iifname \"{bridge}\" ip daddr 169.254.169.254 tcp dport 80 dnat ip to {gateway}:8775"
            )));
            let chain = script
                .split(&format!("chain from_{bridge}"))
                .nth(1)
                .unwrap()
                .split('}')
                .next()
                .unwrap();
            assert!(chain.contains(&format!(
                "ip daddr {gateway} tcp dport 8775 ct status dnat accept"
            )));
        }
        // From anywhere else the port is closed, after the bridges' jumps.
        let input = script
            .split("chain input")
            .nth(1)
            .unwrap()
            .split('}')
            .next()
            .unwrap();
        assert!(input.trim_end().ends_with("tcp dport 8775 drop"));
        let without = render(&Policy {
            metadata_port: None,
            ..policy()
        });
        assert!(!without.contains("169.254.169.254"));
    }

    fn name(text: &str) -> IfName {
        text.parse().unwrap()
    }

    fn lines(script: &str) -> Vec<&str> {
        script.lines().map(str::trim).collect()
    }

    #[test]
    fn an_empty_policy_only_removes_the_tables() {
        let script = render(&Policy::default());
        assert_eq!(
            lines(&script),
            [
                "table inet nubis {}",
                "delete table inet nubis",
                "table bridge nubis {}",
                "delete table bridge nubis"
            ]
        );
        assert!(!Policy::default().needs_forwarding());
        assert!(Policy::default().is_empty() && !policy().is_empty());
    }

    #[test]
    fn taps_may_only_send_their_own_mac_and_address() {
        let script = render(&policy());
        let lines = lines(&script);
        for rule in [
            "iifname \"nbt0123abcd0\" jump nic_nbt0123abcd0",
            "ether saddr != 02:4e:42:00:00:01 counter drop",
            "arp saddr ether != 02:4e:42:00:00:01 counter drop",
            "arp saddr ip != { 0.0.0.0, 10.30.0.2 } counter drop",
            "ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
            "ip saddr != 10.30.0.2 counter drop",
            "ether type { ip, arp } accept",
        ] {
            assert!(lines.contains(&rule), "missing {rule}:\n{script}");
        }
        // The DHCP exception comes before the address check.
        let dhcp = lines.iter().position(|l| l.starts_with("ip saddr 0.0.0.0"));
        let spoof = lines
            .iter()
            .position(|l| l.starts_with("ip saddr != 10.30"));
        assert!(dhcp < spoof);
    }

    #[test]
    fn networks_are_isolated_and_nat_is_per_network() {
        let script = render(&policy());
        let lines = lines(&script);
        for rule in [
            "iifname \"nbn4096\" jump from_nbn4096",
            "udp sport 68 udp dport 67 accept",
            "ip daddr 10.30.0.1 icmp type echo-request accept",
            "ip daddr 10.40.0.1 icmp type echo-request accept",
            "iifname \"nbn4096\" oifname \"nbn4096\" accept",
            "iifname \"nbn4096\" oifname != \"nbn*\" oifname != \"nbr*\" accept",
            "iifname \"nbn4097\" drop",
            "oifname \"nbn4097\" drop",
            "ip saddr 10.30.0.0/24 ip daddr != 10.30.0.0/24 oifname != \"nbn4096\" masquerade",
            "fib daddr type local tcp dport 18080 dnat ip to 10.30.0.2:8080",
        ] {
            assert!(lines.contains(&rule), "missing {rule}:\n{script}");
        }
        // No NAT and no DHCP for the second network.
        assert!(!script.contains("ip saddr 10.40.0.0/24"));
        assert!(!script.contains("iifname \"nbn4097\" oifname != "));
        let from_4097 = script.split("chain from_nbn4097").nth(1).unwrap();
        let from_4097 = from_4097.split('}').next().unwrap();
        assert!(!from_4097.contains("dport 67"), "{from_4097}");
        // Each network's own accept precedes the drops.
        let accept = lines
            .iter()
            .position(|l| *l == "iifname \"nbn4097\" oifname \"nbn4097\" accept");
        let drop = lines.iter().position(|l| *l == "iifname \"nbn4097\" drop");
        assert!(accept < drop);
        assert!(policy().needs_forwarding());
    }

    #[test]
    fn nat_egress_never_reaches_the_denied_destinations() {
        let script = render(&policy());
        let lines = lines(&script);
        let deny = "iifname \"nbn4096\" ip daddr { 169.254.0.0/16, 192.0.2.7/32 } counter drop";
        let accept = "iifname \"nbn4096\" oifname != \"nbn*\" oifname != \"nbr*\" accept";
        let deny_at = lines.iter().position(|l| *l == deny);
        let accept_at = lines.iter().position(|l| *l == accept);
        assert!(deny_at.is_some() && deny_at < accept_at, "{script}");
        // A network without NAT reaches nothing outside anyway.
        let forward = script.split("chain forward").nth(1).unwrap();
        let forward = forward.split('}').next().unwrap();
        assert!(
            !forward.contains("iifname \"nbn4097\" ip daddr"),
            "{script}"
        );
    }

    #[test]
    fn the_script_is_balanced() {
        let script = render(&policy());
        assert_eq!(script.matches('{').count(), script.matches('}').count());
        let script = render(&overlay_policy());
        assert_eq!(script.matches('{').count(), script.matches('}').count());
    }

    fn overlay_policy() -> Policy {
        let mut policy = policy();
        policy.segments[1].overlay = Some(OverlayPort {
            vxlan: name("nvx1048577"),
            gateway_mac: "02:4e:47:10:00:01".parse().unwrap(),
        });
        policy
    }

    #[test]
    fn the_gateway_arp_and_dhcp_stay_off_the_overlay_both_ways() {
        assert!(!render(&policy()).contains("overlay_"));
        let script = render(&overlay_policy());
        let lines = lines(&script);
        for rule in [
            "iifname \"nvx1048577\" jump overlay_nvx1048577",
            "oifname \"nvx1048577\" jump overlay_nvx1048577",
            "type filter hook forward priority filter; policy accept;",
            "type filter hook output priority filter; policy accept;",
            "ether saddr 02:4e:47:10:00:01 counter drop",
            "arp daddr ip 10.40.0.1 counter drop",
            "udp dport { 67, 68 } counter drop",
        ] {
            assert!(lines.contains(&rule), "missing {rule}:\n{script}");
        }
        // Into the bridge, forwarded out of it, and sent by the host.
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.ends_with("jump overlay_nvx1048577"))
                .count(),
            3
        );
    }
}
