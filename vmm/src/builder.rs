//! Assembles a VM from a validated [`VmConfig`]: KVM, guest RAM, the kernel
//! and its boot data, the legacy devices on their buses, and configured
//! vCPUs. Everything that can fail because of bad input fails here, before
//! any guest code runs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{self, AcpiError};
use crate::arch::x86_64::boot::{self, BootError};
use crate::arch::x86_64::cpuid::VcpuTopology;
use crate::arch::x86_64::layout::{
    guest_ram_ranges, virtio_mmio_cmdline, virtio_mmio_slot, ACPI_PM1_EVT_PORT, ACPI_PM_PORTS_LEN,
    BOOT_TIMER_SIZE, BOOT_TIMER_START, I8042_KBD_IRQ, SERIAL_IRQ, VIRTIO_MMIO_SIZE,
};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::config::{
    disk_id, host_memory_mib, net_id, ConfigError, HostLimits, NetConfig, SerialConfig, VmConfig,
};
use crate::devices::bus::{lock, Bus, BusError};
use crate::devices::legacy::acpi_pm::AcpiPm;
use crate::devices::legacy::boot_timer::BootTimer;
use crate::devices::legacy::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use crate::devices::legacy::serial::{
    InputReady, SerialDevice, SerialOutput, SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use crate::devices::legacy::IrqLine;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::console::{Console, ConsoleBackend, ConsoleBackendError};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{Net, NetError, Tap, TapError};
use crate::devices::virtio::queue_handler::{DeviceEventHandler, EventDrivenDevice};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::{RateLimited, VirtioDevice, VirtioInterrupt};
use crate::memory::{create_guest_ram, GuestMemoryMmap, MemoryError};
use crate::platform::KvmFlavor;
use crate::snapshot::file::{read_memory, read_state, SnapshotError};
use crate::snapshot::state::{MachineShape, VmSnapshot};
use crate::snapshot::{MEMORY_FILE, STATE_FILE};
use crate::vstate::persist::{saved_msr_indices, PersistError};
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
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("NIC {id}: {source}")]
    Tap { id: String, source: TapError },
    #[error("NIC {id}: no MAC given and no random one to make: {source}")]
    RandomMac {
        id: String,
        source: crate::config::RandomError,
    },
    #[error("{id}: {source}")]
    Console {
        id: String,
        source: ConsoleBackendError,
    },
    #[error("cannot register the queue notification of virtio device {index}: {source}")]
    Ioeventfd {
        index: usize,
        source: kvm_ioctls::Error,
    },
    #[error("no MMIO slot or IRQ left for virtio device {0}")]
    NoDeviceSlot(usize),
    #[error("cannot place a device on its bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore the VM's KVM state: {0}")]
    VmState(PersistError),
    #[error("cannot probe the vCPUs' MSRs: {0}")]
    MsrProbe(PersistError),
    #[error("cannot listen on {purpose} socket {path}: {source}")]
    Listen {
        purpose: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

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

/// A VM ready to run: everything created and configured, no thread started.
pub struct BuiltVm {
    pub config: VmConfig,
    pub kvm: Kvm,
    pub vm: Vm,
    pub memory: GuestMemoryMmap,
    pub memfd: File,
    pub vcpus: Vec<Vcpu>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub serial_input: SerialInput,
    pub serial_input_ready: EventFd,
    pub i8042: Arc<Mutex<I8042>>,
    pub i8042_reset: EventFd,
    pub acpi_poweroff: EventFd,
    pub boot_time_us: Arc<AtomicU64>,
    pub control_listener: Option<(UnixListener, PathBuf)>,
    /// The event-loop subscribers of the virtio devices.
    pub device_handlers: Vec<Arc<Mutex<dyn MutEventSubscriber>>>,
    /// The rate-limited devices by id, for the control socket.
    pub rate_limited: Vec<(String, Arc<Mutex<dyn RateLimited>>)>,
    /// The virtio devices' transports, in slot order, for snapshots.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// What a snapshot of this VM must be restored into.
    pub shape: MachineShape,
}

fn eventfd(what: &'static str) -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::EventFd { what, source })
}

fn irq_line(what: &'static str) -> Result<IrqLine, BuildError> {
    IrqLine::new().map_err(|source| BuildError::EventFd { what, source })
}

/// Binds a Unix socket at `path`, replacing a stale socket file but never
/// any other kind of file.
pub fn bind_unix_socket(path: &Path, purpose: &'static str) -> Result<UnixListener, BuildError> {
    let listen_error = |source| BuildError::Listen {
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

fn serial_backend(config: &SerialConfig) -> Result<(SerialOutput, SerialInput), BuildError> {
    Ok(match config {
        SerialConfig::Stdout => (SerialOutput::Stdout(std::io::stdout()), SerialInput::Stdin),
        SerialConfig::Off => (SerialOutput::Sink, SerialInput::None),
        SerialConfig::File { path } => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::SerialFile {
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

/// Opens the tap of NIC `id`.
fn open_tap(id: &str, net: &NetConfig) -> Result<Tap, BuildError> {
    let tap_error = |source| BuildError::Tap {
        id: id.to_string(),
        source,
    };
    match (&net.tap, net.fd) {
        (Some(name), _) => Tap::open(name).map_err(tap_error),
        (None, Some(fd)) => Tap::from_inherited_fd(fd).map_err(tap_error),
        (None, None) => Err(BuildError::Config(ConfigError::InvalidNet {
            value: id.to_string(),
            reason: "one of tap=NAME or fd=N is required".into(),
        })),
    }
}

/// Hands out virtio-mmio slots: each device gets its MMIO window and IRQ
/// (irqfd), its queues' ioeventfds, and a `virtio_mmio.device=` argument.
struct VirtioSlots<'a> {
    vm: &'a Vm,
    memory: &'a GuestMemoryMmap,
    mmio_bus: Bus,
    cmdline: String,
    next: usize,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl VirtioSlots<'_> {
    fn attach<D: VirtioDevice + 'static>(
        &mut self,
        make: impl FnOnce(Arc<VirtioInterrupt>) -> Result<Arc<Mutex<D>>, BuildError>,
    ) -> Result<Arc<Mutex<D>>, BuildError> {
        let index = self.next;
        let (base, irq) = virtio_mmio_slot(index).ok_or(BuildError::NoDeviceSlot(index))?;
        let irq_line = irq_line("a virtio interrupt")?;
        self.vm.register_irqfd(&irq_line.0, irq)?;
        let interrupt = Arc::new(VirtioInterrupt::new(irq_line));
        let device = make(interrupt.clone())?;
        let notify = kvm_ioctls::IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY);
        for (queue, evt) in crate::devices::bus::lock(&device)
            .queue_events()
            .iter()
            .enumerate()
        {
            self.vm
                .fd()
                .register_ioevent(evt, &notify, queue as u32)
                .map_err(|source| BuildError::Ioeventfd { index, source })?;
        }
        let dyn_device: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            dyn_device,
            interrupt,
            self.memory.clone(),
        )));
        self.transports.push(transport.clone());
        self.mmio_bus.insert(transport, base, VIRTIO_MMIO_SIZE)?;
        self.cmdline.push(' ');
        self.cmdline.push_str(&virtio_mmio_cmdline(base, irq));
        self.next += 1;
        Ok(device)
    }
}

/// The event-loop subscriber of `device`.
fn handler<D: EventDrivenDevice + 'static>(
    device: &Arc<Mutex<D>>,
) -> Arc<Mutex<dyn MutEventSubscriber>> {
    Arc::new(Mutex::new(DeviceEventHandler::new(device.clone())))
}

