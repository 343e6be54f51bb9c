//! The virtio-net device: an RX and a TX queue on a tap.
//!
//! RX: frames are read from the tap only while the guest has posted receive
//! buffers. A frame read when none is left waits in the device (one frame,
//! never dropped) and the tap is not read again until the guest kicks its RX
//! queue; the tap is watched edge-triggered, so a full tap does not wake the
//! loop again and again. TX: each kick sends every available chain. Both
//! directions have their own rate limiter (bytes/s and frames/s); a frame
//! over the limit waits in the queue for the limiter's timer.
//!
//! Offloads: the device offers checksum and TSO both ways; what the guest
//! accepts to receive is set on the tap (TUNSETOFFLOAD), and what it sends
//! arrives with its header, which the host kernel honours.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use event_manager::EventSet;
use virtio_queue::{Queue, QueueT};

use super::persist::{NetState, NetStateError};
use crate::devices::virtio::persist::{DeviceState, DeviceStateError};
use crate::persist::{Persist, Versioned};
use vmm_sys_util::eventfd::EventFd;

use super::frame::{self, MAX_FRAME_LEN};
use super::rx::{self, Delivery};
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use crate::devices::virtio::queue_handler::{
    clear_event, notify_used, undo_pop, EventDrivenDevice,
};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, RateLimited, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::{RateLimit, RateLimiter, RateLimiterError};

pub const VIRTIO_ID_NET: u32 = 1;

/// Feature bits (virtio spec 5.1.3).
const VIRTIO_NET_F_CSUM: u32 = 0;
const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
const VIRTIO_NET_F_MTU: u32 = 3;
const VIRTIO_NET_F_MAC: u32 = 5;
const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// Event sources, in [`EventDrivenDevice::event_sources`] order.
const SOURCE_RX_QUEUE: usize = 0;
const SOURCE_TX_QUEUE: usize = 1;
const SOURCE_TAP: usize = 2;
const SOURCE_RX_LIMITER: usize = 3;
const SOURCE_TX_LIMITER: usize = 4;

/// Errors in creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot create the queue eventfds of NIC {id}: {source}")]
    EventFd { id: String, source: std::io::Error },
    #[error("NIC {id}: {source}")]
    RateLimiter {
        id: String,
        source: RateLimiterError,
    },
}

/// Frame counters, for logs and (later) metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

struct ActiveQueues {
    memory: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several receive chains.
    mergeable: bool,
}

/// Bytes of config space up to and including `mtu`.
const CONFIG_LEN: usize = 12;

/// The device's config space for `mac` and an optional MTU.
fn config_space(mac: [u8; 6], mtu: Option<u16>) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    config[..6].copy_from_slice(&mac);
    config[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    config
}

pub struct Net {
    id: String,
    tap: Tap,
    /// The config space: mac (6 bytes), status (2, unused: no
    /// VIRTIO_NET_F_STATUS), max_virtqueue_pairs (2, no multi-queue), mtu (2).
    config: [u8; CONFIG_LEN],
    /// Whether VIRTIO_NET_F_MTU is offered (an MTU was given).
    mtu_offered: bool,
    queue_sizes: [u16; 2],
    queue_events: [EventFd; 2],
    interrupt: Arc<VirtioInterrupt>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    active: Option<ActiveQueues>,
    /// The frame read from the tap and not yet delivered (RX back-pressure):
    /// `rx_frame[..rx_pending]`; nothing is pending when zero.
    rx_frame: Vec<u8>,
    rx_pending: usize,
    tx_frame: Vec<u8>,
    counters: NetCounters,
}

