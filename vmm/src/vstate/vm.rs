//! The KVM VM: memory slots, the in-kernel interrupt controllers (PIC,
//! IOAPIC, LAPICs) and PIT, and irqfd registration for device interrupts.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::GuestMemoryMmap;

/// Errors in creating or configuring the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (expected 12)")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddress(kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed: {0}")]
    SetIdentityMap(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    CreateIrqChip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    CreatePit(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} at {addr:#x} failed: {source}")]
    SetMemoryRegion {
        slot: u32,
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD for GSI {gsi} failed: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
}

/// Opens `/dev/kvm` and checks the API version.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::ApiVersion(version));
    }
    Ok(kvm)
}

/// A KVM VM with its guest RAM and interrupt controllers.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM on `memory` (one slot per region), then the
    /// in-kernel irqchip and the PIT.
    ///
    /// Memory first: once the irqchip exists, each memory slot change
    /// waits for KVM's SRCU readers (`synchronize_srcu_expedited`), which
    /// took 5 to 10 ms per slot on our hosts against 0.1 to 0.2 ms before
    /// it (bench/boot.py's breakdown; Firecracker orders it the same way).
    pub fn new(kvm: &Kvm, memory: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let vm = Self { fd };
        vm.register_memory(memory)?;
        let fd = vm.fd;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::SetIdentityMap)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(Self { fd })
    }

    /// Gives every guest RAM region to KVM, one slot each.
    fn register_memory(&self, memory: &GuestMemoryMmap) -> Result<(), VmError> {
        self.set_memory_slots(memory, 0)
    }

    /// Switches KVM's dirty-page log of every slot on or off (slot N is
    /// region N; switching it on starts from a clean log).
    pub fn set_dirty_logging(&self, memory: &GuestMemoryMmap, on: bool) -> Result<(), VmError> {
        self.set_memory_slots(memory, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// The pages of slot `slot` (`len` bytes) written by the guest since the
    /// last call, as a bitmap of 64 pages per word; reading clears it.
    pub fn dirty_log(&self, slot: u32, len: usize) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, len)
            .map_err(|source| VmError::DirtyLog { slot, source })
    }

    fn set_memory_slots(&self, memory: &GuestMemoryMmap, flags: u32) -> Result<(), VmError> {
        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let addr = region.start_addr().0;
            let host_addr = region.as_ptr() as u64;
            let region_spec = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: addr,
                memory_size: region.len(),
                userspace_addr: host_addr,
            };
            // SAFETY: the host range [host_addr, host_addr + len) is a live
            // mapping owned by `memory`, which outlives the VM (the VMM keeps
            // both until the process exits).
            unsafe { self.fd.set_user_memory_region(region_spec) }
                .map_err(|source| VmError::SetMemoryRegion { slot, addr, source })?;
        }
        Ok(())
    }

    /// Routes writes to `evt` to the interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
