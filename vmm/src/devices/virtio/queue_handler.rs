//! Serving a single-queue virtio device from the event loop: one subscriber
//! type for every such device, so each device only says how to process its
//! queue.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VirtioInterrupt};
use crate::devices::bus::lock;
use crate::memory::GuestMemoryMmap;

/// A device whose (first) queue is served when the guest kicks it.
pub trait ServeQueue: VirtioDevice {
    /// Serves every request the guest has made available.
    fn process_queue(&mut self);
}

/// Raises the device's interrupt after used buffers were added, unless the
/// driver asked not to be notified (EVENT_IDX). An unreadable ring counts as
/// "notify": a spurious interrupt is harmless, a missed one hangs the driver.
pub fn notify_used(queue: &mut Queue, memory: &GuestMemoryMmap, interrupt: &VirtioInterrupt) {
    if !matches!(queue.needs_notification(memory), Ok(false)) {
        interrupt.signal_used_queue();
    }
}

/// Watches a device's queue eventfd (an ioeventfd the guest's kick writes).
pub struct QueueEventHandler<D: ServeQueue> {
    device: Arc<Mutex<D>>,
    queue_event: EventFd,
}

impl<D: ServeQueue> QueueEventHandler<D> {
    pub fn new(device: Arc<Mutex<D>>) -> io::Result<Self> {
        let queue_event = lock(&device)
            .queue_events()
            .first()
            .ok_or_else(|| io::Error::other("the device has no queue"))?
            .try_clone()?;
        Ok(Self {
            device,
            queue_event,
        })
    }
}

impl<D: ServeQueue> MutEventSubscriber for QueueEventHandler<D> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.queue_event, EventSet::IN)) {
            log::error!("virtio: cannot watch a device queue: {err:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_event.as_raw_fd() {
            let _ = self.queue_event.read();
            lock(&self.device).process_queue();
        }
    }
}
