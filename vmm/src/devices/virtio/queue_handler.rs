//! Serving virtio devices from the event loop: one subscriber type for every
//! device, so each device only lists what it waits on (queue eventfds, a tap,
//! rate-limiter timers) and says what to do when one of them is ready.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
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

/// Returns several chains to the guest at once: every used element is
/// written before the used index moves, so that a driver reading the ring
/// concurrently never sees part of a frame that spans several buffers.
pub fn add_used_batch(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    used: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let size = queue.size();
    if size == 0 || used.iter().any(|(head, _)| *head >= size) {
        return Err(virtio_queue::Error::InvalidDescriptorIndex);
    }
    let ring = queue.used_ring();
    let start = queue.next_used();
    for (offset, (head, len)) in used.iter().enumerate() {
        let slot = u64::from(start.wrapping_add(offset as u16) % size);
        let addr = ring
            .checked_add(4 + slot * 8)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        memory
            .write_obj(u32::from(*head).to_le(), GuestAddress(addr))
            .and_then(|()| memory.write_obj(len.to_le(), GuestAddress(addr + 4)))
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    let next = start.wrapping_add(used.len() as u16);
    queue.set_next_used(next);
    let index = ring
        .checked_add(2)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    memory
        .store(next.to_le(), GuestAddress(index), Ordering::Release)
        .map_err(virtio_queue::Error::GuestMemory)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{memory, TestQueue};

    #[test]
    fn a_batch_is_published_whole_and_wraps_around_the_ring() {
        let mem = memory(0x10000);
        let layout = TestQueue::at(0x1000, 4);
        let mut queue = layout.queue();
        queue.set_next_used(3);
        add_used_batch(&mut queue, &mem, &[(1, 100), (2, 200), (3, 0)]).unwrap();
        assert_eq!(layout.used_idx(&mem), 6);
        assert_eq!(layout.used_elem(&mem, 3), (1, 100));
        assert_eq!(layout.used_elem(&mem, 4), (2, 200), "slot 0 after the wrap");
        assert_eq!(layout.used_elem(&mem, 5), (3, 0));
        assert_eq!(queue.next_used(), 6);
    }

    #[test]
    fn a_batch_with_a_bad_head_publishes_nothing() {
        let mem = memory(0x10000);
        let layout = TestQueue::at(0x1000, 4);
        let mut queue = layout.queue();
        assert!(add_used_batch(&mut queue, &mem, &[(1, 100), (4, 1)]).is_err());
        assert_eq!(layout.used_idx(&mem), 0);
        assert_eq!(queue.next_used(), 0);
    }
}
