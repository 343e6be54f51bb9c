//! What a destination answers a migrating source (Accept, Ready, Running,
//! Refuse), read as the source reads it.
//! Nothing may panic; see `vmm::fuzz_api::migration_source`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz_api::migration_source(data));
