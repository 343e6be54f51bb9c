//! virtio-rng (entropy device): fills the guest's buffers from the host's
//! `getrandom`. One queue, served from the event loop on each kick.

use std::convert::Infallible;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::EventSet;

use virtio_queue::{Queue, QueueT};

use super::persist::{DeviceState, DeviceStateError};
use crate::persist::Persist;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::queue_handler::{clear_event, notify_used, EventDrivenDevice};
use crate::devices::virtio::{
    ActivateError, Activation, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

pub const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 64;
/// Bytes served per request at most: a guest asking for more gets less.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Fills `buf` from the host's getrandom.
fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += got as usize;
    }
    Ok(())
}

pub struct Rng {
    queue_sizes: [u16; 1],
    queue_events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    active: Option<(GuestMemoryMmap, Queue)>,
}

impl Rng {
    pub fn new(interrupt: Arc<VirtioInterrupt>) -> std::io::Result<Self> {
        Ok(Self {
            queue_sizes: [QUEUE_SIZE],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK)?],
            interrupt,
            active: None,
        })
    }

    /// Fills the write-only buffers of one chain; returns the bytes written.
    fn fill(memory: &GuestMemoryMmap, buffers: &[(GuestAddress, u32)]) -> u32 {
        let mut written = 0usize;
        for (addr, len) in buffers {
            let len = (*len as usize).min(MAX_BYTES_PER_REQUEST - written);
            if len == 0 {
                break;
            }
            let mut bytes = vec![0u8; len];
            if host_random(&mut bytes).is_err() || memory.write_slice(&bytes, *addr).is_err() {
                break;
            }
            written += len;
        }
        written as u32
    }
}

impl Rng {
    fn process_queue(&mut self) {
        let Some((memory, queue)) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*memory) {
            let head = chain.head_index();
            let buffers: Vec<(GuestAddress, u32)> = chain
                .filter(|desc| desc.is_write_only())
                .map(|desc| (desc.addr(), desc.len()))
                .collect();
            let written = Self::fill(memory, &buffers);
            if let Err(err) = queue.add_used(&*memory, head, written) {
                log::warn!("virtio-rng: cannot complete a request: {err}");
            }
            used_any = true;
        }
        if used_any {
            notify_used(queue, memory, &self.interrupt);
        }
    }
}

impl EventDrivenDevice for Rng {
    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        self.queue_events
            .iter()
            .map(|event| (event.as_raw_fd(), EventSet::IN))
            .collect()
    }

    fn on_event(&mut self, _source: usize) {
        for event in &self.queue_events {
            clear_event(event);
        }
        self.process_queue();
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let (memory, queue, _) = activation.single_queue()?;
        self.active = Some((memory, queue));
        log::info!("virtio-rng: active");
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|(_, queue)| queue.state()).collect()
    }

    fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
        let Ok(()) = self.save();
        Ok(DeviceState::Rng)
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match state {
            DeviceState::Rng => {
                let Ok(()) = self.restore(&());
                Ok(())
            }
            other => Err(other.wrong_kind("an entropy device's")),
        }
    }
}

/// The entropy device keeps nothing beyond its queue (which the transport
/// saves): its state is empty.
impl Persist for Rng {
    type State = ();
    type Error = Infallible;

    fn save(&self) -> Result<(), Infallible> {
        Ok(())
    }

    fn restore(&mut self, _state: &()) -> Result<(), Infallible> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn buffers_are_filled_and_bounded() {
        let mem = memory();
        let written = Rng::fill(
            &mem,
            &[(GuestAddress(0x1000), 64), (GuestAddress(0x2000), 64)],
        );
        assert_eq!(written, 128);
        let mut data = [0u8; 64];
        mem.read_slice(&mut data, GuestAddress(0x1000)).unwrap();
        assert_ne!(data, [0u8; 64], "64 random bytes are not all zero");
        let past_end = Rng::fill(&mem, &[(GuestAddress(0xf_ff00), 0x1000)]);
        assert_eq!(
            past_end, 0,
            "a buffer crossing the end of guest RAM gets nothing"
        );
        let huge = Rng::fill(&mem, &[(GuestAddress(0), u32::MAX)]);
        assert_eq!(
            huge as usize, MAX_BYTES_PER_REQUEST,
            "huge buffers are capped"
        );
        let capped = Rng::fill(
            &mem,
            &[
                (GuestAddress(0), 0x8_0000),
                (GuestAddress(0x8_0000), 0x8_0000),
            ],
        );
        assert_eq!(capped as usize, MAX_BYTES_PER_REQUEST);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Random descriptor tables and available rings (any address, also
        /// past guest RAM, any length and flags, loops): the device neither
        /// panics nor hangs, completes at most the chains offered, and
        /// reports at most its per-request cap.
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
            use crate::devices::virtio::testing::{interrupt, memory, TestQueue};
            let layout = TestQueue::at(0x1000, 16);
            let mem = memory(0x2_0000);
            let mut rng = Rng::new(interrupt()).unwrap();
            rng.activate(Activation {
                memory: mem.clone(),
                queues: vec![layout.queue()],
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap();
            for (index, (addr, len, flags, next)) in descs.iter().enumerate() {
                // Buffers may point anywhere but at the rings themselves,
                // whose used lengths the assertions below read back.
                let addr = if *addr < 0x2000 { addr + 0x2000 } else { *addr };
                layout.write_desc(&mem, index as u16, addr, *len, *flags, *next);
            }
            layout.publish(&mem, &heads);
            rng.process_queue();
            let used = layout.used_idx(&mem);
            proptest::prop_assert!(usize::from(used) <= heads.len());
            for slot in 0..used {
                let (_, len) = layout.used_elem(&mem, slot);
                proptest::prop_assert!(len as usize <= MAX_BYTES_PER_REQUEST);
            }
        }
    }
}
