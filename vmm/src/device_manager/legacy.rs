//! The legacy PC devices every microVM has, on their buses: the 8250 UART
//! (with its host side: where output goes, where input comes from), the
//! i8042 (reset line, Ctrl-Alt-Del), the ACPI power-off/reset ports and
//! GPE block (with its SCI line) and the boot-timer page.

use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::DeviceError;
use crate::arch::x86_64::layout::{
    ACPI_PM1_EVT_PORT, ACPI_PM_PORTS_LEN, ACPI_SCI_IRQ, BOOT_TIMER_SIZE, BOOT_TIMER_START,
    I8042_KBD_IRQ, SERIAL_IRQ,
};
use crate::config::SerialConfig;
use crate::devices::bus::Bus;
use crate::devices::legacy::acpi_pm::AcpiPm;
use crate::devices::legacy::boot_timer::BootTimer;
use crate::devices::legacy::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use crate::devices::legacy::serial::{
    InputReady, SerialDevice, SerialOutput, SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use crate::devices::legacy::IrqLine;
use crate::vstate::vm::Vm;

/// Where serial input comes from.
pub enum SerialInput {
    /// The VMM's stdin.
    Stdin,
    /// Clients of a listening Unix socket; the current one is shared with the
    /// UART's output side.
    Socket {
        listener: UnixListener,
        path: PathBuf,
        client: Arc<Mutex<Option<std::os::unix::net::UnixStream>>>,
    },
    /// No input (file or discarded output).
    None,
}

/// The legacy devices and the host ends of their lines.
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub serial_input: SerialInput,
    pub serial_input_ready: EventFd,
    pub i8042: Arc<Mutex<I8042>>,
    pub i8042_reset: EventFd,
    pub acpi_poweroff: EventFd,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    pub boot_time_us: Arc<AtomicU64>,
}

fn eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source })
}

fn irq_line(what: &'static str) -> Result<IrqLine, DeviceError> {
    IrqLine::new().map_err(|source| DeviceError::EventFd { what, source })
}

fn clone_eventfd(evt: &EventFd, what: &'static str) -> Result<EventFd, DeviceError> {
    evt.try_clone()
        .map_err(|source| DeviceError::EventFd { what, source })
}

/// Binds a Unix socket at `path`, replacing a stale socket file but never
/// any other kind of file.
pub fn bind_unix_socket(path: &Path, purpose: &'static str) -> Result<UnixListener, DeviceError> {
    let listen_error = |source| DeviceError::Listen {
        purpose,
        path: path.to_path_buf(),
        source,
    };
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if metadata.file_type().is_socket() {
            std::fs::remove_file(path).map_err(listen_error)?;
        } else {
            return Err(listen_error(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    // Only this VMM's user (and root) may connect; peers are checked too
    // (control/server.rs).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    Ok(listener)
}

fn serial_backend(config: &SerialConfig) -> Result<(SerialOutput, SerialInput), DeviceError> {
    Ok(match config {
        SerialConfig::Stdout => (SerialOutput::Stdout(std::io::stdout()), SerialInput::Stdin),
        SerialConfig::Off => (SerialOutput::Sink, SerialInput::None),
        SerialConfig::File { path } => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| DeviceError::SerialFile {
                    path: path.clone(),
                    source,
                })?;
            (SerialOutput::File(file), SerialInput::None)
        }
        SerialConfig::Unix { path } => {
            let listener = bind_unix_socket(path, "serial")?;
            let client = Arc::new(Mutex::new(None));
            (
                SerialOutput::Socket(client.clone()),
                SerialInput::Socket {
                    listener,
                    path: path.clone(),
                    client,
                },
            )
        }
    })
}

impl LegacyDevices {
    /// Makes the legacy devices, their interrupts wired to `vm`, and puts
    /// them on the buses.
    pub fn new(
        serial_config: &SerialConfig,
        vm: &Vm,
        io_bus: &mut Bus,
        mmio_bus: &mut Bus,
    ) -> Result<Self, DeviceError> {
        let (serial_output, serial_input) = serial_backend(serial_config)?;
        let serial_irq = irq_line("the serial interrupt")?;
        vm.register_irqfd(&serial_irq.0, SERIAL_IRQ)?;
        let serial_input_ready = eventfd("serial input readiness")?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            InputReady(clone_eventfd(
                &serial_input_ready,
                "serial input readiness",
            )?),
            serial_output,
        )));

        let kbd_irq = irq_line("the keyboard interrupt")?;
        vm.register_irqfd(&kbd_irq.0, I8042_KBD_IRQ)?;
        let i8042_reset = eventfd("the i8042 reset line")?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            kbd_irq,
            clone_eventfd(&i8042_reset, "the i8042 reset line")?,
        )));

        let acpi_poweroff = eventfd("the ACPI power-off line")?;
        let sci = irq_line("the ACPI SCI")?;
        vm.register_irqfd(&sci.0, ACPI_SCI_IRQ)?;
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(
            clone_eventfd(&acpi_poweroff, "the ACPI power-off line")?,
            clone_eventfd(&i8042_reset, "the ACPI reset line")?,
            sci,
        )));

        let boot_timer = BootTimer::new();
        let boot_time_us = boot_timer.boot_time();

        io_bus.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
        io_bus.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)?;
        io_bus.insert(
            acpi_pm.clone(),
            u64::from(ACPI_PM1_EVT_PORT),
            ACPI_PM_PORTS_LEN,
        )?;
        mmio_bus.insert(
            Arc::new(Mutex::new(boot_timer)),
            BOOT_TIMER_START,
            BOOT_TIMER_SIZE,
        )?;
        Ok(Self {
            serial,
            serial_input,
            serial_input_ready,
            i8042,
            i8042_reset,
            acpi_poweroff,
            acpi_pm,
            boot_time_us,
        })
    }
}
