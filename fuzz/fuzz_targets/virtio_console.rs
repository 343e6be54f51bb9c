//! A virtio-console port: guest RAM holding both queues' rings, descriptor
//! tables and buffers, host input waiting, then the device's events.
//! Nothing may panic; see `vmm::fuzz_api::virtio_console`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz_api::virtio_console(data));
