//! ACPI fixed hardware, as the FADT declares it (see `arch::x86_64::acpi`):
//! the PM1a event block (status, always zero: the VM raises no fixed events;
//! enable, kept as written, since ACPICA reads its writes back), the PM1a
//! control block, the reset register and the GPE0 block.
//! Writing SLP_EN with the `\_S5` sleep type to PM1a control powers the VM
//! off; writing the reset value to the reset register resets it.
//!
//! The GPE0 block is one status byte (bits set by the VMM, cleared by the
//! guest writing ones) and one enable byte: a status bit set while its
//! enable bit is (in either order) raises the SCI, and the guest runs the
//! DSDT's `\_GPE._Exx` method of that event.

use std::convert::Infallible;

use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;
use crate::arch::x86_64::acpi::{RESET_VALUE, S5_SLEEP_TYPE};
use crate::arch::x86_64::layout::{
    ACPI_GPE0_PORT, ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_PORT, ACPI_RESET_PORT,
};
use crate::devices::bus::BusDevice;
use crate::persist::Persist;

const PM1_EN_OFFSET: u64 = 2;
const PM1_CNT_OFFSET: u64 = (ACPI_PM1_CNT_PORT - ACPI_PM1_EVT_PORT) as u64;
const RESET_OFFSET: u64 = (ACPI_RESET_PORT - ACPI_PM1_EVT_PORT) as u64;
const GPE0_STS_OFFSET: u64 = (ACPI_GPE0_PORT - ACPI_PM1_EVT_PORT) as u64;
pub(crate) const GPE0_EN_OFFSET: u64 = GPE0_STS_OFFSET + 1;
const SLEEP_TYPE_SHIFT: u16 = 10;
const SLEEP_TYPE_MASK: u16 = 0x7;
const SLEEP_ENABLE: u16 = 1 << 13;

pub struct AcpiPm {
    poweroff_evt: EventFd,
    reset_evt: EventFd,
    sci: IrqLine,
    pm1_enable: u16,
    pm1_control: u16,
    gpe0_status: u8,
    gpe0_enable: u8,
}

/// The registers the guest wrote, for a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {
    pub pm1_enable: u16,
    pub pm1_control: u16,
    pub gpe0_status: u8,
    pub gpe0_enable: u8,
}

impl crate::persist::VersionedState for AcpiPmState {
    const COMPONENT: &'static str = "acpi-pm";
    const VERSION: u16 = 1;
}

impl Persist for AcpiPm {
    type State = AcpiPmState;
    type Error = Infallible;

    fn save(&self) -> Result<AcpiPmState, Infallible> {
        Ok(AcpiPmState {
            pm1_enable: self.pm1_enable,
            pm1_control: self.pm1_control,
            gpe0_status: self.gpe0_status,
            gpe0_enable: self.gpe0_enable,
        })
    }

    /// Takes on a saved state. A pending event's interrupt is in the
    /// interrupt controllers' saved state, not raised again here.
    fn restore(&mut self, state: &AcpiPmState) -> Result<(), Infallible> {
        self.pm1_enable = state.pm1_enable;
        self.pm1_control = state.pm1_control & !SLEEP_ENABLE;
        self.gpe0_status = state.gpe0_status;
        self.gpe0_enable = state.gpe0_enable;
        Ok(())
    }
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
    /// `sci` is the ACPI SCI line (an irqfd).
    pub fn new(poweroff_evt: EventFd, reset_evt: EventFd, sci: IrqLine) -> Self {
        Self {
            poweroff_evt,
            reset_evt,
            sci,
            pm1_enable: 0,
            pm1_control: 0,
            gpe0_status: 0,
            gpe0_enable: 0,
        }
    }

    /// Signals general-purpose event `gpe` (0 to 7) to the guest: its
    /// status bit is set, and the SCI raised if the guest enabled it (or
    /// once it does).
    pub fn raise_gpe(&mut self, gpe: u8) {
        let Some(bit) = 1u8.checked_shl(u32::from(gpe)) else {
            log::error!("there is no GPE {gpe} in the GPE0 block");
            return;
        };
        self.gpe0_status |= bit;
        self.signal_pending_gpes();
    }

