//! Tenants and their API tokens, cluster-wide: etcd holds them
//! (`tenants/`, `tenant-names/`, `tokens/`, see `docs/cluster.md`) and every
//! agent mirrors them into its SQLite database, where authentication and
//! the services read them as on a standalone host. A tenant created
//! through one host can use any host.
//!
//! A write goes to etcd first; the agent that made it answers once its
//! mirror has applied that write, so the caller reads what it wrote from
//! the same host. The mirror reads the three prefixes whole on any change
//! (they are small), so a missed or compacted event cannot leave it wrong.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use nubis_api::{Quota, TokenCreated, TokenInfo};
use serde::{Deserialize, Serialize};

use super::{typed, Cluster, ClusterError, Inner};
use crate::store::{new_id, now, random_hex, token_hash, Store, TenantRow};

/// `tenants/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: String,
    pub name: String,
    pub quota: Quota,
    pub created_at: u64,
}

/// `tenant-names/{name}`: which tenant has the name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantName {
    pub id: String,
}

/// `tokens/{sha256}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub tenant_id: String,
    pub created_at: u64,
}

impl From<&TenantRecord> for TenantRow {
    fn from(record: &TenantRecord) -> Self {
        TenantRow {
            id: record.id.clone(),
            name: record.name.clone(),
            quota: record.quota,
            created_at: record.created_at,
        }
    }
}

impl From<&TenantRow> for TenantRecord {
    fn from(row: &TenantRow) -> Self {
        TenantRecord {
            id: row.id.clone(),
            name: row.name.clone(),
            quota: row.quota,
            created_at: row.created_at,
        }
    }
}

/// How long a write waits for this agent's mirror to apply it.
const MIRROR_PATIENCE: Duration = Duration::from_secs(10);
/// How long to wait before reading again after a failure.
const RETRY: Duration = Duration::from_secs(1);

fn json<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, ClusterError> {
    serde_json::to_vec(value).map_err(|err| ClusterError::Corrupt {
        key: key.to_string(),
        reason: format!("cannot encode: {err}"),
    })
}

/// What etcd holds of tenants and tokens, at one revision.
struct Snapshot {
    tenants: Vec<TenantRecord>,
    tokens: Vec<(TokenInfo, String)>,
    revision: i64,
}

async fn read(inner: &Inner) -> Result<Snapshot, ClusterError> {
    let keys = &inner.keys;
    let (tenants_prefix, tokens_prefix) = (keys.tenants(), keys.tokens());
    let (mut read, revision) = inner
        .etcd
        .get_prefixes_at::<serde_json::Value>(&[&tenants_prefix, &tokens_prefix])
        .await?;
    let token_values = read.pop().unwrap_or_default();
    let tenant_values = read.pop().unwrap_or_default();
    let tenants = tenant_values
        .into_iter()
        .map(|(key, stored)| typed(&key, stored.value))
        .collect::<Result<Vec<TenantRecord>, _>>()?;
    let mut tokens = Vec::new();
    for (key, stored) in token_values {
        let record: TokenRecord = typed(&key, stored.value)?;
        let hash = key.rsplit('/').next().unwrap_or_default().to_string();
        tokens.push((
            TokenInfo {
                id: record.id,
                tenant_id: record.tenant_id,
                created_at: record.created_at,
            },
            hash,
        ));
    }
    Ok(Snapshot {
        tenants,
        tokens,
        revision,
    })
}

/// Applies what etcd holds to `store`; the revision applied.
async fn sync(inner: &Inner, store: &Store) -> Result<i64, ClusterError> {
    let snapshot = read(inner).await?;
    let rows: Vec<TenantRow> = snapshot.tenants.iter().map(TenantRow::from).collect();
    let mirrored = store
        .mirror_tenants(&rows, &snapshot.tokens)
        .map_err(|err| ClusterError::Mirror(err.to_string()))?;
    for subnet in mirrored.freed_subnets {
        let _ = inner.freed_subnets.send(subnet);
    }
    for id in mirrored.kept {
        tracing::warn!(
            tenant = %id,
            "the cluster has no tenant {id}, which still holds resources here: kept without tokens"
        );
    }
    Ok(snapshot.revision)
}

