//! Services in etcd: `services/{id}` holds what the tenant asked (each
//! role's spec, its revision and the one before it) and how its last
//! rollout goes; `service-names/{tenant}/{name}` keeps names unique. The
//! instances are VM records (`vms/{id}`) that say which service, role,
//! slot and revision they belong to ([`InstanceOf`]). The tenant's writes
//! (create, scale, upgrade, rollback) change the spec; the controller's
//! writes (rollout progress, events) are conditioned on the record being
//! unchanged and on its leadership (`service_plan.rs` decides them).

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use nubis_api::{Probe, RoleSpec, Rollout, VmEvent};
use serde::{Deserialize, Serialize};

use super::etcd::encode;
use super::vms::ATTEMPTS;
use super::{typed, Cluster, ClusterError};
use crate::store::now;

/// How many events a service keeps.
const MAX_EVENTS: usize = 30;

/// `services/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub created_at: u64,
    pub roles: Vec<RoleRecord>,
    #[serde(default)]
    pub events: Vec<VmEvent>,
}

/// A role of a service record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    /// As asked, with `image` the image's id.
    pub spec: RoleSpec,
    pub revision: u64,
    /// Disk MiB an instance takes (its image's size).
    pub storage_mib: u64,
    /// The spec of the revision before, for a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousRevision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// The address of its endpoints on its first network, taken in
    /// `ipam/` with the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_address: Option<std::net::Ipv4Addr>,
}

impl RoleRecord {
    /// The network its virtual address is on: its first.
    pub fn endpoint_network(&self) -> Option<&str> {
        self.spec.networks.first().map(String::as_str)
    }
}

/// A role's revision before the current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousRevision {
    pub revision: u64,
    pub spec: RoleSpec,
    pub storage_mib: u64,
}

impl ServiceRecord {
    /// Appends an event, keeping the last [`MAX_EVENTS`].
    pub fn record_event(&mut self, kind: &str, message: impl Into<String>) {
        self.events.push(VmEvent {
            at: now(),
            kind: kind.to_string(),
            message: message.into(),
        });
        let excess = self.events.len().saturating_sub(MAX_EVENTS);
        self.events.drain(..excess);
    }

    pub fn role(&self, name: &str) -> Option<&RoleRecord> {
        self.roles.iter().find(|role| role.spec.name == name)
    }

    pub fn role_mut(&mut self, name: &str) -> Option<&mut RoleRecord> {
        self.roles.iter_mut().find(|role| role.spec.name == name)
    }

    /// The keys it holds besides its own: its roles' virtual addresses
    /// (`ipam/`) and its endpoints' host ports (`host-ports/`).
    fn held_keys(&self, keys: &super::keys::Keys) -> Vec<String> {
        let mut held = Vec::new();
        for role in &self.roles {
            if let (Some(network), Some(address)) = (role.endpoint_network(), role.virtual_address)
            {
                held.push(keys.address(network, address));
            }
            for endpoint in &role.spec.endpoints {
                if let Some(port) = endpoint.host_port {
                    held.push(keys.host_port(endpoint.protocol, port));
                }
            }
        }
        held
    }

    /// Whether this is service `wanted` (id or name) of `tenant` (any
    /// tenant's by id when None).
    pub fn is(&self, tenant: Option<&str>, wanted: &str) -> bool {
        match tenant {
            Some(tenant) => self.tenant_id == tenant && (self.id == wanted || self.name == wanted),
            None => self.id == wanted,
        }
    }
}

/// What makes a VM an instance of a service: in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceOf {
    pub service: String,
    pub role: String,
    /// Its slot, 0 to the role's count - 1: the slot's update domain is
    /// `index % update_domains`.
    pub index: u32,
    /// The role revision it was made from.
    pub revision: u64,
    /// How its host checks its health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
}

/// A service record and the revision it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredService {
    pub record: ServiceRecord,
    pub revision: i64,
}

/// `service-names/{tenant}/{name}`.
#[derive(Serialize)]
struct ServiceName<'a> {
    id: &'a str,
}

impl Cluster {
    /// Every service of the cluster.
    pub async fn services(&self) -> Result<Vec<StoredService>, ClusterError> {
        let prefix = self.inner.keys.services();
        let read = self
            .inner
            .etcd
            .get_prefixes::<serde_json::Value>(&[&prefix])
            .await?
            .pop()
            .unwrap_or_default();
        let mut services = Vec::with_capacity(read.len());
        for (key, stored) in read {
            services.push(StoredService {
                record: typed(&key, stored.value)?,
                revision: stored.mod_revision,
            });
        }
        services.sort_by(|a, b| {
            (a.record.created_at, &a.record.id).cmp(&(b.record.created_at, &b.record.id))
        });
        Ok(services)
    }

    /// Service `wanted` (id or name) as `tenant` sees it (any by id for
    /// None).
    pub async fn service(
        &self,
        tenant: Option<&str>,
        wanted: &str,
    ) -> Result<StoredService, ClusterError> {
        self.services()
            .await?
            .into_iter()
            .find(|service| service.record.is(tenant, wanted))
            .ok_or_else(|| ClusterError::NoSuchService(wanted.to_string()))
    }

