//! The VMM process's exit codes: how the agent learns why a VMM ended
//! when it is its child (otherwise the VMM's log tells).

/// A clean stop: the guest powered off or reset, or the host stopped it.
pub const EXIT_OK: i32 = 0;
/// Bad input or a VMM failure.
pub const EXIT_VMM_ERROR: i32 = 1;
/// The guest crashed the VM.
pub const EXIT_GUEST_CRASH: i32 = 2;
/// A VMM started to receive a live migration when none was handed over to
/// it: the guest never ran in this process, so whoever started it may
/// forget the copy.
pub const EXIT_NOT_RECEIVED: i32 = 3;
