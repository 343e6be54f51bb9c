//! The host side of virtio-vsock: Unix sockets, in the convention
//! Firecracker users know.
//!
//! - Host to guest: a host process connects to the device's socket and
//!   writes `CONNECT <port>\n`; once the guest accepts on that vsock port,
//!   it reads `OK <host port>\n`, then the stream is the connection.
//! - Guest to host: a guest connection to host (CID 2) port P is made to
//!   the Unix socket `<socket>_P`, if a host process listens there.
//!
//! The muxer owns an epoll descriptor that holds its listener, the
//! accepted sockets still saying which port they want, every connection's
//! socket and a timer; the VMM's event loop watches that one descriptor.
//! Everything is bounded: connections ([`MAX_CONNECTIONS`]), each one's
//! buffer, the `CONNECT` line, the time a host waits for the guest, and
//! the resets owed to the guest for packets that matched nothing.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Key};
use super::packet::{Header, Op, Packet, HOST_CID, TYPE_STREAM};

/// Connections and accepted sockets at once, at most.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a host process may take to say `CONNECT <port>`, and the guest
/// to accept it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Resets owed to the guest for packets of no connection, at most; more
/// are dropped (a guest that floods gets fewer answers, not more memory).
const MAX_PENDING_RESETS: usize = 64;
/// Host ports handed to host-initiated connections start here (guest
/// listeners see them as the peer's port).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const LISTENER: u64 = u64::MAX;
const TIMER: u64 = u64::MAX - 1;

/// Why the host side of the device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("cannot remove the stale vsock socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket: refused")]
    NotASocket { path: PathBuf },
    #[error("cannot listen on the vsock socket {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the vsock event descriptors: {0}")]
    Epoll(std::io::Error),
}

