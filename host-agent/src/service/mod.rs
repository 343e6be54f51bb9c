//! The agent's domain logic, one module per resource, between the REST
//! handlers (`http/`) and the store, supervisor and peers. A handler
//! parses, authorizes and calls one function here; the function does the
//! rest (address allocation, quotas, checks beyond parsing, undoing what
//! it did when a later step fails) and answers with a typed
//! [`ServiceError`], which `http/errors.rs` maps to a status and error
//! code in one place.
//!
//! Why: so that the rules hold whoever calls them (a handler, a peer's
//! call, a later scheduler) and can be tested in-process, without HTTP or
//! a VM. The host's networking is reached through [`HostNetwork`], which
//! tests replace.

pub mod endpoints;
pub mod hosts;
pub mod images;
pub mod incoming;
pub mod migrations;
pub mod moves;
pub mod networks;
pub mod placed;
pub mod port_forwards;
pub mod probes;
pub mod services;
pub mod snapshots;
pub mod ssh_keys;
pub mod tenants;
pub mod uploads;
pub mod vms;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use nubis_api::{ApiError, ErrorCode};
use tokio::sync::OwnedMutexGuard;

use crate::ipv4::Cidr;
use crate::network::host::{HostNetworkError, LinuxNetwork};
use crate::network::NetworkError;
use crate::peers::{PeerClient, PeerError};
use crate::quota::SpaceError;
use crate::store::{Store, StoreError};
use crate::supervisor::{Supervisor, SupervisorError};

/// Who asks: the operator sees every tenant's resources, a tenant only its
/// own (another tenant's is "not found", exactly as a missing one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    Operator,
    Tenant(&'a str),
}

impl<'a> Scope<'a> {
    /// The tenant to filter by; None for the operator.
    pub fn tenant(self) -> Option<&'a str> {
        match self {
            Scope::Operator => None,
            Scope::Tenant(id) => Some(id),
        }
    }
}

/// What the services need of the host's networking (bridges, rules, DHCP,
/// the underlay): `network::host::LinuxNetwork` in the agent, a stand-in
/// in tests.
pub trait HostNetwork: Send + Sync {
    /// Held while addresses are assigned or bridges made.
    fn lock(&self) -> BoxFuture<'_, OwnedMutexGuard<()>>;
    /// Brings the host's bridges, tunnels, rules and DHCP servers in line
    /// with the store.
    fn reconcile(&self) -> BoxFuture<'_, std::result::Result<(), HostNetworkError>>;
    /// Brings the rules in line with the store when only VMs were added on
    /// networks the host carries; at worst, all of [`HostNetwork::reconcile`].
    fn refresh_vm_rules(&self) -> BoxFuture<'_, std::result::Result<(), HostNetworkError>> {
        self.reconcile()
    }
    /// Why `cidr` may not be a tenant network here (it shadows one of the
    /// host's own), or None.
    fn shadowed(
        &self,
        cidr: Cidr,
    ) -> BoxFuture<'_, std::result::Result<Option<String>, HostNetworkError>>;
    /// This host's end of the overlay's tunnels, when configured.
    fn underlay_address(&self) -> Option<Ipv4Addr>;
    /// The MTU of the link that carries `local`, the underlay address.
    fn underlay_mtu(&self, local: Ipv4Addr) -> BoxFuture<'_, std::result::Result<u16, String>>;
    /// Removes the default bridge of the tenant that had `subnet`.
    fn remove_tenant_bridge(
        &self,
        subnet: u8,
    ) -> BoxFuture<'_, std::result::Result<(), NetworkError>>;
}

/// What every service function works with.
#[derive(Clone)]
pub struct Services {
    pub store: Arc<Store>,
    /// Runs the VMs (start, stop, files).
    pub supervisor: Arc<Supervisor>,
    /// The host's bridges, rules and underlay.
    pub host_network: Arc<dyn HostNetwork>,
    /// Calls to peer hosts.
    pub peers: Arc<PeerClient>,
    pub data_dir: PathBuf,
    /// Where image files may come from.
    pub image_dirs: Arc<Vec<PathBuf>>,
    /// The migrations this host drives (or drove).
    pub migrations: Arc<migrations::Migrations>,
    /// This host as `/v1/hosts` shows it when it is standalone.
    pub local_host: Arc<hosts::LocalHostInfo>,
    /// The cluster this host is a member of; None when standalone.
    pub cluster: Option<crate::cluster::Cluster>,
    /// The hosts this one calls and takes calls from.
    pub peer_directory: Arc<crate::peer_directory::PeerDirectory>,
    /// The health probes of the service instances this host runs.
    pub probes: Arc<probes::Probes>,
}

