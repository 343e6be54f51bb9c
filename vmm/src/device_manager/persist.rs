//! Saving and restoring every device at once: the discipline for saving
//! (every device held, transport then device: the order vCPU exits lock
//! them in, so that the event loop cannot serve a queue halfway through)
//! and the order of a restore (the virtio devices, which then announce
//! themselves on their networks, then the UART, the i8042 and the ACPI
//! registers).

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::devices::bus::lock;
use crate::devices::legacy::acpi_pm::{AcpiPm, AcpiPmState};
use crate::devices::legacy::i8042::{I8042State, I8042};
use crate::devices::legacy::serial::{SerialDevice, SerialDeviceState, SerialStateError};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::persist::{TransportState, TransportStateError};
use crate::devices::virtio::VirtioDevice;
use crate::persist::{Persist, Versioned};

/// The devices' part of a snapshot (`snapshot::VmSnapshot` holds these
/// fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// The virtio devices, in slot order.
    pub devices: Vec<Versioned<TransportState>>,
    pub serial: Versioned<SerialDeviceState>,
    pub i8042: Versioned<I8042State>,
    /// Absent from snapshots older than the GPE block: its registers
    /// start cleared then.
    pub acpi_pm: Option<Versioned<AcpiPmState>>,
}

impl crate::persist::VersionedState for DevicesState {
    const COMPONENT: &'static str = "devices";
    const VERSION: u16 = 1;
}

/// Why the devices' state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum DevicesStateError {
    #[error("cannot save the virtio device {index} state: {source}")]
    SaveVirtio {
        index: usize,
        source: TransportStateError,
    },
    #[error("cannot save the serial port state: {0}")]
    SaveSerial(SerialStateError),
    #[error("the snapshot does not fit this VM: it holds {saved} virtio device state(s) for {devices} device(s)")]
    DeviceCount { saved: usize, devices: usize },
    #[error("cannot restore the virtio device {index} ({kind}) state: {source}")]
    RestoreVirtio {
        index: usize,
        kind: &'static str,
        source: TransportStateError,
    },
    #[error("cannot restore the serial port state: {0}")]
    RestoreSerial(SerialStateError),
}

/// The devices a snapshot saves, shared with the running VM (cheap to
/// clone).
#[derive(Clone)]
pub struct StatefulDevices {
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The transports' devices, in slot order.
    virtio: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
}

/// Every device locked.
pub struct HeldDevices<'a> {
    transports: Vec<MutexGuard<'a, MmioTransport>>,
    devices: Vec<MutexGuard<'a, dyn VirtioDevice + 'static>>,
    serial: MutexGuard<'a, SerialDevice>,
    i8042: MutexGuard<'a, I8042>,
    acpi_pm: MutexGuard<'a, AcpiPm>,
}

impl StatefulDevices {
    pub fn new(
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        serial: Arc<Mutex<SerialDevice>>,
        i8042: Arc<Mutex<I8042>>,
        acpi_pm: Arc<Mutex<AcpiPm>>,
    ) -> Self {
        let virtio = transports
            .iter()
            .map(|transport| lock(transport).device())
            .collect();
        Self {
            transports,
            virtio,
            serial,
            i8042,
            acpi_pm,
        }
    }

    /// The ACPI registers (a restore raises a GPE through them).
    pub fn acpi_pm(&self) -> &Mutex<AcpiPm> {
        &self.acpi_pm
    }

    /// The virtio devices, in slot order.
    pub fn virtio(&self) -> &[Arc<Mutex<dyn VirtioDevice>>] {
        &self.virtio
    }

    /// Locks every device until the guard goes.
    pub fn hold(&self) -> HeldDevices<'_> {
        HeldDevices {
            transports: self.transports.iter().map(|t| lock(t)).collect(),
            devices: self.virtio.iter().map(|d| lock(d)).collect(),
            serial: lock(&self.serial),
            i8042: lock(&self.i8042),
            acpi_pm: lock(&self.acpi_pm),
        }
    }
}

impl HeldDevices<'_> {
    /// The state of the devices held.
    pub fn save(&self) -> Result<DevicesState, DevicesStateError> {
        let devices = self
            .transports
            .iter()
            .zip(&self.devices)
            .enumerate()
            .map(|(index, (transport, device))| {
                transport
                    .save_locked(&**device)
                    .map(Versioned)
                    .map_err(|source| DevicesStateError::SaveVirtio { index, source })
            })
            .collect::<Result<_, _>>()?;
        let serial = self.serial.save().map_err(DevicesStateError::SaveSerial)?;
        let Ok(i8042) = self.i8042.save();
        let Ok(acpi_pm) = self.acpi_pm.save();
        Ok(DevicesState {
            devices,
            serial: Versioned(serial),
            i8042: Versioned(i8042),
            acpi_pm: Some(Versioned(acpi_pm)),
        })
    }
}

impl Persist for StatefulDevices {
    type State = DevicesState;
    type Error = DevicesStateError;

    /// Holds every device while saving them.
    fn save(&self) -> Result<DevicesState, DevicesStateError> {
        self.hold().save()
    }

    /// Restores the devices of a VM that has not run: the virtio devices
    /// (running ones activated on their saved queues and kicked), which
    /// then announce where they now are, then the UART and the i8042.
    fn restore(&mut self, state: &DevicesState) -> Result<(), DevicesStateError> {
        if state.devices.len() != self.transports.len() {
            return Err(DevicesStateError::DeviceCount {
                saved: state.devices.len(),
                devices: self.transports.len(),
            });
        }
        for (index, (transport, saved)) in self.transports.iter().zip(&state.devices).enumerate() {
            lock(transport)
                .restore(saved)
                .map_err(|source| DevicesStateError::RestoreVirtio {
                    index,
                    kind: saved.device.kind(),
                    source,
                })?;
        }
        for device in &self.virtio {
            lock(device).announce();
        }
        lock(&self.serial)
            .restore(&state.serial)
            .map_err(DevicesStateError::RestoreSerial)?;
        let Ok(()) = lock(&self.i8042).restore(&state.i8042);
        if let Some(acpi_pm) = &state.acpi_pm {
            let Ok(()) = lock(&self.acpi_pm).restore(acpi_pm);
        }
        Ok(())
    }
}
