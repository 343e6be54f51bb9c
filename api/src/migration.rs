//! Live migration of a running VM to another host (`/v1/hosts`), and the
//! host-to-host messages that prepare the destination.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Image, Tenant, Vm};

/// `POST /v1/vms/{id}/migration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationCreate {
    /// The destination: a registered peer host's name.
    pub host: String,
    /// The pause the guest may see, in ms (100 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Copy rounds at most before the hand-over (30 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Seconds of copying at most before the hand-over (300 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seconds: Option<u64>,
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
    pub tenant: Tenant,
    pub image: Image,
    /// The source's underlay address.
    pub source: String,
}

/// Host to host: where the destination's VMM waits, and its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingReady {
    /// "ADDRESS:PORT" on the destination's underlay.
    pub listen: String,
    pub token: String,
}
