//! The virtio entropy device: guest RAM holding its queue's rings,
//! descriptors and buffers, then a notification.
//! Nothing may panic; see `vmm::fuzz_api::virtio_rng`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz_api::virtio_rng(data));
