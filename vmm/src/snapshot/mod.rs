//! Snapshots: a VM's complete state in two files of one directory, so that
//! a new `nubis-vmm` process resumes the guest exactly where it was.
//!
//! - `state`: a header (magic, format version, payload length, SHA-256 of
//!   the payload) and the payload, the JSON of [`VmSnapshot`]: machine
//!   shape, KVM VM state (irqchip, PIT, clock), every vCPU's registers,
//!   LAPIC, MSRs and events, and every device's state with its queue
//!   positions. Each component saves a plain serde struct of its own.
//! - `memory`: guest RAM, byte for byte (holes left where a page is zero,
//!   so that a mostly idle guest's file stays sparse).
//!
//! A file of another format version, a corrupt or truncated one, or one
//! for a machine of another shape is refused with a message saying which.

pub mod file;
pub mod state;

pub use file::{read_memory, read_state, write_memory, write_state, SnapshotError};
pub use state::VmSnapshot;

pub use nubis_contract::snapshot::{MEMORY_FILE, STATE_FILE};
