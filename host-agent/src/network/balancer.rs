//! Service endpoints in the kernel: each host balances the flows that
//! enter it (to a role's virtual address, or to an endpoint's port on any
//! of its addresses) over the role's healthy instances, wherever they run,
//! with nftables: a DNAT to one of them picked by `numgen random`, kept by
//! conntrack for the flow's life. No proxy sits in the data path.
//!
//! Every host is its network's gateway with the same address and MAC, and
//! frames with that MAC never cross the overlay (`firewall.rs`), so the
//! host cannot reach another host's instance from its bridge. It has a
//! second, own address on each balanced network instead, on a veth whose
//! other end is a port of the bridge (`nlb{vni}`, `nlbp{vni}`): balanced
//! flows are routed out of it (a firewall mark selects a routing table)
//! and their source becomes that address, so that the instance's answers
//! come back to the host that holds the flow's conntrack entry, which
//! turns them back into answers from the virtual address.
//!
//! The virtual address is on every host's bridge, as a /32: a guest's ARP
//! for it is answered by its own host with the gateway's MAC (such frames
//! stay on the host), and its flows to other ports of it hit the input
//! chain's drop, as the gateway's do.
//!
//! All of it comes from typed values (`Ipv4Addr`, `IfName`, ports): no
//! text a tenant chose reaches the script or a command line.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;

use nubis_api::Protocol;
use tokio::io::AsyncWriteExt;

use super::typed::{IfName, MacAddr};
use super::{ip, ip_output, link_exists, links_named, NetworkError};
use crate::ipv4::Cidr;

/// The conntrack and packet mark of balanced flows ("NL", 1).
pub const LB_MARK: u32 = 0x4e4c_0001;
/// The routing table that sends marked packets out of the balancing veth.
pub const LB_TABLE: u32 = 20044;
/// The nftables table of the balancer.
const TABLE: &str = "ip nubis_lb";

/// Where a flow enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entry {
    /// A role's virtual address and port.
    Virtual { address: Ipv4Addr, port: u16 },
    /// A port on any of the host's own addresses.
    HostPort(u16),
}

/// One balanced port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub protocol: Protocol,
    pub entry: Entry,
    /// The instances' port.
    pub target_port: u16,
    /// The healthy instances' addresses; none: new flows are refused.
    pub backends: Vec<Ipv4Addr>,
}

/// A network this host balances flows onto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub vni: u32,
    pub bridge: IfName,
    pub cidr: Cidr,
    pub mtu: u16,
    /// This host's own address on it.
    pub lb_address: Ipv4Addr,
    /// The virtual addresses of the roles on it.
    pub virtual_addresses: Vec<Ipv4Addr>,
}

impl Segment {
    /// The host's end of the balancing veth.
    pub fn link(&self) -> IfName {
        lb_link(self.vni)
    }

    /// Its end in the bridge.
    pub fn port(&self) -> IfName {
        lb_port(self.vni)
    }
}

fn lb_link(vni: u32) -> IfName {
    IfName::generated("nlb", &vni.to_string())
}

fn lb_port(vni: u32) -> IfName {
    IfName::generated("nlbp", &vni.to_string())
}

/// Everything this host balances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balancer {
    pub segments: Vec<Segment>,
    pub frontends: Vec<Frontend>,
}

impl Balancer {
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.frontends.is_empty()
    }
}

/// The nft script that replaces the balancer's table (or removes it).
pub fn render(balancer: &Balancer) -> String {
    let mut out = format!("table {TABLE} {{}}\ndelete table {TABLE}\n");
    if balancer.is_empty() {
        return out;
    }
    let _ = writeln!(out, "table {TABLE} {{");
    for (chain, hook, priority) in [
        ("prerouting", "prerouting", "dstnat - 10"),
        ("output", "output", "-110"),
    ] {
        let _ = writeln!(
            out,
            "  chain {chain} {{\n    type nat hook {hook} priority {priority}; policy accept;"
        );
        for frontend in &balancer.frontends {
            let _ = writeln!(out, "    {}", frontend_rule(frontend));
        }
        out.push_str("  }\n");
    }
    // Every later packet of a balanced flow (the first is marked with its
    // DNAT) takes the balancing route too.
    let _ = writeln!(
        out,
        "  chain mark_forwarded {{\n    type filter hook prerouting priority mangle; policy accept;\n    ct direction original ct mark {LB_MARK:#x} meta mark set {LB_MARK:#x}\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain mark_local {{\n    type route hook output priority mangle; policy accept;\n    ct direction original ct mark {LB_MARK:#x} meta mark set {LB_MARK:#x}\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat - 10; policy accept;"
    );
    for segment in &balancer.segments {
        let _ = writeln!(
            out,
            "    ct mark {LB_MARK:#x} oifname \"{}\" snat ip to {}",
            segment.link(),
            segment.lb_address
        );
    }
    out.push_str("  }\n}\n");
    out
}

