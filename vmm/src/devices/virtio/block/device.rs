//! The virtio-blk device: one request queue, served from the event loop when
//! the guest kicks it (through an ioeventfd), against a raw image file.
//! Capacity comes from the file size; read-only disks offer
//! `VIRTIO_BLK_F_RO`; FLUSH maps to `fdatasync`, and without FLUSH
//! negotiated every write is made durable before it completes. A rate
//! limiter (bytes/s, requests/s) holds requests in the guest's queue while
//! the disk is over its limit.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use event_manager::EventSet;

use virtio_queue::{Queue, QueueT};

use super::persist::{BlockState, BlockStateError};
use super::tracker::WriteTracker;
use crate::devices::virtio::persist::{DeviceState, DeviceStateError};
use crate::devices::virtio::DiskCopySource;
use crate::persist::{Persist, Versioned};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Disk, MAX_SEGMENTS, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES};
use crate::devices::virtio::queue_handler::{
    clear_event, notify_used, undo_pop, EventDrivenDevice,
};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, RateLimited, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::{RateLimit, RateLimiter, RateLimiterError};

pub const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_FLUSH: u32 = 9;
const VIRTIO_BLK_F_DISCARD: u32 = 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// Largest DISCARD/WRITE_ZEROES range in one segment: 2 GiB in sectors.
const MAX_ZEROING_SECTORS: u32 = 1 << 22;
/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (and padding).
const CONFIG_LEN: usize = 60;
const QUEUE_SIZE: u16 = 256;

/// Errors in opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("cannot create the queue eventfd of disk {path}: {source}")]
    EventFd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {path}: {source}")]
    RateLimiter {
        path: PathBuf,
        source: RateLimiterError,
    },
}

struct ActiveQueue {
    memory: GuestMemoryMmap,
    queue: Queue,
    flush_negotiated: bool,
}

/// The device's configuration space: capacity, and the DISCARD and
/// WRITE_ZEROES limits.
fn config_space(capacity_sectors: u64) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    for (offset, value) in [
        (36, MAX_ZEROING_SECTORS), // max_discard_sectors
        (40, MAX_SEGMENTS),        // max_discard_seg
        (44, 1),                   // discard_sector_alignment
        (48, MAX_ZEROING_SECTORS), // max_write_zeroes_sectors
        (52, MAX_SEGMENTS),        // max_write_zeroes_seg
    ] {
        config[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }
    config[56] = 1; // write_zeroes_may_unmap
    config
}

pub struct Block {
    path: PathBuf,
    file: File,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    capacity_bytes: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    queue_events: [EventFd; 1],
    interrupt: Arc<VirtioInterrupt>,
    limiter: RateLimiter,
    active: Option<ActiveQueue>,
    counters: BlockCounters,
    /// Set while the disk is being copied to another host.
    tracker: Option<Arc<WriteTracker>>,
}

/// Request counters, for the control socket's `status`.
#[derive(Debug, Default, Clone, Copy)]
struct BlockCounters {
    read_requests: u64,
    read_bytes: u64,
    write_requests: u64,
    write_bytes: u64,
    flushes: u64,
    /// Malformed requests and requests that completed with an error.
    errors: u64,
}

impl BlockCounters {
    fn record(&mut self, kind: u32, bytes: u64, status: u8) {
        match kind {
            request::VIRTIO_BLK_T_IN => {
                self.read_requests += 1;
                self.read_bytes += bytes;
            }
            request::VIRTIO_BLK_T_OUT => {
                self.write_requests += 1;
                self.write_bytes += bytes;
            }
            request::VIRTIO_BLK_T_FLUSH => self.flushes += 1,
            _ => {}
        }
        if status != request::VIRTIO_BLK_S_OK {
            self.errors += 1;
        }
    }
}

/// Event sources of a disk, in [`EventDrivenDevice::event_sources`] order.
const SOURCE_QUEUE: usize = 0;
const SOURCE_LIMITER: usize = 1;

