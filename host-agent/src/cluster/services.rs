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
use super::vms::{prefix_end, ATTEMPTS};
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
        let txn = Txn::new()
            .when([
                Compare::create_revision(tenant_key.as_str(), CompareOp::Greater, 0),
                Compare::create_revision(name_key.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(key.as_str(), encode(&key, record)?, None),
                TxnOp::put(
                    name_key.as_str(),
                    encode(&name_key, &ServiceName { id: &record.id })?,
                    None,
                ),
            ]);
        let (done, _) = self
            .inner
            .etcd
            .txn(&format!("define service {}", record.id), txn)
            .await?;
        if done {
            return Ok(());
        }
        self.require_tenant(&record.tenant_id).await?;
        Err(ClusterError::Exists(format!(
            "a service named '{}' of this tenant",
            record.name
        )))
    }

    /// Changes service `id` with `change` (which may refuse), written only
    /// if nobody wrote it in between (tried again otherwise).
    pub async fn update_service<F>(
        &self,
        id: &str,
        mut change: F,
    ) -> Result<ServiceRecord, ClusterError>
    where
        F: FnMut(&mut ServiceRecord) -> Result<(), ClusterError>,
    {
        let key = self.inner.keys.service(id);
        self.inner
            .etcd
            .update(&key, |current: Option<ServiceRecord>| {
                let mut record =
                    current.ok_or_else(|| ClusterError::NoSuchService(id.to_string()))?;
                change(&mut record)?;
                Ok(record)
            })
            .await
    }

    /// Writes `record` as the controller, if it is still at `revision` and
    /// this host still leads. Whether it was written.
    pub(super) async fn write_service_as_controller(
        &self,
        record: &ServiceRecord,
        revision: i64,
    ) -> Result<bool, ClusterError> {
        let Some(leader_key) = self.inner.leader_key() else {
            return Ok(false);
        };
        let key = self.inner.keys.service(&record.id);
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
                Compare::create_revision(leader_key, CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(key.as_str(), encode(&key, record)?, None)]);
        let (done, _) = self
            .inner
            .etcd
            .txn(&format!("update service {}", record.id), txn)
            .await?;
        Ok(done)
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
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    stored.mod_revision,
                )])
                .and_then([
                    TxnOp::delete(key.as_str(), None),
                    TxnOp::delete(keys.service_name(&record.tenant_id, &record.name), None),
                ]);
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

    /// Returns at the first change of a service, a VM record or a VM's
    /// report after `revision`: what the controller's service pass reads.
    pub(super) async fn services_or_vms_changed(&self, revision: i64) -> Result<(), ClusterError> {
        // "service-names/" < "services/" < "status/" < "usage/" <
        // "vm-names/" < "vms/".
        let keys = &self.inner.keys;
        let (start, end) = (keys.service_names(), prefix_end(&keys.vms()));
        self.inner
            .etcd
            .changed("the services and VMs", (&start, &end), revision)
            .await
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
