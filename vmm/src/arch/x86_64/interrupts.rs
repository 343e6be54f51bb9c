//! The local APIC's LINT pins: LINT0 as ExtINT (the legacy PIC's output) and
//! LINT1 as NMI, which is what firmware leaves for an MP-table guest.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors in programming the LAPIC.
#[derive(Debug, thiserror::Error)]
pub enum InterruptsError {
    #[error("KVM_GET_LAPIC failed: {0}")]
    GetLapic(kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC failed: {0}")]
    SetLapic(kvm_ioctls::Error),
}

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a LAPIC state.
pub fn configure_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Applies [`configure_lint`] to a vCPU's in-kernel LAPIC.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), InterruptsError> {
    let mut lapic = vcpu.get_lapic().map_err(InterruptsError::GetLapic)?;
    configure_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(InterruptsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        configure_lint(&mut lapic);
        assert_eq!(get_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!((get_reg(&lapic, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
        set_reg(&mut lapic, APIC_LVT0, 0);
        configure_lint(&mut lapic);
        assert_eq!((get_reg(&lapic, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
    }
}
