//! What a peer sends to a `--migrate-listen` destination: the record layer
//! as a stranger without the key reaches it, then (as the plaintext inside
//! opened records) its first frame judged as a Hello, then pages, disk
//! pieces and the state.
//! Nothing may panic; see `vmm::fuzz_api::migration_destination`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz_api::migration_destination(data));
