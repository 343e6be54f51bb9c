//! The vsock device: guest RAM holding its three queues, descriptors and
//! packets, a host process and a host listener, then notifications.
//! Nothing may panic; see `vmm::fuzz_api::virtio_vsock`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz_api::virtio_vsock(data));
