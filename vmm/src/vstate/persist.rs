//! What KVM holds of a VM and of its vCPUs, saved for a snapshot and put
//! back in a new process: the in-kernel interrupt controllers, the PIT and
//! the clock ([`Vm`]'s [`Persist`]); per vCPU its CPUID, registers,
//! FPU/SSE state, LAPIC, MSRs, pending events and run state (the KVM calls
//! behind `Vcpu`'s [`Persist`], which runs them on the vCPU's thread). The
//! structs are KVM's own (kvm-bindings serializes them); the order of the
//! set calls is the one KVM needs.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::vm::Vm;
use crate::persist::Persist;

/// Errors in saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    #[error("{call} failed: {source}")]
    Kvm {
        call: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the {what} list: {source}")]
    Fam {
        what: &'static str,
        source: vmm_sys_util::fam::Error,
    },
    #[error("the saved XSAVE area has {0} words, not 1024")]
    XsaveSize(usize),
    #[error("KVM_SET_MSRS set {set} of {expected} saved MSRs (the first refused is {refused:#x})")]
    PartialMsrs {
        set: usize,
        expected: usize,
        refused: u32,
    },
}

fn kvm(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Kvm { call, source }
}

/// The VM-wide state: PIC (both halves), IOAPIC, PIT and kvmclock.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl crate::persist::VersionedState for VmState {
    const COMPONENT: &'static str = "VM";
    const VERSION: u16 = 1;
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl Persist for Vm {
    type State = VmState;
    type Error = KvmStateError;

    fn save(&self) -> Result<VmState, KvmStateError> {
        let fd = self.fd();
        let mut clock = fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK takes no flags but these; the TSC-stable one is an
        // output only.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(VmState {
            pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Puts the state into a VM made like the saved one (irqchip and PIT
    /// created).
    fn restore(&mut self, state: &VmState) -> Result<(), KvmStateError> {
        let fd = self.fd();
        fd.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
        fd.set_clock(&state.clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// One vCPU's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// x87/SSE (and, where the guest enabled it, extended) state: the
    /// 4 KiB `kvm_xsave` region.
    pub xsave: Vec<u32>,
    /// Absent on hosts without XSAVE.
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl crate::persist::VersionedState for VcpuState {
    const COMPONENT: &'static str = "vCPU";
    const VERSION: u16 = 1;
}

/// The MSRs a snapshot saves: every one KVM lists that this host lets a
/// vCPU read (`vcpu` is probed; unreadable ones are left out).
pub fn saved_msr_indices(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, KvmStateError> {
    let listed = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(listed
        .as_slice()
        .iter()
        .copied()
        .filter(|index| read_msrs(vcpu, &[*index]).is_ok_and(|read| read.len() == 1))
        .collect())
}

/// Reads `indices`, in chunks KVM accepts; stops at the first one that
/// cannot be read (KVM reads in order).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|index| kvm_msr_entry {
                index: *index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| KvmStateError::Fam {
            what: "MSR",
            source,
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(chunk.len())]);
        if read < chunk.len() {
            break;
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Saves a vCPU that is out of `KVM_RUN` (paused), after a pending I/O
    /// completion has been run (see `Vcpu::finish_pending_io`).
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, KvmStateError> {
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        let msrs = read_msrs(fd, msr_indices)?;
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd
                .get_xsave()
                .map_err(kvm("KVM_GET_XSAVE"))?
                .region
                .to_vec(),
            xcrs: fd.get_xcrs().ok(),
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Puts the state into a freshly created vCPU that has not run.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), KvmStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|source| KvmStateError::Fam {
            what: "CPUID",
            source,
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        let mut xsave = kvm_xsave::default();
        if self.xsave.len() != xsave.region.len() {
            return Err(KvmStateError::XsaveSize(self.xsave.len()));
        }
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: `kvm_xsave` is the 4 KiB legacy buffer; this VMM never
        // enables KVM_CAP_XSAVE2's larger, dynamically sized features, so
        // 4 KiB is exactly what KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|source| KvmStateError::Fam {
                what: "MSR",
                source,
            })?;
            let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(KvmStateError::PartialMsrs {
                    set,
                    expected: chunk.len(),
                    refused: chunk[set].index,
                });
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialize_and_deserialize() {
        let state = VcpuState {
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 42,
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = serde_json::to_string(&state).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.msrs[0].data, 42);
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        let vm = VmState::default();
        let json = serde_json::to_string(&vm).unwrap();
        let back: VmState = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
    }
}
