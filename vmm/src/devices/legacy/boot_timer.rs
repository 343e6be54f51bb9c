//! The boot timer: one MMIO page the guest's init writes when user space
//! starts (`devmem 0xc0000000 8 123`). The VMM logs the time since its own
//! process started, which is the boot time a user of the VM experiences.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::logger::since_process_start;

/// The value the guest writes to mark "user space started".
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// Stored in [`BootTimer::boot_time`] until the guest writes the marker.
pub const NOT_BOOTED: u64 = u64::MAX;

pub struct BootTimer {
    boot_time_us: Arc<AtomicU64>,
}

impl BootTimer {
    pub fn new() -> Self {
        Self {
            boot_time_us: Arc::new(AtomicU64::new(NOT_BOOTED)),
        }
    }

    /// Microseconds from process start to the first marker, or [`NOT_BOOTED`].
    pub fn boot_time(&self) -> Arc<AtomicU64> {
        self.boot_time_us.clone()
    }
}

impl Default for BootTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let elapsed = since_process_start();
        let micros = elapsed.as_micros() as u64;
        let first = self
            .boot_time_us
            .compare_exchange(NOT_BOOTED, micros, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if first {
            log::info!(
                "Guest-boot-time = {:>8} us {} ms",
                micros,
                elapsed.as_millis()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_magic_at_offset_zero_once() {
        let mut timer = BootTimer::new();
        let time = timer.boot_time();
        timer.write(4, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[1]);
        timer.write(0, &[]);
        assert_eq!(time.load(Ordering::SeqCst), NOT_BOOTED);
        timer.write(0, &[BOOT_TIMER_MAGIC, 0, 0, 0, 0, 0, 0, 0]);
        let first = time.load(Ordering::SeqCst);
        assert_ne!(first, NOT_BOOTED);
        std::thread::sleep(std::time::Duration::from_millis(2));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(time.load(Ordering::SeqCst), first);
    }
}
