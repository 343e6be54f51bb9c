//! The 8250 UART at 0x3f8 (IRQ 4): the guest's console.
//!
//! The register model is vm-superio's; this module connects it to the host:
//! output to stdout, a file, a Unix-socket client or nowhere, input pushed in
//! by the event loop. The UART's receive FIFO is small (64 bytes), so the
//! event loop stops reading input while it is full and resumes when the
//! guest has drained it ([`InputReady`] wakes it).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;
use crate::devices::bus::{lock, BusDevice};
use crate::persist::Persist;

pub const SERIAL_PORT_BASE: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;

/// Where the guest's console output goes.
pub enum SerialOutput {
    Stdout(io::Stdout),
    File(File),
    /// The currently connected socket client, if any. Output while no client
    /// is connected is dropped, as on a real serial line with nobody listening.
    Socket(Arc<Mutex<Option<UnixStream>>>),
    Sink,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Stdout(out) => out.write(buf),
            Self::File(file) => file.write(buf),
            Self::Socket(client) => {
                let mut client = lock(client);
                if let Some(stream) = client.as_mut() {
                    if stream.write_all(buf).is_err() {
                        // The client went away; drop it and keep the guest running.
                        *client = None;
                    }
                }
                Ok(buf.len())
            }
            Self::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout(out) => out.flush(),
            Self::File(file) => file.flush(),
            Self::Socket(_) | Self::Sink => Ok(()),
        }
    }
}

/// Signals the event loop when the guest has emptied the receive FIFO.
pub struct InputReady(pub EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(err) = self.0.write(1) {
            log::warn!("cannot signal serial input readiness: {err}");
        }
    }
}

pub struct SerialDevice {
    uart: Serial<IrqLine, InputReady, SerialOutput>,
}

/// The UART's registers and unread input, for a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl crate::persist::VersionedState for SerialDeviceState {
    const COMPONENT: &'static str = "serial port";
    const VERSION: u16 = 1;
}

/// The UART's receive FIFO, in bytes (vm-superio's).
const UART_FIFO_LEN: usize = 64;

/// Why a saved UART state is refused.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error(
        "the saved UART state holds {len} bytes of input, more than its FIFO's {UART_FIFO_LEN}"
    )]
    InputTooLong { len: usize },
    #[error("cannot duplicate the UART's {what}: {source}")]
    Duplicate {
        what: &'static str,
        source: io::Error,
    },
    #[error("the saved UART state is refused: {0:?}")]
    Refused(vm_superio::serial::Error<io::Error>),
}

impl SerialDevice {
    pub fn new(irq: IrqLine, input_ready: InputReady, output: SerialOutput) -> Self {
        Self {
            uart: Serial::with_events(irq, input_ready, output),
        }
    }

