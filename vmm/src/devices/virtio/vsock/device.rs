//! The virtio-vsock device: three queues (receive, transmit, events) and
//! the [`Muxer`] that carries packets to and from host sockets.
//!
//! Transmit chains are read into packets and handed to the muxer; the
//! muxer's packets for the guest wait until the guest gives a receive
//! buffer (nothing is read from a host socket before there is room and
//! credit for it). After a restore the guest is told, on the event queue,
//! that its transport was reset; until it takes that event, nothing is
//! delivered (its connections are gone, and it must learn so first).

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use event_manager::EventSet;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Muxer, MuxerError};
use super::packet::{self, HEADER_LEN};
use super::persist::VsockState;
use crate::devices::virtio::persist::{DeviceState, DeviceStateError};
use crate::devices::virtio::queue_handler::{
    clear_event, notify_used, undo_pop, EventDrivenDevice,
};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::persist::{Persist, Versioned};

pub const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENTS: usize = 2;
/// The event source after the three queues: the muxer's epoll descriptor.
const MUXER: usize = 3;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

struct Active {
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
}

pub struct Vsock {
    queue_sizes: [u16; 3],
    queue_events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    muxer: Muxer,
    active: Option<Active>,
    /// Restored from a snapshot: the guest is told of the reset when its
    /// queues are handed back.
    restored: bool,
    /// The guest has not yet taken the reset event: the event queue's
    /// available index when it was sent (the guest gives the queue a new
    /// buffer once it has handled the event).
    awaiting_reset_ack: Option<u16>,
}

/// Why the device cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot make the vsock device's queue notifiers: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Muxer(#[from] MuxerError),
}

impl Vsock {
    /// The guest's context id is `guest_cid`; host processes connect on
    /// `socket`.
    pub fn new(
        guest_cid: u64,
        socket: &Path,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, VsockError> {
        let queue_events = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VsockError::EventFd)?;
        Ok(Self {
            queue_sizes: [QUEUE_SIZE; 3],
            queue_events,
            interrupt,
            muxer: Muxer::new(guest_cid, socket)?,
            active: None,
            restored: false,
            awaiting_reset_ack: None,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid()
    }

    /// Hands every packet the guest queued to the muxer.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let memory = &active.memory;
        let queue = &mut active.queues[TX];
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let descriptors: Vec<_> = chain.collect();
            match packet::read_tx(memory, &descriptors) {
                Ok(packet) => self.muxer.send(packet),
                Err(err) => log::debug!("virtio-vsock: transmit packet dropped: {err}"),
            }
            if let Err(err) = queue.add_used(memory, head, 0) {
                log::warn!("virtio-vsock: cannot return a transmit buffer: {err}");
            }
            used_any = true;
        }
        if used_any {
            notify_used(queue, memory, &self.interrupt);
        }
    }

    /// Whether the guest took the reset event: it gave the event queue a
    /// new buffer since. Checked at every chance, not only when the guest
    /// kicks the event queue: with notifications suppressed (event index)
    /// it may refill the queue without a kick.
    fn reset_acknowledged(&mut self) -> bool {
        if let Some(mark) = self.awaiting_reset_ack {
            if self.event_queue_avail() == Some(mark) {
                return false;
            }
            self.awaiting_reset_ack = None;
            log::info!("virtio-vsock: the guest took the transport reset");
        }
        true
    }

