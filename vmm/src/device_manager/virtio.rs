//! The virtio-mmio slots: each device gets the next MMIO window and IRQ
//! (an irqfd), its queues' ioeventfds and a `virtio_mmio.device=` argument
//! for the kernel. Slot order is the config's device order, which a
//! snapshot's machine shape records.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;

use super::DeviceError;
use crate::arch::x86_64::layout::{virtio_mmio_cmdline, virtio_mmio_slot, VIRTIO_MMIO_SIZE};
use crate::config::{disk_id, net_id, ConfigError, NetConfig, VmConfig};
use crate::devices::bus::{lock, Bus};
use crate::devices::legacy::IrqLine;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::{Console, ConsoleBackend};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::queue_handler::{DeviceEventHandler, EventDrivenDevice};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{RateLimited, VirtioDevice, VirtioInterrupt};
use crate::memory::GuestMemoryMmap;
use crate::vstate::vm::Vm;

/// The virtio devices of a VM, attached.
pub struct VirtioDevices {
    /// The kernel command line with a `virtio_mmio.device=` per device.
    pub cmdline: String,
    /// The transports, in slot order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The event-loop subscribers of the devices.
    pub device_handlers: Vec<Arc<Mutex<dyn MutEventSubscriber>>>,
    /// The rate-limited devices by id, for the control socket.
    pub rate_limited: Vec<(String, Arc<Mutex<dyn RateLimited>>)>,
}

/// The virtio devices' kinds, in slot order (the order [`attach_all`]
/// attaches them in).
pub fn device_kinds(config: &VmConfig) -> Vec<String> {
    let mut kinds = vec!["block".to_string(); config.disks.len()];
    kinds.extend(std::iter::repeat_n("net".to_string(), config.nets.len()));
    if config.rng {
        kinds.push("rng".into());
    }
    kinds.extend(std::iter::repeat_n(
        "console".to_string(),
        config.consoles.len(),
    ));
    if config.vsock.is_some() {
        kinds.push("vsock".into());
    }
    kinds
}

/// Hands out the slots.
struct Slots<'a> {
    vm: &'a Vm,
    memory: &'a GuestMemoryMmap,
    mmio_bus: &'a mut Bus,
    cmdline: String,
    next: usize,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl Slots<'_> {
    fn attach<D: VirtioDevice + 'static>(
        &mut self,
        make: impl FnOnce(Arc<VirtioInterrupt>) -> Result<Arc<Mutex<D>>, DeviceError>,
    ) -> Result<Arc<Mutex<D>>, DeviceError> {
        let index = self.next;
        let (base, irq) = virtio_mmio_slot(index).ok_or(DeviceError::NoDeviceSlot(index))?;
        let irq_line = IrqLine::new().map_err(|source| DeviceError::EventFd {
            what: "a virtio interrupt",
            source,
        })?;
        self.vm.register_irqfd(&irq_line.0, irq)?;
        let interrupt = Arc::new(VirtioInterrupt::new(irq_line));
        let device = make(interrupt.clone())?;
        let notify = kvm_ioctls::IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY);
        for (queue, evt) in lock(&device).queue_events().iter().enumerate() {
            self.vm
                .fd()
                .register_ioevent(evt, &notify, queue as u32)
                .map_err(|source| DeviceError::Ioeventfd { index, source })?;
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

/// Opens the tap of NIC `id`.
fn open_tap(id: &str, net: &NetConfig) -> Result<Tap, DeviceError> {
    let tap_error = |source| DeviceError::Tap {
        id: id.to_string(),
        source,
    };
    match (&net.tap, net.fd) {
        (Some(name), _) => Tap::open(name).map_err(tap_error),
        (None, Some(fd)) => Tap::from_inherited_fd(fd).map_err(tap_error),
        (None, None) => Err(DeviceError::Config(ConfigError::InvalidNet {
            value: id.to_string(),
            reason: "one of tap=NAME or fd=N is required".into(),
        })),
    }
}

/// Attaches `config`'s virtio devices, in slot order: disks, NICs, the
/// entropy device, the console ports, the vsock device.
pub fn attach_all(
    config: &VmConfig,
    vm: &Vm,
    memory: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
) -> Result<VirtioDevices, DeviceError> {
    let mut slots = Slots {
        vm,
        memory,
        mmio_bus,
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
            None => crate::config::random_mac().map_err(|source| DeviceError::RandomMac {
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
            let rng = Rng::new(interrupt).map_err(|source| DeviceError::EventFd {
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
                return Err(DeviceError::Config(ConfigError::InvalidConsole {
                    value: id,
                    reason: "one of fd=N or file=PATH is required".into(),
                }))
            }
        }
        .map_err(|source| DeviceError::Console {
            id: id.clone(),
            source,
        })?;
        let port = slots.attach(|interrupt| {
            let console =
                Console::new(&id, backend, interrupt).map_err(|source| DeviceError::EventFd {
                    what: "a console's queues",
                    source,
                })?;
            Ok(Arc::new(Mutex::new(console)))
        })?;
        device_handlers.push(handler(&port));
    }
    if let Some(vsock) = &config.vsock {
        let device = slots.attach(|interrupt| {
            let device = Vsock::new(u64::from(vsock.cid), &vsock.socket, interrupt)?;
            log::info!(
                "vsock: guest CID {}, host socket {}",
                vsock.cid,
                vsock.socket.display()
            );
            Ok(Arc::new(Mutex::new(device)))
        })?;
        device_handlers.push(handler(&device));
    }
    Ok(VirtioDevices {
        cmdline: slots.cmdline,
        transports: slots.transports,
        device_handlers,
        rate_limited,
    })
}
