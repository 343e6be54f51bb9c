//! The agent's DHCP server: one UDP socket per network bridge (bound to the
//! bridge's device, so that each network answers only its own VMs), each
//! served by a task that looks the client's MAC up in the agent's
//! database. Replies go out by broadcast on the bridge, or unicast to a
//! client that already has its address.
//!
//! A guest controls what arrives here, so it may not cost the agent more
//! than a trickle: requests are rate-limited per network and per client MAC
//! (`RateLimiter`; what goes over is dropped and counted), the database
//! lookup runs on the blocking pool rather than the async runtime that
//! serves the API, and per-request logging is at debug level.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Each network's rate (see [`RateLimiter`]).
    network_per_second: u32,
    running: Mutex<HashMap<String, Running>>,
}

struct Running {
    bridge: String,
    task: tokio::task::JoinHandle<()>,
}

impl DhcpServers {
    pub fn new(leases: Arc<dyn LeaseLookup>, network_per_second: u32) -> Self {
        Self {
            leases,
            network_per_second,
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
                self.network_per_second,
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

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    fn take(&mut self, burst: f64, per_second: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How many DHCP requests one network's server answers: per network and
/// per client MAC. A client that keeps its lease asks a few times a day;
/// a booting guest a handful of times in a few seconds.
pub struct RateLimiter {
    network: Bucket,
    /// The network's rate (requests per second); its burst is twice that.
    network_per_second: f64,
    clients: HashMap<String, Bucket>,
    /// One client's burst and rate (requests per second).
    client_burst: f64,
    client_per_second: f64,
    /// Requests dropped so far.
    pub dropped: u64,
}

impl RateLimiter {
    /// The network's rate unless the agent's settings say otherwise
    /// (`dhcp_requests_per_s`).
    pub const DEFAULT_NETWORK_PER_SECOND: u32 = 32;
    const CLIENT_BURST: f64 = 8.0;
    const CLIENT_PER_SECOND: f64 = 2.0;
    /// Clients remembered at most (a flood of made-up MACs cannot grow
    /// the table): past it, the table starts anew.
    const MAX_CLIENTS: usize = 4096;

    /// A limiter that answers `network_per_second` requests a second on
    /// the network (at least one), with a burst of twice that.
    pub fn new(now: Instant, network_per_second: u32) -> Self {
        Self::with_clients(
            now,
            network_per_second,
            Self::CLIENT_BURST,
            Self::CLIENT_PER_SECOND,
        )
    }

    /// [`RateLimiter::new`] with each client's own burst and rate.
    pub fn with_clients(
        now: Instant,
        network_per_second: u32,
        client_burst: f64,
        client_per_second: f64,
    ) -> Self {
        let network_per_second = f64::from(network_per_second.max(1));
        Self {
            network: Bucket::full(2.0 * network_per_second, now),
            network_per_second,
            clients: HashMap::new(),
            client_burst,
            client_per_second,
            dropped: 0,
        }
    }

    /// Whether a request from `mac` may be answered now.
    pub fn admit(&mut self, mac: &str, now: Instant) -> bool {
        if self.clients.len() >= Self::MAX_CLIENTS && !self.clients.contains_key(mac) {
            self.clients.clear();
        }
        let client = self
            .clients
            .entry(mac.to_string())
            .or_insert_with(|| Bucket::full(self.client_burst, now));
        let admitted = client.take(self.client_burst, self.client_per_second, now)
            && self
                .network
                .take(2.0 * self.network_per_second, self.network_per_second, now);
        if !admitted {
            self.dropped += 1;
        }
        admitted
    }
}

async fn serve(
    socket: tokio::net::UdpSocket,
    network: String,
    bridge: String,
    server_id: Ipv4Addr,
    leases: Arc<dyn LeaseLookup>,
    network_per_second: u32,
) {
    let mut buf = vec![0u8; 1500];
    let mut limiter = RateLimiter::new(Instant::now(), network_per_second);
    let mut last_warning: Option<Instant> = None;
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
        let now = Instant::now();
        if !limiter.admit(&mac, now) {
            if last_warning.is_none_or(|at| now.duration_since(at) > Duration::from_secs(60)) {
                tracing::warn!(bridge = %bridge, mac = %mac, dropped = limiter.dropped, "DHCP requests over the rate limit are dropped");
                last_warning = Some(now);
            }
            continue;
        }
        // The lookup takes the database's lock: off the async runtime.
        let lookup = {
            let (leases, network, mac) = (leases.clone(), network.clone(), mac.clone());
            tokio::task::spawn_blocking(move || leases.lease(&network, &mac))
        };
        let lease = match lookup.await {
            Ok(lease) => lease,
            Err(err) => {
                tracing::warn!(bridge = %bridge, "DHCP lease lookup failed: {err}");
                continue;
            }
        };
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
            Ok(_) => tracing::debug!(
                bridge = %bridge, mac = %mac, address = %lease.address,
                "DHCP {:?} answered with {kind:?}", request.kind
            ),
            Err(err) => tracing::warn!(bridge = %bridge, mac = %mac, "DHCP reply failed: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_client_is_held_to_its_rate_and_others_still_get_answers() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(start, RateLimiter::DEFAULT_NETWORK_PER_SECOND);
        let admitted = (0..100)
            .filter(|_| limiter.admit("02:4e:42:00:00:01", start))
            .count();
        assert_eq!(admitted, RateLimiter::CLIENT_BURST as usize);
        assert_eq!(limiter.dropped, 100 - admitted as u64);
        // Another client is not starved by the first one's flood.
        assert!(limiter.admit("02:4e:42:00:00:02", start));
        // Tokens come back with time.
        assert!(limiter.admit("02:4e:42:00:00:01", start + Duration::from_secs(1)));
    }

    #[test]
    fn a_flood_of_made_up_macs_is_held_to_the_network_rate() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(start, RateLimiter::DEFAULT_NETWORK_PER_SECOND);
        let admitted = (0..10_000)
            .filter(|index| {
                limiter.admit(
                    &format!("02:00:00:00:{:02x}:{:02x}", index / 256, index % 256),
                    start,
                )
            })
            .count();
        assert_eq!(
            admitted,
            2 * RateLimiter::DEFAULT_NETWORK_PER_SECOND as usize
        );
        assert!(limiter.clients.len() <= RateLimiter::MAX_CLIENTS);
    }
}