    /// Defines `record`: refused when its name is taken or its tenant is
    /// gone. Its instances count against the quota as the controller
    /// makes them.
    pub async fn define_service(&self, record: &ServiceRecord) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let (key, name_key) = (
            keys.service(&record.id),
            keys.service_name(&record.tenant_id, &record.name),
        );
        let tenant_key = keys.tenant(&record.tenant_id);
        let owner = encode(&name_key, &ServiceName { id: &record.id })?;
        let held = record.held_keys(keys);
        let mut conditions = vec![
            Compare::create_revision(tenant_key.as_str(), CompareOp::Greater, 0),
            Compare::create_revision(name_key.as_str(), CompareOp::Equal, 0),
        ];
        let mut puts = vec![
            TxnOp::put(key.as_str(), encode(&key, record)?, None),
            TxnOp::put(name_key.as_str(), owner.clone(), None),
        ];
        for key in &held {
            conditions.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
            puts.push(TxnOp::put(key.as_str(), owner.clone(), None));
        }
        let txn = Txn::new().when(conditions).and_then(puts);
        let (done, _) = self
            .inner
            .etcd
            .txn(&format!("define service {}", record.id), txn)
            .await?;
        if done {
            return Ok(());
        }
        self.require_tenant(&record.tenant_id).await?;
        if self
            .inner
            .etcd
            .get::<serde_json::Value>(&name_key)
            .await?
            .is_some()
        {
            return Err(ClusterError::Exists(format!(
                "a service named '{}' of this tenant",
                record.name
            )));
        }
        for key in &held {
            if self
                .inner
                .etcd
                .get::<serde_json::Value>(key)
                .await?
                .is_some()
            {
                let what = match key.contains("/host-ports/") {
                    true => "host port",
                    false => "address",
                };
                return Err(ClusterError::Raced(format!("{what} {key}")));
            }
        }
        Err(ClusterError::Contended { key, attempts: 1 })
    }

    /// Changes service `id` with `change` (which may refuse), written only
    /// if nobody wrote it in between (tried again otherwise).
    pub async fn update_service<F>(
        &self,
        id: &str,
        change: F,
    ) -> Result<ServiceRecord, ClusterError>
    where
        F: FnMut(&mut ServiceRecord) -> Result<(), ClusterError>,
    {
        let key = self.inner.keys.service(id);
        self.update_record(&key, || ClusterError::NoSuchService(id.to_string()), change)
            .await
    }

    /// Writes `record` as the controller, if it is still at `revision` and
    /// this host still leads. Whether it was written.
    pub(super) async fn write_service_as_controller(
        &self,
        record: &ServiceRecord,
        revision: i64,
    ) -> Result<bool, ClusterError> {
        let key = self.inner.keys.service(&record.id);
        let action = format!("update service {}", record.id);
        self.put_as_controller(&key, record, revision, &action)
            .await
    }

    /// Deletes service `id` and its name; the controller then retires its
    /// instances.
    pub async fn delete_service(&self, id: &str) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let key = keys.service(id);
        for _ in 0..ATTEMPTS {
            let Some(stored) = self.inner.etcd.get::<ServiceRecord>(&key).await? else {
                return Err(ClusterError::NoSuchService(id.to_string()));
            };
            let record = stored.value;
            let deletes: Vec<TxnOp> = [
                key.clone(),
                keys.service_name(&record.tenant_id, &record.name),
            ]
            .into_iter()
            .chain(record.held_keys(keys))
            .map(|key| TxnOp::delete(key, None))
            .collect();
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    stored.mod_revision,
                )])
                .and_then(deletes);
            let (done, _) = self
                .inner
                .etcd
                .txn(&format!("delete service {id}"), txn)
                .await?;
            if done {
                return Ok(());
            }
        }
        Err(ClusterError::Contended {
            key,
            attempts: ATTEMPTS,
        })
    }

    /// Whether a service endpoint holds `port` on every host.
    pub async fn host_port_taken(
        &self,
        protocol: nubis_api::Protocol,
        port: u16,
    ) -> Result<bool, ClusterError> {
        let key = self.inner.keys.host_port(protocol, port);
        Ok(self
            .inner
            .etcd
            .get::<serde_json::Value>(&key)
            .await?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_finds_its_service_by_name_and_the_operator_by_id() {
        let service = ServiceRecord {
            id: "svc-1".into(),
            tenant_id: "t-1".into(),
            name: "shop".into(),
            created_at: 1,
            roles: Vec::new(),
            events: Vec::new(),
        };
        assert!(service.is(Some("t-1"), "shop") && service.is(Some("t-1"), "svc-1"));
        assert!(!service.is(Some("t-2"), "svc-1"));
        assert!(service.is(None, "svc-1") && !service.is(None, "shop"));
    }

    #[test]
    fn events_are_bounded() {
        let mut service = ServiceRecord {
            id: "svc-1".into(),
            tenant_id: "t-1".into(),
            name: "shop".into(),
            created_at: 1,
            roles: Vec::new(),
            events: Vec::new(),
        };
        for n in 0..(MAX_EVENTS + 3) {
            service.record_event("replaced", format!("n {n}"));
        }
        assert_eq!(service.events.len(), MAX_EVENTS);
        assert_eq!(service.events[0].message, "n 3");
    }
}
