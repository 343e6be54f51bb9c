//! What `nubis run` reads from the guest: event lines on the control port
//! and the share disk's listing (whose names the guest chose).
//! Nothing may panic; see `nubis_run::fuzz_api::run_protocol`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nubis_run::fuzz_api::run_protocol(data));