    /// Fills the guest's receive buffers with the muxer's packets.
    fn process_rx(&mut self) {
        if !self.reset_acknowledged() {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let memory = &active.memory;
        let queue = &mut active.queues[RX];
        let mut used_any = false;
        while self.muxer.has_rx() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let descriptors: Vec<_> = chain.collect();
            let written = match packet::rx_room(&descriptors) {
                Ok(room) if room >= HEADER_LEN => {
                    let Some(packet) = self.muxer.next_rx(room - HEADER_LEN) else {
                        undo_pop(queue);
                        break;
                    };
                    packet::write_rx(memory, &descriptors, &packet).unwrap_or_else(|err| {
                        log::debug!("virtio-vsock: receive packet dropped: {err}");
                        0
                    })
                }
                Ok(room) => {
                    log::debug!("virtio-vsock: a receive buffer of {room} bytes is too small");
                    0
                }
                Err(err) => {
                    log::debug!("virtio-vsock: receive buffer refused: {err}");
                    0
                }
            };
            if let Err(err) = queue.add_used(memory, head, written) {
                log::warn!("virtio-vsock: cannot return a receive buffer: {err}");
            }
            used_any = true;
        }
        if used_any {
            notify_used(queue, memory, &self.interrupt);
        }
    }

    /// The event queue's available index (None before activation or when
    /// the guest's ring is unreadable).
    fn event_queue_avail(&self) -> Option<u16> {
        let active = self.active.as_ref()?;
        active.queues[EVENTS]
            .avail_idx(&active.memory, std::sync::atomic::Ordering::Acquire)
            .ok()
            .map(|avail| avail.0)
    }

    /// Tells the guest that every connection is gone (after a restore).
    fn send_transport_reset(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let memory = &active.memory;
        let queue = &mut active.queues[EVENTS];
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            log::warn!("virtio-vsock: no event buffer: the guest is not told of the reset");
            return;
        };
        let head = chain.head_index();
        let target = chain
            .filter(|desc| desc.is_write_only() && desc.len() >= 4)
            .map(|desc| desc.addr())
            .next();
        let written = target
            .and_then(|addr| memory.write_obj(EVENT_TRANSPORT_RESET.to_le(), addr).ok())
            .map_or(0, |()| 4);
        if let Err(err) = queue.add_used(memory, head, written) {
            log::warn!("virtio-vsock: cannot return an event buffer: {err}");
        }
        notify_used(queue, memory, &self.interrupt);
        if written > 0 {
            // A guest whose ring cannot be read is not waited for.
            self.awaiting_reset_ack = self.event_queue_avail();
            log::info!("virtio-vsock: the guest was told its connections were reset");
        }
    }
}

impl EventDrivenDevice for Vsock {
    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        let mut sources: Vec<(RawFd, EventSet)> = self
            .queue_events
            .iter()
            .map(|event| (event.as_raw_fd(), EventSet::IN))
            .collect();
        sources.push((self.muxer.epoll_fd(), EventSet::IN));
        sources
    }

    fn on_event(&mut self, source: usize) {
        match source {
            RX => clear_event(&self.queue_events[RX]),
            TX => {
                clear_event(&self.queue_events[TX]);
                self.process_tx();
            }
            EVENTS => {
                // The guest took the reset event when it gives the event
                // queue a new buffer (a restored transport's first kick is
                // not that, and Linux keeps several buffers queued):
                // `process_rx` checks.
                clear_event(&self.queue_events[EVENTS]);
            }
            MUXER => self.muxer.process_events(),
            _ => return,
        }
        self.process_rx();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    /// `struct virtio_vsock_config { le64 guest_cid; }`
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid().to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-vsock: the guest wrote its read-only config at {offset}");
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if activation.queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: activation.queues.len(),
            });
        }
        self.active = Some(Active {
            memory: activation.memory,
            queues: activation.queues,
        });
        self.awaiting_reset_ack = None;
        if std::mem::take(&mut self.restored) {
            self.send_transport_reset();
        }
        log::info!("virtio-vsock: active, guest CID {}", self.guest_cid());
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.awaiting_reset_ack = None;
        self.muxer.reset();
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|active| active.queues.iter().map(|queue| queue.state()))
            .collect()
    }

    fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
        let Ok(state) = self.save();
        Ok(DeviceState::Vsock(Versioned(state)))
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match state {
            DeviceState::Vsock(state) => {
                let Ok(()) = self.restore(state);
                Ok(())
            }
            other => Err(other.wrong_kind("a vsock device's")),
        }
    }
}