/// The rule of one frontend: a DNAT over its backends, or a refusal.
fn frontend_rule(frontend: &Frontend) -> String {
    let protocol = frontend.protocol.as_str();
    let entry = match frontend.entry {
        Entry::Virtual { address, port } => {
            format!("ip daddr {address} {protocol} dport {port}")
        }
        Entry::HostPort(port) => format!("fib daddr type local {protocol} dport {port}"),
    };
    if frontend.backends.is_empty() {
        let refuse = match frontend.protocol {
            Protocol::Tcp => "reject with tcp reset",
            Protocol::Udp => "reject",
        };
        return format!("{entry} {refuse}");
    }
    let map: Vec<String> = frontend
        .backends
        .iter()
        .enumerate()
        .map(|(index, address)| format!("{index} : {address}"))
        .collect();
    format!(
        "{entry} ct mark set {LB_MARK:#x} meta mark set {LB_MARK:#x} dnat ip to numgen random mod {} map {{ {} }} : {}",
        frontend.backends.len(),
        map.join(", "),
        frontend.target_port
    )
}

/// Makes the host balance as `balancer` says: the balancing veths and
/// their addresses, the virtual addresses on the bridges, the routing
/// table and rule, then the rules (one nft transaction).
pub async fn apply(balancer: &Balancer) -> Result<(), NetworkError> {
    for segment in &balancer.segments {
        ensure_segment(segment).await?;
    }
    remove_stale(balancer).await?;
    ensure_routes(balancer).await?;
    nft(&render(balancer)).await
}

async fn ensure_segment(segment: &Segment) -> Result<(), NetworkError> {
    let (link, port) = (segment.link(), segment.port());
    if !link_exists(&link).await {
        ip(&[
            "link",
            "add",
            link.as_str(),
            "type",
            "veth",
            "peer",
            "name",
            port.as_str(),
        ])
        .await?;
    }
    let mtu = segment.mtu.to_string();
    ip(&[
        "link",
        "set",
        "dev",
        port.as_str(),
        "mtu",
        &mtu,
        "master",
        segment.bridge.as_str(),
    ])
    .await?;
    ip(&["link", "set", "dev", link.as_str(), "mtu", &mtu]).await?;
    ip(&["link", "set", "dev", port.as_str(), "up"]).await?;
    ip(&["link", "set", "dev", link.as_str(), "up"]).await?;
    // Answers come in here from addresses routed through the bridge.
    sysctl(&link, "rp_filter", b"2").await?;
    // Each of the bridge and the veth answers ARP only for its own
    // addresses (the gateway and virtual addresses, the balancing one):
    // a guest must never learn the veth's MAC for its gateway, nor the
    // gateway's (which stays on the host) for the balancing address.
    for interface in [&link, &segment.bridge] {
        sysctl(interface, "arp_ignore", b"1").await?;
        sysctl(interface, "arp_announce", b"2").await?;
    }
    set_host_addresses(&link, &[segment.lb_address]).await?;
    set_host_addresses(&segment.bridge, &segment.virtual_addresses).await
}

/// Sets `net.ipv4.conf.{interface}.{name}` to `value`.
async fn sysctl(interface: &IfName, name: &str, value: &[u8]) -> Result<(), NetworkError> {
    let path = format!("/proc/sys/net/ipv4/conf/{}/{name}", interface.as_str());
    tokio::fs::write(&path, value)
        .await
        .map_err(|err| NetworkError::Balancer(format!("write {path}: {err}")))
}

/// Makes `wanted` exactly the /32 addresses of `link` (its other
/// addresses, such as a bridge's gateway, are left alone).
async fn set_host_addresses(link: &IfName, wanted: &[Ipv4Addr]) -> Result<(), NetworkError> {
    let listing = ip_output(&["-o", "-4", "addr", "show", "dev", link.as_str()]).await?;
    let present = host_addresses(&listing);
    for address in &present {
        if !wanted.contains(address) {
            let cidr = format!("{address}/32");
            ip(&["addr", "del", &cidr, "dev", link.as_str()]).await?;
        }
    }
    for address in wanted {
        if !present.contains(address) {
            let cidr = format!("{address}/32");
            ip(&["addr", "add", &cidr, "dev", link.as_str()]).await?;
        }
    }
    Ok(())
}

/// The /32 addresses in `ip -o -4 addr show` output.
fn host_addresses(listing: &str) -> Vec<Ipv4Addr> {
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "inet")?;
            let (address, prefix) = words.next()?.split_once('/')?;
            (prefix == "32").then(|| address.parse().ok()).flatten()
        })
        .collect()
}

