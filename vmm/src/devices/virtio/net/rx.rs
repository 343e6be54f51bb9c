//! Delivering one received frame into the guest's receive queue: into one
//! chain, or, with VIRTIO_NET_F_MRG_RXBUF, spread over as many chains as it
//! needs, their count in the header's `num_buffers`. The guest then posts
//! small buffers instead of a 64 KiB chain per frame, which is what makes
//! receiving cheap for its driver.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};

use super::frame::{self, FrameError};
use crate::devices::virtio::queue_handler::add_used_batch;
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::RateLimiter;

/// What became of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// The chains it was given could not take it; they were returned empty
    /// and the frame is gone.
    Dropped(FrameError),
    /// Not enough buffers posted: nothing was taken from the queue.
    NoBuffers,
    /// Over the rate limit: nothing was taken from the queue.
    Throttled,
}

/// Moves `frame` (virtio-net header included) into the receive queue.
pub fn deliver(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    limiter: &mut RateLimiter,
) -> Delivery {
    let start = queue.next_avail();
    let mut chains: Vec<(u16, Vec<Descriptor>, usize)> = Vec::new();
    // Chains with a device-readable buffer: returned empty, never written.
    let mut unusable: Vec<(u16, u32)> = Vec::new();
    let mut room = 0usize;
    let mut refused = None;
    while room < frame.len() {
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            queue.set_next_avail(start);
            return Delivery::NoBuffers;
        };
        let head = chain.head_index();
        let descriptors: Vec<Descriptor> = chain.collect();
        match frame::writable_room(&descriptors) {
            Ok(chain_room) if chain_room > 0 => {
                room += chain_room;
                chains.push((head, descriptors, chain_room));
            }
            Ok(_) => unusable.push((head, 0)),
            Err(err) => {
                refused = Some(err);
                unusable.push((head, 0));
            }
        }
        if !mergeable {
            break;
        }
    }
    if !limiter.consume(1, frame.len() as u64) {
        queue.set_next_avail(start);
        return Delivery::Throttled;
    }
    let mut used = unusable;
    let outcome = if room < frame.len() {
        Err(refused.unwrap_or(FrameError::NoRoom {
            room,
            needed: frame.len(),
        }))
    } else {
        frame::set_num_buffers(frame, chains.len() as u16);
        write_chains(memory, &chains, frame)
    };
    let delivery = match outcome {
        Ok(lengths) => {
            used.extend(chains.iter().map(|(head, ..)| *head).zip(lengths));
            Delivery::Delivered
        }
        Err(err) => {
            used.extend(chains.iter().map(|(head, ..)| (*head, 0)));
            Delivery::Dropped(err)
        }
    };
    if let Err(err) = add_used_batch(queue, memory, &used) {
        log::warn!("virtio-net: cannot return RX buffers: {err}");
    }
    delivery
}

