//! Cluster mode: agents on many hosts form one cloud through etcd. Each
//! member keeps a lasting record and a lease-bound heartbeat
//! (`membership`), controller candidates elect one controller through
//! etcd's election API, and every agent can show every member
//! (`/v1/hosts`). Without cluster settings the agent is a standalone host
//! and none of this runs.
//!
//! etcd is trusted infrastructure: whoever can write its keys can steer
//! the cluster, so production clusters reach it over TLS with client
//! certificates (`settings::EtcdTls`). Key layout: `keys.rs` and
//! `docs/cluster.md`.

pub mod claims;
mod controller;
pub mod drain;
pub mod etcd;
pub mod images;
pub mod inventory;
pub mod keys;
mod membership;
pub mod networks;
pub mod records;
pub mod service_control;
pub mod service_plan;
pub mod services;
pub mod settings;
mod ssh_keys;
pub mod tenants;
pub mod view;
pub mod vms;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nubis_api::{ClusterHost, HostResources};
use tokio::sync::watch;

use self::etcd::Etcd;
use self::keys::Keys;
use self::records::{cluster_host, MemberRecord};
use self::settings::{ClusterSettings, HostName};
use self::view::View;
use crate::store::now;

/// How long joining waits for the first copy of the cluster's tenants.
const JOIN_MIRROR_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Errors of cluster membership and of the cluster's view.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: cannot {action}: {source}")]
    Etcd {
        action: String,
        source: etcd_client::Error,
    },
    #[error("cannot read the etcd TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd key {key} holds an unreadable value: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("host name '{name}' belongs to another member (certificate {fingerprint}); if that host is gone for good, forget it first (DELETE /v1/hosts/{name})")]
    NameTaken { name: String, fingerprint: String },
    #[error("no host '{0}' in the cluster")]
    NoSuchHost(String),
    #[error("host '{0}' is up: only a down host can be forgotten")]
    HostUp(String),
    #[error("{key} kept changing under {attempts} attempts to update it")]
    Contended { key: String, attempts: usize },
    #[error("{0} exists in the cluster")]
    Exists(String),
    #[error("no tenant '{0}' in the cluster")]
    NoSuchTenant(String),
    #[error("the cluster's tenants on this host: {0}")]
    Mirror(String),
    #[error("{0}")]
    Held(String),
    #[error("no VM '{0}'")]
    NoSuchVm(String),
    #[error("no service '{0}'")]
    NoSuchService(String),
    #[error("quota exceeded: {0}")]
    Quota(String),
    #[error("nics[{index}]: no network '{name}'")]
    NoNetwork { index: usize, name: String },
    #[error("{0}")]
    AddressesExhausted(String),
    /// A controller's write found another host leading.
    #[error("this host no longer leads the cluster")]
    NotLeading,
    /// Another writer took it first (an address, a VNI): draw again.
    #[error("{0} was taken meanwhile")]
    Raced(String),
}

/// `value`, read at `key`, as a `T`.
fn typed<T: serde::de::DeserializeOwned>(
    key: &str,
    value: serde_json::Value,
) -> Result<T, ClusterError> {
    serde_json::from_value(value).map_err(|err| ClusterError::Corrupt {
        key: key.to_string(),
        reason: err.to_string(),
    })
}

/// What this host tells the cluster about itself.
pub struct LocalHost {
    pub fingerprint: String,
    pub api_address: SocketAddr,
    pub underlay_address: Option<Ipv4Addr>,
    pub peer_port: u16,
    pub capacity: HostResources,
    /// What the VMs here take now, and how many there are.
    pub usage: Box<dyn Fn() -> LocalUsage + Send + Sync>,
}

/// What a host's heartbeat says it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalUsage {
    pub resources: HostResources,
    pub vms: u32,
}

