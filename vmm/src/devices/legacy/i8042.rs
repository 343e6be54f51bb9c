//! A minimal i8042 keyboard controller: enough for Linux's i8042 and atkbd
//! drivers to find a keyboard, for the guest to reset the machine (command
//! 0xfe, or a pulse of the output port's reset line) and for the VMM to send
//! Ctrl-Alt-Del, which is how a graceful shutdown is asked of the guest.

use std::collections::VecDeque;
use std::convert::Infallible;

use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;
use crate::devices::bus::BusDevice;
use crate::persist::Persist;

/// The controller answers at ports 0x60 (data) and 0x64 (status/command).
pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_TRANSLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_GET_ID: u8 = 0xf2;
const KBD_ECHO: u8 = 0xee;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const SELF_TEST_PASSED: u8 = 0x55;
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;

/// Ctrl, Alt, Delete pressed then released, in scan code set 1 (what the
/// guest sees when the controller translates) and set 2.
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
const OUTPUT_BUFFER_LIMIT: usize = 64;

/// Errors the controller reports to the VMM.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("cannot raise the keyboard interrupt: {0}")]
    Interrupt(std::io::Error),
}

pub struct I8042 {
    control: u8,
    status: u8,
    output: VecDeque<u8>,
    pending_command: Option<u8>,
    kbd_irq: IrqLine,
    reset_evt: EventFd,
}

/// The controller's registers and unread output, for a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub control: u8,
    pub status: u8,
    pub output: Vec<u8>,
    pub pending_command: Option<u8>,
}

impl crate::persist::VersionedState for I8042State {
    const COMPONENT: &'static str = "i8042";
    const VERSION: u16 = 1;
}

impl Persist for I8042 {
    type State = I8042State;
    type Error = Infallible;

    fn save(&self) -> Result<I8042State, Infallible> {
        Ok(I8042State {
            control: self.control,
            status: self.status,
            output: self.output.iter().copied().collect(),
            pending_command: self.pending_command,
        })
    }

    /// Takes on a saved state (output beyond the buffer's limit dropped).
    fn restore(&mut self, state: &I8042State) -> Result<(), Infallible> {
        self.control = state.control;
        self.status = state.status;
        self.output = state
            .output
            .iter()
            .copied()
            .take(OUTPUT_BUFFER_LIMIT)
            .collect();
        self.pending_command = state.pending_command;
        Ok(())
    }
}

impl I8042 {
    /// `reset_evt` is written when the guest resets the machine.
    pub fn new(kbd_irq: IrqLine, reset_evt: EventFd) -> Self {
        Self {
            control: CTR_KBD_INTERRUPT | CTR_SYSTEM_FLAG | CTR_TRANSLATE,
            status: STATUS_UNLOCKED | STATUS_SYSTEM_FLAG,
            output: VecDeque::new(),
            pending_command: None,
            kbd_irq,
            reset_evt,
        }
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_BUFFER_LIMIT {
            self.output.push_back(byte);
        }
        self.status |= STATUS_OUTPUT_FULL;
    }

    fn raise_keyboard_interrupt(&self) -> Result<(), I8042Error> {
        if self.control & CTR_KBD_INTERRUPT != 0 && !self.output.is_empty() {
            self.kbd_irq.trigger().map_err(I8042Error::Interrupt)?;
        }
        Ok(())
    }

    fn request_reset(&self) {
        log::info!("guest reset through the i8042");
        if let Err(err) = self.reset_evt.write(1) {
            log::error!("cannot signal the guest reset: {err}");
        }
    }