/// A host process that connected and has not finished its `CONNECT` line.
#[derive(Debug)]
struct Accepted {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// The Unix-socket side of the device.
pub struct Muxer {
    guest_cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    accepted: HashMap<RawFd, Accepted>,
    connections: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    rx_queue: VecDeque<Key>,
    resets: VecDeque<Header>,
    next_local_port: u32,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("guest_cid", &self.guest_cid)
            .field("socket", &self.socket)
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

/// Removes `path` if it is a socket (a previous VMM's); anything else
/// there is refused.
fn remove_stale_socket(path: &Path) -> Result<(), MuxerError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| MuxerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(MuxerError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MuxerError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Connects to the Unix socket at `path` without blocking: a listener
/// whose queue is full refuses, rather than stalling the event loop.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= address.sun_path.len() {
        return Err(ErrorKind::InvalidInput.into());
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: creates a descriptor; no memory is passed; checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `address` is a valid sockaddr_un whose size is passed.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(address).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// The port of a `CONNECT <port>` line (without its newline).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl Muxer {
    /// Listens on `socket` for host processes (a stale socket there is
    /// replaced); the guest's context id is `guest_cid`.
    pub fn new(guest_cid: u64, socket: &Path) -> Result<Self, MuxerError> {
        remove_stale_socket(socket)?;
        let listener = UnixListener::bind(socket).map_err(|source| MuxerError::Listen {
            path: socket.to_path_buf(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| MuxerError::Listen {
                path: socket.to_path_buf(),
                source,
            })?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let timer = crate::devices::nonblocking_timer().map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Self {
            guest_cid,
            socket: socket.to_path_buf(),
            listener,
            epoll,
            timer,
            timer_armed: false,
            accepted: HashMap::new(),
            connections: HashMap::new(),
            by_fd: HashMap::new(),
            rx_queue: VecDeque::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// The descriptor the event loop watches: readable when any of the
    /// muxer's sockets or its timer is.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The guest's context id changed (a restore into a VM configured
    /// with another): connections were reset with the transport anyway.
    pub fn set_guest_cid(&mut self, guest_cid: u64) {
        self.guest_cid = guest_cid;
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Drops every connection and waiting host process (the driver reset
    /// the device, or the transport was reset after a restore).
    pub fn reset(&mut self) {
        for (fd, _) in self.accepted.drain() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        for (_, connection) in self.connections.drain() {
            if connection.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    connection.fd(),
                    EpollEvent::default(),
                );
            }
        }
        self.by_fd.clear();
        self.rx_queue.clear();
        self.resets.clear();
    }

    /// Serves what is ready on the muxer's descriptors, without waiting.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        // Bounded: a host that keeps sockets busy cannot hold the event
        // loop here; what is left is reported again.
        for _ in 0..8 {
            let ready = match self.epoll.wait(0, &mut events) {
                Ok(ready) => ready,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::warn!("vsock: cannot poll the host sockets: {err}");
                    return;
                }
            };
            if ready == 0 {
                break;
            }
            // Served at once: what these events start (an accepted
            // socket's first line) is often ready in the next round.
            for event in &events[..ready] {
                self.on_event(event.data(), event.event_set());
            }
        }
        self.sweep(Instant::now());
    }

    fn on_event(&mut self, data: u64, events: EventSet) {
        match data {
            LISTENER => self.accept_all(),
            TIMER => {
                let _ = self.timer.wait();
                self.timer_armed = false;
            }
            fd => {
                let Ok(fd) = RawFd::try_from(fd) else {
                    return;
                };
                if self.accepted.contains_key(&fd) {
                    self.read_connect_line(fd);
                } else if let Some(key) = self.by_fd.get(&fd).copied() {
                    if let Some(connection) = self.connections.get_mut(&key) {
                        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                            connection.on_hang_up();
                        } else {
                            if events.contains(EventSet::IN) {
                                connection.on_readable();
                            }
                            if events.contains(EventSet::OUT) {
                                connection.on_writable();
                            }
                        }
                    }
                    self.refresh(key);
                }
            }
        }
    }

    fn in_use(&self) -> usize {
        self.accepted.len() + self.connections.len()
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::warn!("vsock: cannot accept on {}: {err}", self.socket.display());
                    return;
                }
            };
            if self.in_use() >= MAX_CONNECTIONS {
                log::warn!(
                    "vsock: {MAX_CONNECTIONS} connections already: a host connection is refused"
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .is_err()
            {
                continue;
            }
            self.accepted.insert(
                fd,
                Accepted {
                    stream,
                    line: Vec::new(),
                    since: Instant::now(),
                },
            );
        }
        // Unreachable: the loop returns.
    }

    /// Reads the `CONNECT` line a byte at a time (what follows it is the
    /// connection's data, for the guest).
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(accepted) = self.accepted.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match accepted.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&accepted.line),
                Ok(_) if accepted.line.len() >= MAX_CONNECT_LINE => break None,
                Ok(_) => accepted.line.push(byte[0]),
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(accepted) = self.accepted.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(port) = port else {
            log::debug!("vsock: a host connection did not start with CONNECT <port>: closed");
            return;
        };
        let Some(local_port) = self.free_local_port(port) else {
            return;
        };
        let key = Key {
            local_port,
            peer_port: port,
        };
        self.connections
            .insert(key, Connection::from_host(accepted.stream, key));
        self.refresh(key);
    }

