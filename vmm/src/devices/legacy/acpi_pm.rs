//! The ACPI sleep control/status and reset register of a hardware-reduced
//! ACPI platform: one I/O port (declared in the FADT, see
//! `arch::x86_64::acpi`). Writing SLP_EN with the `\_S5` sleep type powers
//! the VM off; writing the reset value resets it.

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{RESET_VALUE, S5_SLEEP_TYPE};
use crate::devices::bus::BusDevice;

pub const ACPI_PM_PORT_LEN: u64 = 1;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
const SLEEP_ENABLE: u8 = 1 << 5;

pub struct AcpiPm {
    poweroff_evt: EventFd,
    reset_evt: EventFd,
}

impl AcpiPm {
    pub fn new(poweroff_evt: EventFd, reset_evt: EventFd) -> Self {
        Self {
            poweroff_evt,
            reset_evt,
        }
    }
}

fn signal(evt: &EventFd, what: &str) {
    log::info!("guest {what} through ACPI");
    if let Err(err) = evt.write(1) {
        log::error!("cannot signal the guest {what}: {err}");
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        if value == RESET_VALUE {
            signal(&self.reset_evt, "reset");
        } else if value & SLEEP_ENABLE != 0
            && (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK == S5_SLEEP_TYPE
        {
            signal(&self.poweroff_evt, "power-off");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPm, EventFd, EventFd) {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let pm = AcpiPm::new(off.try_clone().unwrap(), reset.try_clone().unwrap());
        (pm, off, reset)
    }

    #[test]
    fn s5_with_sleep_enable_powers_off() {
        let (mut pm, off, reset) = device();
        pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLEEP_ENABLE]);
        assert_eq!(off.read().unwrap(), 1);
        assert!(reset.read().is_err());
    }

    #[test]
    fn other_sleep_states_and_offsets_do_nothing() {
        let (mut pm, off, reset) = device();
        pm.write(0, &[(S5_SLEEP_TYPE << 2)]); // no SLP_EN
        pm.write(0, &[(3 << 2) | SLEEP_ENABLE]); // S3
        pm.write(1, &[(S5_SLEEP_TYPE << 2) | SLEEP_ENABLE]);
        pm.write(0, &[]);
        assert!(off.read().is_err());
        assert!(reset.read().is_err());
        let mut byte = [0xffu8];
        pm.read(0, &mut byte);
        assert_eq!(byte, [0]);
    }

    #[test]
    fn reset_value_resets() {
        let (mut pm, off, reset) = device();
        pm.write(0, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
        assert!(off.read().is_err());
    }
}
