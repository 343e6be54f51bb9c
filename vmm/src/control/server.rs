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

/// Clients connected at once, at most: each holds a descriptor and up to
/// [`MAX_REQUEST_LEN`] bytes of a request.
const MAX_CLIENTS: usize = 64;
/// How long an answer may wait for a client that does not read: the event
/// loop must not hang on it.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Bytes read from a client per readiness event.
const READ_CHUNK: usize = 4096;

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
                    if self.clients.len() >= MAX_CLIENTS {
                        log::warn!("control socket: refused a client: {MAX_CLIENTS} are connected");
                        continue;
                    }
                    // Reads happen only when epoll reports data; writes of small
                    // answers may block briefly, and a client that reads none
                    // is dropped after a while.
                    if let Err(err) = stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_write_timeout(Some(ANSWER_TIMEOUT)))
                    {
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
        let mut buf = [0u8; READ_CHUNK];
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

    struct Answers;

    impl VmControl for Answers {
        fn handle(&self, _request: Request) -> Response {
            Response::ok()
        }
    }

    /// A server with one client connected through a socket pair; returns
    /// the server, the client's descriptor there and the client's end.
    fn server_with_client(name: &str) -> (ControlServer, RawFd, UnixStream, PathBuf) {
        let path =
            std::env::temp_dir().join(format!("nubis-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let mut server = ControlServer::new(listener, path.clone(), Arc::new(Answers));
        let (ours, theirs) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        server.clients.insert(
            fd,
            Client {
                stream: ours,
                pending: Vec::new(),
            },
        );
        (server, fd, theirs, path)
    }

    #[test]
    fn requests_are_answered_line_by_line() {
        let (mut server, fd, mut theirs, _path) = server_with_client("lines");
        theirs
            .write_all(b"{\"command\":\"status\"}\n\n{\"command\":\"bogus\"}\n{\"comm")
            .unwrap();
        assert!(server.serve(fd));
        let mut answers = [0u8; 256];
        let got = theirs.read(&mut answers).unwrap();
        let text = String::from_utf8_lossy(&answers[..got]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("\"ok\":true"), "{text}");
        assert!(lines[1].contains("bad_request"), "{text}");
        assert_eq!(server.clients[&fd].pending, b"{\"comm");
    }

    #[test]
    fn an_endless_line_is_refused_and_the_client_dropped() {
        let (mut server, fd, mut theirs, _path) = server_with_client("endless");
        let chunk = [b' '; READ_CHUNK];
        let mut rounds = 0;
        loop {
            theirs.write_all(&chunk).unwrap();
            rounds += 1;
            if !server.serve(fd) {
                break;
            }
            assert!(server.clients[&fd].pending.len() <= MAX_REQUEST_LEN);
            assert!(rounds <= MAX_REQUEST_LEN / READ_CHUNK + 1, "never refused");
        }
        assert_eq!(rounds, MAX_REQUEST_LEN / READ_CHUNK + 1);
        theirs
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&theirs), &mut answer).unwrap();
        assert!(answer.contains("bad_request"), "{answer}");
        assert!(answer.contains("exceeds"), "{answer}");
    }

    #[test]
    fn a_peer_as_ourselves_is_accepted() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        assert!(check_peer(&ours).is_ok());
    }
}