impl Services {
    /// The services of an agent on the host's real network.
    pub fn new(
        store: Arc<Store>,
        supervisor: Arc<Supervisor>,
        host_network: Arc<LinuxNetwork>,
        peers: Arc<PeerClient>,
        peer_directory: Arc<crate::peer_directory::PeerDirectory>,
        data_dir: PathBuf,
        image_dirs: Arc<Vec<PathBuf>>,
    ) -> Self {
        Self {
            store,
            supervisor,
            host_network,
            peers,
            data_dir,
            image_dirs,
            migrations: Default::default(),
            local_host: Default::default(),
            cluster: None,
            peer_directory,
            probes: Default::default(),
        }
    }
}

impl Services {
    /// Refuses a new VM here (created, restored or migrating in) while an
    /// operator has cordoned this host. The watched view may lag an
    /// uncordon the controller already acted on: a cordon it shows is
    /// checked in etcd.
    pub async fn refuse_if_cordoned(&self) -> Result<()> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        if cluster.is_cordoned() && cluster.is_cordoned_now().await? {
            return Err(ServiceError::Conflict(format!(
                "host {} is cordoned: it takes no new VMs",
                cluster.host_name()
            )));
        }
        Ok(())
    }

    /// A VM of this host's store as the API shows it (in a cluster, with
    /// this host as its host).
    pub fn vm_view(&self, row: crate::store::VmRow) -> nubis_api::Vm {
        let mut vm = nubis_api::Vm::from(row);
        vm.host = self
            .cluster
            .as_ref()
            .map(|cluster| cluster.host_name().to_string());
        vm
    }

    /// In cluster mode, held while a resource of `tenant` is made on this
    /// host: the cluster knows this host holds some of the tenant's, so
    /// the tenant cannot be deleted meanwhile (`cluster/tenants.rs`).
    pub async fn hold_tenant(
        &self,
        tenant: &str,
    ) -> Result<Option<crate::cluster::tenants::TenantHold>> {
        match &self.cluster {
            Some(cluster) => Ok(Some(cluster.hold(tenant).await?)),
            None => Ok(None),
        }
    }
}

/// Why a service refused or failed. Each variant is one kind of answer
/// (`http/errors.rs` gives it its status); its message is the client's.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Malformed input: the field at fault and why.
    #[error("{message}")]
    Invalid {
        field: Option<String>,
        message: String,
    },
    /// Well-formed, but not doable on this host (a missing image, a CIDR
    /// the host uses, an MTU the underlay does not carry).
    #[error("{message}")]
    Unprocessable {
        field: Option<String>,
        message: String,
    },
    /// No such resource, or another tenant's.
    #[error("no {what} '{id}'")]
    NotFound { what: &'static str, id: String },
    /// A record the resource refers to is gone.
    #[error("{0}")]
    Gone(String),
    /// The resource's state or another one's forbids it.
    #[error("{0}")]
    Conflict(String),
    /// The host's disk would go below its reserve.
    #[error("{0}")]
    HostFull(String),
    /// A quota or a pool (addresses, ports) is used up.
    #[error("{0}")]
    Exhausted(String),
    /// The caller's identity no longer holds (its tenant is gone).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// A stored record or the host is not as it must be.
    #[error("{0}")]
    Internal(String),
    /// A peer host answered wrongly (not a refusal of its own).
    #[error("{0}")]
    PeerAnswer(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// What the request needs is away for now (a VM's host is down).
    #[error("{0}")]
    Unavailable(String),
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// A 422 naming `field`.
    pub fn unprocessable(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unprocessable {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound {
            what,
            id: id.into(),
        }
    }
}

/// The input checks of `validate` answer in the API's terms; here they are
/// an [`ServiceError::Invalid`] again.
impl From<ApiError> for ServiceError {
    fn from(error: ApiError) -> Self {
        let body = error.error;
        match (body.code, body.field) {
            (ErrorCode::InvalidInput, field) => Self::Invalid {
                field,
                message: body.message,
            },
            (ErrorCode::Unprocessable, field) => Self::Unprocessable {
                field,
                message: body.message,
            },
            (_, _) => Self::Internal(body.message),
        }
    }
}

/// A host network's failure answers as the supervisor's did when it
/// shaped the network itself (`http/errors.rs`).
impl From<HostNetworkError> for ServiceError {
    fn from(error: HostNetworkError) -> Self {
        Self::Supervisor(error.into())
    }
}

pub type Result<T> = std::result::Result<T, ServiceError>;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
