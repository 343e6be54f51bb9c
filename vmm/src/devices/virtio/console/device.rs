//! The virtio-console device: a receive queue (host to guest) and a
//! transmit queue (guest to host) on one backend.
//!
//! Receive: bytes are read from the backend only into buffers the guest has
//! posted; with none posted the backend is not read (its bytes wait in the
//! host's socket), and the guest's next RX kick resumes. Transmit: each
//! chain is written out whole before it is returned; a backend that cannot
//! take more (a full socket) keeps the rest of the chain in the device until
//! it is writable again, so the guest is slowed, never lost. The backend is
//! watched edge-triggered for both directions.

use std::convert::Infallible;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::EventSet;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::backend::ConsoleBackend;
use super::persist::{ConsoleState, PendingTx};
use crate::devices::virtio::persist::{DeviceState, DeviceStateError};
use crate::devices::virtio::queue_handler::{
    clear_event, notify_used, undo_pop, EventDrivenDevice,
};
use crate::devices::virtio::{
    ActivateError, Activation, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::persist::{Persist, Versioned};

pub const VIRTIO_ID_CONSOLE: u32 = 3;
const QUEUE_SIZE: u16 = 64;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Bytes taken from one transmit chain at most: the rest of a longer chain
/// is not read (Linux sends at most a page per chain).
const MAX_TX_CHAIN_BYTES: usize = 1 << 20;
/// Bytes put into one receive chain at most.
const MAX_RX_CHAIN_BYTES: usize = 64 * 1024;

/// Event sources, in [`EventDrivenDevice::event_sources`] order.
const SOURCE_RX_QUEUE: usize = 0;
const SOURCE_TX_QUEUE: usize = 1;

/// Byte counters, for logs and the control socket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Guest bytes thrown away because the backend failed (its reader went
    /// away): the guest must not hang on a host that stopped listening.
    pub tx_dropped: u64,
}

struct ActiveQueues {
    memory: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
}

pub struct Console {
    id: String,
    backend: ConsoleBackend,
    queue_sizes: [u16; 2],
    queue_events: [EventFd; 2],
    interrupt: Arc<VirtioInterrupt>,
    active: Option<ActiveQueues>,
    /// The transmit chain being written out: head and remaining bytes.
    tx_pending: Option<(u16, Vec<u8>)>,
    /// The backend reached end of file or failed on read: no more input.
    input_closed: bool,
    /// The backend failed on write: further output is dropped.
    output_broken: bool,
    counters: ConsoleCounters,
}