impl Persist for Vsock {
    type State = VsockState;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<VsockState, Self::Error> {
        Ok(VsockState {
            guest_cid: self.guest_cid(),
        })
    }

    /// Connections do not survive (see the module's docs): whatever the
    /// muxer held is dropped, and the guest is told on activation. The
    /// restoring VM's context id stands.
    fn restore(&mut self, state: &VsockState) -> Result<(), Self::Error> {
        if state.guest_cid != self.guest_cid() {
            log::info!(
                "virtio-vsock: guest CID {} in the snapshot, {} now",
                state.guest_cid,
                self.guest_cid()
            );
        }
        self.muxer.reset();
        self.restored = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::devices::virtio::testing::{interrupt, memory, TestQueue, VIRTQ_DESC_F_WRITE};
    use crate::devices::virtio::vsock::packet::{Header, Op, HOST_CID, TYPE_STREAM};

    const GUEST_CID: u64 = 3;
    const MEM_SIZE: usize = 0x40000;
    const QUEUES: [TestQueue; 3] = [
        TestQueue {
            desc_table: 0x0000,
            avail_ring: 0x1000,
            used_ring: 0x2000,
            size: 16,
        },
        TestQueue {
            desc_table: 0x3000,
            avail_ring: 0x4000,
            used_ring: 0x5000,
            size: 16,
        },
        TestQueue {
            desc_table: 0x6000,
            avail_ring: 0x7000,
            used_ring: 0x8000,
            size: 16,
        },
    ];
    /// Buffers: 0x10000 + 0x1000 per descriptor.
    const BUFFERS: u64 = 0x10000;

    struct Guest {
        _dir: TempDir,
        socket: std::path::PathBuf,
        mem: GuestMemoryMmap,
        device: Vsock,
        /// Chains published so far, per queue.
        published: [u16; 3],
    }

    impl Guest {
        fn new() -> Self {
            let dir = TempDir::new_with_prefix("/tmp/nubis-vsock-dev-").unwrap();
            let socket = dir.as_path().join("v.sock");
            let mem = memory(MEM_SIZE);
            let mut device = Vsock::new(GUEST_CID, &socket, interrupt()).unwrap();
            device
                .activate(Activation {
                    memory: mem.clone(),
                    queues: QUEUES.iter().map(TestQueue::queue).collect(),
                    acked_features: 1 << VIRTIO_F_VERSION_1,
                })
                .unwrap();
            Self {
                _dir: dir,
                socket,
                mem,
                device,
                published: [0; 3],
            }
        }

        /// Adds a one-buffer chain to `queue`, as the driver does.
        fn give(&mut self, queue: usize, bytes: &[u8], len: u32, write: bool) {
            let layout = QUEUES[queue];
            let index = self.published[queue];
            let slot = index % layout.size;
            let addr = BUFFERS + (queue as u64 * 16 + u64::from(slot)) * 0x1000;
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            let flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
            layout.write_desc(&self.mem, slot, addr, len, flags, 0);
            self.mem
                .write_obj(
                    slot,
                    GuestAddress(layout.avail_ring + 4 + u64::from(slot) * 2),
                )
                .unwrap();
            self.published[queue] = index + 1;
            self.mem
                .write_obj(index + 1, GuestAddress(layout.avail_ring + 2))
                .unwrap();
        }

        fn send(&mut self, op: Op, src_port: u32, dst_port: u32, payload: &[u8]) {
            let header = Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: payload.len() as u32,
                kind: TYPE_STREAM,
                op: op.code(),
                flags: 0,
                buf_alloc: 1 << 16,
                fwd_cnt: 0,
            };
            let mut bytes = header.to_bytes().to_vec();
            bytes.extend_from_slice(payload);
            self.give(TX, &bytes, bytes.len() as u32, false);
            self.device.on_event(TX);
        }

        /// The packets the device has put in receive buffers so far
        /// (buffers returned empty are left out).
        fn received(&self) -> Vec<(Header, Vec<u8>)> {
            let layout = QUEUES[RX];
            (0..layout.used_idx(&self.mem))
                .map(|n| layout.used_elem(&self.mem, n))
                .filter(|(_, len)| *len as usize >= HEADER_LEN)
                .map(|(head, len)| {
                    let addr = BUFFERS + u64::from(head) * 0x1000;
                    let mut bytes = vec![0u8; len as usize];
                    self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
                    let mut raw = [0u8; HEADER_LEN];
                    raw.copy_from_slice(&bytes[..HEADER_LEN]);
                    (Header::from_bytes(&raw), bytes[HEADER_LEN..].to_vec())
                })
                .collect()
        }

        /// Serves the muxer until `count` packets were received.
        fn wait_received(&mut self, count: usize) -> Vec<(Header, Vec<u8>)> {
            let start = Instant::now();
            loop {
                let received = self.received();
                if received.len() >= count {
                    return received;
                }
                assert!(start.elapsed() < Duration::from_secs(3), "{received:?}");
                std::thread::sleep(Duration::from_millis(5));
                self.device.on_event(MUXER);
            }
        }
    }

