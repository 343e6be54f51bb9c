//! The agent's DHCP server: one UDP socket per network bridge (bound to the
//! bridge's device, so that each network answers only its own VMs), each
//! served by a task that looks the client's MAC up in the agent's
//! database. Replies go out by broadcast on the bridge, or unicast to a
//! client that already has its address.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::dhcp::{self, Answer, Lease, Request};

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;

/// Errors in opening a server socket.
#[derive(Debug, thiserror::Error)]
pub enum DhcpServerError {
    #[error("cannot open a DHCP socket on {bridge}: {what}: {source}")]
    Socket {
        bridge: String,
        what: &'static str,
        source: std::io::Error,
    },
}

/// Finds the lease of a MAC on a network (None: not one of its NICs).
pub trait LeaseLookup: Send + Sync + 'static {
    fn lease(&self, network_id: &str, mac: &str) -> Option<Lease>;
}

/// One server per network, by network id.
pub struct DhcpServers {
    leases: Arc<dyn LeaseLookup>,
    running: Mutex<HashMap<String, Running>>,
}

struct Running {
    bridge: String,
    task: tokio::task::JoinHandle<()>,
}

impl DhcpServers {
    pub fn new(leases: Arc<dyn LeaseLookup>) -> Self {
        Self {
            leases,
            running: Mutex::new(HashMap::new()),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes exactly the servers in `wanted` (network id, bridge, gateway)
    /// run: new ones start, the others stop.
    pub fn reconcile(&self, wanted: &[(String, String, Ipv4Addr)]) -> Result<(), DhcpServerError> {
        let mut running = self.running();
        running.retain(|network, server| {
            let keep = wanted
                .iter()
                .any(|(id, bridge, _)| id == network && *bridge == server.bridge)
                && !server.task.is_finished();
            if !keep {
                server.task.abort();
            }
            keep
        });
        for (network, bridge, gateway) in wanted {
            if running.contains_key(network) {
                continue;
            }
            let socket = bind(bridge)?;
            let task = tokio::spawn(serve(
                socket,
                network.clone(),
                bridge.clone(),
                *gateway,
                self.leases.clone(),
            ));
            tracing::info!(network = %network, bridge = %bridge, "DHCP server started");
            running.insert(
                network.clone(),
                Running {
                    bridge: bridge.clone(),
                    task,
                },
            );
        }
        Ok(())
    }
}

impl Drop for DhcpServers {
    fn drop(&mut self) {
        for server in self.running().values() {
            server.task.abort();
        }
    }
}

/// A non-blocking UDP socket on port 67 of `bridge` only, allowed to
/// broadcast, sharing the port with the other bridges' sockets.
fn bind(bridge: &str) -> Result<tokio::net::UdpSocket, DhcpServerError> {
    let fail = |what: &'static str| {
        let source = std::io::Error::last_os_error();
        move || DhcpServerError::Socket {
            bridge: bridge.to_string(),
            what,
            source,
        }
    };
    // SAFETY: socket() has no memory preconditions; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(fail("socket")());
    }
    // SAFETY: fd is a socket just opened and owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for (option, what) in [
        (libc::SO_REUSEADDR, "SO_REUSEADDR"),
        (libc::SO_BROADCAST, "SO_BROADCAST"),
    ] {
        // SAFETY: fd is open; the option value is a live c_int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(fail(what)());
        }
    }
    // SAFETY: fd is open; the device name is a live buffer of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            bridge.as_ptr().cast(),
            bridge.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(fail("SO_BINDTODEVICE")());
    }
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: SERVER_PORT.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::UNSPECIFIED).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: fd is open; `address` is a live sockaddr_in of the size passed.
    let rc = unsafe {
        libc::bind(
            fd,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(fail("bind to port 67")());
    }
    let socket = std::net::UdpSocket::from(owned);
    tokio::net::UdpSocket::from_std(socket).map_err(|source| DhcpServerError::Socket {
        bridge: bridge.to_string(),
        what: "register with the runtime",
        source,
    })
}

async fn serve(
    socket: tokio::net::UdpSocket,
    network: String,
    bridge: String,
    server_id: Ipv4Addr,
    leases: Arc<dyn LeaseLookup>,
) {
    let mut buf = vec![0u8; 1500];
    loop {
        let len = match socket.recv_from(&mut buf).await {
            Ok((len, _from)) => len,
            Err(err) => {
                tracing::warn!(bridge = %bridge, "DHCP receive failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let request = match Request::parse(&buf[..len]) {
            Ok(request) => request,
            Err(err) => {
                tracing::debug!(bridge = %bridge, "ignoring a datagram: {err}");
                continue;
            }
        };
        let mac = request.mac();
        let lease = leases.lease(&network, &mac);
        let kind = match dhcp::decide(&request, lease.as_ref(), server_id) {
            Answer::Reply(kind) => kind,
            Answer::Ignore(why) => {
                tracing::debug!(bridge = %bridge, mac = %mac, "no DHCP answer to {:?}: {why}", request.kind);
                continue;
            }
        };
        let Some(lease) = lease else { continue };
        let reply = dhcp::build_reply(&request, kind, &lease, server_id);
        let destination = SocketAddrV4::new(dhcp::reply_destination(&request), CLIENT_PORT);
        match socket.send_to(&reply, destination).await {
            Ok(_) => tracing::info!(
                bridge = %bridge, mac = %mac, address = %lease.address,
                "DHCP {:?} answered with {kind:?}", request.kind
            ),
            Err(err) => tracing::warn!(bridge = %bridge, mac = %mac, "DHCP reply failed: {err}"),
        }
    }
}
