//! Why the VM stopped, and how the first reason reaches the event loop.
//!
//! Any thread (a vCPU on a guest reset or crash, the i8042 on a reset, the
//! control socket on `stop`, the signal handler on SIGTERM) may end the VM.
//! The first reason recorded wins; the eventfd wakes the event loop, which
//! then stops every vCPU and returns the reason to `main`.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;

/// The process exit statuses (clean stop, VMM error, guest crash, a
/// migration in that was not received): the agent reads them.
pub use nubis_contract::exit::{EXIT_GUEST_CRASH, EXIT_NOT_RECEIVED, EXIT_OK, EXIT_VMM_ERROR};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (reboot, or Ctrl-Alt-Del handled by the kernel).
    GuestReset,
    /// The guest powered off.
    GuestShutdown,
    /// The host asked: a control-socket `stop` or a signal.
    Stopped(String),
    /// The guest made the VM unusable: triple fault, emulation failure, ...
    GuestCrash(String),
    /// The VMM itself failed while running.
    VmmError(String),
}

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::GuestReset | Self::GuestShutdown | Self::Stopped(_) => EXIT_OK,
            Self::GuestCrash(_) => EXIT_GUEST_CRASH,
            Self::VmmError(_) => EXIT_VMM_ERROR,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::GuestReset => "the guest reset the VM".to_string(),
            Self::GuestShutdown => "the guest powered the VM off".to_string(),
            Self::Stopped(by) => format!("stopped by {by}"),
            Self::GuestCrash(what) => format!("guest crash: {what}"),
            Self::VmmError(what) => format!("VMM error: {what}"),
        }
    }
}

/// Records the first exit reason and wakes the event loop.
pub struct ExitNotifier {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` unless one is recorded already, and wakes the loop.
    pub fn notify(&self, reason: ExitReason) {
        {
            let mut current = lock(&self.reason);
            if current.is_none() {
                *current = Some(reason);
            }
        }
        if let Err(err) = self.evt.write(1) {
            log::error!("cannot wake the event loop to stop the VM: {err}");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let notifier = ExitNotifier::new().unwrap();
        assert_eq!(notifier.reason(), None);
        notifier.notify(ExitReason::GuestReset);
        notifier.notify(ExitReason::GuestCrash("x".into()));
        assert_eq!(notifier.reason(), Some(ExitReason::GuestReset));
        assert_eq!(notifier.event().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::GuestShutdown.exit_code(), 0);
        assert_eq!(ExitReason::Stopped("SIGTERM".into()).exit_code(), 0);
        assert_eq!(ExitReason::GuestCrash("triple fault".into()).exit_code(), 2);
        assert_eq!(ExitReason::VmmError("epoll".into()).exit_code(), 1);
        assert!(ExitReason::GuestCrash("triple fault".into())
            .describe()
            .contains("triple fault"));
    }
}
