//! The control socket's server side, an event-loop subscriber: accepts
//! clients, reads request lines, and answers through a [`VmControl`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::protocol::{
    encode_response, parse_request, ErrorCode, Request, Response, MAX_REQUEST_LEN,
};

/// What the server asks of the VM.
pub trait VmControl: Send + Sync {
    fn handle(&self, request: Request) -> Response;
}

struct Client {
    stream: UnixStream,
    pending: Vec<u8>,
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    clients: HashMap<RawFd, Client>,
    vm: Arc<dyn VmControl>,
}

/// The user ids allowed to drive the VM: root (the agent) and the VMM's
/// own user (in a jail, a user no other process has).
pub fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

/// Refuses a client whose credentials (SO_PEERCRED) are not allowed.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `credentials`,
    // which is a ucred on the stack, and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(format!(
            "cannot read its credentials: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    let own = unsafe { libc::geteuid() };
    if peer_allowed(credentials.uid, own) {
        Ok(())
    } else {
        Err(format!(
            "pid {} runs as uid {}, not root or {own}",
            credentials.pid, credentials.uid
        ))
    }
}

impl ControlServer {
    pub fn new(listener: UnixListener, path: PathBuf, vm: Arc<dyn VmControl>) -> Self {
        Self {
            listener,
            path,
            clients: HashMap::new(),
            vm,
        }
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(refused) = check_peer(&stream) {
                        log::warn!("control socket: refused a client: {refused}");
                        continue;
                    }
                    // Reads happen only when epoll reports data; writes of small
                    // answers may block briefly, which is fine.
                    if let Err(err) = stream.set_nonblocking(false) {
                        log::warn!("control socket: cannot configure a client: {err}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let events = Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP);
                    if let Err(err) = ops.add(events) {
                        log::warn!("control socket: cannot watch a client: {err:?}");
                        continue;
                    }
                    self.clients.insert(
                        fd,
                        Client {
                            stream,
                            pending: Vec::new(),
                        },
                    );
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    log::warn!(
                        "control socket {}: accept failed: {err}",
                        self.path.display()
                    );
                    break;
                }
            }
        }
    }

    fn drop_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(client) = self.clients.remove(&fd) {
            let _ = ops.remove(Events::empty(&client.stream));
        }
    }

    /// Reads what is available and answers every complete line. Returns
    /// false when the client must be dropped.
    fn serve(&mut self, fd: RawFd) -> bool {
        let Some(client) = self.clients.get_mut(&fd) else {
            return false;
        };
        let mut buf = [0u8; 4096];
        let read = match client.stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        client.pending.extend_from_slice(&buf[..read]);
        while let Some(newline) = client.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = client.pending.drain(..=newline).collect();
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let response = match parse_request(line) {
                Ok(request) => self.vm.handle(request),
                Err(response) => response,
            };
            if client
                .stream
                .write_all(&encode_response(&response))
                .is_err()
            {
                return false;
            }
        }
        if client.pending.len() > MAX_REQUEST_LEN {
            let response = Response::error(
                ErrorCode::BadRequest,
                format!("request line exceeds {MAX_REQUEST_LEN} bytes"),
            );
            let _ = client.stream.write_all(&encode_response(&response));
            return false;
        }
        true
    }
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!(
                "control socket {}: cannot watch it: {err:?}",
                self.path.display()
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_all(ops);
            return;
        }
        let readable = events.event_set().contains(EventSet::IN);
        if !readable || !self.serve(fd) {
            self.drop_client(fd, ops);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_and_the_vmms_own_user_may_connect() {
        assert!(peer_allowed(0, 900_001));
        assert!(peer_allowed(900_001, 900_001));
        assert!(!peer_allowed(900_002, 900_001));
        assert!(!peer_allowed(1000, 900_001));
        assert!(peer_allowed(0, 0));
    }

    #[test]
    fn a_peer_as_ourselves_is_accepted() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        assert!(check_peer(&ours).is_ok());
    }
}