    /// The next host port no connection to guest port `peer_port` uses.
    fn free_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(next) if next < u32::MAX => next,
                _ => FIRST_LOCAL_PORT,
            };
            let key = Key {
                local_port: port,
                peer_port,
            };
            if !self.connections.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// Brings `key`'s registration and queueing in line with its state;
    /// drops it when it is finished.
    fn refresh(&mut self, key: Key) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        let fd = connection.fd();
        if connection.is_finished() {
            if connection.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.connections.remove(&key);
            self.by_fd.remove(&fd);
            return;
        }
        let wanted = (!connection.is_hung_up()).then(|| connection.interest());
        if wanted != connection.registered {
            let result = match (connection.registered, wanted) {
                (None, Some(events)) => self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(events, fd as u64),
                ),
                (Some(_), Some(events)) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(events, fd as u64),
                ),
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => {
                    connection.registered = wanted;
                    self.by_fd.insert(fd, key);
                }
                Err(err) => {
                    log::warn!("vsock: cannot watch a host socket: {err}");
                    connection.kill();
                }
            }
        }
        if connection.has_rx() && !connection.queued {
            connection.queued = true;
            self.rx_queue.push_back(key);
        }
    }

    /// Times out host processes that did not say what they want and
    /// connections the guest did not answer; keeps the timer armed while
    /// any are waiting.
    fn sweep(&mut self, now: Instant) {
        let late: Vec<RawFd> = self
            .accepted
            .iter()
            .filter(|(_, accepted)| now.duration_since(accepted.since) >= CONNECT_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            self.accepted.remove(&fd);
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        let unanswered: Vec<Key> = self
            .connections
            .values()
            .filter(|connection| {
                connection
                    .awaiting_guest_since()
                    .is_some_and(|since| now.duration_since(since) >= CONNECT_TIMEOUT)
            })
            .map(Connection::key)
            .collect();
        for key in unanswered {
            log::debug!(
                "vsock: the guest did not answer on port {} within {CONNECT_TIMEOUT:?}",
                key.peer_port
            );
            if let Some(connection) = self.connections.get_mut(&key) {
                connection.kill();
            }
            self.refresh(key);
        }
        let waiting = !self.accepted.is_empty()
            || self
                .connections
                .values()
                .any(|connection| connection.awaiting_guest_since().is_some());
        // (A request not yet delivered is not timed: the guest is not
        // taking packets, and the host may give up by closing.)
        if waiting && !self.timer_armed {
            let tick = CONNECT_TIMEOUT / 4;
            self.timer_armed = self.timer.reset(tick, Some(tick)).is_ok();
        } else if !waiting && self.timer_armed {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    /// A reset for the guest, answering a packet that belongs to nothing.
    fn reset_reply(&mut self, to: &Header) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            return;
        }
        self.resets.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            kind: TYPE_STREAM,
            op: Op::Rst.code(),
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// A packet the guest sent.
    pub fn send(&mut self, packet: Packet) {
        let header = packet.header;
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            log::debug!(
                "vsock: packet from CID {} to CID {} dropped (the guest is {}, the host {HOST_CID})",
                header.src_cid,
                header.dst_cid,
                self.guest_cid
            );
            return;
        }
        let is_reset = header.op() == Some(Op::Rst);
        if header.kind != TYPE_STREAM {
            if !is_reset {
                self.reset_reply(&header);
            }
            return;
        }
        let key = Key::of_guest_packet(&header);
        if let Some(connection) = self.connections.get_mut(&key) {
            connection.on_guest_packet(&packet);
            self.refresh(key);
            return;
        }
        match header.op() {
            Some(Op::Request) => self.connect_to_host(&header),
            Some(Op::Rst) => {}
            _ => self.reset_reply(&header),
        }
    }

    /// The guest connects to host port `dst_port`: to `<socket>_<port>`.
    fn connect_to_host(&mut self, request: &Header) {
        if self.in_use() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections already: the guest's is refused");
            return self.reset_reply(request);
        }
        let mut path = self.socket.clone().into_os_string();
        path.push(format!("_{}", request.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let connection = Connection::from_guest(stream, request);
                let key = connection.key();
                self.connections.insert(key, connection);
                self.refresh(key);
            }
            Err(err) => {
                log::debug!(
                    "vsock: guest connection to host port {} refused: {err}",
                    request.dst_port
                );
                self.reset_reply(request);
            }
        }
    }

    /// Whether there may be a packet for the guest.
    pub fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest, with at most `max_payload` bytes of
    /// data.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<Packet> {
        if let Some(header) = self.resets.pop_front() {
            return Some(Packet {
                header,
                payload: Vec::new(),
            });
        }
        for _ in 0..self.rx_queue.len() {
            let key = self.rx_queue.pop_front()?;
            let packet = self.connections.get_mut(&key).and_then(|connection| {
                connection.queued = false;
                connection.next_rx(self.guest_cid, max_payload)
            });
            self.refresh(key);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use vmm_sys_util::tempdir::TempDir;

    use super::super::connection::BUF_ALLOC;
    use super::super::packet::shutdown;

    const GUEST_CID: u64 = 3;

    struct Fixture {
        _dir: TempDir,
        socket: PathBuf,
        muxer: Muxer,
    }

    fn fixture() -> Fixture {
        let dir = TempDir::new_with_prefix("/tmp/nubis-vsock-").unwrap();
        let socket = dir.as_path().join("v.sock");
        let muxer = Muxer::new(GUEST_CID, &socket).unwrap();
        Fixture {
            _dir: dir,
            socket,
            muxer,
        }
    }

    fn from_guest(op: Op, src_port: u32, dst_port: u32, payload: &[u8]) -> Packet {
        Packet {
            header: Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: payload.len() as u32,
                kind: TYPE_STREAM,
                op: op.code(),
                flags: 0,
                buf_alloc: 1 << 20,
                fwd_cnt: 0,
            },
            payload: payload.to_vec(),
        }
    }

    /// Serves events until `done` holds (at most 2 s).
    fn pump(muxer: &mut Muxer, mut done: impl FnMut(&mut Muxer) -> bool) {
        let start = Instant::now();
        while !done(muxer) {
            assert!(start.elapsed() < Duration::from_secs(2), "nothing happened");
            std::thread::sleep(Duration::from_millis(5));
            muxer.process_events();
        }
    }

    fn next(muxer: &mut Muxer) -> Packet {
        let mut packet = None;
        pump(muxer, |muxer| {
            packet = muxer.next_rx(4096);
            packet.is_some()
        });
        packet.unwrap()
    }

    #[test]
    fn a_host_process_connects_to_a_guest_port() {
        let mut f = fixture();
        let mut host = UnixStream::connect(&f.socket).unwrap();
        host.write_all(b"CONNECT 52\nhello").unwrap();
        let request = next(&mut f.muxer);
        assert_eq!(request.header.op(), Some(Op::Request));
        assert_eq!(request.header.dst_port, 52);
        assert_eq!(request.header.dst_cid, GUEST_CID);
        let local = request.header.src_port;
        assert!(local >= FIRST_LOCAL_PORT);
        f.muxer.send(from_guest(Op::Response, 52, local, b""));
        let mut line = String::new();
        let mut byte = [0u8; 1];
        while !line.ends_with('\n') {
            host.read_exact(&mut byte).unwrap();
            line.push(byte[0] as char);
        }
        assert_eq!(line, format!("OK {local}\n"));
        // What the host wrote after its CONNECT line is the guest's.
        let data = next(&mut f.muxer);
        assert_eq!(data.header.op(), Some(Op::Rw));
        assert_eq!(data.payload, b"hello");
        f.muxer.send(from_guest(Op::Rw, 52, local, b"world"));
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"world");
    }

    #[test]
    fn bad_connect_lines_are_closed() {
        let lines: [&[u8]; 5] = [
            b"CONNECT\n",
            b"CONNECT x\n",
            b"HELLO 52\n",
            b"CONNECT 99999999999\n",
            &[b'C'; 40],
        ];
        for line in lines {
            let mut f = fixture();
            let mut host = UnixStream::connect(&f.socket).unwrap();
            host.write_all(line).unwrap();
            host.set_read_timeout(Some(Duration::from_millis(10)))
                .unwrap();
            pump(&mut f.muxer, |_| matches!(host.read(&mut [0u8; 1]), Ok(0)));
            assert_eq!(f.muxer.in_use(), 0, "{line:?}");
            assert!(!f.muxer.has_rx(), "{line:?}");
        }
    }

    #[test]
    fn a_silent_host_or_guest_times_out() {
        let mut f = fixture();
        let _silent = UnixStream::connect(&f.socket).unwrap();
        pump(&mut f.muxer, |muxer| muxer.accepted.len() == 1);
        std::thread::sleep(CONNECT_TIMEOUT);
        pump(&mut f.muxer, |muxer| muxer.accepted.is_empty());

        let mut host = UnixStream::connect(&f.socket).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let request = next(&mut f.muxer);
        assert_eq!(request.header.op(), Some(Op::Request));
        std::thread::sleep(CONNECT_TIMEOUT);
        let reset = next(&mut f.muxer);
        assert_eq!(reset.header.op(), Some(Op::Rst));
        assert_eq!(f.muxer.connection_count(), 0);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed without an OK");
    }

    #[test]
    fn the_guest_connects_to_a_host_listener() {
        let mut f = fixture();
        let mut path = f.socket.clone().into_os_string();
        path.push("_1234");
        let listener = UnixListener::bind(&path).unwrap();
        f.muxer.send(from_guest(Op::Request, 7000, 1234, b""));
        let (mut host, _) = listener.accept().unwrap();
        let response = next(&mut f.muxer);
        assert_eq!(response.header.op(), Some(Op::Response));
        assert_eq!(
            (response.header.src_port, response.header.dst_port),
            (1234, 7000)
        );
        f.muxer.send(from_guest(Op::Rw, 7000, 1234, b"ping"));
        let mut got = [0u8; 4];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        host.write_all(b"pong").unwrap();
        let reply = next(&mut f.muxer);
        assert_eq!(reply.payload, b"pong");
        // The guest closes; the host sees the end after the data.
        let mut close = from_guest(Op::Shutdown, 7000, 1234, b"");
        close.header.flags = shutdown::SEND | shutdown::RCV;
        f.muxer.send(close);
        let reset = next(&mut f.muxer);
        assert_eq!(reset.header.op(), Some(Op::Rst));
        assert_eq!(f.muxer.connection_count(), 0);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn packets_of_no_connection_are_reset_and_bounded() {
        let mut f = fixture();
        // Nobody listens on host port 99.
        f.muxer.send(from_guest(Op::Request, 7000, 99, b""));
        let reset = f.muxer.next_rx(4096).unwrap();
        assert_eq!(reset.header.op(), Some(Op::Rst));
        assert_eq!((reset.header.src_port, reset.header.dst_port), (99, 7000));
        // A reset to a reset would loop: none is sent.
        f.muxer.send(from_guest(Op::Rst, 7000, 99, b""));
        assert!(f.muxer.next_rx(4096).is_none());
        // Another CID's or another type's packets.
        let mut spoofed = from_guest(Op::Rw, 7000, 99, b"x");
        spoofed.header.src_cid = 42;
        f.muxer.send(spoofed);
        assert!(
            f.muxer.next_rx(4096).is_none(),
            "a spoofed source is dropped"
        );
        let mut seqpacket = from_guest(Op::Request, 7000, 99, b"");
        seqpacket.header.kind = 2;
        f.muxer.send(seqpacket);
        assert_eq!(f.muxer.next_rx(4096).unwrap().header.op(), Some(Op::Rst));
        for port in 0..1000 {
            f.muxer.send(from_guest(Op::Rw, port, 99, b"x"));
        }
        assert_eq!(f.muxer.resets.len(), MAX_PENDING_RESETS);
    }

    #[test]
    fn connections_are_bounded() {
        let mut f = fixture();
        let mut path = f.socket.clone().into_os_string();
        path.push("_5");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut accepted = Vec::new();
        for port in 0..(MAX_CONNECTIONS as u32 + 10) {
            f.muxer.send(from_guest(Op::Request, port, 5, b""));
            while let Ok((stream, _)) = listener.accept() {
                accepted.push(stream);
            }
        }
        assert_eq!(f.muxer.connection_count(), MAX_CONNECTIONS);
        let mut resets = 0;
        while let Some(packet) = f.muxer.next_rx(4096) {
            if packet.header.op() == Some(Op::Rst) {
                resets += 1;
            }
        }
        assert_eq!(resets, 10);
        f.muxer.reset();
        assert_eq!(f.muxer.connection_count(), 0);
    }

    #[test]
    fn a_guest_that_ignores_credit_is_reset_not_buffered() {
        let mut f = fixture();
        let mut path = f.socket.clone().into_os_string();
        path.push("_6");
        let listener = UnixListener::bind(&path).unwrap();
        f.muxer.send(from_guest(Op::Request, 1, 6, b""));
        let (_host, _) = listener.accept().unwrap();
        assert_eq!(next(&mut f.muxer).header.op(), Some(Op::Response));
        let chunk = vec![0u8; 32 * 1024];
        // The host never reads: its socket buffer and then ours fill.
        let mut sent = 0usize;
        while f.muxer.connection_count() == 1 && sent < 64 << 20 {
            f.muxer.send(from_guest(Op::Rw, 1, 6, &chunk));
            sent += chunk.len();
            if f.muxer.has_rx() {
                if let Some(packet) = f.muxer.next_rx(4096) {
                    if packet.header.op() == Some(Op::Rst) {
                        break;
                    }
                }
            }
        }
        assert!(
            sent < 64 << 20,
            "never reset after {sent} bytes (buffer {BUF_ALLOC})"
        );
    }

    #[test]
    fn a_stale_socket_is_replaced_and_other_files_refused() {
        let dir = TempDir::new_with_prefix("/tmp/nubis-vsock-").unwrap();
        let socket = dir.as_path().join("v.sock");
        drop(Muxer::new(GUEST_CID, &socket).unwrap());
        Muxer::new(GUEST_CID, &socket).unwrap();
        let file = dir.as_path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Muxer::new(GUEST_CID, &file),
            Err(MuxerError::NotASocket { .. })
        ));
    }

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT -1",
            b"CONNECT +5",
            b"connect 5",
            b"CONNECT  5",
            b"CONNECT",
            b"\xff",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }
}
