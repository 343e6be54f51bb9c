//! Request lines on the VMM's control socket.
//! Nothing may panic; see `vmm::fuzz_api::control_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz_api::control_request(data));
