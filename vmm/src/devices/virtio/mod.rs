//! virtio 1.x devices on the virtio-mmio transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] gives it
//! the register interface the guest driver talks to, and hands it its queues
//! once the driver has set them up (status DRIVER_OK). Queue notifications
//! arrive through ioeventfds (no exit to the VMM's vCPU thread per kick) and
//! interrupts leave through an irqfd.

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod queue_handler;
pub mod rng;
#[cfg(test)]
pub mod testing;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::legacy::IrqLine;
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::RateLimit;

/// Feature bit: the device speaks virtio 1.x (modern) only.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits written by the driver.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bit: a queue has new used buffers.
pub const INTERRUPT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// Errors in activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device expects {expected} queue(s), the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    #[error("the device's backend refused the setup: {0}")]
    Backend(String),
}

/// The interrupt line of one virtio-mmio device, with its status register.
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: IrqLine,
}

impl VirtioInterrupt {
    pub fn new(irq: IrqLine) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INTERRUPT_USED_RING, Ordering::SeqCst);
        if let Err(err) = self.irq.trigger() {
            log::error!("cannot raise a virtio interrupt: {err}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets status bits without raising the line (a restored device's
    /// pending interrupt status; the restored irqchip holds the line).
    pub fn raise_status(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver has finished setting it up.
pub struct Activation {
    pub memory: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub acked_features: u64,
}

impl Activation {
    /// The one queue of a single-queue device.
    pub fn single_queue(mut self) -> Result<(GuestMemoryMmap, Queue, u64), ActivateError> {
        if self.queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: self.queues.len(),
            });
        }
        let queue = self.queues.remove(0);
        Ok((self.memory, queue, self.acked_features))
    }
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device (driver reset); it may be activated again.
    fn reset(&mut self);
    /// The eventfds the guest kicks, one per queue.
    fn queue_events(&self) -> &[EventFd];
    /// The queues the device runs on, with their ring positions; empty
    /// before activation (a snapshot saves them).
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
    /// The device's own state for a snapshot: its
    /// [`Persist::save`](crate::persist::Persist::save), as the transport
    /// (which knows it only as a `dyn VirtioDevice`) saves it.
    fn save_state(&self) -> Result<persist::DeviceState, persist::DeviceStateError>;
    /// Takes on saved state, before its queues are handed back: its
    /// [`Persist::restore`](crate::persist::Persist::restore); refused when
    /// the state is another kind of device's or does not fit this device's
    /// backend.
    fn restore_state(
        &mut self,
        state: &persist::DeviceState,
    ) -> Result<(), persist::DeviceStateError>;
    /// Tells the network where the device now is (after a restore or a
    /// migration); nothing for devices that are not on a network.
    fn announce(&mut self) {}
    /// Starts (or stops) marking what the guest writes, for a disk that is
    /// being copied to another host; None for devices without a disk.
    fn track_writes(&mut self, _on: bool) -> Option<DiskCopySource> {
        None
    }
}

/// What copying a disk to another host needs: its file, its size, and the
/// tracker of what the guest writes meanwhile.
pub struct DiskCopySource {
    pub path: std::path::PathBuf,
    pub capacity: u64,
    pub tracker: std::sync::Arc<block::tracker::WriteTracker>,
}

/// A device whose I/O is rate limited, with limits the control socket can
/// change while the VM runs.
pub trait RateLimited: Send {
    fn rate_limit(&self) -> RateLimit;
    fn set_rate_limit(&mut self, limit: RateLimit);
    /// The device's I/O counters, by name, for the control socket's
    /// `status` (the agent exports them as metrics).
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// Reads `data.len()` bytes at `offset` from a configuration blob; bytes
/// past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(source) = config.get(start..) {
        let len = source.len().min(data.len());
        data[..len].copy_from_slice(&source[..len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut data = [9u8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acknowledged() {
        let irq = IrqLine::new().unwrap();
        let probe = irq.0.try_clone().unwrap();
        let interrupt = VirtioInterrupt::new(irq);
        interrupt.signal_used_queue();
        assert_eq!(interrupt.status(), INTERRUPT_USED_RING);
        assert_eq!(probe.read().unwrap(), 1);
        interrupt.acknowledge(INTERRUPT_USED_RING);
        assert_eq!(interrupt.status(), 0);
    }
}
