//! The process's exit status for why the VM stopped. The reasons and their
//! notifier are in [`crate::vstate::exit`], below the vCPUs that report
//! them.

/// The process exit statuses (clean stop, VMM error, guest crash, a
/// migration in that was not received): the agent reads them.
pub use nubis_contract::exit::{EXIT_GUEST_CRASH, EXIT_NOT_RECEIVED, EXIT_OK, EXIT_VMM_ERROR};

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
