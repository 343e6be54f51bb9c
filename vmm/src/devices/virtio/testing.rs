//! Test support: split virtqueues laid out in guest memory by hand, the way
//! a guest driver (or an attacker) would, for in-process device tests.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::VirtioInterrupt;
use crate::devices::legacy::IrqLine;
use crate::memory::GuestMemoryMmap;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Guest RAM of `size` bytes at address 0.
pub fn memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// An interrupt line nobody listens to.
pub fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()))
}

/// Where one queue's rings live in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct TestQueue {
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub size: u16,
}

impl TestQueue {
    /// A queue of `size` entries whose rings follow each other from `base`.
    pub fn at(base: u64, size: u16) -> Self {
        let avail_ring = base + 16 * u64::from(size);
        let used_ring = (avail_ring + 6 + 2 * u64::from(size) + 3) & !3;
        Self {
            desc_table: base,
            avail_ring,
            used_ring,
            size,
        }
    }

    /// The device side of the queue, set up and ready.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.desc_table as u32), Some(0));
        queue.set_avail_ring_address(Some(self.avail_ring as u32), Some(0));
        queue.set_used_ring_address(Some(self.used_ring as u32), Some(0));
        queue.set_ready(true);
        queue
    }

    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let base = self.desc_table + u64::from(index) * 16;
        mem.write_obj(addr, GuestAddress(base)).unwrap();
        mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    /// Makes `heads` the available ring's entries from slot 0 on.
    pub fn publish(&self, mem: &GuestMemoryMmap, heads: &[u16]) {
        for (slot, head) in heads.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(self.avail_ring + 4 + slot as u64 * 2))
                .unwrap();
        }
        mem.write_obj(heads.len() as u16, GuestAddress(self.avail_ring + 2))
            .unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap()
    }

    /// The used ring's entry in `slot`: (descriptor head, length written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, slot: u16) -> (u32, u32) {
        let at = self.used_ring + 4 + u64::from(slot % self.size) * 8;
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}
