//! A snapshot directory's layout: what the VMM writes there and whoever
//! reuses a snapshot (the agent, `nubis run`'s warm cache) looks for.

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