/// Writes `frame` across `chains` in order; returns each chain's length.
fn write_chains(
    memory: &GuestMemoryMmap,
    chains: &[(u16, Vec<Descriptor>, usize)],
    frame: &[u8],
) -> Result<Vec<u32>, FrameError> {
    let mut offset = 0;
    let mut lengths = Vec::with_capacity(chains.len());
    for (_, descriptors, chain_room) in chains {
        let part = (*chain_room).min(frame.len() - offset);
        lengths.push(frame::scatter(
            memory,
            descriptors,
            &frame[offset..offset + part],
        )?);
        offset += part;
    }
    Ok(lengths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{memory, TestQueue, VIRTQ_DESC_F_WRITE};
    use crate::rate_limiter::RateLimit;
    use vm_memory::{Bytes, GuestAddress};

    const RX: TestQueue = TestQueue {
        desc_table: 0x1000,
        avail_ring: 0x2000,
        used_ring: 0x3000,
        size: 8,
    };

    fn unlimited() -> RateLimiter {
        RateLimiter::new(RateLimit::default()).unwrap()
    }

    /// Posts `count` buffers of `len` bytes at 0x10000 + i * 0x1000.
    fn post(mem: &GuestMemoryMmap, count: u16, len: u32) {
        for index in 0..count {
            let addr = 0x10000 + u64::from(index) * 0x1000;
            RX.write_desc(mem, index, addr, len, VIRTQ_DESC_F_WRITE, 0);
        }
        RX.publish(mem, &(0..count).collect::<Vec<_>>());
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 + 1).collect()
    }

    #[test]
    fn a_large_frame_spans_several_mergeable_buffers() {
        let mem = memory(0x20000);
        let mut queue = RX.queue();
        post(&mem, 4, 1000);
        let mut data = frame(2500);
        let delivery = deliver(&mut queue, &mem, &mut data, true, &mut unlimited());
        assert_eq!(delivery, Delivery::Delivered);
        assert_eq!(RX.used_idx(&mem), 3);
        assert_eq!(RX.used_elem(&mem, 0), (0, 1000));
        assert_eq!(RX.used_elem(&mem, 1), (1, 1000));
        assert_eq!(RX.used_elem(&mem, 2), (2, 500));
        let mut header = [0u8; 12];
        mem.read_slice(&mut header, GuestAddress(0x10000)).unwrap();
        assert_eq!(&header[10..12], &[3, 0], "num_buffers");
        let mut tail = vec![0u8; 500];
        mem.read_slice(&mut tail, GuestAddress(0x12000)).unwrap();
        assert_eq!(tail, data[2000..]);
        assert_eq!(queue.next_avail(), 3, "the fourth buffer stays posted");
    }

    #[test]
    fn too_few_buffers_take_nothing_from_the_queue() {
        let mem = memory(0x20000);
        let mut queue = RX.queue();
        post(&mem, 2, 1000);
        let mut data = frame(2500);
        let delivery = deliver(&mut queue, &mem, &mut data, true, &mut unlimited());
        assert_eq!(delivery, Delivery::NoBuffers);
        assert_eq!(queue.next_avail(), 0);
        assert_eq!(RX.used_idx(&mem), 0);
        // Once the guest posts more, the same frame goes through.
        post(&mem, 3, 1000);
        let delivery = deliver(&mut queue, &mem, &mut data, true, &mut unlimited());
        assert_eq!(delivery, Delivery::Delivered);
        assert_eq!(RX.used_idx(&mem), 3);
    }

    #[test]
    fn without_mergeable_buffers_one_chain_must_hold_the_frame() {
        let mem = memory(0x20000);
        let mut queue = RX.queue();
        post(&mem, 4, 1000);
        let mut data = frame(2500);
        let delivery = deliver(&mut queue, &mem, &mut data, false, &mut unlimited());
        assert_eq!(
            delivery,
            Delivery::Dropped(FrameError::NoRoom {
                room: 1000,
                needed: 2500
            })
        );
        assert_eq!(RX.used_idx(&mem), 1, "the chain is returned empty");
        assert_eq!(RX.used_elem(&mem, 0), (0, 0));
        let mut small = frame(700);
        let delivery = deliver(&mut queue, &mem, &mut small, false, &mut unlimited());
        assert_eq!(delivery, Delivery::Delivered);
        assert_eq!(RX.used_elem(&mem, 1), (1, 700));
    }

    #[test]
    fn device_readable_chains_are_returned_unwritten() {
        let mem = memory(0x20000);
        let mut queue = RX.queue();
        post(&mem, 3, 1000);
        RX.write_desc(&mem, 0, 0x10000, 1000, 0, 0); // readable
        mem.write_slice(&[0xeeu8; 16], GuestAddress(0x10000))
            .unwrap();
        let mut data = frame(1500);
        let delivery = deliver(&mut queue, &mem, &mut data, true, &mut unlimited());
        assert_eq!(delivery, Delivery::Delivered);
        assert_eq!(RX.used_elem(&mem, 0), (0, 0));
        assert_eq!(RX.used_elem(&mem, 1), (1, 1000));
        assert_eq!(RX.used_elem(&mem, 2), (2, 500));
        let mut untouched = [0u8; 16];
        mem.read_slice(&mut untouched, GuestAddress(0x10000))
            .unwrap();
        assert_eq!(untouched, [0xee; 16]);
    }

    #[test]
    fn a_throttled_frame_takes_nothing_from_the_queue() {
        let mem = memory(0x20000);
        let mut queue = RX.queue();
        post(&mem, 4, 2000);
        let mut limiter = RateLimiter::new(RateLimit {
            bytes_per_s: None,
            ops_per_s: Some(1),
        })
        .unwrap();
        let mut data = frame(100);
        assert_eq!(
            deliver(&mut queue, &mem, &mut data, true, &mut limiter),
            Delivery::Delivered
        );
        assert_eq!(
            deliver(&mut queue, &mem, &mut data, true, &mut limiter),
            Delivery::Throttled
        );
        assert_eq!(queue.next_avail(), 1);
        assert_eq!(RX.used_idx(&mem), 1);
    }
}