impl Console {
    pub fn new(
        id: &str,
        backend: ConsoleBackend,
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            id: id.to_string(),
            input_closed: !backend.is_readable(),
            backend,
            queue_sizes: [QUEUE_SIZE; 2],
            queue_events: [
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            interrupt,
            active: None,
            tx_pending: None,
            output_broken: false,
            counters: ConsoleCounters::default(),
        })
    }

    pub fn counters(&self) -> ConsoleCounters {
        self.counters
    }

    /// Moves backend input into the guest's posted receive buffers.
    fn process_rx(&mut self) {
        if self.input_closed {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        let mut buf = Vec::new();
        while let Some(chain) = active.rx.pop_descriptor_chain(&active.memory) {
            let head = chain.head_index();
            let buffers: Vec<(GuestAddress, usize)> = chain
                .filter(|desc| desc.is_write_only())
                .map(|desc| (desc.addr(), desc.len() as usize))
                .collect();
            let capacity = buffers
                .iter()
                .fold(0usize, |sum, (_, len)| sum.saturating_add(*len))
                .min(MAX_RX_CHAIN_BYTES);
            if capacity == 0 {
                // Nothing to fill: hand it back empty rather than spin on it.
                let _ = active.rx.add_used(&active.memory, head, 0);
                used_any = true;
                continue;
            }
            buf.resize(capacity, 0);
            let got = match self.backend.read(&mut buf) {
                Ok(0) => {
                    log::info!("console {}: input closed by the host", self.id);
                    self.input_closed = true;
                    undo_pop(&mut active.rx);
                    break;
                }
                Ok(got) => got,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    undo_pop(&mut active.rx);
                    break;
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {
                    undo_pop(&mut active.rx);
                    continue;
                }
                Err(err) => {
                    log::warn!("console {}: input failed, closing it: {err}", self.id);
                    self.input_closed = true;
                    undo_pop(&mut active.rx);
                    break;
                }
            };
            let written = scatter(&active.memory, &buffers, &buf[..got]);
            if written < got {
                log::warn!(
                    "console {}: a receive buffer is outside guest memory; {} byte(s) lost",
                    self.id,
                    got - written
                );
            }
            self.counters.rx_bytes += written as u64;
            if let Err(err) = active.rx.add_used(&active.memory, head, written as u32) {
                log::warn!("console {}: cannot return a receive buffer: {err}", self.id);
            }
            used_any = true;
        }
        if used_any {
            notify_used(&mut active.rx, &active.memory, &self.interrupt);
        }
    }

    /// Writes out the guest's transmit chains; stops when the backend is
    /// full and goes on when it is writable again.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        loop {
            if self.tx_pending.is_none() {
                let Some(chain) = active.tx.pop_descriptor_chain(&active.memory) else {
                    break;
                };
                let head = chain.head_index();
                let mut bytes = Vec::new();
                for desc in chain.filter(|desc| !desc.is_write_only()) {
                    let room = MAX_TX_CHAIN_BYTES - bytes.len();
                    let len = (desc.len() as usize).min(room);
                    let start = bytes.len();
                    bytes.resize(start + len, 0);
                    if active
                        .memory
                        .read_slice(&mut bytes[start..], desc.addr())
                        .is_err()
                    {
                        log::warn!(
                            "console {}: a transmit buffer is outside guest memory",
                            self.id
                        );
                        bytes.truncate(start);
                        break;
                    }
                    if bytes.len() == MAX_TX_CHAIN_BYTES {
                        break;
                    }
                }
                self.tx_pending = Some((head, bytes));
            }
            let Some((head, bytes)) = self.tx_pending.as_mut() else {
                break;
            };
            while !bytes.is_empty() {
                if self.output_broken {
                    self.counters.tx_dropped += bytes.len() as u64;
                    bytes.clear();
                    break;
                }
                match self.backend.write(bytes) {
                    Ok(0) => {
                        self.output_broken = true;
                    }
                    Ok(sent) => {
                        self.counters.tx_bytes += sent as u64;
                        bytes.drain(..sent);
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        log::warn!(
                            "console {}: output failed, dropping it from now on: {err}",
                            self.id
                        );
                        self.output_broken = true;
                    }
                }
            }
            if !bytes.is_empty() {
                // The backend is full: its next writable edge resumes.
                break;
            }
            let head = *head;
            self.tx_pending = None;
            if let Err(err) = active.tx.add_used(&active.memory, head, 0) {
                log::warn!(
                    "console {}: cannot return a transmit buffer: {err}",
                    self.id
                );
            }
            used_any = true;
        }
        if used_any {
            notify_used(&mut active.tx, &active.memory, &self.interrupt);
        }
    }
}

/// Copies `data` into the guest buffers in order; returns the bytes copied
/// (fewer when a buffer is not in guest memory).
fn scatter(memory: &GuestMemoryMmap, buffers: &[(GuestAddress, usize)], data: &[u8]) -> usize {
    let mut done = 0;
    for (addr, len) in buffers {
        if done == data.len() {
            break;
        }
        let part = (*len).min(data.len() - done);
        if memory.write_slice(&data[done..done + part], *addr).is_err() {
            break;
        }
        done += part;
    }
    done
}