    /// Free bytes in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues bytes typed by the user; returns how many were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return Ok(0);
        }
        self.uart
            .enqueue_raw_bytes(&bytes[..room])
            .map_err(|err| io::Error::other(format!("{err:?}")))
    }
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialDeviceState, SerialStateError> {
        let state = self.uart.state();
        Ok(SerialDeviceState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer,
        })
    }

    /// Takes on a saved state (its pending interrupts raised again): the
    /// UART is rebuilt in that state around the same interrupt line,
    /// input-ready event and output (vm-superio restores only into a new
    /// one). A state that does not fit is refused before the UART is
    /// touched.
    fn restore(&mut self, state: &SerialDeviceState) -> Result<(), SerialStateError> {
        if state.in_buffer.len() > UART_FIFO_LEN {
            return Err(SerialStateError::InputTooLong {
                len: state.in_buffer.len(),
            });
        }
        let duplicate = |what| move |source| SerialStateError::Duplicate { what, source };
        let irq = self
            .uart
            .interrupt_evt()
            .try_clone()
            .map_err(duplicate("interrupt line"))?;
        let ready = self
            .uart
            .events()
            .0
            .try_clone()
            .map_err(duplicate("input-ready event"))?;
        // A stand-in while the output moves to the restored UART.
        let stand_in = Serial::with_events(
            irq.try_clone().map_err(duplicate("interrupt line"))?,
            InputReady(ready.try_clone().map_err(duplicate("input-ready event"))?),
            SerialOutput::Sink,
        );
        let output = std::mem::replace(&mut self.uart, stand_in).into_writer();
        let state = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        self.uart = Serial::from_state(&state, irq, InputReady(ready), output)
            .map_err(SerialStateError::Refused)?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset < SERIAL_PORT_LEN {
            self.uart.read(offset as u8)
        } else {
            0xff
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset >= SERIAL_PORT_LEN {
            return;
        }
        if let Err(err) = self.uart.write(offset as u8, value) {
            log::warn!("serial write at offset {offset} failed: {err:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;

    fn device(output: SerialOutput) -> (SerialDevice, EventFd, EventFd) {
        let irq = IrqLine::new().unwrap();
        let irq_probe = irq.0.try_clone().unwrap();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ready_probe = ready.try_clone().unwrap();
        (
            SerialDevice::new(irq, InputReady(ready), output),
            irq_probe,
            ready_probe,
        )
    }

    #[test]
    fn output_reaches_the_socket_client() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let client = Arc::new(Mutex::new(Some(ours)));
        let (mut dev, _irq, _ready) = device(SerialOutput::Socket(client));
        for byte in b"hi" {
            dev.write(THR, &[*byte]);
        }
        let mut got = [0u8; 2];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
    }

    #[test]
    fn output_without_a_client_is_dropped() {
        const LSR_THR_EMPTY: u8 = 0x20;
        let client = Arc::new(Mutex::new(None));
        let (mut dev, _irq, _ready) = device(SerialOutput::Socket(client.clone()));
        for byte in b"lost" {
            dev.write(THR, &[*byte]);
        }
        // The guest is not held: the transmitter is empty at once.
        let mut lsr = [0u8; 1];
        dev.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & LSR_THR_EMPTY, 0, "LSR {:#x}", lsr[0]);
        // Nothing was kept for a later client: it sees only what comes
        // after it connected.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        *client.lock().unwrap() = Some(ours);
        dev.write(THR, b"y");
        theirs.set_nonblocking(true).unwrap();
        let mut got = [0u8; 8];
        assert_eq!(theirs.read(&mut got).unwrap(), 1);
        assert_eq!(got[0], b'y');
        // A client that went away is dropped, and output goes on.
        drop(theirs);
        dev.write(THR, b"z");
        assert!(
            client.lock().unwrap().is_none(),
            "the vanished client is kept"
        );
        dev.write(THR, b"!");
    }

    #[test]
    fn input_fills_the_fifo_then_refuses_and_signals_when_drained() {
        let (mut dev, irq, ready) = device(SerialOutput::Sink);
        dev.write(IER, &[0x01]); // receive-data interrupt on
        let input = vec![b'a'; 100];
        let taken = dev.enqueue_input(&input).unwrap();
        assert_eq!(taken, 64);
        assert_eq!(dev.enqueue_input(&input).unwrap(), 0);
        assert!(irq.read().unwrap() >= 1);
        let mut byte = [0u8; 1];
        for _ in 0..64 {
            dev.read(LSR, &mut byte);
            assert_ne!(byte[0] & LSR_DATA_READY, 0);
            dev.read(THR, &mut byte);
            assert_eq!(byte[0], b'a');
        }
        dev.read(LSR, &mut byte);
        assert_eq!(byte[0] & LSR_DATA_READY, 0);
        assert_eq!(ready.read().unwrap(), 1);
        assert_eq!(dev.input_capacity(), 64);
    }

    #[test]
    fn a_saved_uart_comes_back_with_its_registers_and_input() {
        let (mut dev, _irq, _ready) = device(SerialOutput::Sink);
        dev.write(3, &[0x03]); // line control: 8N1
        dev.write(7, &[0x5a]); // scratch
        dev.enqueue_input(b"ab").unwrap();
        let saved = dev.save().unwrap();
        assert_eq!(saved.scratch, 0x5a);
        assert_eq!(saved.in_buffer, b"ab");
        let (mut back, _irq, _ready) = device(SerialOutput::Sink);
        back.restore(&saved).unwrap();
        assert_eq!(back.save().unwrap(), saved);
        let mut byte = [0u8; 1];
        back.read(THR, &mut byte);
        assert_eq!(byte[0], b'a');
        let mut overfull = saved;
        overfull.in_buffer = vec![0; 65];
        let (mut refusing, _irq, _ready) = device(SerialOutput::Sink);
        assert!(matches!(
            refusing.restore(&overfull),
            Err(SerialStateError::InputTooLong { len: 65 })
        ));
    }

    #[test]
    fn out_of_range_offsets_are_ignored() {
        let (mut dev, _irq, _ready) = device(SerialOutput::Sink);
        let mut byte = [0u8; 1];
        dev.read(100, &mut byte);
        assert_eq!(byte[0], 0xff);
        dev.write(100, &[1]);
        dev.write(THR, &[]);
    }
}
