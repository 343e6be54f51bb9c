//! Serving virtio devices from the event loop: one subscriber type for every
//! device, so each device only lists what it waits on (queue eventfds, a tap,
//! rate-limiter timers) and says what to do when one of them is ready.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VirtioInterrupt};
use crate::devices::bus::lock;
use crate::memory::GuestMemoryMmap;

/// A virtio device whose work is driven by file descriptors becoming ready.
pub trait EventDrivenDevice: VirtioDevice {
    /// The descriptors the event loop watches for this device, with the
    /// readiness wanted. The list is fixed for the device's life; an entry's
    /// position is what [`EventDrivenDevice::on_event`] receives.
    fn event_sources(&self) -> Vec<(RawFd, EventSet)>;
    /// Source `source` of [`EventDrivenDevice::event_sources`] is ready.
    fn on_event(&mut self, source: usize);
}

/// Raises the device's interrupt after used buffers were added, unless the
/// driver asked not to be notified (EVENT_IDX). An unreadable ring counts as
/// "notify": a spurious interrupt is harmless, a missed one hangs the driver.
pub fn notify_used(queue: &mut Queue, memory: &GuestMemoryMmap, interrupt: &VirtioInterrupt) {
    if !matches!(queue.needs_notification(memory), Ok(false)) {
        interrupt.signal_used_queue();
    }
}

/// Puts the chain popped last back at the head of the available ring, for
/// a request that must wait (rate limiting): the next pop returns it again.
pub fn undo_pop(queue: &mut Queue) {
    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
}

/// Consumes a queue kick (or any eventfd signal). Nothing is lost if the
/// read fails: the device serves its whole queue on every event anyway.
pub fn clear_event(event: &EventFd) {
    let _ = event.read();
}

/// The event-loop subscriber of one device.
pub struct DeviceEventHandler<D: EventDrivenDevice> {
    device: Arc<Mutex<D>>,
}

impl<D: EventDrivenDevice> DeviceEventHandler<D> {
    pub fn new(device: Arc<Mutex<D>>) -> Self {
        Self { device }
    }
}

impl<D: EventDrivenDevice> MutEventSubscriber for DeviceEventHandler<D> {
    fn init(&mut self, ops: &mut EventOps) {
        let sources = lock(&self.device).event_sources();
        for (index, (fd, events)) in sources.into_iter().enumerate() {
            let Ok(data) = u32::try_from(index) else {
                break;
            };
            if let Err(err) = ops.add(Events::with_data_raw(fd, data, events)) {
                log::error!("virtio: cannot watch descriptor {fd} of a device: {err:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        lock(&self.device).on_event(events.data() as usize);
    }
}