/// Keeps `store`'s tenants and tokens those of etcd for as long as the
/// agent runs.
pub(super) async fn follow(inner: Arc<Inner>, store: Arc<Store>) {
    loop {
        let revision = match sync(&inner, &store).await {
            Ok(revision) => revision,
            Err(err) => {
                tracing::warn!("cluster: cannot mirror the tenants: {err}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        inner.tenants_applied.send_if_modified(|applied| {
            let newer = revision > *applied;
            if newer {
                *applied = revision;
            }
            newer
        });
        let (start, end) = inner.keys.tenants_range();
        let watched = inner.etcd.changed("the tenants", (&start, &end), revision);
        if let Err(err) = watched.await {
            tracing::warn!("cluster: the tenants watch broke: {err}");
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Publishes the tenants and tokens of a host that joins (its standalone
/// past): each one etcd lacks is added; a name that another tenant has in
/// the cluster is refused.
pub(super) async fn publish_local(inner: &Inner, store: &Store) -> Result<(), ClusterError> {
    let local = |err: crate::store::StoreError| ClusterError::Mirror(err.to_string());
    let tokens = store.token_hashes().map_err(local)?;
    for tenant in store.list_tenants().map_err(local)? {
        let record = TenantRecord::from(&tenant);
        let name_key = inner.keys.tenant_name(&tenant.name);
        if let Some(existing) = inner.etcd.get::<TenantName>(&name_key).await? {
            if existing.value.id != tenant.id {
                return Err(ClusterError::Exists(format!(
                    "tenant '{}' of this host ({}) is another tenant's name in the cluster ({})",
                    tenant.name, tenant.id, existing.value.id
                )));
            }
            continue;
        }
        let mut ops = vec![
            TxnOp::put(
                name_key.as_str(),
                json(
                    &name_key,
                    &TenantName {
                        id: tenant.id.clone(),
                    },
                )?,
                None,
            ),
            TxnOp::put(
                inner.keys.tenant(&tenant.id),
                json(&name_key, &record)?,
                None,
            ),
        ];
        for (token, hash) in tokens
            .iter()
            .filter(|(token, _)| token.tenant_id == tenant.id)
        {
            let key = inner.keys.token(hash);
            let value = TokenRecord {
                id: token.id.clone(),
                tenant_id: token.tenant_id.clone(),
                created_at: token.created_at,
            };
            ops.push(TxnOp::put(key.as_str(), json(&key, &value)?, None));
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                name_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(ops);
        inner
            .etcd
            .txn(&format!("publish tenant {}", tenant.id), txn)
            .await?;
        tracing::info!(tenant = %tenant.id, name = %tenant.name, "tenant published to the cluster");
    }
    Ok(())
}

impl Cluster {
    /// Refuses with [`ClusterError::NoSuchTenant`] when `tenant` is not in
    /// the cluster (a conditioned write failed: was it for this?).
    pub(super) async fn require_tenant(&self, tenant: &str) -> Result<(), ClusterError> {
        let key = self.inner.keys.tenant(tenant);
        match self.inner.etcd.get::<serde_json::Value>(&key).await? {
            Some(_) => Ok(()),
            None => Err(ClusterError::NoSuchTenant(tenant.to_string())),
        }
    }

    /// Waits until this agent's mirror has applied `revision`.
    async fn mirrored(&self, revision: i64) -> Result<(), ClusterError> {
        let mut applied = self.inner.tenants_applied.subscribe();
        tokio::time::timeout(MIRROR_PATIENCE, applied.wait_for(|now| *now >= revision))
            .await
            .map_err(|_| {
                ClusterError::Mirror(format!("revision {revision} not mirrored here yet"))
            })?
            .map_err(|_| ClusterError::Mirror("the mirror stopped".into()))?;
        Ok(())
    }

    /// Creates tenant `name`; its id once this host mirrors it.
    pub async fn create_tenant(&self, name: &str, quota: Quota) -> Result<String, ClusterError> {
        let keys = &self.inner.keys;
        let id = new_id("t").map_err(|err| ClusterError::Mirror(err.to_string()))?;
        let record = TenantRecord {
            id: id.clone(),
            name: name.to_string(),
            quota,
            created_at: now(),
        };
        let (name_key, tenant_key) = (keys.tenant_name(name), keys.tenant(&id));
        let txn = Txn::new()
            .when([Compare::create_revision(
                name_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(
                    name_key.as_str(),
                    json(&name_key, &TenantName { id: id.clone() })?,
                    None,
                ),
                TxnOp::put(tenant_key.as_str(), json(&tenant_key, &record)?, None),
            ]);
        let (done, revision) = self
            .inner
            .etcd
            .txn(&format!("create tenant {name}"), txn)
            .await?;
        if !done {
            return Err(ClusterError::Exists(format!("tenant '{name}'")));
        }
        self.mirrored(revision).await?;
        Ok(id)
    }

    /// Deletes tenant `id` with its tokens. The caller has checked that it
    /// holds nothing anywhere.
    pub async fn delete_tenant(&self, id: &str) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let tenant_key = keys.tenant(id);
        let (holdings, vm_names) = (keys.holdings_of(id), keys.vm_names_of(id));
        let service_names = keys.service_names_of(id);
        // Tried again when a token or holding changed in between (a host
        // may drop its holding key between the refusal and the look).
        for _ in 0..super::vms::ATTEMPTS {
            let Some(stored) = self.inner.etcd.get::<TenantRecord>(&tenant_key).await? else {
                return Err(ClusterError::NoSuchTenant(id.to_string()));
            };
            let snapshot = read(&self.inner).await?;
            let mut ops = vec![
                TxnOp::delete(tenant_key.as_str(), None),
                TxnOp::delete(keys.tenant_name(&stored.value.name), None),
            ];
            for (_, hash) in snapshot
                .tokens
                .iter()
                .filter(|(token, _)| token.tenant_id == id)
            {
                ops.push(TxnOp::delete(keys.token(hash), None));
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(
                        tenant_key.as_str(),
                        CompareOp::Equal,
                        stored.mod_revision,
                    ),
                    // No key under holdings/{id}/: no host holds anything of it.
                    Compare::create_revision(holdings.as_str(), CompareOp::Equal, 0).with_prefix(),
                    // Nor does the cluster have a VM of it (pending ones too).
                    Compare::create_revision(vm_names.as_str(), CompareOp::Equal, 0).with_prefix(),
                    // Nor a service (which would make VMs again).
                    Compare::create_revision(service_names.as_str(), CompareOp::Equal, 0)
                        .with_prefix(),
                ])
                .and_then(ops);
            let (done, revision) = self
                .inner
                .etcd
                .txn(&format!("delete tenant {id}"), txn)
                .await?;
            if done {
                return self.mirrored(revision).await;
            }
            let services = self
                .inner
                .etcd
                .list::<serde_json::Value>(&service_names)
                .await?;
            if !services.is_empty() {
                return Err(ClusterError::Held(format!(
                    "tenant {id} still has {} service(s): delete them first",
                    services.len()
                )));
            }
            let vms = self.inner.etcd.list::<serde_json::Value>(&vm_names).await?;
            if !vms.is_empty() {
                return Err(ClusterError::Held(format!(
                    "tenant {id} still has {} VM(s) in the cluster: delete them first",
                    vms.len()
                )));
            }
            let hosts = self.holders(id).await?;
            if !hosts.is_empty() {
                return Err(ClusterError::Held(format!(
                    "tenant {id} still holds resources on host(s) {}: delete them first",
                    hosts.join(", ")
                )));
            }
        }
        Err(ClusterError::Contended {
            key: tenant_key,
            attempts: super::vms::ATTEMPTS,
        })
    }

    /// A new token of tenant `tenant_id` (the secret is in the result only).
    pub async fn create_token(&self, tenant_id: &str) -> Result<TokenCreated, ClusterError> {
        let keys = &self.inner.keys;
        let random = |err: crate::store::StoreError| ClusterError::Mirror(err.to_string());
        let created = TokenCreated {
            id: new_id("tok").map_err(random)?,
            tenant_id: tenant_id.to_string(),
            token: format!("nbs_{}", random_hex(32).map_err(random)?),
            created_at: now(),
        };
        let key = keys.token(&token_hash(&created.token));
        let record = TokenRecord {
            id: created.id.clone(),
            tenant_id: tenant_id.to_string(),
            created_at: created.created_at,
        };
        let tenant_key = keys.tenant(tenant_id);
        let txn = Txn::new()
            .when([Compare::create_revision(
                tenant_key.as_str(),
                CompareOp::Greater,
                0,
            )])
            .and_then([TxnOp::put(key.as_str(), json(&key, &record)?, None)]);
        let (done, revision) = self
            .inner
            .etcd
            .txn(&format!("create a token of tenant {tenant_id}"), txn)
            .await?;
        if !done {
            return Err(ClusterError::NoSuchTenant(tenant_id.to_string()));
        }
        self.mirrored(revision).await?;
        Ok(created)
    }

    /// Brings this agent's mirror up to `token` when the cluster knows a
    /// token this host has not heard of yet (made a moment ago on another
    /// member); whether it is the cluster's. An unknown token costs one
    /// point read of etcd, never a wait.
    pub async fn catch_up_token(&self, token: &str) -> Result<bool, ClusterError> {
        let key = self.inner.keys.token(&token_hash(token));
        match self.inner.etcd.get::<TokenRecord>(&key).await? {
            Some(stored) => {
                self.mirrored(stored.mod_revision).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Revokes token `token_id` of tenant `tenant_id`; whether it existed.
    pub async fn delete_token(
        &self,
        tenant_id: &str,
        token_id: &str,
    ) -> Result<bool, ClusterError> {
        let snapshot = read(&self.inner).await?;
        let Some((_, hash)) = snapshot
            .tokens
            .iter()
            .find(|(token, _)| token.id == token_id && token.tenant_id == tenant_id)
        else {
            return Ok(false);
        };
        let txn = Txn::new().and_then([TxnOp::delete(self.inner.keys.token(hash), None)]);
        let (_, revision) = self
            .inner
            .etcd
            .txn(&format!("revoke token {token_id}"), txn)
            .await?;
        self.mirrored(revision).await?;
        Ok(true)
    }
}

/// This host's holding keys, and a lock per tenant: taking a key and
/// making the resource happen under the lock, and so do checking that the
/// host holds nothing more and dropping the key, so that a key is never
/// dropped while a resource it covers is being made.
#[derive(Default)]
pub(super) struct Holdings {
    held: std::sync::Mutex<std::collections::BTreeSet<String>>,
    locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Holdings {
    fn lock_of(&self, tenant: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(tenant.to_string()).or_default().clone()
    }

    fn is_held(&self, tenant: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(tenant)
    }

    fn set_held(&self, tenant: &str, held: bool) {
        let mut set = self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if held {
            set.insert(tenant.to_string());
        } else {
            set.remove(tenant);
        }
    }

    fn held(&self) -> Vec<String> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Held while a resource of a tenant is made on this host: its holding
/// key exists until the guard goes and the resource is in the store.
pub struct TenantHold {
    _lock: tokio::sync::OwnedMutexGuard<()>,
}

/// Writes this host's holding key of `tenant` unless it has one; refused
/// when the tenant is gone from the cluster. Called under the tenant's lock.
async fn take_holding(inner: &Inner, tenant: &str) -> Result<(), ClusterError> {
    if inner.holdings.is_held(tenant) {
        return Ok(());
    }
    let key = inner.keys.holding(tenant, &inner.settings.host_name);
    let tenant_key = inner.keys.tenant(tenant);
    let txn = Txn::new()
        .when([Compare::create_revision(
            tenant_key.as_str(),
            CompareOp::Greater,
            0,
        )])
        .and_then([TxnOp::put(key.as_str(), b"{}".to_vec(), None)]);
    let (done, _) = inner
        .etcd
        .txn(
            &format!("record that this host holds resources of tenant {tenant}"),
            txn,
        )
        .await?;
    if !done {
        return Err(ClusterError::NoSuchTenant(tenant.to_string()));
    }
    inner.holdings.set_held(tenant, true);
    Ok(())
}

/// Takes holding keys for the tenants that hold anything here at join (a
/// host's standalone past, or keys lost with an etcd restore).
pub(super) async fn hold_local(inner: &Inner, store: &Store) -> Result<(), ClusterError> {
    let prefix = inner.keys.holdings();
    let suffix = format!("/{}", inner.settings.host_name);
    let existing = inner.etcd.list::<serde_json::Value>(&prefix).await?;
    for (key, _) in existing {
        if let Some(tenant) = key
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(&suffix))
        {
            inner.holdings.set_held(tenant, true);
        }
    }
    let local = store
        .tenants_holding()
        .map_err(|err| ClusterError::Mirror(err.to_string()))?;
    for tenant in local {
        let lock = inner.holdings.lock_of(&tenant);
        let _guard = lock.lock().await;
        if let Err(err) = take_holding(inner, &tenant).await {
            tracing::warn!(tenant = %tenant, "cannot record this host's resources of the tenant: {err}");
        }
    }
    Ok(())
}

/// How often this host drops the holding keys of tenants it no longer
/// holds anything of.
const RELEASE_PERIOD: Duration = Duration::from_secs(2);

/// Drops, for as long as the agent runs, the holding keys of tenants that
/// hold nothing here any more.
pub(super) async fn release_unused(inner: Arc<Inner>, store: Arc<Store>) {
    loop {
        tokio::time::sleep(RELEASE_PERIOD).await;
        for tenant in inner.holdings.held() {
            let lock = inner.holdings.lock_of(&tenant);
            let _guard = lock.lock().await;
            match store.tenants_holding() {
                Ok(holding) if holding.contains(&tenant) => continue,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!("cannot list the tenants holding resources here: {err}");
                    break;
                }
            }
            let key = inner.keys.holding(&tenant, &inner.settings.host_name);
            let txn = Txn::new().and_then([TxnOp::delete(key.as_str(), None)]);
            match inner
                .etcd
                .txn(&format!("drop this host's holding of tenant {tenant}"), txn)
                .await
            {
                Ok(_) => inner.holdings.set_held(&tenant, false),
                Err(err) => tracing::warn!("cannot drop a holding key: {err}"),
            }
        }
    }
}

impl Cluster {
    /// Held while a resource of `tenant` is made on this host (see
    /// [`TenantHold`]); refused when the tenant is gone from the cluster.
    pub async fn hold(&self, tenant: &str) -> Result<TenantHold, ClusterError> {
        let lock = self.inner.holdings.lock_of(tenant).lock_owned().await;
        take_holding(&self.inner, tenant).await?;
        Ok(TenantHold { _lock: lock })
    }

    /// The hosts that hold resources of `tenant`.
    async fn holders(&self, tenant: &str) -> Result<Vec<String>, ClusterError> {
        let prefix = self.inner.keys.holdings_of(tenant);
        let found = self.inner.etcd.list::<serde_json::Value>(&prefix).await?;
        Ok(found
            .into_iter()
            .filter_map(|(key, _)| key.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }
}
