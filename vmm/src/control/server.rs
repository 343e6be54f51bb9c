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
