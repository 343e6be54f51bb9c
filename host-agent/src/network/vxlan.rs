//! The host side of the overlay: one VXLAN interface per overlay network
//! (`nvx<vni>`, UDP 4789 from the host's underlay address) on the network's
//! bridge. Broadcast and unknown frames go to every other host that carries
//! the network (head-end replication: one all-zero FDB entry per peer), and
//! the kernel learns where each remote MAC lives from the frames it
//! receives, so unicast goes straight to the right host. No multicast is
//! needed in the underlay.

use std::net::Ipv4Addr;

use super::{ip, ip_output, link_exists, run, IfName, NetworkError};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const VXLAN_OVERHEAD: u16 = 50;

/// What a VXLAN interface should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub name: IfName,
    pub vni: u32,
    pub local: Ipv4Addr,
    pub bridge: IfName,
    pub mtu: u16,
    /// The other hosts' underlay addresses.
    pub peers: Vec<Ipv4Addr>,
}

/// Makes the tunnel exist as described (recreating one with another VNI or
/// local address), on its bridge, with exactly its peers in the flood list.
pub async fn ensure(tunnel: &Tunnel) -> Result<(), NetworkError> {
    if link_exists(&tunnel.name).await {
        let details = ip_output(&["-d", "-o", "link", "show", "dev", tunnel.name.as_str()]).await?;
        if parse_vxlan(&details) != Some((tunnel.vni, tunnel.local)) {
            ip(&["link", "del", "dev", tunnel.name.as_str()]).await?;
        }
    }
    if !link_exists(&tunnel.name).await {
        let (vni, local, port) = (
            tunnel.vni.to_string(),
            tunnel.local.to_string(),
            VXLAN_PORT.to_string(),
        );
        ip(&[
            "link",
            "add",
            tunnel.name.as_str(),
            "type",
            "vxlan",
            "id",
            &vni,
            "local",
            &local,
            "dstport",
            &port,
        ])
        .await?;
    }
    let mtu = tunnel.mtu.to_string();
    ip(&[
        "link",
        "set",
        "dev",
        tunnel.name.as_str(),
        "mtu",
        &mtu,
        "master",
        tunnel.bridge.as_str(),
    ])
    .await?;
    ip(&["link", "set", "dev", tunnel.name.as_str(), "up"]).await?;
    let listing = run("bridge", &["fdb", "show", "dev", tunnel.name.as_str()]).await?;
    let present = flood_destinations(&listing);
    for peer in &tunnel.peers {
        if !present.contains(peer) {
            let dst = peer.to_string();
            run(
                "bridge",
                &[
                    "fdb",
                    "append",
                    FLOOD_MAC,
                    "dev",
                    tunnel.name.as_str(),
                    "dst",
                    &dst,
                ],
            )
            .await?;
        }
    }
    for stale in present.iter().filter(|dst| !tunnel.peers.contains(dst)) {
        let dst = stale.to_string();
        run(
            "bridge",
            &[
                "fdb",
                "del",
                FLOOD_MAC,
                "dev",
                tunnel.name.as_str(),
                "dst",
                &dst,
            ],
        )
        .await?;
    }
    Ok(())
}

/// The all-zero MAC: the FDB entries that broadcast and unknown unicast
/// frames are copied to.
const FLOOD_MAC: &str = "00:00:00:00:00:00";

/// The VNI and local address in `ip -d -o link show` of a VXLAN interface
/// ("... vxlan id 1048577 local 192.0.2.1 srcport 0 0 dstport 4789 ...").
fn parse_vxlan(details: &str) -> Option<(u32, Ipv4Addr)> {
    let words: Vec<&str> = details.split_whitespace().collect();
    let vxlan = words.iter().position(|word| *word == "vxlan")?;
    let after = |key: &str| {
        words[vxlan..]
            .windows(2)
            .find(|pair| pair[0] == key)
            .map(|pair| pair[1])
    };
    Some((after("id")?.parse().ok()?, after("local")?.parse().ok()?))
}

/// The peers in a VXLAN interface's flood list (`bridge fdb show dev X`:
/// "00:00:00:00:00:00 dst 192.0.2.2 self permanent").
fn flood_destinations(listing: &str) -> Vec<Ipv4Addr> {
    listing
        .lines()
        .filter(|line| line.starts_with(FLOOD_MAC))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "dst")?;
            words.next()?.parse().ok()
        })
        .collect()
}

/// The MTU of the interface that holds the underlay address `local`.
pub async fn underlay_mtu(local: Ipv4Addr) -> Result<u16, NetworkError> {
    let listing = ip_output(&["-o", "-4", "addr", "show"]).await?;
    let device = device_with_address(&listing, local).ok_or(NetworkError::NoUnderlay(local))?;
    let mtu = ip_output(&["-o", "link", "show", "dev", &device]).await?;
    link_mtu(&mtu).ok_or(NetworkError::NoUnderlay(local))
}

/// The device holding `address` in `ip -o -4 addr show`
/// ("2: eth0    inet 192.0.2.1/24 brd 192.0.2.255 scope global eth0").
fn device_with_address(listing: &str, address: Ipv4Addr) -> Option<String> {
    listing.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let device = words.nth(1)?.split('@').next()?;
        words.next().filter(|word| *word == "inet")?;
        let held: Ipv4Addr = words.next()?.split('/').next()?.parse().ok()?;
        (held == address).then(|| device.to_string())
    })
}

/// The "mtu N" of an `ip -o link show` line.
fn link_mtu(line: &str) -> Option<u16> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|pair| pair[0] == "mtu")
        .and_then(|pair| pair[1].parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_details_are_parsed() {
        let details = "12: nvx1048577: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1450 qdisc noqueue master nbn1048577 state UNKNOWN mode DEFAULT group default qlen 1000\\    link/ether 6a:1b:2c:3d:4e:5f brd ff:ff:ff:ff:ff:ff promiscuity 1 minmtu 68 maxmtu 65535 \\    vxlan id 1048577 local 192.0.2.1 srcport 0 0 dstport 4789 ttl auto ageing 300";
        assert_eq!(
            parse_vxlan(details),
            Some((1048577, Ipv4Addr::new(192, 0, 2, 1)))
        );
        assert_eq!(parse_vxlan("5: nbn4096: <BROADCAST> mtu 1500"), None);
        assert_eq!(parse_vxlan(""), None);
    }

    #[test]
    fn flood_entries_are_the_all_zero_ones() {
        let listing = "00:00:00:00:00:00 dst 192.0.2.2 self permanent\n\
                       00:00:00:00:00:00 dst 192.0.2.3 self permanent\n\
                       02:4e:42:01:02:03 dst 192.0.2.2 self\n\
                       6a:1b:2c:3d:4e:5f vlan 1 master nbn1048577 permanent\n";
        assert_eq!(
            flood_destinations(listing),
            [Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)]
        );
        assert!(flood_destinations("").is_empty());
    }

    #[test]
    fn the_underlay_device_and_its_mtu_are_found() {
        let listing = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                       7: veth-a@if6    inet 192.0.2.1/24 scope global veth-a\\       valid_lft forever\n";
        assert_eq!(
            device_with_address(listing, Ipv4Addr::new(192, 0, 2, 1)).as_deref(),
            Some("veth-a")
        );
        assert_eq!(
            device_with_address(listing, Ipv4Addr::new(192, 0, 2, 9)),
            None
        );
        assert_eq!(
            link_mtu("7: veth-a@if6: <BROADCAST,UP> mtu 1500 qdisc noqueue"),
            Some(1500)
        );
        assert_eq!(link_mtu("garbage"), None);
    }
}