/// Removes the balancing veths of networks no longer balanced, and the
/// virtual addresses of bridges that have none now.
async fn remove_stale(balancer: &Balancer) -> Result<(), NetworkError> {
    let wanted: Vec<IfName> = balancer.segments.iter().map(Segment::link).collect();
    for link in links_named("nlb").await? {
        let ours = link.as_str().strip_prefix("nlb").is_some_and(|rest| {
            !rest.starts_with('p') && rest.bytes().all(|byte| byte.is_ascii_digit())
        });
        if ours && !wanted.contains(&link) {
            super::delete_link(&link).await?;
        }
    }
    Ok(())
}

/// Forgets what the host knew of backends' link-layer addresses on
/// `segment`'s balancing veth: those of `returned` (backends new to this
/// agent: an address a new instance took over from a deleted one, a VM
/// back from a move), and any that is not the backend's NIC's (`backends`:
/// address and MAC). Each is then looked up again rather than sent to the
/// old MAC or host until the kernel's entry fails (which a connection
/// attempt may not outlast). Other entries are kept: a lookup is a
/// broadcast, and an agent that restarts must not make every flow wait
/// for one.
pub async fn forget_neighbors(
    segment: &Segment,
    backends: &[(Ipv4Addr, MacAddr)],
    returned: &[Ipv4Addr],
) {
    let link = segment.link();
    if !link_exists(&link).await {
        // Made by this pass: it knows nobody yet.
        return;
    }
    let listing = match ip_output(&["-4", "neigh", "show", "dev", link.as_str()]).await {
        Ok(listing) => listing,
        Err(err) => {
            tracing::warn!("cannot list the neighbours of {link}: {err}");
            return;
        }
    };
    let mut forgotten: std::collections::BTreeSet<Ipv4Addr> =
        wrong_neighbors(&listing, backends).into_iter().collect();
    forgotten.extend(returned);
    for address in forgotten {
        let address = address.to_string();
        // Nothing known of it is the usual case, and fine.
        let _ = ip_output(&["neigh", "del", &address, "dev", link.as_str()]).await;
    }
}

/// The entries of `ip -4 neigh show dev X` ("ADDR lladdr MAC STATE", or
/// "ADDR STATE" while unresolved) that name a backend with another MAC.
fn wrong_neighbors(listing: &str, backends: &[(Ipv4Addr, MacAddr)]) -> Vec<Ipv4Addr> {
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let address: Ipv4Addr = words.next()?.parse().ok()?;
            let (_, mac) = backends.iter().find(|(backend, _)| *backend == address)?;
            let known = words
                .skip_while(|word| *word != "lladdr")
                .nth(1)
                .and_then(|text| text.parse::<MacAddr>().ok());
            (known.is_some_and(|known| known != *mac)).then_some(address)
        })
        .collect()
}

async fn ensure_routes(balancer: &Balancer) -> Result<(), NetworkError> {
    let table = LB_TABLE.to_string();
    let mark = format!("{LB_MARK:#x}");
    let rules = ip_output(&["rule", "show", "table", &table]).await?;
    let has_rule = !rules.trim().is_empty();
    if balancer.segments.is_empty() {
        if has_rule {
            ip(&["rule", "del", "fwmark", &mark, "table", &table]).await?;
        }
        ip_output(&["route", "flush", "table", &table]).await.ok();
        return Ok(());
    }
    if !has_rule {
        ip(&[
            "rule", "add", "fwmark", &mark, "table", &table, "priority", &table,
        ])
        .await?;
    }
    // A table without routes does not exist yet: nothing listed.
    let listing = ip_output(&["route", "show", "table", &table])
        .await
        .unwrap_or_default();
    for segment in &balancer.segments {
        let (cidr, source) = (segment.cidr.to_string(), segment.lb_address.to_string());
        ip(&[
            "route",
            "replace",
            &cidr,
            "dev",
            segment.link().as_str(),
            "src",
            &source,
            "table",
            &table,
        ])
        .await?;
    }
    for line in listing.lines() {
        let Some(destination) = line.split_whitespace().next() else {
            continue;
        };
        let wanted = balancer
            .segments
            .iter()
            .any(|segment| segment.cidr.to_string() == destination);
        if !wanted {
            if let Ok(cidr) = destination.parse::<Cidr>() {
                let cidr = cidr.to_string();
                ip(&["route", "del", &cidr, "table", &table]).await?;
            }
        }
    }
    Ok(())
}

