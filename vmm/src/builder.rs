//! Assembles a VM from a validated [`VmConfig`], in one of two ways:
//! [`build_for_boot`] loads the kernel and its boot data into fresh RAM
//! and sets the vCPUs up to enter it; [`build_from_snapshot`] fills RAM
//! from a snapshot or a migration stream and puts the saved device, VM and
//! vCPU state back. Both share one core (KVM, guest RAM, the devices of a
//! [`DeviceManager`], the vCPUs), so that a restored VM has exactly the
//! machine a booted one would. Everything that can fail because of bad
//! input fails here, before any guest code runs.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use vm_memory::GuestAddress;

use crate::arch::x86_64::acpi::{self, AcpiError};
use crate::arch::x86_64::boot::{self, BootError};
use crate::arch::x86_64::cpuid::VcpuTopology;
use crate::arch::x86_64::layout::guest_ram_ranges;
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::config::{host_memory_mib, ConfigError, HostLimits, VmConfig};
pub use crate::device_manager::legacy::bind_unix_socket;
use crate::device_manager::virtio::device_kinds;
pub use crate::device_manager::SerialInput;
use crate::device_manager::{DeviceError, DeviceManager, DevicesState, DevicesStateError};
use crate::devices::legacy::vmgenid::{self, VmGenIdError};
use crate::devices::virtio::persist::{DeviceState, TransportState};
use crate::memory::{create_guest_ram, GuestMemoryMmap, MemoryError};
use crate::persist::{Persist, Versioned};
use crate::platform::KvmFlavor;
use crate::snapshot::file::{read_memory, read_state, SnapshotError};
use crate::snapshot::state::{MachineShape, VmSnapshot};
use crate::snapshot::{MEMORY_FILE, STATE_FILE};
use crate::startup;
use crate::vstate::persist::{saved_msr_indices, KvmStateError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{open_kvm, Vm, VmError};

/// Errors in building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read the host's memory size: {0}")]
    HostMemory(std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    DevicesState(#[from] DevicesStateError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore the VM's KVM state: {0}")]
    VmState(KvmStateError),
    #[error("cannot probe the vCPUs' MSRs: {0}")]
    MsrProbe(KvmStateError),
    #[error(transparent)]
    VmGenId(#[from] VmGenIdError),
}

/// A VM ready to run: everything created and configured, no thread started.
pub struct BuiltVm {
    pub config: VmConfig,
    pub kvm: Kvm,
    pub vm: Vm,
    pub memory: GuestMemoryMmap,
    pub backing: crate::memory::RamBacking,
    pub vcpus: Vec<Vcpu>,
    pub devices: DeviceManager,
    pub control_listener: Option<(UnixListener, PathBuf)>,
    /// What a snapshot of this VM must be restored into.
    pub shape: MachineShape,
}

/// Where a restored VM's RAM and state come from: a snapshot directory or
/// a migration stream. `load` fills guest RAM and returns the state.
pub trait RestoreSource {
    /// Guest RAM the source provides itself for `ranges` (mapped from its
    /// file), or None for fresh RAM that `load` fills.
    fn ram(
        &mut self,
        _ranges: &[(GuestAddress, u64)],
    ) -> Option<Result<crate::memory::GuestRam, BuildError>> {
        None
    }
    fn load(&mut self, memory: &GuestMemoryMmap) -> Result<VmSnapshot, SnapshotError>;
    /// Whether the restored VM starts a new generation (a new VM
    /// generation id, the guest told): it may run from a copy of its past,
    /// as any restore of a snapshot does.
    fn new_generation(&self) -> bool {
        true
    }
}

/// What a restored VM is to the one that was saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreAs {
    /// The same VM, going on: the snapshot's memory is read into RAM of
    /// its own, and its NICs keep their MACs.
    Resume,
    /// One of possibly many clones: the memory file is mapped privately
    /// (pages copied only when the guest writes them, so that clones of
    /// one snapshot share the rest), and its NICs take the config's MACs
    /// (the host then tells the guest its new identity).
    Clone,
}

/// A snapshot directory (see [`crate::snapshot`]).
pub struct SnapshotDir<'a> {
    pub dir: &'a Path,
    pub restore_as: RestoreAs,
}

impl RestoreSource for SnapshotDir<'_> {
    fn ram(
        &mut self,
        ranges: &[(GuestAddress, u64)],
    ) -> Option<Result<crate::memory::GuestRam, BuildError>> {
        if self.restore_as != RestoreAs::Clone {
            return None;
        }
        let path = self.dir.join(MEMORY_FILE);
        log::info!("mapping guest RAM privately from {}", path.display());
        Some(
            File::open(&path)
                .map_err(|source| {
                    BuildError::Snapshot(SnapshotError::Io {
                        action: "open",
                        path: path.clone(),
                        source,
                    })
                })
                .and_then(|file| Ok(crate::memory::map_guest_ram_privately(ranges, file)?)),
        )
    }

    fn load(&mut self, memory: &GuestMemoryMmap) -> Result<VmSnapshot, SnapshotError> {
        log::info!("restoring the VM saved in {}", self.dir.display());
        let snapshot = read_state(&self.dir.join(STATE_FILE))?;
        if self.restore_as == RestoreAs::Clone {
            // Mapped already (`ram`), of the size the VM's config asks:
            // the state's shape check below compares it with the saved.
            return Ok(snapshot);
        }
        // The shape first: RAM of another size is refused by its length.
        read_memory(&self.dir.join(MEMORY_FILE), memory).map_err(|err| match err {
            SnapshotError::MemorySize { .. } => SnapshotError::Mismatch(format!(
                "it has {} MiB of RAM, the VM {}",
                snapshot.machine.memory_bytes >> 20,
                crate::snapshot::file::memory_len(memory) >> 20
            )),
            other => other,
        })?;
        Ok(snapshot)
    }
}

