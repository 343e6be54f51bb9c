//! Console input: bytes from stdin (raw mode on a terminal) or from the
//! connected client of the serial socket, fed into the UART's receive FIFO
//! as fast as the guest drains it.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use crate::device_manager::SerialInput;
use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialDevice;

const STDIN_FD: RawFd = libc::STDIN_FILENO;

/// Puts stdin back into canonical mode when dropped.
pub struct TerminalGuard {
    raw: bool,
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if self.raw {
            let _ = io::stdin().lock().set_canon_mode();
        }
    }
}

/// Reads fd 0 directly: `std::io::Stdin` buffers, and bytes held in its
/// buffer would be invisible to epoll (and so never reach the guest).
fn read_stdin_unbuffered(buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
    let read = unsafe { libc::read(STDIN_FD, buf.as_mut_ptr().cast(), buf.len()) };
    if read < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(read as usize)
    }
}

fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    io::stdin().is_terminal()
}

pub struct SerialInputHandler {
    serial: Arc<Mutex<SerialDevice>>,
    input: SerialInput,
    ready: EventFd,
    /// The input source is not being watched because the FIFO is full.
    throttled: bool,
    stdin_raw: bool,
}

impl SerialInputHandler {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: SerialInput, ready: EventFd) -> Self {
        let mut stdin_raw = false;
        if matches!(input, SerialInput::Stdin) && stdin_is_terminal() {
            match io::stdin().lock().set_raw_mode() {
                Ok(()) => stdin_raw = true,
                Err(err) => log::warn!("cannot put the terminal in raw mode: {err}"),
            }
        }
        Self {
            serial,
            input,
            ready,
            throttled: false,
            stdin_raw,
        }
    }

    /// Restores the terminal when the VM ends.
    pub fn terminal_guard(&self) -> TerminalGuard {
        TerminalGuard {
            raw: self.stdin_raw,
        }
    }

    fn source_fd(&self) -> Option<RawFd> {
        match &self.input {
            SerialInput::Stdin => Some(STDIN_FD),
            SerialInput::Socket { client, .. } => lock(client).as_ref().map(|s| s.as_raw_fd()),
            SerialInput::None => None,
        }
    }

    fn watch_source(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.source_fd() {
            if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                // stdin redirected from a regular file cannot be polled: no input then.
                log::debug!("console input not watched: {err:?}");
            }
        }
    }

    fn unwatch_source(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.source_fd() {
            let _ = ops.remove(Events::empty_raw(fd));
        }
    }

    fn read_source(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.input {
            SerialInput::Stdin => read_stdin_unbuffered(buf),
            SerialInput::Socket { client, .. } => match lock(client).as_mut() {
                Some(stream) => stream.read(buf),
                None => Ok(0),
            },
            SerialInput::None => Ok(0),
        }
    }

    fn on_input(&mut self, ops: &mut EventOps) {
        let capacity = lock(&self.serial).input_capacity();
        if capacity == 0 {
            self.unwatch_source(ops);
            self.throttled = true;
            return;
        }
        let mut buf = vec![0u8; capacity];
        match self.read_source(&mut buf) {
            Ok(0) | Err(_) => {
                // End of input: stop watching (a socket client may reconnect).
                self.unwatch_source(ops);
                if let SerialInput::Socket { client, .. } = &self.input {
                    *lock(client) = None;
                }
            }
            Ok(n) => {
                if let Err(err) = lock(&self.serial).enqueue_input(&buf[..n]) {
                    log::warn!("cannot queue console input: {err}");
                }
            }
        }
    }

    fn on_fifo_drained(&mut self, ops: &mut EventOps) {
        let _ = self.ready.read();
        if self.throttled {
            self.throttled = false;
            self.watch_source(ops);
        }
    }

    fn accept(listener: &UnixListener, path: &Path) -> Option<UnixStream> {
        match listener.accept() {
            Ok((stream, _)) => Some(stream),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => None,
            Err(err) => {
                log::warn!("serial socket {}: accept failed: {err}", path.display());
                None
            }
        }
    }

    fn on_connect(&mut self, ops: &mut EventOps) {
        let SerialInput::Socket {
            listener,
            path,
            client,
        } = &self.input
        else {
            return;
        };
        let Some(stream) = Self::accept(listener, path) else {
            return;
        };
        // One client at a time: a new one replaces the old.
        if let Some(old) = lock(client).take() {
            let _ = ops.remove(Events::empty(&old));
        }
        *lock(client) = Some(stream);
        self.throttled = false;
        self.watch_source(ops);
    }
}

impl MutEventSubscriber for SerialInputHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.ready, EventSet::IN)) {
            log::warn!("console input readiness not watched: {err:?}");
        }
        if let SerialInput::Socket { listener, .. } = &self.input {
            if let Err(err) = ops.add(Events::new(listener, EventSet::IN)) {
                log::warn!("serial socket not watched: {err:?}");
            }
        }
        self.watch_source(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.ready.as_raw_fd() {
            self.on_fifo_drained(ops);
            return;
        }
        if let SerialInput::Socket { listener, .. } = &self.input {
            if fd == listener.as_raw_fd() {
                self.on_connect(ops);
                return;
            }
        }
        if Some(fd) == self.source_fd() {
            self.on_input(ops);
        }
    }
}