async fn nft(script: &str) -> Result<(), NetworkError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| NetworkError::Balancer(format!("cannot run nft: {err}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|err| NetworkError::Balancer(format!("cannot write to nft: {err}")))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|err| NetworkError::Balancer(format!("nft: {err}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Balancer(format!(
            "nft refused the balancer's rules: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer() -> Balancer {
        Balancer {
            segments: vec![Segment {
                vni: 4096,
                bridge: "nbn4096".parse().unwrap(),
                cidr: "10.71.0.0/24".parse().unwrap(),
                mtu: 1450,
                lb_address: Ipv4Addr::new(10, 71, 0, 9),
                virtual_addresses: vec![Ipv4Addr::new(10, 71, 0, 5)],
            }],
            frontends: vec![
                Frontend {
                    protocol: Protocol::Tcp,
                    entry: Entry::Virtual {
                        address: Ipv4Addr::new(10, 71, 0, 5),
                        port: 80,
                    },
                    target_port: 8080,
                    backends: vec![Ipv4Addr::new(10, 71, 0, 2), Ipv4Addr::new(10, 71, 0, 3)],
                },
                Frontend {
                    protocol: Protocol::Udp,
                    entry: Entry::HostPort(30053),
                    target_port: 53,
                    backends: Vec::new(),
                },
            ],
        }
    }

    #[test]
    fn an_empty_balancer_only_removes_the_table() {
        assert_eq!(
            render(&Balancer::default()),
            "table ip nubis_lb {}\ndelete table ip nubis_lb\n"
        );
    }

    #[test]
    fn frontends_dnat_over_their_backends_and_refuse_without() {
        let script = render(&balancer());
        assert!(script.starts_with("table ip nubis_lb {}\ndelete table ip nubis_lb\n"));
        let dnat = "ip daddr 10.71.0.5 tcp dport 80 ct mark set 0x4e4c0001 meta mark set 0x4e4c0001 dnat ip to numgen random mod 2 map { 0 : 10.71.0.2, 1 : 10.71.0.3 } : 8080";
        // In both the forwarded and the local path.
        assert_eq!(script.matches(dnat).count(), 2, "{script}");
        assert_eq!(
            script
                .matches("fib daddr type local udp dport 30053 reject\n")
                .count(),
            2,
            "{script}"
        );
        assert!(
            script.contains("ct mark 0x4e4c0001 oifname \"nlb4096\" snat ip to 10.71.0.9"),
            "{script}"
        );
        assert!(
            script.contains("ct direction original ct mark 0x4e4c0001 meta mark set 0x4e4c0001")
        );
    }

    #[test]
    fn host_addresses_are_the_slash_32s() {
        let listing = "7: nbn4096    inet 10.71.0.1/24 brd 10.71.0.255 scope global nbn4096\\       valid_lft forever preferred_lft forever\n\
                       7: nbn4096    inet 10.71.0.5/32 scope global nbn4096\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(host_addresses(listing), [Ipv4Addr::new(10, 71, 0, 5)]);
        assert!(host_addresses("").is_empty());
    }

    #[test]
    fn only_neighbours_with_another_mac_than_the_backends_are_wrong() {
        let listing = "10.71.0.2 lladdr 52:54:00:00:00:02 REACHABLE\n\
                       10.71.0.3 lladdr 52:54:00:00:00:99 STALE\n\
                       10.71.0.4 FAILED\n\
                       10.71.0.9 lladdr 52:54:00:00:00:09 STALE\n\
                       garbage\n";
        let mac = |last: u8| MacAddr::new([0x52, 0x54, 0, 0, 0, last]);
        let backends = [
            (Ipv4Addr::new(10, 71, 0, 2), mac(2)),
            (Ipv4Addr::new(10, 71, 0, 3), mac(3)),
            (Ipv4Addr::new(10, 71, 0, 4), mac(4)),
        ];
        // .2 is right, .3 another instance's, .4 unresolved (looked up
        // anyway), .9 no backend's.
        assert_eq!(
            wrong_neighbors(listing, &backends),
            [Ipv4Addr::new(10, 71, 0, 3)]
        );
        assert!(wrong_neighbors("", &backends).is_empty());
    }

    /// The rendered script is what nft takes (checked by nft itself, in
    /// a scratch network namespace, when this runs as root with nft).
    #[test]
    fn nft_takes_the_script() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let nft = std::process::Command::new("nft").arg("--version").output();
        if !root || nft.is_err() {
            eprintln!("skipped: needs root and nft");
            return;
        }
        let name = format!("nbt-lb-{}", std::process::id());
        let run = |args: &[&str]| std::process::Command::new("ip").args(args).status();
        assert!(run(&["netns", "add", &name]).is_ok_and(|status| status.success()));
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "nft", "-c", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(render(&balancer()).as_bytes())
            .expect("write");
        let output = child.wait_with_output().expect("nft");
        let _ = run(&["netns", "del", &name]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