impl Net {
    /// A NIC named `id` with guest MAC `mac` on `tap`; `rate_limit` applies
    /// to each direction separately; `mtu`, when given, is offered to the
    /// guest as the MTU to use.
    pub fn new(
        id: &str,
        tap: Tap,
        mac: [u8; 6],
        mtu: Option<u16>,
        rate_limit: RateLimit,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, NetError> {
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| NetError::EventFd {
                id: id.to_string(),
                source,
            })
        };
        let limiter = || {
            RateLimiter::new(rate_limit).map_err(|source| NetError::RateLimiter {
                id: id.to_string(),
                source,
            })
        };
        Ok(Self {
            id: id.to_string(),
            tap,
            config: config_space(mac, mtu),
            mtu_offered: mtu.is_some(),
            queue_sizes: [QUEUE_SIZE; 2],
            queue_events: [eventfd()?, eventfd()?],
            interrupt,
            rx_limiter: limiter()?,
            tx_limiter: limiter()?,
            active: None,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_pending: 0,
            tx_frame: vec![0; MAX_FRAME_LEN],
            counters: NetCounters::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Delivers frames from the tap into the guest's receive buffers until
    /// the tap is empty, the guest has no buffer left, or the limiter says
    /// wait. A frame that cannot be delivered yet stays pending.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let memory = &active.memory;
        let mut used_any = false;
        while !self.rx_limiter.is_blocked() {
            if self.rx_pending == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(0) => break,
                    Ok(len) => self.rx_pending = len,
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(err) => {
                        log::error!("virtio-net {}: cannot read the tap: {err}", self.id);
                        break;
                    }
                }
            }
            let frame_len = self.rx_pending as u64;
            match rx::deliver(
                &mut active.rx,
                memory,
                &mut self.rx_frame[..self.rx_pending],
                active.mergeable,
                &mut self.rx_limiter,
            ) {
                Delivery::Delivered => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += frame_len;
                }
                Delivery::Dropped(err) => {
                    self.counters.rx_dropped += 1;
                    log::warn!("virtio-net {}: receive frame dropped: {err}", self.id);
                }
                // The frame waits: for the guest's next RX kick (the tap
                // is not read meanwhile), or for the limiter's timer.
                Delivery::NoBuffers | Delivery::Throttled => break,
            }
            self.rx_pending = 0;
            used_any = true;
        }
        if used_any {
            notify_used(&mut active.rx, memory, &self.interrupt);
        }
    }

    /// Sends every frame the guest has queued, until the limiter says wait.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let memory = &active.memory;
        let mut used_any = false;
        while !self.tx_limiter.is_blocked() {
            let Some(chain) = active.tx.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let descriptors: Vec<_> = chain.collect();
            match frame::gather(memory, &descriptors, &mut self.tx_frame) {
                Ok(len) => {
                    if !self.tx_limiter.consume(1, len as u64) {
                        undo_pop(&mut active.tx);
                        break;
                    }
                    match self.tap.write_frame(&self.tx_frame[..len]) {
                        Ok(_) => {
                            self.counters.tx_frames += 1;
                            self.counters.tx_bytes += len as u64;
                        }
                        Err(err) => {
                            // The host stack refused it (no route, full
                            // queue): like a wire, the frame is lost.
                            self.counters.tx_dropped += 1;
                            log::debug!("virtio-net {}: tap write failed: {err}", self.id);
                        }
                    }
                }
                Err(err) => {
                    self.counters.tx_dropped += 1;
                    log::warn!("virtio-net {}: transmit frame dropped: {err}", self.id);
                }
            }
            if let Err(err) = active.tx.add_used(memory, head, 0) {
                log::warn!("virtio-net {}: cannot return a TX buffer: {err}", self.id);
            }
            used_any = true;
        }
        if used_any {
            notify_used(&mut active.tx, memory, &self.interrupt);
        }
    }
}

/// The tap offloads matching the receive features the guest accepted.
fn tap_offloads(acked_features: u64) -> u32 {
    let acked = |bit: u32| acked_features & (1u64 << bit) != 0;
    let mut offloads = 0;
    if acked(VIRTIO_NET_F_GUEST_CSUM) {
        offloads |= TUN_F_CSUM;
        if acked(VIRTIO_NET_F_GUEST_TSO4) {
            offloads |= TUN_F_TSO4;
        }
        if acked(VIRTIO_NET_F_GUEST_TSO6) {
            offloads |= TUN_F_TSO6;
        }
    }
    offloads
}

impl EventDrivenDevice for Net {
    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        // In SOURCE_* order.
        vec![
            (self.queue_events[RX_QUEUE].as_raw_fd(), EventSet::IN),
            (self.queue_events[TX_QUEUE].as_raw_fd(), EventSet::IN),
            (
                self.tap.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (self.rx_limiter.timer_fd(), EventSet::IN),
            (self.tx_limiter.timer_fd(), EventSet::IN),
        ]
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
            SOURCE_TAP => self.process_rx(),
            SOURCE_RX_LIMITER => {
                self.rx_limiter.on_timer();
                self.process_rx();
            }
            SOURCE_TX_LIMITER => {
                self.tx_limiter.on_timer();
                self.process_tx();
            }
            _ => {}
        }
    }
}

