//! How an x86_64 guest is laid out and entered: the guest-physical memory map,
//! the Linux 64-bit boot protocol (zero page, GDT, identity page tables,
//! registers), CPUID and MSRs per vCPU, the LAPIC's LINT pins, and the MP
//! table through which an SMP guest finds its CPUs and IOAPIC.

pub mod acpi;
pub mod aml;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
