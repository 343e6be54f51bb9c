//! The vCPU's registers at the 64-bit entry of the Linux boot protocol:
//! long mode with paging on, flat segments from the boot GDT, RSI pointing
//! at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{
    kvm_segment_from_gdt, BOOT_GDT, CODE_SEGMENT_INDEX, DATA_SEGMENT_INDEX, TSS_SEGMENT_INDEX,
};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, ZERO_PAGE_START};
use super::paging::{setup_identity_mapping, PagingError};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Errors in setting a vCPU's boot registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
    #[error("cannot write the boot GDT/IDT at {addr:#x}: {source}")]
    WriteDescriptorTable {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    Paging(#[from] PagingError),
}

/// The general-purpose registers at kernel entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Fills `sregs` for long mode with the boot GDT; `cr3` is the PML4.
pub fn configure_long_mode(sregs: &mut kvm_sregs, cr3: u64) {
    let code = kvm_segment_from_gdt(BOOT_GDT[1], CODE_SEGMENT_INDEX);
    let data = kvm_segment_from_gdt(BOOT_GDT[2], DATA_SEGMENT_INDEX);
    let tss = kvm_segment_from_gdt(BOOT_GDT[3], TSS_SEGMENT_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Writes the boot GDT, an empty IDT and the identity page tables into guest
/// memory and loads the matching special registers into the vCPU.
pub fn setup_sregs<M: GuestMemoryBackend>(mem: &M, vcpu: &VcpuFd) -> Result<(), RegsError> {
    for (index, entry) in BOOT_GDT.iter().enumerate() {
        let addr = BOOT_GDT_START + (index as u64) * 8;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|source| RegsError::WriteDescriptorTable { addr, source })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| RegsError::WriteDescriptorTable {
            addr: BOOT_IDT_START,
            source,
        })?;
    let cr3 = setup_identity_mapping(mem)?;
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_long_mode(&mut sregs, cr3);
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

/// Sets the general-purpose registers for entry at `entry`.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry)).map_err(RegsError::SetRegs)
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_sregs() {
        let mut sregs = kvm_sregs::default();
        configure_long_mode(&mut sregs, 0x9000);
        assert_eq!(sregs.cr3, 0x9000);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 8);
        assert_eq!(sregs.ss.selector, 16);
        assert_eq!(sregs.gdt.limit, 31);
    }

    #[test]
    fn entry_registers() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
    }
}