    #[test]
    fn the_config_space_holds_the_guest_cid() {
        let guest = Guest::new();
        let mut cid = [0u8; 8];
        guest.device.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
        assert_eq!(guest.device.device_type(), 19);
        assert_eq!(guest.device.queue_max_sizes().len(), 3);
    }

    #[test]
    fn a_host_connection_reaches_a_guest_listener_and_back() {
        let mut guest = Guest::new();
        for _ in 0..4 {
            guest.give(RX, &[], 0x1000, true);
        }
        let mut host = UnixStream::connect(&guest.socket).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let received = guest.wait_received(1);
        let (request, _) = received[0];
        assert_eq!(request.op(), Some(Op::Request));
        assert_eq!(request.dst_port, 52);
        let local = request.src_port;
        guest.send(Op::Response, 52, local, b"");
        guest.send(Op::Rw, 52, local, b"hello from the guest");
        let mut answer = vec![0u8; format!("OK {local}\n").len() + 20];
        host.read_exact(&mut answer).unwrap();
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            format!("OK {local}\nhello from the guest")
        );
        host.write_all(b"hello from the host").unwrap();
        let received = guest.wait_received(2);
        assert_eq!(received[1].0.op(), Some(Op::Rw));
        assert_eq!(received[1].1, b"hello from the host");
        // The transmit buffers went back to the guest.
        assert_eq!(QUEUES[TX].used_idx(&guest.mem), 2);
    }

    #[test]
    fn a_guest_connection_reaches_a_host_listener() {
        let mut guest = Guest::new();
        guest.give(RX, &[], 0x1000, true);
        let mut path = guest.socket.clone().into_os_string();
        path.push("_9000");
        let listener = UnixListener::bind(&path).unwrap();
        guest.send(Op::Request, 40000, 9000, b"");
        let (mut host, _) = listener.accept().unwrap();
        let received = guest.wait_received(1);
        assert_eq!(received[0].0.op(), Some(Op::Response));
        guest.send(Op::Rw, 40000, 9000, b"ping");
        let mut got = [0u8; 4];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }

    #[test]
    fn a_restored_device_resets_the_guests_transport_first() {
        let mut guest = Guest::new();
        guest.device.reset();
        let state = guest.device.save_state().unwrap();
        guest.device.restore_state(&state).unwrap();
        // The driver had event buffers (Linux keeps 8) and a receive
        // buffer queued.
        guest.give(EVENTS, &[0xff; 4], 4, true);
        guest.give(EVENTS, &[0xff; 4], 4, true);
        guest.give(RX, &[], 0x1000, true);
        guest
            .device
            .activate(Activation {
                memory: guest.mem.clone(),
                queues: QUEUES.iter().map(TestQueue::queue).collect(),
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap();
        let events = QUEUES[EVENTS];
        assert_eq!(events.used_idx(&guest.mem), 1);
        assert_eq!(events.used_elem(&guest.mem, 0), (0, 4));
        let event: u32 = guest
            .mem
            .read_obj(GuestAddress(BUFFERS + 32 * 0x1000))
            .unwrap();
        assert_eq!(event, EVENT_TRANSPORT_RESET);
        // Nothing is delivered until the guest takes the event (its first
        // kick after the restore is not that).
        let mut host = UnixStream::connect(&guest.socket).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        guest.device.on_event(MUXER);
        guest.device.on_event(EVENTS);
        assert!(guest.received().is_empty());
        guest.give(EVENTS, &[], 4, true);
        guest.device.on_event(EVENTS);
        assert_eq!(guest.received()[0].0.op(), Some(Op::Request));
    }

    #[test]
    fn bad_chains_go_back_unused() {
        let mut guest = Guest::new();
        // A receive buffer too small for a header, and one the device may
        // not write.
        guest.give(RX, &[], 10, true);
        guest.give(RX, &[], 0x1000, false);
        guest.give(RX, &[], 0x1000, true);
        guest.send(Op::Request, 1, 77, b""); // nobody listens: a reset
        let received = guest.received();
        assert_eq!(QUEUES[RX].used_elem(&guest.mem, 0), (0, 0));
        assert_eq!(QUEUES[RX].used_elem(&guest.mem, 1), (1, 0));
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].0.op(), Some(Op::Rst));
        // A transmit chain shorter than a header is returned and dropped.
        guest.give(TX, &[1, 2, 3], 3, false);
        guest.device.on_event(TX);
        assert_eq!(QUEUES[TX].used_idx(&guest.mem), 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Random descriptor tables and rings on all three queues, and
        /// random packet headers: nothing panics, nothing is written past
        /// guest memory, every used entry is a chain the guest offered.
        #[test]
        fn random_queues_never_panic(
            descs in proptest::collection::vec(
                (prop_oneof![0u64..(MEM_SIZE as u64 * 2), any::<u64>()], any::<u32>(), 0u16..8, 0u16..20),
                48,
            ),
            heads in proptest::collection::vec(0u16..20, 0..12),
            headers in proptest::collection::vec((any::<u32>(), 0u16..9, any::<u32>(), 0u16..3), 4),
        ) {
            let mut guest = Guest::new();
            for (i, (dst_port, op, len, kind)) in headers.iter().enumerate() {
                let header = Header {
                    src_cid: GUEST_CID,
                    dst_cid: HOST_CID,
                    src_port: i as u32,
                    dst_port: *dst_port,
                    len: *len % 0x2000,
                    kind: *kind,
                    op: *op,
                    flags: *len,
                    buf_alloc: *len,
                    fwd_cnt: 0,
                };
                guest.mem
                    .write_slice(&header.to_bytes(), GuestAddress(BUFFERS + i as u64 * 0x100))
                    .unwrap();
            }
            for (index, (addr, len, flags, next)) in descs.iter().enumerate() {
                let queue = QUEUES[index / 16];
                let addr = if index % 2 == 0 { BUFFERS + (addr % 4) * 0x100 } else { *addr };
                queue.write_desc(&guest.mem, (index % 16) as u16, addr, *len % 0x3000, *flags, *next);
            }
            for queue in &QUEUES {
                queue.publish(&guest.mem, &heads);
            }
            for source in [TX, RX, EVENTS, MUXER, TX] {
                guest.device.on_event(source);
            }
            for queue in &QUEUES {
                prop_assert!(queue.used_idx(&guest.mem) as usize <= heads.len());
            }
        }
    }
}