impl RateLimited for Net {
    fn rate_limit(&self) -> RateLimit {
        self.rx_limiter.limit()
    }

    fn set_rate_limit(&mut self, limit: RateLimit) {
        let now = Instant::now();
        self.rx_limiter.set_limit(limit, now);
        self.tx_limiter.set_limit(limit, now);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("rx_frames", c.rx_frames),
            ("rx_bytes", c.rx_bytes),
            ("rx_dropped", c.rx_dropped),
            ("tx_frames", c.tx_frames),
            ("tx_bytes", c.tx_bytes),
            ("tx_dropped", c.tx_dropped),
            ("rx_throttled", self.rx_limiter.throttled_count()),
            ("tx_throttled", self.tx_limiter.throttled_count()),
        ]
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
        ]
        .iter()
        .fold(0u64, |features, bit| features | (1u64 << bit))
            | (u64::from(self.mtu_offered) << VIRTIO_NET_F_MTU)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is the host's choice (VIRTIO_NET_F_CTRL_MAC_ADDR is not
        // offered); writes are ignored.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let [rx, tx]: [Queue; 2] = activation
            .queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: 2, got })?;
        let offloads = tap_offloads(activation.acked_features);
        // The guest was told that it may receive offloaded frames: without
        // the tap's cooperation that promise cannot be kept.
        self.tap
            .set_offload(offloads)
            .map_err(|err| ActivateError::Backend(err.to_string()))?;
        self.active = Some(ActiveQueues {
            memory: activation.memory,
            rx,
            tx,
            mergeable: activation.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
        });
        log::info!(
            "virtio-net {}: active on tap {} (tap offloads {offloads:#x}, {} receive buffers)",
            self.id,
            self.tap.name(),
            if self.active.as_ref().is_some_and(|active| active.mergeable) {
                "mergeable"
            } else {
                "one chain per frame"
            }
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = 0;
        log::info!("virtio-net {}: reset ({:?})", self.id, self.counters);
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
        Ok(DeviceState::Net(Versioned(self.save()?)))
    }

    fn announce(&mut self) {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        match self.tap.write_frame(&super::frame::announcement(mac)) {
            Ok(_) => log::info!(
                "virtio-net {}: announced on tap {}",
                self.id,
                self.tap.name()
            ),
            Err(err) => log::warn!("virtio-net {}: cannot announce: {err}", self.id),
        }
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match state {
            DeviceState::Net(state) => Ok(self.restore(state)?),
            other => Err(other.wrong_kind("a NIC's")),
        }
    }
}

impl Persist for Net {
    type State = NetState;
    type Error = NetStateError;

    fn save(&self) -> Result<NetState, NetStateError> {
        let c = self.counters;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        Ok(NetState {
            mac,
            rx_limiter: self.rx_limiter.save(),
            tx_limiter: self.tx_limiter.save(),
            pending_rx_frame: self.rx_frame[..self.rx_pending].to_vec(),
            counters: [
                c.rx_frames,
                c.rx_bytes,
                c.rx_dropped,
                c.tx_frames,
                c.tx_bytes,
                c.tx_dropped,
            ],
        })
    }