/// Makes `config` fit a machine saved before every VM had a vsock device:
/// such a snapshot (or a migrating VM started then) is restored without
/// one rather than refused; everything else must match as it is.
pub fn fit_to_saved(config: &mut VmConfig, saved: &MachineShape) {
    if config.vsock.is_some() && !saved.devices.iter().any(|kind| kind == "vsock") {
        log::info!("the saved machine has no vsock device: the VM goes on without one");
        config.vsock = None;
    }
}

/// The shape of the machine `config` describes, as snapshots record it.
pub fn machine_shape(config: &VmConfig) -> MachineShape {
    MachineShape {
        vcpus: config.machine.vcpus,
        memory_bytes: config.memory_bytes(),
        devices: device_kinds(config),
    }
}

/// What both paths build first: KVM, the VM and its (empty) RAM, for a
/// config validated against this host.
struct Core {
    config: VmConfig,
    kvm: Kvm,
    vm: Vm,
    ram: crate::memory::GuestRam,
    flavor: KvmFlavor,
    shape: MachineShape,
}

impl Core {
    fn new(config: VmConfig) -> Result<Self, BuildError> {
        Self::with_ram(config, None)
    }

    /// [`Core::new`] with RAM that `source` provides, if it does.
    fn with_ram(
        config: VmConfig,
        source: Option<&mut dyn RestoreSource>,
    ) -> Result<Self, BuildError> {
        let kvm = open_kvm()?;
        startup::mark("kvm opened");
        let limits = HostLimits {
            max_vcpus: kvm.get_max_vcpus() as u32,
            host_memory_mib: host_memory_mib().map_err(BuildError::HostMemory)?,
        };
        config.validate(&limits)?;
        let flavor = KvmFlavor::detect();
        log::info!(
            "building VM: {} vCPU(s), {} MiB, kernel {}, KVM flavor {:?}",
            config.machine.vcpus,
            config.machine.memory_mib,
            config.boot.kernel.display(),
            flavor
        );
        let shape = machine_shape(&config);
        startup::mark("config checked");
        let ranges = guest_ram_ranges(config.memory_bytes());
        let ram = match source.and_then(|source| source.ram(&ranges)) {
            Some(ram) => ram?,
            None => create_guest_ram(&ranges)?,
        };
        startup::mark("guest memory");
        let vm = Vm::new(&kvm, &ram.memory)?;
        startup::mark("KVM VM");
        Ok(Self {
            config,
            kvm,
            vm,
            ram,
            flavor,
            shape,
        })
    }