impl Block {
    /// Opens the image at `path`. `id` (at most 20 bytes are used) is what
    /// the guest reads as the disk's serial.
    pub fn new(
        path: &Path,
        read_only: bool,
        id: &str,
        rate_limit: RateLimit,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, BlockError> {
        let open_error = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_error)?;
        let metadata = file.metadata().map_err(open_error)?;
        if !metadata.is_file() {
            return Err(BlockError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        // Whole sectors only: a partial last sector is not addressable.
        let capacity_bytes = metadata.len() / SECTOR_SIZE * SECTOR_SIZE;
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        let bytes = id.as_bytes();
        let len = bytes.len().min(VIRTIO_BLK_ID_BYTES);
        serial[..len].copy_from_slice(&bytes[..len]);
        let queue_event =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BlockError::EventFd {
                path: path.to_path_buf(),
                source,
            })?;
        let limiter = RateLimiter::new(rate_limit).map_err(|source| BlockError::RateLimiter {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            read_only,
            id: serial,
            capacity_bytes,
            config: config_space(capacity_bytes / SECTOR_SIZE),
            queue_sizes: [QUEUE_SIZE],
            queue_events: [queue_event],
            interrupt,
            limiter,
            active: None,
            counters: BlockCounters::default(),
            tracker: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Block {
    /// Serves every request the guest has made available, until the queue
    /// is empty or the rate limiter holds the next request back.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if self.limiter.is_blocked() {
            return;
        }
        let mut disk = Disk {
            file: &mut self.file,
            capacity_bytes: self.capacity_bytes,
            read_only: self.read_only,
            id: &self.id,
            write_through: !active.flush_negotiated,
            tracker: self.tracker.as_deref(),
        };
        let memory = &active.memory;
        let mut used_any = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let descriptors: Vec<_> = chain.collect();
            let written = match request::parse(&descriptors, memory) {
                Ok(request) => {
                    if !self.limiter.consume(1, request.data_bytes()) {
                        // Over the limit: the request stays in the queue
                        // until the limiter's timer fires.
                        undo_pop(&mut active.queue);
                        break;
                    }
                    let done = request::execute(&request, memory, &mut disk);
                    self.counters
                        .record(request.kind, request.data_bytes(), done.status);
                    done.written.saturating_add(1)
                }
                Err(err) => {
                    self.counters.errors += 1;
                    log::warn!("virtio-blk {}: bad request: {err}", self.path.display());
                    0
                }
            };
            if let Err(err) = active.queue.add_used(memory, head, written) {
                log::warn!(
                    "virtio-blk {}: cannot complete a request: {err}",
                    self.path.display()
                );
            }
            used_any = true;
        }
        if used_any {
            notify_used(&mut active.queue, memory, &self.interrupt);
        }
    }
}

impl EventDrivenDevice for Block {
    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        // In SOURCE_QUEUE, SOURCE_LIMITER order.
        vec![
            (self.queue_events[0].as_raw_fd(), EventSet::IN),
            (self.limiter.timer_fd(), EventSet::IN),
        ]
    }

    fn on_event(&mut self, source: usize) {
        match source {
            SOURCE_QUEUE => clear_event(&self.queue_events[0]),
            SOURCE_LIMITER => self.limiter.on_timer(),
            _ => return,
        }
        self.process_queue();
    }
}

impl RateLimited for Block {
    fn rate_limit(&self) -> RateLimit {
        self.limiter.limit()
    }

    fn set_rate_limit(&mut self, limit: RateLimit) {
        self.limiter.set_limit(limit, Instant::now());
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("read_requests", c.read_requests),
            ("read_bytes", c.read_bytes),
            ("write_requests", c.write_requests),
            ("write_bytes", c.write_bytes),
            ("flushes", c.flushes),
            ("errors", c.errors),
            ("throttled", self.limiter.throttled_count()),
        ]
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Capacity is read-only; writeback mode is not offered.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let (memory, queue, acked_features) = activation.single_queue()?;
        self.active = Some(ActiveQueue {
            memory,
            queue,
            flush_negotiated: acked_features & (1 << VIRTIO_BLK_F_FLUSH) != 0,
        });
        log::info!(
            "virtio-blk {}: active ({} sectors{})",
            self.path.display(),
            self.capacity_bytes / SECTOR_SIZE,
            if self.read_only { ", read-only" } else { "" }
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .map(|active| active.queue.state())
            .collect()
    }

