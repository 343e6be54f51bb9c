//! The legacy PC devices a microVM keeps: the 8250 UART console, an i8042
//! (reset line and Ctrl-Alt-Del), the ACPI power-off/reset ports and GPE
//! block, the VM generation id and the boot-timer page.

pub mod acpi_pm;
pub mod boot_timer;
pub mod i8042;
pub mod serial;
pub mod vmgenid;

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd registered with KVM as an irqfd:
/// writing it raises the IRQ without leaving the device's thread.
pub struct IrqLine(pub EventFd);

impl IrqLine {
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    pub fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        IrqLine::trigger(self)
    }
}
