//! The process's exit status for why the VM stopped. The reasons and their
//! notifier are in [`crate::vstate::exit`], below the vCPUs that report
//! them.

/// The process exit status for a clean stop.
pub const EXIT_OK: i32 = 0;
/// The process exit status for bad input or a VMM failure.
pub const EXIT_VMM_ERROR: i32 = 1;
/// The process exit status when the guest crashed the VM.
pub const EXIT_GUEST_CRASH: i32 = 2;
/// The process exit status of a VMM started to receive a live migration
/// when none was handed over to it: the guest never ran in this process,
/// so whoever started it may forget the copy (the agent must match it:
/// `host-agent/src/supervisor/process.rs`).
pub const EXIT_NOT_RECEIVED: i32 = 3;

pub use crate::vstate::exit::{ExitNotifier, ExitReason};

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::GuestReset | Self::GuestShutdown | Self::Stopped(_) => EXIT_OK,
            Self::GuestCrash(_) => EXIT_GUEST_CRASH,
            Self::VmmError(_) => EXIT_VMM_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