    fn restore(&mut self, state: &NetState) -> Result<(), NetStateError> {
        if state.mac[..] != self.config[..6] {
            return Err(NetStateError::Mac {
                id: self.id.clone(),
            });
        }
        if state.pending_rx_frame.len() > self.rx_frame.len() {
            return Err(NetStateError::PendingFrame {
                id: self.id.clone(),
                len: state.pending_rx_frame.len(),
            });
        }
        self.rx_limiter.restore(&state.rx_limiter);
        self.tx_limiter.restore(&state.tx_limiter);
        let pending = state.pending_rx_frame.len();
        self.rx_frame[..pending].copy_from_slice(&state.pending_rx_frame);
        self.rx_pending = pending;
        let [rx_frames, rx_bytes, rx_dropped, tx_frames, tx_bytes, tx_dropped] = state.counters;
        self.counters = NetCounters {
            rx_frames,
            rx_bytes,
            rx_dropped,
            tx_frames,
            tx_bytes,
            tx_dropped,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::tap::VNET_HDR_LEN;
    use crate::devices::virtio::testing::{
        interrupt, memory, TestQueue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    };
    use std::process::Command;
    use vm_memory::{Bytes, GuestAddress};

    const RX: TestQueue = TestQueue {
        desc_table: 0x1000,
        avail_ring: 0x2000,
        used_ring: 0x3000,
        size: 16,
    };
    const TX: TestQueue = TestQueue {
        desc_table: 0x4000,
        avail_ring: 0x5000,
        used_ring: 0x6000,
        size: 16,
    };
    /// A local experimental EtherType, so that other traffic is ignored.
    const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

    /// A real tap interface, up, with a packet socket bound to it standing
    /// in for the host network. Removed on drop. Needs root.
    struct HostSide {
        name: String,
        socket: std::os::fd::OwnedFd,
    }

    impl HostSide {
        fn new(tag: &str) -> (Tap, HostSide) {
            let name = format!("nbu{tag}{}", std::process::id() % 100_000);
            let tap = Tap::open(&name).unwrap_or_else(|err| {
                panic!("this test needs root and /dev/net/tun to create a tap: {err}")
            });
            let sysctl = format!("net.ipv6.conf.{name}.disable_ipv6=1");
            Command::new("sysctl").args(["-qw", &sysctl]).status().ok();
            let up = Command::new("ip")
                .args(["link", "set", "dev", &name, "up"])
                .status()
                .unwrap();
            assert!(up.success(), "ip link set {name} up failed");
            // SAFETY: plain socket/bind calls on values built here; results
            // are checked.
            let socket = unsafe {
                let protocol = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    i32::from(protocol),
                );
                assert!(
                    fd >= 0,
                    "packet socket: {}",
                    std::io::Error::last_os_error()
                );
                let c_name = std::ffi::CString::new(name.clone()).unwrap();
                let mut address: libc::sockaddr_ll = std::mem::zeroed();
                address.sll_family = libc::AF_PACKET as u16;
                address.sll_protocol = protocol;
                address.sll_ifindex = libc::if_nametoindex(c_name.as_ptr()) as i32;
                let ret = libc::bind(
                    fd,
                    (&address as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
            };
            (tap, HostSide { name, socket })
        }

        /// Sends an Ethernet frame out of the interface: the guest's RX.
        fn send(&self, frame: &[u8]) {
            // SAFETY: `frame` is valid for reads of its length.
            let sent = unsafe {
                libc::send(
                    self.socket.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                )
            };
            assert_eq!(sent, frame.len() as isize);
        }

        /// The next test frame the interface received (the guest's TX).
        fn receive(&self) -> Vec<u8> {
            for _ in 0..200 {
                let mut buf = vec![0u8; 2048];
                // SAFETY: `buf` is valid for writes of its length.
                let got = unsafe {
                    libc::recv(self.socket.as_raw_fd(), buf.as_mut_ptr().cast(), 2048, 0)
                };
                if got > 14 && buf[12..14] == ETHERTYPE {
                    buf.truncate(got as usize);
                    return buf;
                }
                if got < 0 {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            panic!("no test frame arrived on {}", self.name);
        }
    }

    impl Drop for HostSide {
        fn drop(&mut self) {
            // A tap without persistence vanishes with its descriptor; this
            // only cleans up after a test that failed half-way.
            Command::new("ip")
                .args(["link", "del", &self.name])
                .stderr(std::process::Stdio::null())
                .status()
                .ok();
        }
    }

    fn test_frame(marker: u8, len: usize) -> Vec<u8> {
        let mut frame = vec![marker; len];
        frame[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        frame[12..14].copy_from_slice(&ETHERTYPE);
        frame
    }

    fn active_net(mem: &GuestMemoryMmap, tap: Tap, limit: RateLimit) -> Net {
        let mut net = Net::new("test", tap, [2, 0, 0, 0, 0, 1], None, limit, interrupt()).unwrap();
        net.activate(Activation {
            memory: mem.clone(),
            queues: vec![RX.queue(), TX.queue()],
            acked_features: net.avail_features(),
        })
        .unwrap();
        net
    }

    /// Posts `count` receive buffers of 2 KiB, at 0x10000 + i * 0x1000.
    fn post_rx_buffers(mem: &GuestMemoryMmap, count: u16) {
        for index in 0..count {
            let addr = 0x10000 + u64::from(index) * 0x1000;
            RX.write_desc(mem, index, addr, 2048, VIRTQ_DESC_F_WRITE, 0);
        }
        RX.publish(mem, &(0..count).collect::<Vec<_>>());
    }

    fn received(mem: &GuestMemoryMmap, slot: u16) -> Vec<u8> {
        let (head, len) = RX.used_elem(mem, slot);
        let mut data = vec![0u8; len as usize];
        mem.read_slice(&mut data, GuestAddress(0x10000 + u64::from(head) * 0x1000))
            .unwrap();
        data
    }

    #[test]
    fn frames_wait_for_receive_buffers_and_none_is_lost() {
        let mem = memory(0x10_0000);
        let (tap, host) = HostSide::new("rx");
        let mut net = active_net(&mem, tap, RateLimit::default());
        post_rx_buffers(&mem, 1);
        let frames: Vec<Vec<u8>> = (1..=3)
            .map(|i| test_frame(i, 60 + usize::from(i)))
            .collect();
        for frame in &frames {
            host.send(frame);
        }
        net.on_event(SOURCE_TAP);
        // Other traffic may come first; the test frames arrive in order.
        let mut got = Vec::new();
        let mut slot = 0;
        let mut posted = 1;
        while got.len() < frames.len() && posted < RX.size {
            while RX.used_idx(&mem) > slot {
                let data = received(&mem, slot);
                assert_eq!(&data[10..12], &[1, 0], "num_buffers is 1");
                if data.len() > VNET_HDR_LEN + 14 && data[VNET_HDR_LEN + 12..][..2] == ETHERTYPE {
                    got.push(data[VNET_HDR_LEN..].to_vec());
                }
                slot += 1;
            }
            assert!(
                net.rx_pending > 0 || got.len() == frames.len(),
                "a frame waits in the device while the guest has no buffer"
            );
            // The guest posts one more buffer and kicks.
            posted += 1;
            post_rx_buffers(&mem, posted);
            net.on_event(SOURCE_RX_QUEUE);
        }
        assert_eq!(got, frames);
        assert_eq!(net.counters().rx_dropped, 0);
    }

    #[test]
    fn transmitted_frames_reach_the_host_whole() {
        let mem = memory(0x10_0000);
        let (tap, host) = HostSide::new("tx");
        let mut net = active_net(&mem, tap, RateLimit::default());
        let frame = test_frame(0x77, 300);
        // Header and frame split over three descriptors.
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x20000))
            .unwrap();
        mem.write_slice(&frame[..100], GuestAddress(0x21000))
            .unwrap();
        mem.write_slice(&frame[100..], GuestAddress(0x22000))
            .unwrap();
        TX.write_desc(&mem, 0, 0x20000, VNET_HDR_LEN as u32, VIRTQ_DESC_F_NEXT, 1);
        TX.write_desc(&mem, 1, 0x21000, 100, VIRTQ_DESC_F_NEXT, 2);
        TX.write_desc(&mem, 2, 0x22000, 200, 0, 0);
        // A chain with a device-writable buffer is refused, not sent.
        TX.write_desc(&mem, 3, 0x20000, 64, VIRTQ_DESC_F_WRITE, 0);
        TX.publish(&mem, &[3, 0]);
        net.on_event(SOURCE_TX_QUEUE);
        assert_eq!(TX.used_idx(&mem), 2, "both chains are returned");
        assert_eq!(host.receive(), frame);
        assert_eq!(net.counters().tx_frames, 1);
        assert_eq!(net.counters().tx_dropped, 1);
    }

    #[test]
    fn transmit_is_rate_limited_in_frames_per_second() {
        let mem = memory(0x10_0000);
        let (tap, host) = HostSide::new("rl");
        // 10 frames/s: a bucket of one frame, refilled every 100 ms.
        let limit = RateLimit {
            bytes_per_s: None,
            ops_per_s: Some(10),
        };
        let mut net = active_net(&mem, tap, limit);
        let frame = test_frame(0x55, 64);
        for index in 0..3u16 {
            let addr = 0x20000 + u64::from(index) * 0x1000;
            mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(addr))
                .unwrap();
            mem.write_slice(&frame, GuestAddress(addr + VNET_HDR_LEN as u64))
                .unwrap();
            TX.write_desc(&mem, index, addr, (VNET_HDR_LEN + 64) as u32, 0, 0);
        }
        TX.publish(&mem, &[0, 1, 2]);
        net.on_event(SOURCE_TX_QUEUE);
        assert_eq!(TX.used_idx(&mem), 1, "one frame passes, two wait");
        assert_eq!(host.receive(), frame);
        let mut poll = libc::pollfd {
            fd: net.tx_limiter.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 2000) }, 1);
        net.on_event(SOURCE_TX_LIMITER);
        assert_eq!(TX.used_idx(&mem), 2, "the timer lets the next frame go");
        net.set_rate_limit(RateLimit::default());
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 2000) }, 1);
        net.on_event(SOURCE_TX_LIMITER);
        assert_eq!(TX.used_idx(&mem), 3, "lifting the limit sends the rest");
    }

    #[test]
    fn offloads_follow_the_guest_features() {
        assert_eq!(tap_offloads(0), 0);
        let all = (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(tap_offloads(all), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
        // TSO without checksum offload is not a valid combination for tun.
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
    }

    #[test]
    fn activation_needs_both_queues() {
        let mem = memory(0x10_0000);
        let (tap, _host) = HostSide::new("aq");
        let mut net = Net::new(
            "test",
            tap,
            [2, 0, 0, 0, 0, 1],
            None,
            RateLimit::default(),
            interrupt(),
        )
        .unwrap();
        let err = net
            .activate(Activation {
                memory: mem,
                queues: vec![RX.queue()],
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 1
            }
        ));
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(net.avail_features() & (1 << VIRTIO_NET_F_MTU), 0);
    }

    #[test]
    fn an_mtu_is_offered_in_the_config_space() {
        let (tap, _host) = HostSide::new("mtu");
        let net = Net::new(
            "test",
            tap,
            [2, 0, 0, 0, 0, 1],
            Some(1450),
            RateLimit::default(),
            interrupt(),
        )
        .unwrap();
        assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MTU), 0);
        let mut mtu = [0u8; 2];
        net.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1450);
        // A read past the config space is zeros, never a panic.
        let mut past = [0xffu8; 4];
        net.read_config(11, &mut past);
        assert_eq!(past, [0x05, 0, 0, 0]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Random RX and TX descriptor tables and rings (any address, also
        /// past guest RAM, any length, flags including INDIRECT, loops),
        /// with real frames waiting in the tap: the device neither panics
        /// nor hangs, and never completes more chains than were offered.
        #[test]
        fn random_queues_never_panic(
            descs in proptest::collection::vec(
                (
                    proptest::prop_oneof![0u64..0x4_0000, proptest::prelude::any::<u64>()],
                    proptest::prop_oneof![0u32..0x2_0000, proptest::prelude::any::<u32>()],
                    0u16..8,
                    0u16..32,
                ),
                32,
            ),
            rx_heads in proptest::collection::vec(0u16..40, 0..16),
            tx_heads in proptest::collection::vec(0u16..40, 0..16),
        ) {
            let mem = memory(0x4_0000);
            let (tap, host) = HostSide::new("pp");
            let mut net = active_net(&mem, tap, RateLimit::default());
            for (index, (addr, len, flags, next)) in descs.iter().enumerate() {
                let queue = if index < 16 { RX } else { TX };
                let index = (index % 16) as u16;
                // Half the time point at a plausible buffer in guest RAM.
                let addr = if index.is_multiple_of(2) { 0x10000 + u64::from(index) * 0x1000 } else { *addr };
                queue.write_desc(&mem, index, addr, *len, *flags, *next);
            }
            RX.publish(&mem, &rx_heads);
            TX.publish(&mem, &tx_heads);
            // Frames for the guest, small and large, waiting in the tap.
            for (marker, len) in [(1, 60), (2, 1514), (3, 600)] {
                host.send(&test_frame(marker, len));
            }
            net.on_event(SOURCE_TX_QUEUE);
            net.on_event(SOURCE_TAP);
            net.on_event(SOURCE_RX_QUEUE);
            proptest::prop_assert!(usize::from(RX.used_idx(&mem)) <= rx_heads.len());
            proptest::prop_assert!(usize::from(TX.used_idx(&mem)) <= tx_heads.len());
        }
    }
}
