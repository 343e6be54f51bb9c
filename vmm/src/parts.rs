//! The pieces of a running VM that a snapshot or a migration takes its
//! state from, and the discipline for taking it: vCPUs paused, every
//! device held (transport, then device: the order vCPU exits lock them in)
//! so that the event loop cannot serve a queue halfway through.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::devices::bus::lock;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::VirtioDevice;
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;
use crate::runtime::exit::ExitNotifier;
use crate::snapshot::state::{MachineShape, VmSnapshot};
use crate::vstate::vcpu::RunControl;
use crate::vstate::vm::Vm;

/// How long vCPUs get to save their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct VmParts {
    pub vm: Arc<Vm>,
    pub memory: GuestMemoryMmap,
    /// The memfd behind `memory`: which pages exist at all.
    pub memfd: std::fs::File,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub control: Arc<RunControl>,
    pub exit: Arc<ExitNotifier>,
    pub shape: MachineShape,
}

/// Every device locked.
pub struct HeldDevices<'a> {
    transports: Vec<MutexGuard<'a, MmioTransport>>,
    devices: Vec<MutexGuard<'a, dyn VirtioDevice + 'static>>,
    serial: MutexGuard<'a, SerialDevice>,
    i8042: MutexGuard<'a, I8042>,
}

impl VmParts {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: Arc<Vm>,
        memory: GuestMemoryMmap,
        memfd: std::fs::File,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        serial: Arc<Mutex<SerialDevice>>,
        i8042: Arc<Mutex<I8042>>,
        control: Arc<RunControl>,
        exit: Arc<ExitNotifier>,
        shape: MachineShape,
    ) -> Self {
        let devices = transports
            .iter()
            .map(|transport| lock(transport).device())
            .collect();
        Self {
            vm,
            memory,
            memfd,
            transports,
            devices,
            serial,
            i8042,
            control,
            exit,
            shape,
        }
    }

    /// The virtio devices, in slot order.
    pub fn devices(&self) -> &[Arc<Mutex<dyn VirtioDevice>>] {
        &self.devices
    }

    /// Locks every device until the guard goes.
    pub fn hold_devices(&self) -> HeldDevices<'_> {
        HeldDevices {
            transports: self.transports.iter().map(|t| lock(t)).collect(),
            devices: self.devices.iter().map(|d| lock(d)).collect(),
            serial: lock(&self.serial),
            i8042: lock(&self.i8042),
        }
    }

    /// The whole state but RAM, of a VM whose vCPUs are paused and whose
    /// devices `held` holds.
    pub fn capture_state(&self, held: &HeldDevices<'_>) -> Result<VmSnapshot, String> {
        let vcpus = self
            .control
            .save_all(SAVE_TIMEOUT)
            .map_err(|err| err.to_string())?;
        let vm = self.vm.save().map_err(|err| err.to_string())?;
        let devices = held
            .transports
            .iter()
            .zip(&held.devices)
            .map(|(transport, device)| transport.save_locked(&**device))
            .collect::<Result<_, _>>()
            .map_err(|err| err.to_string())?;
        let serial = held.serial.save().map_err(|err| err.to_string())?;
        let Ok(i8042) = held.i8042.save();
        Ok(VmSnapshot {
            machine: self.shape.clone(),
            vm,
            vcpus,
            devices,
            serial,
            i8042,
        })
    }
}