    fn track_writes(&mut self, on: bool) -> Option<DiskCopySource> {
        if !on {
            self.tracker = None;
            return None;
        }
        let tracker = Arc::new(WriteTracker::new(self.capacity_bytes));
        self.tracker = Some(tracker.clone());
        Some(DiskCopySource {
            path: self.path.clone(),
            capacity: self.capacity_bytes,
            tracker,
        })
    }

    fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
        Ok(DeviceState::Block(Versioned(self.save()?)))
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match state {
            DeviceState::Block(state) => Ok(self.restore(state)?),
            other => Err(other.wrong_kind("a disk's")),
        }
    }
}

impl Persist for Block {
    type State = BlockState;
    type Error = BlockStateError;

    fn save(&self) -> Result<BlockState, BlockStateError> {
        let c = self.counters;
        Ok(BlockState {
            capacity_bytes: self.capacity_bytes,
            read_only: self.read_only,
            limiter: self.limiter.save(),
            counters: [
                c.read_requests,
                c.read_bytes,
                c.write_requests,
                c.write_bytes,
                c.flushes,
                c.errors,
            ],
        })
    }

    fn restore(&mut self, state: &BlockState) -> Result<(), BlockStateError> {
        if state.capacity_bytes != self.capacity_bytes {
            return Err(BlockStateError::Capacity {
                path: self.path.clone(),
                found: self.capacity_bytes,
                saved: state.capacity_bytes,
            });
        }
        if state.read_only != self.read_only {
            return Err(BlockStateError::ReadOnly {
                path: self.path.clone(),
                found: self.read_only,
                saved: state.read_only,
            });
        }
        self.limiter.restore(&state.limiter);
        let [read_requests, read_bytes, write_requests, write_bytes, flushes, errors] =
            state.counters;
        self.counters = BlockCounters {
            read_requests,
            read_bytes,
            write_requests,
            write_bytes,
            flushes,
            errors,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{interrupt, TestQueue};
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress};

    const MEM_SIZE: usize = 0x10_0000;
    const SIZE: u16 = 16;

    fn image(len: u64) -> vmm_sys_util::tempfile::TempFile {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        file.as_file().set_len(len).unwrap();
        file
    }

    /// The request queue's rings, in the block tests' fixed layout.
    const QUEUE: TestQueue = TestQueue {
        desc_table: 0x1000,
        avail_ring: 0x3000,
        used_ring: 0x4000,
        size: SIZE,
    };

    /// A block device activated on a queue whose descriptor table and
    /// available ring hold whatever the "guest" wrote.
    fn active_block(mem: &GuestMemoryMmap, path: &Path, read_only: bool) -> Block {
        active_limited_block(mem, path, read_only, RateLimit::default())
    }

    fn active_limited_block(
        mem: &GuestMemoryMmap,
        path: &Path,
        read_only: bool,
        limit: RateLimit,
    ) -> Block {
        let mut block = Block::new(path, read_only, "fuzz", limit, interrupt()).unwrap();
        block
            .activate(Activation {
                memory: mem.clone(),
                queues: vec![QUEUE.queue()],
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap();
        block
    }

    fn write_desc(mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        QUEUE.write_desc(mem, index, addr, len, flags, next);
    }

    fn publish(mem: &GuestMemoryMmap, heads: &[u16]) {
        QUEUE.publish(mem, heads);
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        QUEUE.used_idx(mem)
    }

    #[test]
    fn a_saved_disk_comes_back_and_another_disk_is_refused() {
        let file = image(1 << 20);
        let mut block = Block::new(
            file.as_path(),
            false,
            "vda",
            RateLimit {
                bytes_per_s: Some(1 << 20),
                ops_per_s: None,
            },
            interrupt(),
        )
        .unwrap();
        block.counters.read_requests = 7;
        block.counters.errors = 1;
        let saved = block.save().unwrap();
        let saved: BlockState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let mut fresh = Block::new(
            file.as_path(),
            false,
            "vda",
            RateLimit::default(),
            interrupt(),
        )
        .unwrap();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.save().unwrap(), saved);
        assert_eq!(fresh.rate_limit().bytes_per_s, Some(1 << 20));

        let mut read_only = Block::new(
            file.as_path(),
            true,
            "vda",
            RateLimit::default(),
            interrupt(),
        )
        .unwrap();
        assert!(matches!(
            read_only.restore(&saved),
            Err(BlockStateError::ReadOnly {
                found: true,
                saved: false,
                ..
            })
        ));
        let larger = image(2 << 20);
        let mut other = Block::new(
            larger.as_path(),
            false,
            "vda",
            RateLimit::default(),
            interrupt(),
        )
        .unwrap();
        assert!(matches!(
            other.restore_state(&DeviceState::Block(Versioned(saved))),
            Err(DeviceStateError::Block(BlockStateError::Capacity { .. }))
        ));
        assert!(matches!(
            other.restore_state(&DeviceState::Rng),
            Err(DeviceStateError::WrongKind { found: "rng", .. })
        ));
    }

    #[test]
    fn a_read_request_through_the_queue_completes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let disk = image(8 * 512);
        let mut block = active_block(&mem, disk.as_path(), false);
        mem.write_obj(0u32, GuestAddress(0x8000)).unwrap(); // VIRTIO_BLK_T_IN
        mem.write_obj(2u64, GuestAddress(0x8008)).unwrap(); // sector 2
        write_desc(&mem, 0, 0x8000, 16, 1, 1); // NEXT
        write_desc(&mem, 1, 0x9000, 512, 1 | 2, 2); // NEXT | WRITE
        write_desc(&mem, 2, 0xa000, 1, 2, 0); // WRITE
        mem.write_obj(0xffu8, GuestAddress(0xa000)).unwrap();
        publish(&mem, &[0]);
        block.process_queue();
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), 0);
        let used_len: u32 = mem.read_obj(GuestAddress(QUEUE.used_ring + 8)).unwrap();
        assert_eq!(used_len, 513);
        let counters = block.counters();
        assert!(counters.contains(&("read_requests", 1)), "{counters:?}");
        assert!(counters.contains(&("read_bytes", 512)), "{counters:?}");
        assert!(counters.contains(&("errors", 0)), "{counters:?}");
    }

    /// Publishes `count` one-sector read requests.
    fn publish_reads(mem: &GuestMemoryMmap, count: u16) {
        for request in 0..count {
            let (head, at) = (request * 3, 0x8000 + u64::from(request) * 0x1000);
            mem.write_obj(0u32, GuestAddress(at)).unwrap(); // VIRTIO_BLK_T_IN
            mem.write_obj(0u64, GuestAddress(at + 8)).unwrap();
            write_desc(mem, head, at, 16, 1, head + 1);
            write_desc(mem, head + 1, at + 0x100, 512, 1 | 2, head + 2);
            write_desc(mem, head + 2, at + 0x300, 1, 2, 0);
        }
        publish(
            mem,
            &(0..count).map(|request| request * 3).collect::<Vec<_>>(),
        );
    }

    #[test]
    fn the_rate_limiter_holds_requests_in_the_queue_until_its_timer() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let disk = image(8 * 512);
        // 10 requests/s: a bucket of one request, refilled every 100 ms.
        let limit = RateLimit {
            bytes_per_s: None,
            ops_per_s: Some(10),
        };
        let mut block = active_limited_block(&mem, disk.as_path(), false, limit);
        publish_reads(&mem, 3);
        block.on_event(SOURCE_QUEUE);
        assert_eq!(used_idx(&mem), 1, "one request passes, two wait");
        block.on_event(SOURCE_QUEUE);
        assert_eq!(used_idx(&mem), 1, "a kick does not bypass the limiter");
        let mut poll = libc::pollfd {
            fd: block.limiter.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 2000) }, 1);
        block.on_event(SOURCE_LIMITER);
        assert_eq!(used_idx(&mem), 2, "the timer lets the next request go");
        block.set_rate_limit(RateLimit::default());
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 2000) }, 1);
        block.on_event(SOURCE_LIMITER);
        assert_eq!(used_idx(&mem), 3, "lifting the limit serves the rest");
        assert_eq!(block.rate_limit(), RateLimit::default());
    }

    #[test]
    fn a_descriptor_loop_does_not_hang_or_panic() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let disk = image(8 * 512);
        std::fs::write(disk.as_path(), [0x5au8; 8 * 512]).unwrap();
        let mut block = active_block(&mem, disk.as_path(), false);
        // A write request whose chain goes 0 -> 1 -> 0 -> ... for ever.
        mem.write_obj(1u32, GuestAddress(0x8000)).unwrap(); // VIRTIO_BLK_T_OUT
        mem.write_obj(0u64, GuestAddress(0x8008)).unwrap();
        write_desc(&mem, 0, 0x8000, 16, 1, 1);
        write_desc(&mem, 1, 0x9000, 512, 1, 0); // back to 0
        publish(&mem, &[0]);
        // Done within a bounded time, on a thread so that a hang fails the
        // test instead of stalling the run.
        let (done, finished) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            block.process_queue();
            let _ = done.send(());
            block
        });
        assert!(
            finished
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_ok(),
            "process_queue hangs on a descriptor loop"
        );
        let block = worker.join().unwrap();
        // The chain is given back to the guest with nothing written, counted
        // as an error, and the disk is untouched.
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(QUEUE.used_elem(&mem, 0), (0, 0));
        assert_eq!(block.counters.errors, 1);
        assert_eq!(block.counters.write_requests, 0);
        assert_eq!(std::fs::read(disk.as_path()).unwrap(), [0x5au8; 8 * 512]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random descriptor tables and available rings: arbitrary
        /// addresses (also past guest RAM), lengths, flags (indirect too),
        /// next indices and heads. The device must neither panic nor touch
        /// memory outside the guest, and the image keeps its size.
        #[test]
        fn random_queues_never_panic(
            descs in proptest::collection::vec(
                (prop_oneof![0u64..(MEM_SIZE as u64 * 2), any::<u64>()], any::<u32>(), 0u16..8, 0u16..32),
                SIZE as usize,
            ),
            heads in proptest::collection::vec(0u16..40, 0..20),
            headers in proptest::collection::vec((0u32..10, prop_oneof![0u64..16, any::<u64>()]), 4),
            read_only in any::<bool>(),
        ) {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let disk = image(8 * 512);
            let mut block = active_block(&mem, disk.as_path(), read_only);
            for (i, (kind, sector)) in headers.iter().enumerate() {
                let at = 0x8000 + i as u64 * 0x100;
                mem.write_obj(*kind, GuestAddress(at)).unwrap();
                mem.write_obj(*sector, GuestAddress(at + 8)).unwrap();
            }
            for (index, (addr, len, flags, next)) in descs.iter().enumerate() {
                // Half the time point at a plausible header or buffer.
                let addr = if index % 2 == 0 { 0x8000 + (addr % 4) * 0x100 } else { *addr };
                write_desc(&mem, index as u16, addr, *len % 0x2_0000, *flags, *next);
            }
            publish(&mem, &heads);
            block.process_queue();
            prop_assert_eq!(disk.as_file().metadata().unwrap().len(), 8 * 512);
            prop_assert!(used_idx(&mem) as usize <= heads.len());
        }
    }
}
