//! The virtio-mmio transport (virtio 1.x, register layout version 2): one
//! 4 KiB MMIO window per device with feature negotiation, queue setup, the
//! device status state machine, interrupt status/ack and the device's
//! configuration space at offset 0x100.
//!
//! Every value here is written by the untrusted guest: unknown offsets and
//! odd access sizes are ignored, queue registers only change before the
//! driver sets DRIVER_OK, and a device is activated only when every queue it
//! needs is valid in guest memory.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueState, QueueT};

use super::persist::{QueueSnapshot, TransportState, TransportStateError};
use super::{status, Activation, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::bus::{lock, BusDevice};
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5342_554e; // "NUBS"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Kicks normally go to an ioeventfd registered at this offset.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    device_status: u32,
    activated: bool,
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .filter_map(|max| Queue::new(*max).ok())
        .collect()
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
        memory: GuestMemoryMmap,
    ) -> Self {
        let queues = new_queues(&*lock(&device));
        Self {
            device,
            interrupt,
            memory,
            queues,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            device_status: 0,
            activated: false,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.device_status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.queues = new_queues(&*lock(&self.device));
        self.acked_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.device_status = 0;
        self.activated = false;
        self.interrupt.acknowledge(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & status::FEATURES_OK != 0 && self.device_status & status::FEATURES_OK == 0 {
            let offered = lock(&self.device).avail_features();
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            if self.acked_features & !offered != 0 || self.acked_features & version_1 == 0 {
                log::warn!(
                    "virtio: driver features {:#x} refused (offered {:#x}, VERSION_1 required)",
                    self.acked_features,
                    offered
                );
                value &= !status::FEATURES_OK;
            }
        }
        self.device_status = value;
        if value & status::DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.device_status & status::FEATURES_OK == 0 {
            log::warn!("virtio: DRIVER_OK without FEATURES_OK; device not started");
            self.device_status |= status::FAILED;
            return;
        }
        for (index, queue) in self.queues.iter().enumerate() {
            if !queue.ready() || !queue.is_valid(&self.memory) {
                log::warn!("virtio: queue {index} is not ready or not valid; device not started");
                self.device_status |= status::FAILED;
                return;
            }
        }
        let activation = Activation {
            memory: self.memory.clone(),
            queues: std::mem::take(&mut self.queues),
            acked_features: self.acked_features,
        };
        match lock(&self.device).activate(activation) {
            Ok(()) => self.activated = true,
            Err(err) => {
                log::warn!("virtio: activation failed: {err}");
                self.device_status |= status::FAILED;
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let device = lock(&self.device);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => device.avail_features() as u32,
                1 => (device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => device
                .queue_max_sizes()
                .get(self.queue_select as usize)
                .map_or(0, |max| u32::from(*max)),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.device_status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => {
                if self.device_status & status::FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM => {
                // A size that does not fit 16 bits is invalid (virtio-queue
                // ignores it), not truncated into a valid-looking one.
                let size = u16::try_from(value).unwrap_or(0);
                if let Some(queue) = self.selected_queue() {
                    queue.set_size(size);
                }
            }
            REG_QUEUE_READY => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            REG_QUEUE_NOTIFY => {
                // Without an ioeventfd (it is always registered) the kick would land here.
                if let Some(evt) = lock(&self.device).queue_events().get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.set_status(value),
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            REG_QUEUE_AVAIL_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            REG_QUEUE_AVAIL_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            REG_QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => {}
        }
    }

    fn with_queue(&mut self, apply: impl FnOnce(&mut Queue)) {
        if let Some(queue) = self.selected_queue() {
            apply(queue);
        }
    }

    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// The device behind the transport: held (with the transport) while a
    /// migration takes its final state, so that the event loop cannot
    /// serve it meanwhile.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// [`Persist::save`] with the device already locked by the caller.
    pub fn save_locked(
        &self,
        device: &dyn VirtioDevice,
    ) -> Result<TransportState, TransportStateError> {
        let queues = if self.activated {
            device.queue_states()
        } else {
            self.queues.iter().map(|queue| queue.state()).collect()
        };
        Ok(TransportState {
            device_type: device.device_type(),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            device_status: self.device_status,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            queues: queues.into_iter().map(QueueSnapshot::from).collect(),
            device: device.save_state()?,
        })
    }
}

impl Persist for MmioTransport {
    type State = TransportState;
    type Error = TransportStateError;

    /// The transport's and its device's state.
    fn save(&self) -> Result<TransportState, TransportStateError> {
        self.save_locked(&*lock(&self.device))
    }

    /// Takes on a saved state: a device that was running is activated on
    /// the saved queues (checked against guest memory as the driver's own
    /// setup would be) and kicked, so that requests the guest made just
    /// before the snapshot are served.
    fn restore(&mut self, state: &TransportState) -> Result<(), TransportStateError> {
        let mut device = lock(&self.device);
        if state.device_type != device.device_type() {
            return Err(TransportStateError::DeviceType {
                device: device.device_type(),
                saved: state.device_type,
            });
        }
        if state.queues.len() != device.queue_max_sizes().len()
            && (state.activated || !state.queues.is_empty())
        {
            return Err(TransportStateError::QueueCount {
                saved: state.queues.len(),
                device: device.queue_max_sizes().len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, max)) in state
            .queues
            .iter()
            .zip(device.queue_max_sizes())
            .enumerate()
        {
            if saved.max_size != *max {
                return Err(TransportStateError::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    device: *max,
                });
            }
            let queue = Queue::try_from(QueueState::from(*saved))
                .map_err(|reason| TransportStateError::Queue { index, reason })?;
            if state.activated && !queue.is_valid(&self.memory) {
                return Err(TransportStateError::QueueOutsideMemory { index });
            }
            queues.push(queue);
        }
        device.restore_state(&state.device)?;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.device_status = state.device_status;
        self.interrupt.acknowledge(u32::MAX);
        self.interrupt.raise_status(state.interrupt_status);
        if state.activated {
            device.activate(Activation {
                memory: self.memory.clone(),
                queues,
                acked_features: self.acked_features,
            })?;
            self.activated = true;
            self.queues = Vec::new();
            for event in device.queue_events() {
                let _ = event.write(1);
            }
        } else {
            self.activated = false;
            self.queues = if queues.is_empty() {
                new_queues(&*device)
            } else {
                queues
            };
        }
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.device_status & status::DRIVER_OK == 0 || self.activated {
                lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_register(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::IrqLine;
    use crate::devices::virtio::ActivateError;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy {
        sizes: Vec<u16>,
        events: Vec<EventFd>,
        activated: Option<u64>,
        resets: u32,
        config: [u8; 8],
        queues: Vec<QueueState>,
    }

    use crate::devices::virtio::persist::{DeviceState, DeviceStateError};

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | (1 << 9)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data)
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
            assert_eq!(activation.queues.len(), self.sizes.len());
            self.activated = Some(activation.acked_features);
            self.queues = activation
                .queues
                .iter()
                .map(|queue| queue.state())
                .collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            self.queues.clone()
        }
        fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
            Ok(DeviceState::Rng)
        }
        fn restore_state(&mut self, _state: &DeviceState) -> Result<(), DeviceStateError> {
            Ok(())
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dummy = Arc::new(Mutex::new(Dummy {
            sizes: vec![16],
            events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            activated: None,
            resets: 0,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            queues: Vec::new(),
        }));
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
        (MmioTransport::new(dummy.clone(), interrupt, memory), dummy)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, high: u32, low: u32) {
        write(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, high);
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, low);
        write(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport) {
        write(t, REG_QUEUE_SEL, 0);
        write(t, REG_QUEUE_NUM, 16);
        write(t, REG_QUEUE_DESC_LOW, 0x1000);
        write(t, REG_QUEUE_AVAIL_LOW, 0x2000);
        write(t, REG_QUEUE_USED_LOW, 0x3000);
        write(t, REG_QUEUE_READY, 1);
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn a_running_device_is_restored_running_on_its_saved_queues() {
        let (mut t, _) = setup();
        negotiate(&mut t, 1, 1 << 9);
        setup_queue(&mut t);
        write(&mut t, REG_STATUS, ALL);
        t.interrupt.signal_used_queue();
        let saved = t.save().unwrap();
        assert!(saved.activated);
        assert_eq!(saved.queues.len(), 1);
        assert_eq!(saved.queues[0].desc_table, 0x1000);
        assert_eq!(saved.interrupt_status, super::super::INTERRUPT_USED_RING);
        // Through JSON, as in a state file.
        let saved: TransportState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        let (mut fresh, dummy) = setup();
        fresh.restore(&saved).unwrap();
        assert_eq!(dummy.lock().unwrap().activated, Some((1 << 32) | (1 << 9)));
        assert_eq!(read(&mut fresh, REG_STATUS), ALL);
        assert_eq!(read(&mut fresh, REG_INTERRUPT_STATUS), 1);
        // The device is kicked once, for requests made before the snapshot.
        assert_eq!(dummy.lock().unwrap().events[0].read().unwrap(), 1);
        assert_eq!(fresh.save().unwrap(), saved);
    }

    #[test]
    fn a_saved_state_that_does_not_fit_is_refused() {
        let (mut t, _) = setup();
        negotiate(&mut t, 1, 0);
        setup_queue(&mut t);
        write(&mut t, REG_STATUS, ALL);
        let saved = t.save().unwrap();
        let mut other_type = saved.clone();
        other_type.device_type = 1;
        let (mut fresh, dummy) = setup();
        assert!(matches!(
            fresh.restore(&other_type),
            Err(TransportStateError::DeviceType {
                device: 2,
                saved: 1
            })
        ));
        let mut outside = saved.clone();
        outside.queues[0].desc_table = 0xffff_0000;
        assert!(matches!(
            fresh.restore(&outside),
            Err(TransportStateError::QueueOutsideMemory { index: 0 })
        ));
        let mut odd = saved.clone();
        odd.queues[0].size = 7;
        assert!(fresh.restore(&odd).is_err());
        let mut extra = saved;
        extra.queues.push(extra.queues[0]);
        assert!(matches!(
            fresh.restore(&extra),
            Err(TransportStateError::QueueCount {
                saved: 2,
                device: 1
            })
        ));
        assert!(dummy.lock().unwrap().activated.is_none());
        assert_eq!(read(&mut fresh, REG_STATUS), 0);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = setup();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 2);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 16);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1 << 9);
        write(&mut t, REG_QUEUE_SEL, 5);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn full_handshake_activates_with_acked_features() {
        let (mut t, dummy) = setup();
        negotiate(&mut t, 1, 1 << 9);
        assert_ne!(read(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        setup_queue(&mut t);
        write(&mut t, REG_STATUS, ALL);
        assert_eq!(dummy.lock().unwrap().activated, Some((1 << 32) | (1 << 9)));
        assert_eq!(read(&mut t, REG_STATUS), ALL);
        // Queue registers are frozen once running.
        write(&mut t, REG_QUEUE_NUM, 2);
        write(&mut t, 0, 0); // read-only register: ignored
                             // Reset stops the device and the handshake can start again.
        write(&mut t, REG_STATUS, 0);
        assert_eq!(dummy.lock().unwrap().resets, 1);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn features_without_version_1_or_unoffered_are_refused() {
        let (mut t, _) = setup();
        negotiate(&mut t, 0, 1 << 9);
        assert_eq!(read(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        let (mut t, _) = setup();
        negotiate(&mut t, 1, 1 << 3);
        assert_eq!(read(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_with_a_bad_queue_fails_the_device() {
        let (mut t, dummy) = setup();
        negotiate(&mut t, 1, 0);
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_DESC_LOW, 0xffff_0000); // outside guest memory
        write(&mut t, REG_QUEUE_READY, 1);
        write(&mut t, REG_STATUS, ALL);
        assert!(dummy.lock().unwrap().activated.is_none());
        assert_ne!(read(&mut t, REG_STATUS) & status::FAILED, 0);
    }

    #[test]
    fn driver_ok_without_features_ok_fails_the_device() {
        let (mut t, dummy) = setup();
        setup_queue(&mut t);
        write(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(dummy.lock().unwrap().activated.is_none());
        assert_ne!(read(&mut t, REG_STATUS) & status::FAILED, 0);
    }

    #[test]
    fn odd_accesses_are_ignored_and_config_is_forwarded() {
        let (mut t, _) = setup();
        let mut byte = [0xffu8; 1];
        t.read(REG_MAGIC, &mut byte);
        assert_eq!(byte, [0]);
        t.write(REG_STATUS, &[1, 2]);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        let mut config = [0u8; 2];
        t.read(CONFIG_SPACE + 3, &mut config);
        assert_eq!(config, [4, 5]);
        t.read(CONFIG_SPACE + 0xf00, &mut config);
        assert_eq!(config, [0, 0]);
    }

    proptest::proptest! {
        /// Any sequence of register accesses, of any size at any offset,
        /// with any values (queue addresses past guest RAM included): the
        /// transport never panics, and a device it activates had valid queues.
        #[test]
        fn random_register_traffic_never_panics(
            ops in proptest::collection::vec(
                (0u64..0x200, proptest::prelude::any::<u32>(), 0usize..9, proptest::prelude::any::<bool>()),
                0..200,
            )
        ) {
            let (mut t, _dummy) = setup();
            for (offset, value, size, is_write) in ops {
                let bytes = value.to_le_bytes();
                let mut data = vec![0u8; size];
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes[i % 4];
                }
                if is_write {
                    t.write(offset, &data);
                } else {
                    t.read(offset, &mut data);
                }
            }
        }
    }

    #[test]
    fn notify_register_kicks_the_queue_event() {
        let (mut t, dummy) = setup();
        write(&mut t, REG_QUEUE_NOTIFY, 0);
        write(&mut t, REG_QUEUE_NOTIFY, 7);
        assert_eq!(dummy.lock().unwrap().events[0].read().unwrap(), 1);
    }
}