/// The virtio devices' kinds, in slot order (the order `build` attaches
/// them in).
fn device_kinds(config: &VmConfig) -> Vec<String> {
    let mut kinds = vec!["block".to_string(); config.disks.len()];
    kinds.extend(std::iter::repeat_n("net".to_string(), config.nets.len()));
    if config.rng {
        kinds.push("rng".into());
    }
    kinds.extend(std::iter::repeat_n(
        "console".to_string(),
        config.consoles.len(),
    ));
    kinds
}

/// Validates `config` against this host and builds the VM, to boot its
/// kernel.
pub fn build_vm(config: VmConfig) -> Result<BuiltVm, BuildError> {
    build(config, None)
}

/// Where a restored VM's RAM and state come from: a snapshot directory or
/// a migration stream. `load` fills guest RAM and returns the state.
pub trait RestoreSource {
    fn load(&mut self, memory: &GuestMemoryMmap) -> Result<VmSnapshot, SnapshotError>;
}

/// A snapshot directory (see [`crate::snapshot`]).
struct SnapshotDir<'a>(&'a Path);

impl RestoreSource for SnapshotDir<'_> {
    fn load(&mut self, memory: &GuestMemoryMmap) -> Result<VmSnapshot, SnapshotError> {
        let snapshot = read_state(&self.0.join(STATE_FILE))?;
        // The shape first: RAM of another size is refused by its length.
        read_memory(&self.0.join(MEMORY_FILE), memory).map_err(|err| match err {
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

/// Builds the VM of `config` in the state saved in snapshot directory
/// `dir`: its RAM, devices and vCPUs as they were, the kernel not loaded
/// again. The snapshot must be of a machine of the same shape; the
/// backends (disk files, taps, sockets) are `config`'s.
pub fn restore_vm(config: VmConfig, dir: &Path) -> Result<BuiltVm, BuildError> {
    log::info!("restoring the VM saved in {}", dir.display());
    build(config, Some(&mut SnapshotDir(dir)))
}

/// Builds the VM of `config` from `source`'s RAM and state.
pub fn restore_from(
    config: VmConfig,
    source: &mut dyn RestoreSource,
) -> Result<BuiltVm, BuildError> {
    build(config, Some(source))
}

/// The shape of the machine `config` describes, as snapshots record it.
pub fn machine_shape(config: &VmConfig) -> MachineShape {
    MachineShape {
        vcpus: config.machine.vcpus,
        memory_bytes: config.memory_bytes(),
        devices: device_kinds(config),
    }
}

fn build(config: VmConfig, restore: Option<&mut dyn RestoreSource>) -> Result<BuiltVm, BuildError> {
    let kvm = open_kvm()?;
    let limits = HostLimits {
        max_vcpus: kvm.get_max_vcpus() as u32,
        host_memory_mib: host_memory_mib().map_err(BuildError::HostMemory)?,
    };
    config.validate(&limits)?;
    let flavor = KvmFlavor::detect();
    let mem_size = config.memory_bytes();
    let vcpu_count = config.machine.vcpus;
    log::info!(
        "building VM: {} vCPU(s), {} MiB, kernel {}, KVM flavor {:?}",
        vcpu_count,
        config.machine.memory_mib,
        config.boot.kernel.display(),
        flavor
    );

    let shape = machine_shape(&config);

    let ram = create_guest_ram(&guest_ram_ranges(mem_size))?;
    let vm = Vm::new(&kvm)?;
    vm.register_memory(&ram.memory)?;

    let snapshot = match restore {
        Some(source) => Some(source.load(&ram.memory)?),
        None => None,
    };
    if let Some(snapshot) = &snapshot {
        snapshot.machine.check(&shape)?;
        if snapshot.vcpus.len() != vcpu_count as usize
            || snapshot.devices.len() != shape.devices.len()
        {
            return Err(SnapshotError::Mismatch(format!(
                "it holds {} vCPU and {} device state(s) for a machine of {} and {}",
                snapshot.vcpus.len(),
                snapshot.devices.len(),
                vcpu_count,
                shape.devices.len()
            ))
            .into());
        }
    }

    // A restored VM's RAM is the snapshot's; a booting one gets the kernel.
    let boot_files = match &snapshot {
        Some(_) => None,
        None => {
            let kernel = boot::load_kernel(&ram.memory, &config.boot.kernel)?;
            let initrd = match &config.boot.initrd {
                Some(path) => Some(boot::load_initrd(&ram.memory, path, &kernel, mem_size)?),
                None => None,
            };
            Some((kernel, initrd))
        }
    };
    // virtio-mmio devices, in slot order: disks, NICs, the entropy device,
    // the console ports.
    let mut slots = VirtioSlots {
        vm: &vm,
        memory: &ram.memory,
        mmio_bus: Bus::new(),
        cmdline: config.boot.cmdline.clone(),
        next: 0,
        transports: Vec::new(),
    };
    let mut device_handlers = Vec::new();
    let mut rate_limited: Vec<(String, Arc<Mutex<dyn RateLimited>>)> = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        let id = disk_id(disk, index);
        let block = slots.attach(|interrupt| {
            Ok(Arc::new(Mutex::new(Block::new(
                &disk.path,
                disk.read_only,
                &id,
                disk.rate_limit,
                interrupt,
            )?)))
        })?;
        device_handlers.push(handler(&block));
        rate_limited.push((id, block));
    }
    for (index, net) in config.nets.iter().enumerate() {
        let id = net_id(net, index);
        let tap = open_tap(&id, net)?;
        let mac = match net.mac {
            Some(mac) => mac,
            None => crate::config::random_mac().map_err(|source| BuildError::RandomMac {
                id: id.clone(),
                source,
            })?,
        };
        log::info!("NIC {id}: tap {}, guest MAC {mac}", tap.name());
        let nic = slots.attach(|interrupt| {
            Ok(Arc::new(Mutex::new(Net::new(
                &id,
                tap,
                mac.0,
                net.mtu,
                net.rate_limit,
                interrupt,
            )?)))
        })?;
        device_handlers.push(handler(&nic));
        rate_limited.push((id, nic));
    }
    if config.rng {
        let rng = slots.attach(|interrupt| {
            let rng = Rng::new(interrupt).map_err(|source| BuildError::EventFd {
                what: "the entropy device's queue",
                source,
            })?;
            Ok(Arc::new(Mutex::new(rng)))
        })?;
        device_handlers.push(handler(&rng));
    }
    for (index, console) in config.consoles.iter().enumerate() {
        let id = format!("nubis-console{index}");
        let backend = match (console.fd, &console.file) {
            (Some(fd), _) => ConsoleBackend::from_inherited_fd(fd),
            (None, Some(path)) => ConsoleBackend::append_to(path),
            (None, None) => {
                return Err(BuildError::Config(ConfigError::InvalidConsole {
                    value: id,
                    reason: "one of fd=N or file=PATH is required".into(),
                }))
            }
        }
        .map_err(|source| BuildError::Console {
            id: id.clone(),
            source,
        })?;
        let port = slots.attach(|interrupt| {
            let console =
                Console::new(&id, backend, interrupt).map_err(|source| BuildError::EventFd {
                    what: "a console's queues",
                    source,
                })?;
            Ok(Arc::new(Mutex::new(console)))
        })?;
        device_handlers.push(handler(&port));
    }
    let VirtioSlots {
        mut mmio_bus,
        cmdline,
        transports,
        ..
    } = slots;
    let entry = match boot_files {
        Some((kernel, initrd)) => {
            let cmdline_len = boot::write_cmdline(&ram.memory, &cmdline)?;
            mptable::setup_mptable(&ram.memory, vcpu_count)?;
            let rsdp = acpi::setup_acpi(&ram.memory, vcpu_count)?;
            let params =
                boot::build_boot_params(&kernel, cmdline_len, initrd, mem_size, Some(rsdp));
            boot::write_boot_params(&ram.memory, &params)?;
            Some(kernel.entry)
        }
        None => None,
    };
    if let Some(snapshot) = &snapshot {
        for (index, (transport, state)) in transports.iter().zip(&snapshot.devices).enumerate() {
            lock(transport)
                .restore(state)
                .map_err(|detail| SnapshotError::Restore {
                    what: format!("virtio device {index} ({})", state.device.kind()),
                    detail,
                })?;
        }
        for transport in &transports {
            let device = lock(transport).device();
            lock(&device).announce();
        }
    }

    // Legacy devices.
    let (serial_output, serial_input) = serial_backend(&config.serial)?;
    let serial_irq = irq_line("the serial interrupt")?;
    vm.register_irqfd(&serial_irq.0, SERIAL_IRQ)?;
    let serial_input_ready = eventfd("serial input readiness")?;
    let serial_ready_for_device =
        serial_input_ready
            .try_clone()
            .map_err(|source| BuildError::EventFd {
                what: "serial input readiness",
                source,
            })?;
    let serial = match &snapshot {
        Some(snapshot) => SerialDevice::restored(
            serial_irq,
            InputReady(serial_ready_for_device),
            serial_output,
            &snapshot.serial,
        )
        .map_err(|detail| SnapshotError::Restore {
            what: "serial port".into(),
            detail,
        })?,
        None => SerialDevice::new(
            serial_irq,
            InputReady(serial_ready_for_device),
            serial_output,
        ),
    };
    let serial = Arc::new(Mutex::new(serial));

    let kbd_irq = irq_line("the keyboard interrupt")?;
    vm.register_irqfd(&kbd_irq.0, I8042_KBD_IRQ)?;
    let i8042_reset = eventfd("the i8042 reset line")?;
    let reset_for_device = i8042_reset
        .try_clone()
        .map_err(|source| BuildError::EventFd {
            what: "the i8042 reset line",
            source,
        })?;
    let mut keyboard = I8042::new(kbd_irq, reset_for_device);
    if let Some(snapshot) = &snapshot {
        keyboard.restore(&snapshot.i8042);
    }
    let i8042 = Arc::new(Mutex::new(keyboard));

    let acpi_poweroff = eventfd("the ACPI power-off line")?;
    let acpi_pm = AcpiPm::new(
        acpi_poweroff
            .try_clone()
            .map_err(|source| BuildError::EventFd {
                what: "the ACPI power-off line",
                source,
            })?,
        i8042_reset
            .try_clone()
            .map_err(|source| BuildError::EventFd {
                what: "the ACPI reset line",
                source,
            })?,
    );

    let boot_timer = BootTimer::new();
    let boot_time_us = boot_timer.boot_time();

    let mut io_bus = Bus::new();
    io_bus.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
    io_bus.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)?;
    io_bus.insert(
        Arc::new(Mutex::new(acpi_pm)),
        u64::from(ACPI_PM1_EVT_PORT),
        ACPI_PM_PORTS_LEN,
    )?;
    mmio_bus.insert(
        Arc::new(Mutex::new(boot_timer)),
        BOOT_TIMER_START,
        BOOT_TIMER_SIZE,
    )?;
    let io_bus = Arc::new(io_bus);
    let mmio_bus = Arc::new(mmio_bus);

    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::SupportedCpuid)?;
    let mut vcpus = Vec::with_capacity(vcpu_count as usize);
    for index in 0..vcpu_count {
        let vcpu = Vcpu::new(
            &vm,
            index,
            io_bus.clone(),
            mmio_bus.clone(),
            ram.memory.clone(),
        )?;
        if let Some(entry) = entry {
            let topology = VcpuTopology {
                index,
                count: vcpu_count,
            };
            vcpu.configure(&kvm, &base_cpuid, topology, flavor, entry)?;
        }
        vcpus.push(vcpu);
    }
    if let Some(snapshot) = &snapshot {
        snapshot.vm.restore(vm.fd()).map_err(BuildError::VmState)?;
        for (vcpu, state) in vcpus.iter().zip(&snapshot.vcpus) {
            vcpu.restore(state)?;
        }
    }
    // What a snapshot saves of each vCPU: the MSRs this host lets it read.
    if let Some(first) = vcpus.first() {
        let indices = Arc::new(saved_msr_indices(&kvm, first.fd()).map_err(BuildError::MsrProbe)?);
        for vcpu in &mut vcpus {
            vcpu.set_saved_msrs(indices.clone());
        }
    }

    let control_listener = match &config.control_socket {
        Some(path) => Some((bind_unix_socket(path, "control")?, path.clone())),
        None => None,
    };

    Ok(BuiltVm {
        config,
        kvm,
        vm,
        memory: ram.memory,
        memfd: ram.memfd,
        vcpus,
        serial,
        serial_input,
        serial_input_ready,
        i8042,
        i8042_reset,
        acpi_poweroff,
        boot_time_us,
        control_listener,
        device_handlers,
        rate_limited,
        transports,
        shape,
    })
}