pub(crate) struct Inner {
    etcd: Etcd,
    keys: Keys,
    settings: ClusterSettings,
    local: LocalHost,
    started_at: u64,
    /// Whether this host is the elected controller.
    controller: watch::Sender<bool>,
    /// The lease of the current session.
    lease: Mutex<Option<i64>>,
    /// This host's key in the controller election while it leads: the
    /// controller's writes are conditioned on it (`vms.rs`).
    leader_key: Mutex<Option<Vec<u8>>>,
    /// The membership as last read (`view.rs`).
    view: watch::Sender<Arc<View>>,
    /// The etcd revision of the tenants this host's store mirrors
    /// (`tenants.rs`).
    tenants_applied: watch::Sender<i64>,
    /// This host's holding keys (`tenants.rs`): the tenants it has one
    /// for, and a lock per tenant that orders taking and dropping one.
    holdings: tenants::Holdings,
    /// Snapshots and port forwards being created here: their claims are
    /// not swept (`claims.rs`).
    claims_in_flight: Mutex<std::collections::HashSet<String>>,
    /// How many of those ended (`claims.rs`).
    claims_ended: std::sync::atomic::AtomicU64,
    /// This host's inventory as last published (`inventory.rs`).
    published: tokio::sync::Mutex<inventory::Published>,
    /// Whether no lease renewal got through for a whole TTL: this host may
    /// be taken for lost (`membership.rs`).
    lapsed: watch::Sender<bool>,
    /// This host's VMs that the cluster restarts elsewhere if it is lost,
    /// and those it paused for that reason (`service/placed.rs`).
    restartable: Mutex<std::collections::HashSet<String>>,
    self_fenced: Mutex<std::collections::HashSet<String>>,
    /// The default-bridge subnets of tenants the mirror removed here.
    freed_subnets: tokio::sync::mpsc::UnboundedSender<u8>,
    freed_subnets_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<u8>>>,
}

impl Inner {
    /// This host's election key, while it leads.
    fn leader_key(&self) -> Option<Vec<u8>> {
        if !*self.controller.borrow() {
            return None;
        }
        self.leader_key.lock().ok()?.clone()
    }

    fn set_leader_key(&self, key: Option<Vec<u8>>) {
        if let Ok(mut held) = self.leader_key.lock() {
            *held = key;
        }
    }
}

/// This agent's membership of a cluster.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("host", &self.inner.settings.host_name)
            .finish()
    }
}

/// A tenant's record whose name is unique among the tenant's records of
/// its kind (an image, an SSH key).
pub(crate) struct NamedRecord<'a> {
    /// What it is, for messages ("image").
    pub what: &'a str,
    pub id: &'a str,
    pub tenant: &'a str,
    pub name: &'a str,
}

/// The value of a name key: the id of the record that has the name.
#[derive(serde::Serialize)]
struct NameOwner<'a> {
    id: &'a str,
}

impl Cluster {
    /// Puts `record` at its key and its name key in one transaction, if
    /// its tenant exists and the name is free; refused otherwise, saying
    /// which.
    pub(crate) async fn define_named<T: serde::Serialize>(
        &self,
        named: NamedRecord<'_>,
        (key, record): (&str, &T),
        name_key: &str,
    ) -> Result<(), ClusterError> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let tenant_key = self.inner.keys.tenant(named.tenant);
        let txn = Txn::new()
            .when([
                Compare::create_revision(tenant_key.as_str(), CompareOp::Greater, 0),
                Compare::create_revision(name_key, CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(key, etcd::encode(key, record)?, None),
                TxnOp::put(
                    name_key,
                    etcd::encode(name_key, &NameOwner { id: named.id })?,
                    None,
                ),
            ]);
        let (done, _) = self
            .inner
            .etcd
            .txn(&format!("define {} {}", named.what, named.id), txn)
            .await?;
        if done {
            return Ok(());
        }
        self.require_tenant(named.tenant).await?;
        Err(ClusterError::Exists(format!(
            "an {} named '{}' of this tenant",
            named.what, named.name
        )))
    }
}