    /// Types Ctrl-Alt-Del on the keyboard.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let codes: &[u8] = if self.control & CTR_TRANSLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        for code in codes {
            self.push_output(*code);
        }
        self.raise_keyboard_interrupt()
    }

    fn command(&mut self, command: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match command {
            CMD_READ_CTR => self.push_output(self.control),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_BUFFER
            | CMD_WRITE_AUX_BUFFER
            | CMD_WRITE_AUX => self.pending_command = Some(command),
            CMD_DISABLE_AUX => self.control |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.control &= !CTR_AUX_DISABLED,
            CMD_TEST_AUX | CMD_TEST_KBD => self.push_output(0x00),
            CMD_SELF_TEST => self.push_output(SELF_TEST_PASSED),
            CMD_DISABLE_KBD => self.control |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.control &= !CTR_KBD_DISABLED,
            CMD_READ_INPUT_PORT => self.push_output(0x00),
            CMD_READ_OUTPUT_PORT => self.push_output(OUTPUT_PORT_RESET_LINE),
            CMD_RESET => self.request_reset(),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                if value & OUTPUT_PORT_RESET_LINE == 0 {
                    self.request_reset();
                }
            }
            Some(CMD_WRITE_KBD_BUFFER) => self.push_output(value),
            Some(_) => {}
            // A byte for the keyboard itself.
            None => match value {
                KBD_RESET => {
                    self.push_output(KBD_ACK);
                    self.push_output(KBD_SELF_TEST_PASSED);
                }
                KBD_GET_ID => {
                    self.push_output(KBD_ACK);
                    self.push_output(0xab);
                    self.push_output(0x83);
                }
                KBD_ECHO => self.push_output(KBD_ECHO),
                _ => self.push_output(KBD_ACK),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFFSET_DATA => {
                let byte = self.output.pop_front().unwrap_or(0);
                if self.output.is_empty() {
                    self.status &= !STATUS_OUTPUT_FULL;
                } else if let Err(err) = self.raise_keyboard_interrupt() {
                    log::warn!("{err}");
                }
                byte
            }
            OFFSET_COMMAND => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            OFFSET_DATA => self.data(value),
            OFFSET_COMMAND => self.command(value),
            _ => return,
        }
        if let Err(err) = self.raise_keyboard_interrupt() {
            log::warn!("{err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (I8042, EventFd, EventFd) {
        let irq = IrqLine::new().unwrap();
        let irq_probe = irq.0.try_clone().unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset_probe = reset.try_clone().unwrap();
        (I8042::new(irq, reset), irq_probe, reset_probe)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut data = [0u8; 1];
        dev.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn reset_command_signals_the_vmm() {
        let (mut dev, _irq, reset) = controller();
        assert!(reset.read().is_err());
        dev.write(OFFSET_COMMAND, &[CMD_RESET]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn output_port_reset_line() {
        let (mut dev, _irq, reset) = controller();
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(OFFSET_DATA, &[0x01]);
        assert!(reset.read().is_err());
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(OFFSET_DATA, &[0x00]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn self_test_and_control_register() {
        let (mut dev, _irq, _reset) = controller();
        dev.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, OFFSET_COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, OFFSET_DATA), SELF_TEST_PASSED);
        assert_eq!(read(&mut dev, OFFSET_COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFFSET_DATA, &[0x45]);
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, OFFSET_DATA), 0x45);
    }

    #[test]
    fn keyboard_answers_and_interrupts() {
        let (mut dev, irq, _reset) = controller();
        dev.write(OFFSET_DATA, &[KBD_GET_ID]);
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(read(&mut dev, OFFSET_DATA), KBD_ACK);
        assert_eq!(read(&mut dev, OFFSET_DATA), 0xab);
        assert_eq!(read(&mut dev, OFFSET_DATA), 0x83);
    }

    #[test]
    fn a_saved_controller_comes_back_with_its_registers_and_output() {
        let (mut dev, _irq, _reset) = controller();
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFFSET_DATA, &[0x45]);
        dev.write(OFFSET_DATA, &[KBD_GET_ID]);
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        let Ok(saved) = dev.save();
        let json = serde_json::to_string(&saved).unwrap();
        let saved: I8042State = serde_json::from_str(&json).unwrap();
        let (mut back, _irq, _reset) = controller();
        let Ok(()) = back.restore(&saved);
        let Ok(again) = back.save();
        assert_eq!(again, saved);
        // The pending command and the keyboard's answer are carried over.
        back.write(OFFSET_DATA, &[0x47]);
        assert_eq!(read(&mut back, OFFSET_DATA), KBD_ACK);
        let mut flood = saved;
        flood.output = vec![0; 4 * OUTPUT_BUFFER_LIMIT];
        let Ok(()) = back.restore(&flood);
        assert_eq!(back.output.len(), OUTPUT_BUFFER_LIMIT);
    }

    #[test]
    fn ctrl_alt_del_follows_translation() {
        let (mut dev, irq, _reset) = controller();
        dev.send_ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 1);
        let codes: Vec<u8> = (0..CTRL_ALT_DEL_SET1.len())
            .map(|_| read(&mut dev, OFFSET_DATA))
            .collect();
        assert_eq!(codes, CTRL_ALT_DEL_SET1);
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFFSET_DATA, &[CTR_KBD_INTERRUPT]);
        dev.send_ctrl_alt_del().unwrap();
        let codes: Vec<u8> = (0..CTRL_ALT_DEL_SET2.len())
            .map(|_| read(&mut dev, OFFSET_DATA))
            .collect();
        assert_eq!(codes, CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn output_buffer_is_bounded() {
        let (mut dev, _irq, _reset) = controller();
        for _ in 0..10_000 {
            dev.write(OFFSET_DATA, &[0x00]);
        }
        assert!(dev.output.len() <= OUTPUT_BUFFER_LIMIT);
        dev.write(OFFSET_DATA, &[]);
    }
}
