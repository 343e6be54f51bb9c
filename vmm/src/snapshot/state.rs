//! The snapshot's content: one plain struct per component, gathered here.

use serde::{Deserialize, Serialize};

use super::file::SnapshotError;
use crate::devices::legacy::acpi_pm::AcpiPmState;
use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::SerialDeviceState;
use crate::devices::virtio::persist::TransportState;
use crate::persist::Versioned;
use crate::vstate::persist::{VcpuState, VmState};

/// The machine a snapshot was taken of: a restore needs one of the same
/// shape (the guest knows its vCPUs, RAM and devices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// The virtio devices' kinds, in slot order.
    pub devices: Vec<String>,
}

impl MachineShape {
    /// Refuses `wanted` (the restoring VM's shape) when it differs.
    pub fn check(&self, wanted: &MachineShape) -> Result<(), SnapshotError> {
        let mismatch = |what: String| Err(SnapshotError::Mismatch(what));
        if self.vcpus != wanted.vcpus {
            return mismatch(format!(
                "it has {} vCPU(s), the VM {}",
                self.vcpus, wanted.vcpus
            ));
        }
        if self.memory_bytes != wanted.memory_bytes {
            return mismatch(format!(
                "it has {} MiB of RAM, the VM {}",
                self.memory_bytes >> 20,
                wanted.memory_bytes >> 20
            ));
        }
        if self.devices != wanted.devices {
            return mismatch(format!(
                "its devices are [{}], the VM's [{}]",
                self.devices.join(", "),
                wanted.devices.join(", ")
            ));
        }
        Ok(())
    }
}

/// Everything but guest RAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub machine: MachineShape,
    pub vm: Versioned<VmState>,
    pub vcpus: Vec<Versioned<VcpuState>>,
    /// The virtio devices, in slot order.
    pub devices: Vec<Versioned<TransportState>>,
    pub serial: Versioned<SerialDeviceState>,
    pub i8042: Versioned<I8042State>,
    /// The ACPI registers; absent from snapshots made before the GPE
    /// block existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acpi_pm: Option<Versioned<AcpiPmState>>,
}

impl VmSnapshot {
    /// A snapshot of nothing in particular, for format tests.
    #[cfg(test)]
    pub fn sample_for_tests() -> Self {
        Self {
            machine: MachineShape {
                vcpus: 1,
                memory_bytes: 128 << 20,
                devices: vec!["block".into()],
            },
            vm: Versioned::default(),
            vcpus: vec![Versioned::default()],
            devices: Vec::new(),
            serial: Versioned::default(),
            i8042: Versioned::default(),
            acpi_pm: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_of_another_version_is_refused_by_name() {
        let mut json = serde_json::to_value(VmSnapshot::sample_for_tests()).expect("encode");
        assert_eq!(json["i8042"]["version"], 1);
        json["i8042"]["version"] = 9.into();
        let err = serde_json::from_value::<VmSnapshot>(json).expect_err("i8042 state v9");
        assert!(
            err.to_string()
                .contains("the i8042 state is version 9; this VMM reads version 1"),
            "{err}"
        );
    }

    #[test]
    fn a_restore_needs_the_same_machine_shape() {
        let shape = VmSnapshot::sample_for_tests().machine;
        assert!(shape.check(&shape.clone()).is_ok());
        let mut more = shape.clone();
        more.vcpus = 2;
        assert!(shape
            .check(&more)
            .unwrap_err()
            .to_string()
            .contains("1 vCPU(s), the VM 2"));
        let mut bigger = shape.clone();
        bigger.memory_bytes = 256 << 20;
        assert!(shape
            .check(&bigger)
            .unwrap_err()
            .to_string()
            .contains("128 MiB"));
        let mut other = shape.clone();
        other.devices.push("net".into());
        assert!(shape
            .check(&other)
            .unwrap_err()
            .to_string()
            .contains("[block, net]"));
    }
}