impl Cluster {
    /// Joins the cluster: connects to etcd, records this host as a member
    /// and starts its heartbeat (and, for a controller candidate, its
    /// campaign). When this returns the host is listed as up.
    /// The cluster's tenants and tokens are mirrored into `store` (this
    /// host's own, if it has any etcd lacks, are published first).
    pub async fn join(
        settings: ClusterSettings,
        local: LocalHost,
        store: Arc<crate::store::Store>,
    ) -> Result<Self, ClusterError> {
        let etcd = Etcd::connect(&settings).await?;
        let (freed_subnets, freed_subnets_rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            etcd,
            keys: Keys::new(&settings.prefix),
            settings,
            local,
            started_at: now(),
            controller: watch::channel(false).0,
            lease: Mutex::new(None),
            leader_key: Mutex::new(None),
            view: watch::channel(Arc::new(View::default())).0,
            tenants_applied: watch::channel(0).0,
            holdings: Default::default(),
            claims_in_flight: Default::default(),
            claims_ended: Default::default(),
            published: Default::default(),
            lapsed: watch::channel(false).0,
            restartable: Default::default(),
            self_fenced: Default::default(),
            freed_subnets,
            freed_subnets_rx: Mutex::new(Some(freed_subnets_rx)),
        });
        membership::register(&inner).await?;
        let session = membership::open_session(&inner).await?;
        inner.view.send_replace(Arc::new(view::read(&inner).await?));
        tokio::spawn(membership::run(inner.clone(), session));
        tokio::spawn(view::follow(inner.clone()));
        tenants::publish_local(&inner, &store).await?;
        tenants::hold_local(&inner, &store).await?;
        tokio::spawn(tenants::release_unused(inner.clone(), store.clone()));
        let mut mirrored = inner.tenants_applied.subscribe();
        tokio::spawn(tenants::follow(inner.clone(), store));
        // Joined means this host knows the cluster's tenants: a mirror that
        // cannot be read within the patience of an etcd call fails the join
        // (the operator sees why) instead of hanging the agent's start.
        tokio::time::timeout(
            JOIN_MIRROR_PATIENCE,
            mirrored.wait_for(|revision| *revision > 0),
        )
        .await
        .map_err(|_| ClusterError::Mirror("the cluster's tenants could not be read".into()))?
        .map_err(|_| ClusterError::Mirror("the tenant mirror stopped".into()))?;
        let cluster = Cluster { inner };
        if cluster
            .inner
            .settings
            .roles
            .contains(&settings::Role::Controller)
        {
            tokio::spawn(controller::run(cluster.clone()));
        }
        Ok(cluster)
    }

    pub fn host_name(&self) -> &HostName {
        &self.inner.settings.host_name
    }

    /// Whether this host is the controller now.
    pub fn is_controller(&self) -> bool {
        *self.inner.controller.borrow()
    }

    /// Changes of [`Cluster::is_controller`].
    pub fn controller_changes(&self) -> watch::Receiver<bool> {
        self.inner.controller.subscribe()
    }

    /// Every member, by name, as of one etcd revision (read now), with
    /// how its drain goes if it is drained.
    pub async fn hosts(&self) -> Result<Vec<ClusterHost>, ClusterError> {
        let view = view::read(&self.inner).await?;
        let draining = view
            .members
            .iter()
            .any(|member| member.record.drain.is_some());
        let vms = match draining {
            true => self.vms().await?.0,
            false => Vec::new(),
        };
        Ok(view
            .members
            .iter()
            .map(|member| {
                let controller = view.leader.as_deref() == Some(member.record.name.as_str());
                let mut host = cluster_host(&member.record, member.alive.as_ref(), controller);
                host.drain = member
                    .record
                    .drain
                    .map(|drain| drain::progress(&host.name, &drain, &vms));
                host
            })
            .collect())
    }

    /// The membership as last read (kept current by a watch).
    pub fn view(&self) -> Arc<View> {
        self.inner.view.borrow().clone()
    }

    /// The default-bridge subnets of tenants that went from the cluster
    /// (their bridges here are to be removed); given to one taker.
    pub fn take_freed_subnets(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<u8>> {
        self.inner.freed_subnets_rx.lock().ok()?.take()
    }

    /// Whether an operator cordoned this host (as the view last read it).
    pub fn is_cordoned(&self) -> bool {
        self.view()
            .member(self.inner.settings.host_name.as_str())
            .is_some_and(|member| member.record.cordoned)
    }

    /// Whether this host is cordoned, as etcd has it now.
    pub async fn is_cordoned_now(&self) -> Result<bool, ClusterError> {
        let key = self.inner.keys.member(&self.inner.settings.host_name);
        Ok(self
            .inner
            .etcd
            .get::<MemberRecord>(&key)
            .await?
            .is_some_and(|member| member.value.cordoned))
    }

    /// Changes of [`Cluster::view`].
    pub fn view_changes(&self) -> watch::Receiver<Arc<View>> {
        self.inner.view.subscribe()
    }

    /// The other members this host can call (up, with an underlay
    /// address), as peers: name, underlay address, peer port, certificate.
    pub fn peers(&self) -> Vec<nubis_api::Peer> {
        let me = self.inner.settings.host_name.as_str();
        self.view()
            .members
            .iter()
            .filter(|member| member.record.name.as_str() != me)
            .filter_map(|member| {
                let alive = member.alive.as_ref()?;
                Some(nubis_api::Peer {
                    name: member.record.name.to_string(),
                    address: alive.underlay_address?.to_string(),
                    peer_port: alive.peer_port,
                    fingerprint: member.record.fingerprint.clone(),
                    created_at: member.record.joined_at,
                })
            })
            .collect()
    }

    /// Member `name`.
    pub async fn host(&self, name: &HostName) -> Result<ClusterHost, ClusterError> {
        self.hosts()
            .await?
            .into_iter()
            .find(|host| host.name == name.as_str())
            .ok_or_else(|| ClusterError::NoSuchHost(name.to_string()))
    }

    /// Cordons (no new VMs) or uncordons member `name`; uncordoning ends
    /// its drain.
    pub async fn set_cordon(
        &self,
        name: &HostName,
        cordoned: bool,
    ) -> Result<ClusterHost, ClusterError> {
        let key = self.inner.keys.member(name);
        self.inner
            .etcd
            .update(&key, |current: Option<MemberRecord>| match current {
                Some(member) => Ok(MemberRecord {
                    cordoned,
                    drain: member.drain.filter(|_| cordoned),
                    ..member
                }),
                None => Err(ClusterError::NoSuchHost(name.to_string())),
            })
            .await?;
        self.host(name).await
    }

    /// Drains member `name`: cordoned, its running VMs moved away by the
    /// controller, at most `max_parallel` at once. Draining a drained host
    /// again changes its `max_parallel` only.
    pub async fn drain(
        &self,
        name: &HostName,
        max_parallel: u32,
    ) -> Result<ClusterHost, ClusterError> {
        let key = self.inner.keys.member(name);
        self.inner
            .etcd
            .update(&key, |current: Option<MemberRecord>| match current {
                Some(member) => {
                    let started_at = member.drain.map_or_else(now, |drain| drain.started_at);
                    Ok(MemberRecord {
                        cordoned: true,
                        drain: Some(drain::DrainRecord {
                            started_at,
                            max_parallel,
                        }),
                        ..member
                    })
                }
                None => Err(ClusterError::NoSuchHost(name.to_string())),
            })
            .await?;
        self.host(name).await
    }

    /// Changes of whether this host's lease renewals have lapsed.
    pub fn lapses(&self) -> watch::Receiver<bool> {
        self.inner.lapsed.subscribe()
    }

    /// This host's VMs that the cluster would restart elsewhere were it
    /// lost: set by the follow pass, read when the lease lapses.
    pub fn set_restartable(&self, ids: std::collections::HashSet<String>) {
        *lock(&self.inner.restartable) = ids;
    }

    pub fn restartable(&self) -> std::collections::HashSet<String> {
        lock(&self.inner.restartable).clone()
    }

    /// VMs paused here because this host lapsed (to resume, or fence off,
    /// when it is back).
    pub fn add_self_fenced(&self, id: &str) {
        lock(&self.inner.self_fenced).insert(id.to_string());
    }

    pub fn take_self_fenced(&self) -> std::collections::HashSet<String> {
        std::mem::take(&mut *lock(&self.inner.self_fenced))
    }

    /// Whether an operator drains this host (as the view last read it).
    pub fn is_draining(&self) -> bool {
        self.view()
            .member(self.inner.settings.host_name.as_str())
            .is_some_and(|member| member.record.drain.is_some())
    }

    /// Forgets member `name`, which must be down: its name is free again.
    pub async fn forget(&self, name: &HostName) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        if self
            .inner
            .etcd
            .get::<serde_json::Value>(&keys.member(name))
            .await?
            .is_none()
        {
            return Err(ClusterError::NoSuchHost(name.to_string()));
        }
        if self
            .inner
            .etcd
            .delete_if_absent(&keys.member(name), &keys.alive(name))
            .await?
        {
            // Its balancing addresses go back to their networks.
            let held = self
                .inner
                .etcd
                .list::<networks::LbHost>(&keys.lb_hosts())
                .await?;
            for (key, lb) in held.into_iter().filter(|(_, lb)| lb.host == name.as_str()) {
                let network = key
                    .strip_prefix(&keys.lb_hosts())
                    .and_then(|rest| rest.split('/').next())
                    .unwrap_or_default();
                self.inner
                    .etcd
                    .delete(&keys.address(network, lb.address))
                    .await?;
                self.inner.etcd.delete(&key).await?;
            }
            Ok(())
        } else {
            Err(ClusterError::HostUp(name.to_string()))
        }
    }

    /// Leaves at once (the agent is stopping): the heartbeat and any
    /// leadership go now rather than after the lease's TTL.
    pub async fn leave(&self) {
        let lease = self.inner.lease.lock().ok().and_then(|lease| *lease);
        if let Some(lease) = lease {
            if let Err(err) = self.inner.etcd.revoke(lease).await {
                tracing::warn!("cluster: cannot leave: {err}");
            }
        }
    }
}

/// `mutex` locked, even if a panicking holder poisoned it (the sets it
/// guards stay consistent: each change is one insert, remove or swap).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
