//! The one trait every stateful component implements so that a snapshot or
//! a migration can carry it to a new process: `save` gives a plain serde
//! struct, `restore` puts it back into a component that the new process
//! built from its own config (its backends: files, taps, sockets), which is
//! why restoring is in place rather than a constructor. A component's
//! saving and restoring live together, next to its state struct.
//!
//! The state structs are the snapshot file's and the migration stream's
//! payload (`snapshot::VmSnapshot` gathers them): their serde shapes are
//! versioned with those formats (`snapshot::file::FORMAT_VERSION`,
//! `migration::protocol::VERSION`), which change when one of them does.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component whose state survives a snapshot or a migration.
pub trait Persist {
    /// What is saved: a plain serde struct.
    type State: Serialize + DeserializeOwned;
    /// Why saving failed, or why a saved state does not fit this
    /// component.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The component's state. Devices are saved with their vCPUs paused
    /// and their locks held by the caller.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Takes on `state`; a state that does not fit (another kind, size or
    /// queue layout) is refused, never trusted: it comes from a file or a
    /// network peer.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}