    /// The devices of the config, on their buses.
    fn devices(&self) -> Result<DeviceManager, BuildError> {
        Ok(DeviceManager::new(
            &self.config,
            &self.vm,
            &self.ram.memory,
        )?)
    }

    /// The vCPUs, on the devices' buses; not configured yet.
    fn vcpus(&self, devices: &DeviceManager) -> Result<Vec<Vcpu>, BuildError> {
        (0..self.config.machine.vcpus)
            .map(|index| {
                Ok(Vcpu::new(
                    &self.vm,
                    index,
                    devices.io_bus.clone(),
                    devices.mmio_bus.clone(),
                    self.ram.memory.clone(),
                )?)
            })
            .collect()
    }

    /// Tells the vCPUs which MSRs a snapshot saves, binds the control
    /// socket, and hands the VM over.
    fn finish(self, devices: DeviceManager, mut vcpus: Vec<Vcpu>) -> Result<BuiltVm, BuildError> {
        // What a snapshot saves of each vCPU: the MSRs this host lets it read.
        if let Some(first) = vcpus.first() {
            let indices = std::sync::Arc::new(
                saved_msr_indices(&self.kvm, first.fd()).map_err(BuildError::MsrProbe)?,
            );
            for vcpu in &mut vcpus {
                vcpu.set_saved_msrs(indices.clone());
            }
        }
        let control_listener = match &self.config.control_socket {
            Some(path) => Some((
                bind_unix_socket(path, "control").map_err(BuildError::Devices)?,
                path.clone(),
            )),
            None => None,
        };
        Ok(BuiltVm {
            config: self.config,
            kvm: self.kvm,
            vm: self.vm,
            memory: self.ram.memory,
            backing: self.ram.backing,
            vcpus,
            devices,
            control_listener,
            shape: self.shape,
        })
    }
}

/// Validates `config` against this host and builds the VM, to boot its
/// kernel.
pub fn build_for_boot(config: VmConfig) -> Result<BuiltVm, BuildError> {
    let core = Core::new(config)?;
    let memory = &core.ram.memory;
    let mem_size = core.config.memory_bytes();
    let vcpu_count = core.config.machine.vcpus;
    let kernel = boot::load_kernel(memory, &core.config.boot.kernel)?;
    let initrd = match &core.config.boot.initrd {
        Some(path) => Some(boot::load_initrd(memory, path, &kernel, mem_size)?),
        None => None,
    };
    startup::mark("kernel");
    let devices = core.devices()?;
    startup::mark("devices");
    let cmdline_len = boot::write_cmdline(memory, &devices.cmdline)?;
    mptable::setup_mptable(memory, vcpu_count)?;
    let rsdp = acpi::setup_acpi(memory, vcpu_count)?;
    vmgenid::write_new_id(memory)?;
    let params = boot::build_boot_params(&kernel, cmdline_len, initrd, mem_size, Some(rsdp));
    boot::write_boot_params(memory, &params)?;
    startup::mark("boot data");

    let vcpus = core.vcpus(&devices)?;
    startup::mark("vCPUs created");
    let base_cpuid = core
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::SupportedCpuid)?;
    for vcpu in &vcpus {
        let topology = VcpuTopology {
            index: vcpu.index(),
            count: vcpu_count,
        };
        vcpu.configure(&core.kvm, &base_cpuid, topology, core.flavor, kernel.entry)?;
    }
    startup::mark("vCPUs configured");
    let built = core.finish(devices, vcpus);
    startup::mark("built");
    built
}

