//! The VM's devices, owned in one place: the port I/O and MMIO buses the
//! vCPUs route their exits to, the virtio-mmio slots (each device's
//! window, IRQ, ioeventfds and `virtio_mmio.device=` argument), and the
//! legacy PC devices. The builder makes a `DeviceManager` the same way for
//! a boot and for a restore; a restore then puts the saved state into it
//! ([`persist`]), so that both paths attach the same devices in the same
//! slots.

pub mod legacy;
pub mod persist;
pub mod virtio;

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;

use crate::config::{ConfigError, RandomError, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::console::ConsoleBackendError;
use crate::devices::virtio::net::{NetError, TapError};
use crate::devices::virtio::RateLimited;
use crate::memory::GuestMemoryMmap;
use crate::vstate::vm::{Vm, VmError};
pub use legacy::{LegacyDevices, SerialInput};
pub use persist::{DevicesState, DevicesStateError, HeldDevices, StatefulDevices};
pub use virtio::VirtioDevices;

/// Errors in making the VM's devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::device::VsockError),
    #[error("NIC {id}: {source}")]
    Tap { id: String, source: TapError },
    #[error("NIC {id}: no MAC given and no random one to make: {source}")]
    RandomMac { id: String, source: RandomError },
    #[error("{id}: {source}")]
    Console {
        id: String,
        source: ConsoleBackendError,
    },
    #[error("cannot register the queue notification of virtio device {index}: {source}")]
    Ioeventfd {
        index: usize,
        source: kvm_ioctls::Error,
    },
    #[error("no MMIO slot or IRQ left for virtio device {0}")]
    NoDeviceSlot(usize),
    #[error("cannot place a device on its bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {purpose} socket {path}: {source}")]
    Listen {
        purpose: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Every device of a VM, on its buses.
pub struct DeviceManager {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    /// The kernel command line with a `virtio_mmio.device=` per device.
    pub cmdline: String,
    /// The event-loop subscribers of the virtio devices.
    pub device_handlers: Vec<Arc<Mutex<dyn MutEventSubscriber>>>,
    /// The rate-limited devices by id, for the control socket.
    pub rate_limited: Vec<(String, Arc<Mutex<dyn RateLimited>>)>,
    pub legacy: LegacyDevices,
    /// What a snapshot saves of the devices.
    pub stateful: StatefulDevices,
}

impl DeviceManager {
    /// Makes `config`'s devices for `vm`: the virtio devices in slot order
    /// (disks, NICs, the entropy device, the console ports), then the
    /// legacy ones.
    pub fn new(config: &VmConfig, vm: &Vm, memory: &GuestMemoryMmap) -> Result<Self, DeviceError> {
        let mut mmio_bus = Bus::new();
        let VirtioDevices {
            cmdline,
            transports,
            device_handlers,
            rate_limited,
        } = virtio::attach_all(config, vm, memory, &mut mmio_bus)?;
        let mut io_bus = Bus::new();
        let legacy = LegacyDevices::new(&config.serial, vm, &mut io_bus, &mut mmio_bus)?;
        let stateful = StatefulDevices::new(
            transports,
            legacy.serial.clone(),
            legacy.i8042.clone(),
            legacy.acpi_pm.clone(),
        );
        Ok(Self {
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            cmdline,
            device_handlers,
            rate_limited,
            legacy,
            stateful,
        })
    }
}