    /// Raises the SCI while an enabled event is pending.
    fn signal_pending_gpes(&self) {
        if self.gpe0_status & self.gpe0_enable != 0 {
            if let Err(err) = self.sci.trigger() {
                log::error!("cannot raise the ACPI SCI: {err}");
            }
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
            GPE0_STS_OFFSET => read_from(u16::from(self.gpe0_status), 0, data),
            GPE0_EN_OFFSET => read_from(u16::from(self.gpe0_enable), 0, data),
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
            // Status bits are cleared by writing ones.
            GPE0_STS_OFFSET => self.gpe0_status &= !data.first().copied().unwrap_or(0),
            GPE0_EN_OFFSET => {
                self.gpe0_enable = data.first().copied().unwrap_or(0);
                self.signal_pending_gpes();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPm, EventFd, EventFd) {
        let (pm, off, reset, _sci) = device_with_sci();
        (pm, off, reset)
    }

    fn device_with_sci() -> (AcpiPm, EventFd, EventFd, EventFd) {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sci = IrqLine::new().unwrap();
        let sci_seen = sci.0.try_clone().unwrap();
        let pm = AcpiPm::new(off.try_clone().unwrap(), reset.try_clone().unwrap(), sci);
        (pm, off, reset, sci_seen)
    }

    fn byte_at(pm: &mut AcpiPm, offset: u64) -> u8 {
        let mut byte = [0u8];
        pm.read(offset, &mut byte);
        byte[0]
    }

    #[test]
    fn an_enabled_gpe_raises_the_sci_until_the_guest_clears_it() {
        let (mut pm, _off, _reset, sci) = device_with_sci();
        // Enabled first (as ACPICA does at boot), then raised.
        pm.write(GPE0_EN_OFFSET, &[0x01]);
        assert!(sci.read().is_err(), "nothing pending yet");
        pm.raise_gpe(0);
        assert_eq!(sci.read().unwrap(), 1);
        assert_eq!(byte_at(&mut pm, GPE0_STS_OFFSET), 0x01);
        assert_eq!(byte_at(&mut pm, GPE0_EN_OFFSET), 0x01);
        // Writing zeros clears nothing, writing the bit clears it.
        pm.write(GPE0_STS_OFFSET, &[0x00]);
        assert_eq!(byte_at(&mut pm, GPE0_STS_OFFSET), 0x01);
        pm.write(GPE0_STS_OFFSET, &[0x01]);
        assert_eq!(byte_at(&mut pm, GPE0_STS_OFFSET), 0x00);
    }

    #[test]
    fn a_gpe_raised_while_disabled_waits_for_its_enable() {
        let (mut pm, _off, _reset, sci) = device_with_sci();
        pm.raise_gpe(0);
        assert!(sci.read().is_err());
        pm.write(GPE0_EN_OFFSET, &[0x02]);
        assert!(sci.read().is_err(), "another event enabled");
        pm.write(GPE0_EN_OFFSET, &[0x03]);
        assert_eq!(sci.read().unwrap(), 1);
        // Out of the block: ignored.
        pm.raise_gpe(8);
        assert_eq!(byte_at(&mut pm, GPE0_STS_OFFSET), 0x01);
    }

    #[test]
    fn the_registers_survive_a_snapshot() {
        let (mut pm, _off, _reset, sci) = device_with_sci();
        pm.write(PM1_EN_OFFSET, &[0x20, 0x01]);
        pm.write(GPE0_EN_OFFSET, &[0x01]);
        pm.raise_gpe(0);
        let Ok(saved) = pm.save();
        let json = serde_json::to_string(&saved).unwrap();
        let saved: AcpiPmState = serde_json::from_str(&json).unwrap();
        let (mut back, _off, _reset, back_sci) = device_with_sci();
        let Ok(()) = back.restore(&saved);
        let Ok(again) = back.save();
        assert_eq!(again, saved);
        assert_eq!(byte_at(&mut back, GPE0_STS_OFFSET), 0x01);
        assert!(back_sci.read().is_err(), "a restore raises nothing itself");
        drop(sci);
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
