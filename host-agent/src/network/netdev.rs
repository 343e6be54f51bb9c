//! Network devices through the kernel's own interfaces (the tun driver's
//! ioctls and the interface ioctls of an `AF_INET` socket) instead of `ip`:
//! taps made, and a link's settings read. Every VM start makes a tap per
//! NIC on a bridge that is usually ready already, and the six runs of `ip`
//! that took cost more than the rest of a clone's start on the host (10 to
//! 13 ms measured on the CI machine, against well under one for the
//! ioctls), and serialized the starts of many clones behind the network
//! lock.
//!
//! Names are typed [`IfName`]s (at most 15 bytes, no NUL): nothing a tenant
//! chose reaches an ioctl.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::typed::IfName;
use super::{link_index as index, NetworkError};

/// `SIOCBRADDIF` (linux/sockios.h): add an interface to a bridge.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// Creates `tap` on `bridge`, up, with `mtu` when given, owned by user and
/// group `owner` (a jailed VMM's, which may then attach to it without any
/// capability). A stale tap of that name is replaced; a tap left half
/// made by a failure is removed.
pub async fn create_tap(
    tap: &IfName,
    bridge: &IfName,
    mtu: Option<u16>,
    owner: u32,
) -> Result<(), NetworkError> {
    if index(tap).is_some() {
        super::delete_link(tap).await?;
    }
    let name = tap.as_str().to_string();
    let (tap, bridge) = (tap.clone(), bridge.clone());
    let made = tokio::task::spawn_blocking(move || {
        let made = create_now(&tap, &bridge, mtu, owner);
        if made.is_err() && index(&tap).is_some() {
            if let Err(err) = remove_now(&tap) {
                tracing::warn!("cannot remove the half-made tap {tap}: {err}");
            }
        }
        made
    })
    .await;
    made.map_err(|err| NetworkError::Tap {
        tap: name,
        action: "make",
        source: std::io::Error::other(err.to_string()),
    })?
}

fn create_now(
    tap: &IfName,
    bridge: &IfName,
    mtu: Option<u16>,
    owner: u32,
) -> Result<(), NetworkError> {
    let failed = |action: &'static str| {
        let tap = tap.as_str().to_string();
        move |source| NetworkError::Tap {
            tap,
            action,
            source,
        }
    };
    let tun = open_tun().map_err(failed("open /dev/net/tun for"))?;
    let mut request = interface_request(tap);
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the `ifreq` it is given, which
    // lives across the call; `tun` is an open tun descriptor.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) })
        .map_err(failed("create"))?;
    for (what, ioctl, value) in [
        ("give its owner to", libc::TUNSETOWNER, owner),
        ("give its group to", libc::TUNSETGROUP, owner),
        ("make persistent", libc::TUNSETPERSIST, 1),
    ] {
        // SAFETY: these tun ioctls take their argument by value.
        check(unsafe { libc::ioctl(tun.as_raw_fd(), ioctl, libc::c_ulong::from(value)) })
            .map_err(failed(what))?;
    }
    // The tap outlives this descriptor (persistent).
    drop(tun);
    let socket = control_socket().map_err(failed("open a socket to configure"))?;
    if let Some(mtu) = mtu {
        let mut request = interface_request(tap);
        request.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        // SAFETY: SIOCSIFMTU reads the `ifreq`, alive across the call.
        check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFMTU, &request) })
            .map_err(failed("set the MTU of"))?;
    }
    let tap_index = index(tap)
        .ok_or_else(|| failed("find")(std::io::Error::from(std::io::ErrorKind::NotFound)))?;
    let mut request = interface_request(bridge);
    request.ifr_ifru.ifru_ifindex = tap_index as libc::c_int;
    // SAFETY: SIOCBRADDIF reads the `ifreq` (the bridge's name, the
    // port's index), alive across the call.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRADDIF, &request) })
        .map_err(failed("add to its bridge"))?;
    let mut request = interface_request(tap);
    // SAFETY: SIOCGIFFLAGS writes the flags into the `ifreq`, alive
    // across the call.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) })
        .map_err(failed("read the flags of"))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the `ifreq`, alive across the call.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) })
        .map_err(failed("bring up"))?;
    Ok(())
}

/// What `ip link` would show of a link that matters to a bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkSettings {
    pub up: bool,
    pub mtu: u16,
    pub mac: [u8; 6],
}

/// The settings of link `name` (which must exist).
pub fn link_settings(name: &IfName) -> std::io::Result<LinkSettings> {
    let socket = control_socket()?;
    let mut request = interface_request(name);
    // SAFETY: SIOCGIFFLAGS writes the flags into the `ifreq`, alive
    // across the call.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) })?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let up = unsafe { request.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short != 0;
    // SAFETY: SIOCGIFMTU writes the MTU into the `ifreq`, alive across the
    // call.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &mut request) })?;
    // SAFETY: SIOCGIFMTU filled the MTU member of the union.
    let mtu = u16::try_from(unsafe { request.ifr_ifru.ifru_mtu }).unwrap_or(u16::MAX);
    // SAFETY: SIOCGIFHWADDR writes the address into the `ifreq`, alive
    // across the call.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) })?;
    // SAFETY: SIOCGIFHWADDR filled the hardware address member.
    let data = unsafe { request.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (byte, value) in mac.iter_mut().zip(data.iter()) {
        *byte = *value as u8;
    }
    Ok(LinkSettings { up, mtu, mac })
}

/// Removes the persistent tap `tap`: attached to, then no longer
/// persistent, it goes with the last descriptor.
fn remove_now(tap: &IfName) -> std::io::Result<()> {
    let tun = open_tun()?;
    let mut request = interface_request(tap);
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: as in `create_now`.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) })?;
    // SAFETY: TUNSETPERSIST takes its argument by value.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 0 as libc::c_ulong) })
}

/// An `ifreq` naming `name`, the rest zero.
fn interface_request(name: &IfName) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data (a name and a union of integers,
    // addresses and a pointer), for which all zeros is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // IfName is at most 15 bytes: the last byte stays the NUL.
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_str().bytes()) {
        *slot = byte as libc::c_char;
    }
    request
}

fn open_tun() -> std::io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path; the result is checked before use.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    check(fd)?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn control_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(result: libc::c_int) -> std::io::Result<()> {
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_name_and_its_nul() {
        let name: IfName = "nbt0123456789ab".parse().expect("a name");
        let request = interface_request(&name);
        let bytes: Vec<u8> = request.ifr_name.iter().map(|c| *c as u8).collect();
        assert_eq!(&bytes[..15], b"nbt0123456789ab");
        assert_eq!(bytes[15], 0);
    }

    #[test]
    fn the_loopbacks_settings_are_read() {
        let loopback: IfName = "lo".parse().expect("a name");
        let settings = link_settings(&loopback).expect("lo's settings");
        assert_eq!(settings.mac, [0; 6]);
        assert!(settings.mtu > 0);
    }

    #[test]
    fn a_missing_interface_has_no_index() {
        use crate::network::link_index as index;
        let name: IfName = "nbnotthere0".parse().expect("a name");
        assert_eq!(index(&name), None);
        let loopback: IfName = "lo".parse().expect("a name");
        assert!(index(&loopback).is_some());
    }
}
