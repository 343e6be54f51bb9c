//! Live migration of a running VM to another host (`/v1/hosts`), and the
//! host-to-host messages that prepare the destination.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Image, Tenant, Vm};

/// The bounds of a migration's limits (`MigrationCreate`).
pub const MAX_DOWNTIME_MS: u64 = 60_000;
/// (Rounds bound the pre-copy of a guest that never converges; the time
/// limit ends it too.) The same bounds as the VMM's.
pub const MAX_ROUNDS: std::ops::RangeInclusive<u32> = 0..=100_000_000;
pub const MAX_SECONDS: std::ops::RangeInclusive<u64> = 1..=86_400;

/// `POST /v1/vms/{id}/migration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationCreate {
    /// The destination: a registered peer host's name (422 when there is
    /// none of that name).
    pub host: String,
    /// The pause the guest may see, in ms, 0 to 60000 (100 by default; 0
    /// copies until a round or time limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 60000)]
    pub downtime_ms: Option<u64>,
    /// Copy rounds at most before the hand-over, 0 to 100000000 (30 by
    /// default; 0 hands over after the first full copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 100000000)]
    pub max_rounds: Option<u32>,
    /// Seconds of copying at most before the hand-over, 1 to 86400 (300 by
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86400)]
    pub max_seconds: Option<u64>,
}

impl MigrationCreate {
    /// A migration to `host` within the default limits.
    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            downtime_ms: None,
            max_rounds: None,
            max_seconds: None,
        }
    }

    /// The field and reason of the first limit out of its bounds.
    pub fn out_of_bounds(&self) -> Option<(&'static str, String)> {
        if self.downtime_ms.is_some_and(|ms| ms > MAX_DOWNTIME_MS) {
            return Some(("downtime_ms", format!("must be 0 to {MAX_DOWNTIME_MS}")));
        }
        if self
            .max_rounds
            .is_some_and(|rounds| !MAX_ROUNDS.contains(&rounds))
        {
            return Some((
                "max_rounds",
                format!("must be {} to {}", MAX_ROUNDS.start(), MAX_ROUNDS.end()),
            ));
        }
        if self
            .max_seconds
            .is_some_and(|secs| !MAX_SECONDS.contains(&secs))
        {
            return Some((
                "max_seconds",
                format!("must be {} to {}", MAX_SECONDS.start(), MAX_SECONDS.end()),
            ));
        }
        None
    }
}

/// A migration's progress, as the source host sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    pub vm_id: String,
    pub tenant_id: String,
    pub host: String,
    /// preparing, connecting, copying, handing_over, completed, failed,
    /// cancelled, unconfirmed.
    pub phase: String,
    pub rounds: u32,
    pub bytes_sent: u64,
    pub dirty_pages: u64,
    pub expected_downtime_ms: u64,
    /// The pause the guest saw, once handed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    pub elapsed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Migration {
    pub fn is_over(&self) -> bool {
        matches!(
            self.phase.as_str(),
            "completed" | "failed" | "cancelled" | "unconfirmed"
        )
    }
}

/// Host to host: the source asks the destination to receive a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingMigration {
    pub vm: Vm,
    /// What its metadata service tells it (its SSH keys and user data
    /// are not in `vm`).
    #[serde(default, skip_serializing_if = "crate::VmMetadata::is_empty")]
    pub metadata: crate::VmMetadata,
    pub tenant: Tenant,
    pub image: Image,
    /// The source's underlay address.
    pub source: String,
}

/// Host to host: where the destination's VMM waits, its token, and the
/// key that encrypts and authenticates the migration stream.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingReady {
    /// "ADDRESS:PORT" on the destination's underlay.
    pub listen: String,
    pub token: String,
    /// The migration's key: 64 hex digits (32 random bytes), one per
    /// migration, given to both VMMs and never logged.
    pub key: String,
}

/// Shows neither the token nor the key.
impl std::fmt::Debug for IncomingReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingReady")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constructor_asks_for_the_defaults() {
        let parsed: MigrationCreate = serde_json::from_str(r#"{"host":"b"}"#).unwrap();
        assert_eq!(MigrationCreate::new("b"), parsed);
    }

    #[test]
    fn migration_limits_have_bounds() {
        let limits = |downtime_ms, max_rounds, max_seconds| MigrationCreate {
            host: "b".into(),
            downtime_ms,
            max_rounds,
            max_seconds,
        };
        assert_eq!(limits(None, None, None).out_of_bounds(), None);
        assert_eq!(limits(Some(0), Some(1), Some(1)).out_of_bounds(), None);
        assert_eq!(
            limits(Some(60_000), Some(1000), Some(86_400)).out_of_bounds(),
            None
        );
        for (bad, field) in [
            (limits(Some(60_001), None, None), "downtime_ms"),
            (limits(None, Some(100_000_001), None), "max_rounds"),
            (limits(None, Some(u32::MAX), None), "max_rounds"),
            (limits(None, None, Some(0)), "max_seconds"),
            (limits(None, None, Some(u64::MAX)), "max_seconds"),
        ] {
            assert_eq!(bad.out_of_bounds().map(|(f, _)| f), Some(field));
        }
    }
}
