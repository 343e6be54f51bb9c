//! The Nubis host agent's REST API: request and response bodies, shared by
//! the agent (`nubis-agent`), its CLI (`nubisctl`) and the tests, so that a
//! field cannot mean one thing on one side and another on the other.
//!
//! Everything is versioned under `/v1`. The OpenAPI document is generated
//! from these types and the agent's handlers (`nubis-agent --openapi`) and
//! checked in as `api/openapi.json`.

pub mod cluster;
pub mod error;
pub mod host;
pub mod image;
pub mod migration;
pub mod network;
pub mod service;
pub mod snapshot;
pub mod ssh_key;
pub mod tenant;
pub mod vm;

pub use cluster::{ClusterHost, DrainProgress, HostDrain, HostResources, HostState};
pub use error::{ApiError, ErrorCode};
pub use host::{AddressGrant, AddressRequest, HostIdentity, NetworkReplica, Peer, PeerCreate};
pub use image::{Image, ImageCreate};
pub use migration::{IncomingMigration, IncomingReady, Migration, MigrationCreate};
pub use network::{Network, NetworkCreate, Overlay, PortForward, PortForwardCreate, Protocol};
pub use service::{
    FaultDomainSpread, InstanceHealth, Probe, ProbeProtocol, RestartPolicy, Role, RoleRollback,
    RoleScale, RoleSpec, RoleUpgrade, Rollout, RolloutState, Service, ServiceCreate,
    ServiceEndpoint, ServiceInstance,
};
pub use snapshot::{Snapshot, SnapshotClones, SnapshotClonesMade, SnapshotRestore};
pub use ssh_key::{SshKey, SshKeyCreate};
pub use tenant::{Quota, Tenant, TenantCreate, TokenCreated, TokenInfo};
pub use vm::{
    AntiAffinity, AntiAffinityScope, DrainPolicy, ExecEvent, HostLossPolicy, NamedSshKey,
    PlacementStrategy, RateLimit, Vm, VmCreate, VmDisk, VmEvent, VmExec, VmMetadata, VmNic,
    VmNicCreate, VmPlacement, VmState,
};

/// The API version prefix.
pub const API_PREFIX: &str = "/v1";
