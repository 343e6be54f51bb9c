//! The contract between the host agent and the VMM: every type that crosses
//! their process boundary, in one crate that both depend on (and that needs
//! no KVM), so that a field cannot be written one way by the agent and read
//! another way by the VMM.
//!
//! - [`config`]: the VM config file (`nubis-vmm --config vm.json`);
//! - [`control`]: the control socket's requests and answers;
//! - [`migration`]: a live migration's progress, as `migration_status` reports it;
//! - [`rate_limit`]: a device's rate limit, also a field of the REST API's
//!   types (`ToSchema` with the `utoipa` feature);
//! - [`exit`]: the VMM process's exit codes;
//! - [`snapshot`]: the file names in a snapshot directory.
//!
//! The wire formats are the VMM's: what it accepts and produces is what
//! these types read and write, byte for byte.

pub mod config;
pub mod control;
pub mod exit;
pub mod migration;
pub mod rate_limit;
pub mod snapshot;

pub use rate_limit::RateLimit;
