//! The one trait every stateful component implements so that a snapshot or
//! a migration can carry it to a new process: `save` gives a plain serde
//! struct, `restore` puts it back into a component that the new process
//! built from its own config (its backends: files, taps, sockets), which is
//! why restoring is in place rather than a constructor. A component's
//! saving and restoring live together, next to its state struct.
//!
//! The state structs are the snapshot file's and the migration stream's
//! payload (`snapshot::VmSnapshot` gathers them). Each carries its own
//! version ([`VersionedState`]), written next to it ([`Versioned`]): a
//! component whose state changes shape raises its own number, and a VMM
//! that meets a version it does not know names the component and both
//! numbers instead of misreading fields. The container formats have their
//! versions too (`snapshot::file::FORMAT_VERSION`,
//! `migration::protocol::VERSION`), for the framing around them.

use std::ops::{Deref, DerefMut};

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A component whose state survives a snapshot or a migration.
pub trait Persist {
    /// What is saved: a plain serde struct with its own version.
    type State: VersionedState;
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

/// A component's saved state, and the version of its shape.
pub trait VersionedState: Serialize + DeserializeOwned {
    /// The component, as an error names it ("virtio-net").
    const COMPONENT: &'static str;
    /// Raised whenever the serde shape changes.
    const VERSION: u16;
}

/// The state of a component that has none (the entropy device).
impl VersionedState for () {
    const COMPONENT: &'static str = "stateless device";
    const VERSION: u16 = 1;
}

/// A component's state as it is written: `{"version": N, "state": ...}`.
/// Reading it checks the version before the state's fields are looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versioned<S>(pub S);

impl<S> Versioned<S> {
    pub fn into_inner(self) -> S {
        self.0
    }
}

impl<S> From<S> for Versioned<S> {
    fn from(state: S) -> Self {
        Versioned(state)
    }
}

impl<S> Deref for Versioned<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

impl<S> DerefMut for Versioned<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.0
    }
}

#[derive(Serialize)]
struct Written<'a, S> {
    version: u16,
    state: &'a S,
}

/// The state is held undecoded until its version is known to fit (the
/// formats that carry it are JSON).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Read {
    version: u16,
    state: serde_json::Value,
}

impl<S: VersionedState> Serialize for Versioned<S> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        Written {
            version: S::VERSION,
            state: &self.0,
        }
        .serialize(serializer)
    }
}

impl<'de, S: VersionedState> Deserialize<'de> for Versioned<S> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let read = Read::deserialize(deserializer)?;
        if read.version != S::VERSION {
            return Err(D::Error::custom(format!(
                "the {} state is version {}; this VMM reads version {}",
                S::COMPONENT,
                read.version,
                S::VERSION
            )));
        }
        serde_json::from_value(read.state)
            .map(Versioned)
            .map_err(|err| D::Error::custom(format!("the {} state: {err}", S::COMPONENT)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Counter {
        count: u32,
    }

    impl VersionedState for Counter {
        const COMPONENT: &'static str = "counter";
        const VERSION: u16 = 3;
    }

    #[test]
    fn a_state_is_written_with_its_version_and_read_back() {
        let json = serde_json::to_string(&Versioned(Counter { count: 7 })).expect("encode");
        assert_eq!(json, r#"{"version":3,"state":{"count":7}}"#);
        let back: Versioned<Counter> = serde_json::from_str(&json).expect("decode");
        assert_eq!(back.into_inner(), Counter { count: 7 });
    }

    #[test]
    fn another_version_is_refused_by_name_before_its_fields_are_read() {
        let err =
            serde_json::from_str::<Versioned<Counter>>(r#"{"version":4,"state":{"renamed":"x"}}"#)
                .expect_err("a newer shape");
        assert!(
            err.to_string()
                .contains("the counter state is version 4; this VMM reads version 3"),
            "{err}"
        );
    }

    #[test]
    fn a_state_that_does_not_decode_names_its_component() {
        let err =
            serde_json::from_str::<Versioned<Counter>>(r#"{"version":3,"state":{"count":"x"}}"#)
                .expect_err("a wrong type");
        assert!(err.to_string().contains("the counter state:"), "{err}");
        serde_json::from_str::<Versioned<Counter>>(r#"{"version":3}"#).expect_err("no state");
    }
}