impl EventDrivenDevice for Console {
    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        let mut sources: Vec<(RawFd, EventSet)> = self
            .queue_events
            .iter()
            .map(|event| (event.as_raw_fd(), EventSet::IN))
            .collect();
        if let Some(fd) = self.backend.poll_fd() {
            sources.push((fd, EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED));
        }
        sources
    }

    fn on_event(&mut self, source: usize) {
        match source {
            SOURCE_RX_QUEUE => {
                clear_event(&self.queue_events[RX_QUEUE]);
                self.process_rx();
            }
            SOURCE_TX_QUEUE => {
                clear_event(&self.queue_events[TX_QUEUE]);
                self.process_tx();
            }
            _ => {
                self.process_tx();
                self.process_rx();
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    /// cols, rows, max_nr_ports, emerg_wr: none of the features that give
    /// them meaning is offered, so all read as zero.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mut activation: Activation) -> Result<(), ActivateError> {
        if activation.queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: activation.queues.len(),
            });
        }
        let tx = activation.queues.remove(TX_QUEUE);
        let rx = activation.queues.remove(RX_QUEUE);
        self.active = Some(ActiveQueues {
            memory: activation.memory,
            rx,
            tx,
        });
        log::info!("console {}: active", self.id);
        // A restored device may hold a chain to finish, and input may be
        // waiting already.
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.tx_pending = None;
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|active| [active.rx.state(), active.tx.state()])
            .collect()
    }

    fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
        let Ok(state) = self.save();
        Ok(DeviceState::Console(Versioned(state)))
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match state {
            DeviceState::Console(state) => {
                let Ok(()) = self.restore(state);
                Ok(())
            }
            other => Err(other.wrong_kind("a console's")),
        }
    }
}

impl Persist for Console {
    type State = ConsoleState;
    type Error = Infallible;

    fn save(&self) -> Result<ConsoleState, Infallible> {
        Ok(ConsoleState {
            tx_pending: self.tx_pending.as_ref().map(|(head, bytes)| PendingTx {
                head: *head,
                bytes: bytes.clone(),
            }),
        })
    }

