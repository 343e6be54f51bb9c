//! A snapshot's state file: magic, version, length, SHA-256 and JSON.
//! Nothing may panic; see `vmm::fuzz_api::snapshot_state`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz_api::snapshot_state(data));
