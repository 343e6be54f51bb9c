//! Emulated hardware: the buses that route port and MMIO accesses from the
//! vCPUs, and the legacy devices every microVM has.

pub mod bus;
pub mod legacy;
pub mod virtio;

use std::os::fd::AsRawFd;

use vmm_sys_util::timerfd::TimerFd;

/// A timer for the event loop: non-blocking, so that reading it after a
/// spurious wake-up returns at once instead of stalling every device.
pub fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(std::io::Error::from)?;
    // SAFETY: F_SETFL on a descriptor this function owns; no memory is
    // passed and the result is checked.
    let ret = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timer)
}