    fn restore(&mut self, state: &ConsoleState) -> Result<(), Infallible> {
        self.tx_pending = state
            .tx_pending
            .as_ref()
            .map(|pending| (pending.head, pending.bytes.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{
        interrupt, memory, TestQueue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    };
    use std::io::{Read, Write};
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;

    const RX: TestQueue = TestQueue {
        desc_table: 0x1000,
        avail_ring: 0x1400,
        used_ring: 0x1600,
        size: 16,
    };
    const TX: TestQueue = TestQueue {
        desc_table: 0x2000,
        avail_ring: 0x2400,
        used_ring: 0x2600,
        size: 16,
    };

    /// A console on one end of a socket pair, activated; the other end.
    fn console() -> (Console, UnixStream, GuestMemoryMmap) {
        let (host, device_end) = UnixStream::pair().unwrap();
        let backend = ConsoleBackend::from_inherited_fd(device_end.into_raw_fd()).unwrap();
        let mut console = Console::new("test", backend, interrupt()).unwrap();
        let mem = memory(0x10_0000);
        console
            .activate(Activation {
                memory: mem.clone(),
                queues: vec![RX.queue(), TX.queue()],
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap();
        (console, host, mem)
    }

    #[test]
    fn guest_output_reaches_the_host_in_order() {
        let (mut console, mut host, mem) = console();
        mem.write_slice(b"hello ", GuestAddress(0x8000)).unwrap();
        mem.write_slice(b"world", GuestAddress(0x9000)).unwrap();
        TX.write_desc(&mem, 0, 0x8000, 6, VIRTQ_DESC_F_NEXT, 1);
        TX.write_desc(&mem, 1, 0x9000, 5, 0, 0);
        TX.publish(&mem, &[0]);
        console.process_tx();
        assert_eq!(TX.used_idx(&mem), 1);
        let mut got = [0u8; 11];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello world");
        assert_eq!(console.counters().tx_bytes, 11);
    }

    #[test]
    fn host_input_fills_posted_buffers_and_waits_without_them() {
        let (mut console, mut host, mem) = console();
        host.write_all(b"run true\n").unwrap();
        console.process_rx();
        assert_eq!(RX.used_idx(&mem), 0, "no buffer posted: nothing used");
        RX.write_desc(&mem, 0, 0x8000, 4, VIRTQ_DESC_F_WRITE, 0);
        RX.write_desc(&mem, 1, 0x9000, 64, VIRTQ_DESC_F_WRITE, 0);
        RX.publish(&mem, &[0, 1]);
        console.process_rx();
        assert_eq!(RX.used_idx(&mem), 2);
        assert_eq!(RX.used_elem(&mem, 0), (0, 4));
        assert_eq!(RX.used_elem(&mem, 1), (1, 5));
        let mut got = [0u8; 9];
        mem.read_slice(&mut got[..4], GuestAddress(0x8000)).unwrap();
        mem.read_slice(&mut got[4..], GuestAddress(0x9000)).unwrap();
        assert_eq!(&got, b"run true\n");
    }

    #[test]
    fn a_full_host_socket_holds_the_chain_until_it_drains() {
        let (mut console, mut host, mem) = console();
        // Fill the socket so that the device's write would block.
        let filler = vec![0u8; 4096];
        let mut device_side_full = 0usize;
        {
            let fd = console.backend.poll_fd().unwrap();
            loop {
                // SAFETY: writes from a live buffer to a descriptor the
                // console owns; non-blocking, so it ends with EAGAIN.
                let ret = unsafe { libc::write(fd, filler.as_ptr().cast(), filler.len()) };
                if ret <= 0 {
                    break;
                }
                device_side_full += ret as usize;
            }
        }
        mem.write_slice(b"late", GuestAddress(0x8000)).unwrap();
        TX.write_desc(&mem, 0, 0x8000, 4, 0, 0);
        TX.publish(&mem, &[0]);
        console.process_tx();
        assert_eq!(TX.used_idx(&mem), 0, "the chain waits for room");
        assert!(matches!(
            console.save_state(),
            Ok(DeviceState::Console(Versioned(ConsoleState { tx_pending: Some(PendingTx { head: 0, ref bytes }) }))) if bytes == b"late"
        ));
        let mut sink = vec![0u8; device_side_full];
        host.read_exact(&mut sink).unwrap();
        console.on_event(2);
        assert_eq!(TX.used_idx(&mem), 1);
        let mut got = [0u8; 4];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"late");
    }

    #[test]
    fn a_vanished_host_reader_does_not_hang_the_guest() {
        let (mut console, host, mem) = console();
        drop(host);
        TX.write_desc(&mem, 0, 0x8000, 100, 0, 0);
        TX.publish(&mem, &[0]);
        console.process_tx();
        assert_eq!(TX.used_idx(&mem), 1, "the chain is returned");
        assert_eq!(console.counters().tx_dropped, 100);
        RX.write_desc(&mem, 0, 0x9000, 64, VIRTQ_DESC_F_WRITE, 0);
        RX.publish(&mem, &[0]);
        console.process_rx();
        assert!(console.input_closed, "end of file closes the input");
        assert_eq!(RX.used_idx(&mem), 0, "and the buffer stays the guest's");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Random descriptor tables on both queues (any address, length and
        /// flags, loops): the device neither panics nor hangs and returns
        /// at most the chains offered.
        #[test]
        fn random_queues_never_panic(
            descs in proptest::collection::vec(
                (
                    proptest::prop_oneof![0u64..0x2_0000, proptest::prelude::any::<u64>()],
                    proptest::prelude::any::<u32>(),
                    0u16..8,
                    0u16..32,
                ),
                16,
            ),
            heads in proptest::collection::vec(0u16..40, 0..20),
        ) {
            let (mut console, mut host, mem) = console();
            host.set_nonblocking(true).unwrap();
            let _ = host.write_all(&[7u8; 300]);
            for layout in [RX, TX] {
                for (index, (addr, len, flags, next)) in descs.iter().enumerate() {
                    let addr = if *addr < 0x3000 { addr + 0x3000 } else { *addr };
                    layout.write_desc(&mem, index as u16, addr, *len, *flags, *next);
                }
                layout.publish(&mem, &heads);
            }
            console.process_rx();
            console.process_tx();
            let mut sink = vec![0u8; 1 << 16];
            while host.read(&mut sink).map(|n| n > 0).unwrap_or(false) {
                console.on_event(2);
            }
            proptest::prop_assert!(usize::from(RX.used_idx(&mem)) <= heads.len());
            proptest::prop_assert!(usize::from(TX.used_idx(&mem)) <= heads.len());
        }
    }
}
