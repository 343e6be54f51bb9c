//! The VM generation id (Microsoft's "Virtual Machine Generation ID", as
//! Hyper-V, QEMU and Firecracker provide it): 16 random bytes in reserved
//! guest memory that change whenever the guest may be running from a copy
//! of its past (a restore from a snapshot, each clone of one) and not when
//! it only moves (live migration keeps them with the rest of its memory).
//!
//! Linux's `vmgenid` driver finds them through the DSDT's `\_SB.VGEN`
//! (`arch::x86_64::acpi`), reads them at boot and again when notified (the
//! VMM raises GPE 0, whose `_E00` method notifies the device); on a change
//! it reseeds the kernel's RNG at once and tells what caches secrets
//! (WireGuard drops its session keys), before any of the guest's user
//! space could act on a duplicated state.

use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use super::acpi_pm::AcpiPm;
use crate::arch::x86_64::acpi::VMGENID_GPE;
use crate::arch::x86_64::layout::{VMGENID_SIZE, VMGENID_START};
use crate::config::{random_bytes, RandomError};
use crate::devices::bus::lock;

/// Why a generation id could not be made or given to the guest.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot draw a VM generation id: {0}")]
    Random(#[from] RandomError),
    #[error("cannot write the VM generation id at {VMGENID_START:#x}: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Writes a new generation id into `memory` (a first one at boot).
pub fn write_new_id(memory: &GuestMemoryMmap) -> Result<[u8; VMGENID_SIZE], VmGenIdError> {
    let id: [u8; VMGENID_SIZE] = random_bytes()?;
    memory
        .write_slice(&id, GuestAddress(VMGENID_START))
        .map_err(VmGenIdError::Write)?;
    Ok(id)
}

/// Starts a new generation of a restored VM that has not run yet: a new
/// id, and the guest told (its SCI pends until its vCPUs run).
pub fn start_new_generation(
    memory: &GuestMemoryMmap,
    acpi_pm: &Mutex<AcpiPm>,
) -> Result<(), VmGenIdError> {
    write_new_id(memory)?;
    lock(acpi_pm).raise_gpe(VMGENID_GPE);
    log::info!("a new VM generation id, the guest notified");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::IrqLine;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn each_generation_gets_its_own_id_and_the_guest_is_told() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let first = write_new_id(&memory).unwrap();
        let mut seen = [0u8; VMGENID_SIZE];
        memory
            .read_slice(&mut seen, GuestAddress(VMGENID_START))
            .unwrap();
        assert_eq!(seen, first);

        let sci = IrqLine::new().unwrap();
        let sci_seen = sci.0.try_clone().unwrap();
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let pm = Mutex::new(AcpiPm::new(eventfd(), eventfd(), sci));
        // The guest enabled the event at boot.
        crate::devices::bus::BusDevice::write(
            &mut *lock(&pm),
            crate::devices::legacy::acpi_pm::GPE0_EN_OFFSET,
            &[1],
        );
        start_new_generation(&memory, &pm).unwrap();
        memory
            .read_slice(&mut seen, GuestAddress(VMGENID_START))
            .unwrap();
        assert_ne!(seen, first);
        assert_eq!(sci_seen.read().unwrap(), 1);
    }

    #[test]
    fn an_id_outside_memory_is_an_error_not_a_panic() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
        assert!(matches!(write_new_id(&memory), Err(VmGenIdError::Write(_))));
    }
}
