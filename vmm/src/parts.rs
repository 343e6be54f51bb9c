//! The pieces of a running VM that a snapshot or a migration takes its
//! state from, and taking that state: vCPUs paused, every device held (see
//! [`crate::device_manager::persist`]). Both the runtime (snapshots) and
//! the migration source use it, so it lives below both.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::device_manager::{DevicesState, DevicesStateError, HeldDevices, StatefulDevices};
use crate::devices::virtio::VirtioDevice;
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;
use crate::persist::Versioned;
use crate::snapshot::state::{MachineShape, VmSnapshot};
use crate::vstate::exit::ExitNotifier;
use crate::vstate::persist::KvmStateError;
use crate::vstate::vcpu::{RunControl, VcpuError};
use crate::vstate::vm::Vm;

/// How long vCPUs get to save their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a running VM's state could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Vcpus(#[from] VcpuError),
    #[error("cannot save the VM's KVM state: {0}")]
    Vm(#[from] KvmStateError),
    #[error(transparent)]
    Devices(#[from] DevicesStateError),
}

pub struct VmParts {
    pub vm: Arc<Vm>,
    pub memory: GuestMemoryMmap,
    /// What backs `memory`: which pages exist at all.
    pub backing: crate::memory::RamBacking,
    pub devices: StatefulDevices,
    pub control: Arc<RunControl>,
    pub exit: Arc<ExitNotifier>,
    pub shape: MachineShape,
}

impl VmParts {
    /// The virtio devices, in slot order.
    pub fn devices(&self) -> &[Arc<Mutex<dyn VirtioDevice>>] {
        self.devices.virtio()
    }

    /// Locks every device until the guard goes.
    pub fn hold_devices(&self) -> HeldDevices<'_> {
        self.devices.hold()
    }

    /// The whole state but RAM, of a VM whose vCPUs are paused and whose
    /// devices `held` holds.
    pub fn capture_state(&self, held: &HeldDevices<'_>) -> Result<VmSnapshot, CaptureError> {
        let vcpus = self.control.save_all(SAVE_TIMEOUT)?;
        let vm = self.vm.save()?;
        let DevicesState {
            devices,
            serial,
            i8042,
            acpi_pm,
        } = held.save()?;
        Ok(VmSnapshot {
            machine: self.shape.clone(),
            vm: Versioned(vm),
            vcpus: vcpus.into_iter().map(Versioned).collect(),
            devices,
            serial,
            i8042,
            acpi_pm,
        })
    }
}