/// Builds the VM of `config` in the state `source` saved: its RAM,
/// devices and vCPUs as they were, the kernel not loaded again. The
/// snapshot must be of a machine of the same shape; the backends (disk
/// files, taps, sockets) are `config`'s.
pub fn build_from_snapshot(
    config: VmConfig,
    source: &mut dyn RestoreSource,
    restore_as: RestoreAs,
) -> Result<BuiltVm, BuildError> {
    let mut core = Core::with_ram(config, Some(&mut *source))?;
    let snapshot = source.load(&core.ram.memory)?;
    fit_to_saved(&mut core.config, &snapshot.machine);
    core.shape = machine_shape(&core.config);
    snapshot.machine.check(&core.shape)?;
    if snapshot.vcpus.len() != core.config.machine.vcpus as usize
        || snapshot.devices.len() != core.shape.devices.len()
    {
        return Err(SnapshotError::Mismatch(format!(
            "it holds {} vCPU and {} device state(s) for a machine of {} and {}",
            snapshot.vcpus.len(),
            snapshot.devices.len(),
            core.config.machine.vcpus,
            core.shape.devices.len()
        ))
        .into());
    }
    let VmSnapshot {
        machine: _,
        vm,
        vcpus: vcpu_states,
        devices: mut virtio,
        serial,
        i8042,
        acpi_pm,
    } = snapshot;
    if restore_as == RestoreAs::Clone {
        give_nics_their_macs(&core.config, &mut virtio);
    }
    let mut devices = core.devices()?;
    let mut vcpus = core.vcpus(&devices)?;
    core.vm.restore(&vm).map_err(BuildError::VmState)?;
    for (vcpu, state) in vcpus.iter_mut().zip(&vcpu_states) {
        vcpu.restore(state)?;
    }
    // The devices last: restoring one may raise its interrupt (a vsock
    // device tells the guest of the transport reset, a running device is
    // kicked), which the interrupt controllers' and the vCPUs' saved
    // state would otherwise overwrite, and the guest never hear of.
    devices.stateful.restore(&DevicesState {
        devices: virtio,
        serial,
        i8042,
        acpi_pm,
    })?;
    if source.new_generation() {
        vmgenid::start_new_generation(&core.ram.memory, devices.stateful.acpi_pm())?;
    }
    core.finish(devices, vcpus)
}

/// A clone's NICs take the MACs of its config (the Nth saved NIC the Nth
/// configured one's, as the devices are built in config order); a frame
/// the original had read but not delivered is not the clone's.
fn give_nics_their_macs(config: &VmConfig, saved: &mut [Versioned<TransportState>]) {
    let mut macs = config.nets.iter().map(|net| net.mac);
    for transport in saved {
        if let DeviceState::Net(Versioned(net)) = &mut transport.0.device {
            if let Some(Some(mac)) = macs.next() {
                net.mac = mac.0;
                net.pending_rx_frame.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigOverrides, DiskConfig, VsockConfig};

    fn config_with_vsock() -> VmConfig {
        VmConfig::assemble(
            None,
            ConfigOverrides {
                kernel: Some("/k".into()),
                disks: vec![DiskConfig {
                    path: "/d".into(),
                    read_only: false,
                    id: None,
                    rate_limit: Default::default(),
                }],
                vsock: Some(VsockConfig {
                    cid: 3,
                    socket: "/v.sock".into(),
                }),
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn a_machine_saved_without_vsock_is_restored_without_it() {
        let mut config = config_with_vsock();
        assert_eq!(machine_shape(&config).devices, ["block", "vsock"]);
        let saved = MachineShape {
            vcpus: 1,
            memory_bytes: 128 << 20,
            devices: vec!["block".into()],
        };
        fit_to_saved(&mut config, &saved);
        assert_eq!(config.vsock, None);
        assert!(saved.check(&machine_shape(&config)).is_ok());
        // A machine saved with one keeps it; nothing else is fitted.
        let mut config = config_with_vsock();
        let with = machine_shape(&config);
        fit_to_saved(&mut config, &with);
        assert!(config.vsock.is_some());
        let mut more = saved.clone();
        more.devices.push("net".into());
        let mut config = config_with_vsock();
        fit_to_saved(&mut config, &more);
        assert!(more.check(&machine_shape(&config)).is_err());
    }
}
