//! Termination signals and the events that end the VM, as one event-loop
//! subscriber. SIGTERM, SIGINT and SIGHUP are blocked and read from a
//! signalfd, so that they stop the VM cleanly from the event loop instead of
//! killing the process in the middle of a device access.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::exit::{ExitNotifier, ExitReason};

const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// A signalfd for the termination signals, which it blocks for the calling
/// thread (and the threads it spawns afterwards).
pub struct TerminationSignals {
    fd: File,
}

impl TerminationSignals {
    pub fn new() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame; the calls
        // only write into it, and the mask change affects only this thread.
        let fd = unsafe {
            libc::sigemptyset(&mut set);
            for signal in TERMINATION_SIGNALS {
                libc::sigaddset(&mut set, signal);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that only this File owns.
        let fd = unsafe { File::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// The next pending signal's number, if any.
    fn next(&mut self) -> Option<u32> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match self.fd.read(&mut info) {
            Ok(n) if n == info.len() => {
                Some(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]))
            }
            _ => None,
        }
    }
}

fn signal_name(signal: u32) -> String {
    match signal as libc::c_int {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}

/// Watches everything that ends the VM.
pub struct ExitWatcher {
    exit: Arc<ExitNotifier>,
    guest_reset: EventFd,
    guest_poweroff: EventFd,
    signals: TerminationSignals,
}

impl ExitWatcher {
    pub fn new(
        exit: Arc<ExitNotifier>,
        guest_reset: EventFd,
        guest_poweroff: EventFd,
        signals: TerminationSignals,
    ) -> Self {
        Self {
            exit,
            guest_reset,
            guest_poweroff,
            signals,
        }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for events in [
            Events::new(self.exit.event(), EventSet::IN),
            Events::new(&self.guest_reset, EventSet::IN),
            Events::new(&self.guest_poweroff, EventSet::IN),
            Events::new(&self.signals.fd, EventSet::IN),
        ] {
            if let Err(err) = ops.add(events) {
                self.exit.notify(ExitReason::VmmError(format!(
                    "cannot watch an exit event: {err:?}"
                )));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit.event().as_raw_fd() {
            let _ = self.exit.event().read();
        } else if fd == self.guest_reset.as_raw_fd() {
            let _ = self.guest_reset.read();
            self.exit.notify(ExitReason::GuestReset);
        } else if fd == self.guest_poweroff.as_raw_fd() {
            let _ = self.guest_poweroff.read();
            self.exit.notify(ExitReason::GuestShutdown);
        } else if fd == self.signals.fd.as_raw_fd() {
            while let Some(signal) = self.signals.next() {
                let name = signal_name(signal);
                log::info!("received {name}, stopping the VM");
                self.exit.notify(ExitReason::Stopped(name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(signal_name(libc::SIGTERM as u32), "SIGTERM");
        assert_eq!(signal_name(99), "signal 99");
    }
}
