//! ACPI fixed hardware, as the FADT declares it (see `arch::x86_64::acpi`):
//! the PM1a event block (status, always zero: the VM raises no fixed events;
//! enable, kept as written, since ACPICA reads its writes back), the PM1a
//! control block and the reset register.
//! Writing SLP_EN with the `\_S5` sleep type to PM1a control powers the VM
//! off; writing the reset value to the reset register resets it.

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{RESET_VALUE, S5_SLEEP_TYPE};
use crate::arch::x86_64::layout::{ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_PORT, ACPI_RESET_PORT};
use crate::devices::bus::BusDevice;

const PM1_EN_OFFSET: u64 = 2;
const PM1_CNT_OFFSET: u64 = (ACPI_PM1_CNT_PORT - ACPI_PM1_EVT_PORT) as u64;
const RESET_OFFSET: u64 = (ACPI_RESET_PORT - ACPI_PM1_EVT_PORT) as u64;
const SLEEP_TYPE_SHIFT: u16 = 10;
const SLEEP_TYPE_MASK: u16 = 0x7;
const SLEEP_ENABLE: u16 = 1 << 13;

pub struct AcpiPm {
    poweroff_evt: EventFd,
    reset_evt: EventFd,
    pm1_enable: u16,
    pm1_control: u16,
}

/// Writes `data` at `byte_offset` into a 16-bit register.
fn merge_into(register: u16, byte_offset: u64, data: &[u8]) -> u16 {
    let mut bytes = register.to_le_bytes();
    for (i, value) in data.iter().enumerate() {
        if let Some(slot) = bytes.get_mut(byte_offset as usize + i) {
            *slot = *value;
        }
    }
    u16::from_le_bytes(bytes)
}

/// Reads a 16-bit register from `byte_offset` into `data`.
fn read_from(register: u16, byte_offset: u64, data: &mut [u8]) {
    let bytes = register.to_le_bytes();
    for (i, slot) in data.iter_mut().enumerate() {
        if let Some(value) = bytes.get(byte_offset as usize + i) {
            *slot = *value;
        }
    }
}

impl AcpiPm {
    pub fn new(poweroff_evt: EventFd, reset_evt: EventFd) -> Self {
        Self {
            poweroff_evt,
            reset_evt,
            pm1_enable: 0,
            pm1_control: 0,
        }
    }

    fn write_pm1_control(&mut self, byte_offset: u64, data: &[u8]) {
        // Byte or word accesses; keep the register whole either way.
        let value = merge_into(self.pm1_control, byte_offset, data);
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if value & SLEEP_ENABLE != 0 && sleep_type == u16::from(S5_SLEEP_TYPE) {
            signal(&self.poweroff_evt, "power-off");
        }
        // SLP_EN is write-only: it always reads back as zero.
        self.pm1_control = value & !SLEEP_ENABLE;
    }
}

fn signal(evt: &EventFd, what: &str) {
    log::info!("guest {what} through ACPI");
    if let Err(err) = evt.write(1) {
        log::error!("cannot signal the guest {what}: {err}");
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if (PM1_EN_OFFSET..PM1_EN_OFFSET + 2).contains(&o) => {
                read_from(self.pm1_enable, o - PM1_EN_OFFSET, data)
            }
            o if (PM1_CNT_OFFSET..PM1_CNT_OFFSET + 2).contains(&o) => {
                read_from(self.pm1_control, o - PM1_CNT_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if (PM1_EN_OFFSET..PM1_EN_OFFSET + 2).contains(&o) => {
                self.pm1_enable = merge_into(self.pm1_enable, o - PM1_EN_OFFSET, data)
            }
            o if (PM1_CNT_OFFSET..PM1_CNT_OFFSET + 2).contains(&o) => {
                self.write_pm1_control(o - PM1_CNT_OFFSET, data)
            }
            RESET_OFFSET if data.first() == Some(&RESET_VALUE) => signal(&self.reset_evt, "reset"),
            _ => {}
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

    fn s5(enable: bool) -> [u8; 2] {
        let mut value = u16::from(S5_SLEEP_TYPE) << SLEEP_TYPE_SHIFT;
        if enable {
            value |= SLEEP_ENABLE;
        }
        value.to_le_bytes()
    }

    #[test]
    fn linux_s5_sequence_powers_off() {
        // ACPICA writes SLP_TYP first, then SLP_TYP | SLP_EN.
        let (mut pm, off, reset) = device();
        pm.write(PM1_CNT_OFFSET, &s5(false));
        assert!(off.read().is_err());
        pm.write(PM1_CNT_OFFSET, &s5(true));
        assert_eq!(off.read().unwrap(), 1);
        assert!(reset.read().is_err());
    }

    #[test]
    fn byte_writes_of_the_high_half_power_off_too() {
        let (mut pm, off, _reset) = device();
        pm.write(PM1_CNT_OFFSET + 1, &s5(true)[1..]);
        assert_eq!(off.read().unwrap(), 1);
    }

    #[test]
    fn other_sleep_states_and_registers_do_nothing() {
        let (mut pm, off, reset) = device();
        let s3 = ((3u16 << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE).to_le_bytes();
        pm.write(PM1_CNT_OFFSET, &s3);
        pm.write(0, &s5(true)); // the status register
        pm.write(RESET_OFFSET, &[RESET_VALUE + 1]);
        pm.write(PM1_CNT_OFFSET, &[]);
        assert!(off.read().is_err());
        assert!(reset.read().is_err());
        let mut word = [0xffu8; 2];
        pm.read(0, &mut word);
        assert_eq!(word, [0, 0]);
        pm.read(PM1_CNT_OFFSET, &mut word);
        assert_eq!(
            u16::from_le_bytes(word),
            3 << SLEEP_TYPE_SHIFT,
            "SLP_EN reads as 0"
        );
    }

    #[test]
    fn enable_bits_read_back_and_status_stays_clear() {
        let (mut pm, _off, _reset) = device();
        pm.write(PM1_EN_OFFSET, &[0x20, 0x01]);
        let mut word = [0u8; 2];
        pm.read(PM1_EN_OFFSET, &mut word);
        assert_eq!(word, [0x20, 0x01]);
        pm.write(0, &[0xff, 0xff]);
        pm.read(0, &mut word);
        assert_eq!(word, [0, 0]);
    }

    #[test]
    fn reset_value_resets() {
        let (mut pm, off, reset) = device();
        pm.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
        assert!(off.read().is_err());
    }
}
