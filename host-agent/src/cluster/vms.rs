//! VMs in the cluster: a VM's definition lives in etcd (`vms/{id}`), the
//! controller writes the host it goes to (`controller.rs`), that host
//! defines and runs it (`service::placed`) and reports what it sees
//! (`status/{vm}`). Any agent lists and shows every VM from these keys,
//! so a tenant can talk to any host.
//!
//! Quotas are counted cluster-wide in `usage/{tenant}`, changed in the
//! same transaction as the records it counts and conditioned on the
//! revision that was read: two clients racing for the last vCPU of a
//! quota through two hosts cannot both win.
//!
//! A definition is the tenant's request as it was made (its image
//! resolved to the image's id). Its types refuse fields they do not know:
//! an agent of an older version refuses a VM that asks for a feature it
//! lacks, rather than running it without.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use nubis_api::{Quota, Vm, VmCreate, VmEvent, VmNic, VmState};
use serde::{Deserialize, Serialize};

use super::etcd::encode;
use super::{typed, Cluster, ClusterError};
use crate::store::now;

/// How many times a write that lost a race is tried again.
pub(super) const ATTEMPTS: usize = 16;
/// No limit: for VMs that exist already.
pub const UNLIMITED: Quota = Quota {
    max_vcpus: u32::MAX,
    max_memory_mib: u64::MAX,
    max_vms: u32::MAX,
    max_networks: u32::MAX,
    max_port_forwards: u32::MAX,
    max_snapshots: u32::MAX,
    max_storage_mib: u64::MAX,
};
/// How many cluster events (placement) a VM keeps.
const MAX_EVENTS: usize = 20;

/// `vms/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub tenant_id: String,
    /// The request, with `image` the image's id.
    pub spec: VmCreate,
    /// The member it is placed on; None while pending.
    #[serde(default)]
    pub host: Option<String>,
    pub created_at: u64,
    /// Its NICs as assigned when it was defined: MAC and address on the
    /// cluster's networks (taken in `ipam/`); the host assigns those on
    /// its default bridge.
    #[serde(default)]
    pub nics: Vec<VmNic>,
    /// What the cluster did with it (placement), oldest first.
    #[serde(default)]
    pub events: Vec<VmEvent>,
    /// Disk MiB its disks take: the root disk at its image's size, the
    /// data disks at their full size (as a cloud bills them).
    #[serde(default)]
    pub storage_mib: u64,
    /// While a drain of its host moves it (`drain.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<super::drain::Move>,
    /// Moves of it that failed since it last moved.
    #[serde(default)]
    pub failed_moves: u32,
    /// Its ownership generation: one more each time its host changes. A
    /// host holding it at an older one was replaced and fences its copy
    /// off.
    #[serde(default)]
    pub generation: u64,
    /// Set when it is an instance of a service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<super::services::InstanceOf>,
    /// Why the controller removes it (an instance scaled down, replaced or
    /// upgraded): its host deletes it, then its record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring: Option<String>,
    /// Its SSH keys (`spec.ssh_keys`) as they were at its creation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<nubis_api::NamedSshKey>,
}

impl VmRecord {
    /// Hands the VM to `host`, as a new generation of its ownership.
    pub fn assign_host(&mut self, host: impl Into<String>) {
        self.host = Some(host.into());
        self.generation = self.generation.saturating_add(1);
    }

    /// What the VM counts against its tenant's quota.
    pub fn usage(&self) -> TenantUsage {
        TenantUsage {
            vms: 1,
            vcpus: u64::from(self.spec.vcpus),
            memory_mib: self.spec.memory_mib,
            networks: 0,
            storage_mib: self.storage_mib,
        }
    }

    /// The `ipam/` keys of its addresses on the cluster's networks.
    fn address_keys(&self, keys: &super::keys::Keys) -> Vec<String> {
        self.nics
            .iter()
            .filter_map(|nic| {
                let network = nic.network.as_deref()?;
                let address = nic
                    .address
                    .as_deref()
                    .and_then(crate::network::nic_address)?;
                Some(keys.address(network, address))
            })
            .collect()
    }

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

    /// The VM as the API shows it before its host has reported it.
    pub fn pending(&self) -> Vm {
        let spec = &self.spec;
        Vm {
            id: self.id.clone(),
            tenant_id: self.tenant_id.clone(),
            name: spec.name.clone(),
            image_id: spec.image.clone(),
            state: VmState::Pending,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel_args: spec.kernel_args.clone(),
            root_rate_limit: spec.root_rate_limit,
            disks: spec.disks.clone(),
            nics: if self.nics.is_empty() {
                spec.nics
                    .iter()
                    .map(|nic| VmNic {
                        rate_limit: nic.rate_limit,
                        network: nic.network.clone(),
                        ..VmNic::default()
                    })
                    .collect()
            } else {
                self.nics.clone()
            },
            pid: None,
            last_exit: None,
            restore_from: None,
            created_at: self.created_at,
            host: self.host.clone(),
            placement: spec.placement.clone(),
            ssh_keys: self.ssh_keys.iter().map(|key| key.name.clone()).collect(),
            tags: spec.tags.clone(),
            user_data_bytes: spec
                .user_data
                .as_deref()
                .map(crate::metadata::inputs::decoded_len),
        }
    }
}

/// `usage/{tenant}`: what a tenant's VMs take in the whole cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUsage {
    pub vms: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
    #[serde(default)]
    pub networks: u64,
    /// Disk MiB of the VMs (snapshots are claims: `claims.rs`).
    #[serde(default)]
    pub storage_mib: u64,
}

impl TenantUsage {
    /// `self` with `more` added, if `quota` allows it.
    pub fn with(self, more: TenantUsage, quota: &Quota) -> Result<TenantUsage, ClusterError> {
        let sum = TenantUsage {
            vms: self.vms.saturating_add(more.vms),
            vcpus: self.vcpus.saturating_add(more.vcpus),
            memory_mib: self.memory_mib.saturating_add(more.memory_mib),
            networks: self.networks.saturating_add(more.networks),
            storage_mib: self.storage_mib.saturating_add(more.storage_mib),
        };
        for (what, used, asked, max) in [
            ("VMs", self.vms, more.vms, u64::from(quota.max_vms)),
            ("vCPUs", self.vcpus, more.vcpus, u64::from(quota.max_vcpus)),
            (
                "memory MiB",
                self.memory_mib,
                more.memory_mib,
                quota.max_memory_mib,
            ),
            (
                "networks",
                self.networks,
                more.networks,
                u64::from(quota.max_networks),
            ),
        ] {
            // Only what is asked for: a tenant over a quota lowered since
            // may still make what does not count against it.
            if asked > 0 && used.saturating_add(asked) > max {
                return Err(ClusterError::Quota(format!(
                    "{what}: {used} in use in the cluster + {asked} requested exceeds the tenant's quota of {max}"
                )));
            }
        }
        Ok(sum)
    }

    /// `self` without `less` (never below zero).
    pub fn without(self, less: TenantUsage) -> TenantUsage {
        TenantUsage {
            vms: self.vms.saturating_sub(less.vms),
            vcpus: self.vcpus.saturating_sub(less.vcpus),
            memory_mib: self.memory_mib.saturating_sub(less.memory_mib),
            networks: self.networks.saturating_sub(less.networks),
            storage_mib: self.storage_mib.saturating_sub(less.storage_mib),
        }
    }
}

/// `status/{vm}`: the VM as the host that runs it last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub host: String,
    pub vm: Vm,
    /// A service instance's health, as its host's probe finds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<nubis_api::InstanceHealth>,
}

/// A VM as the cluster has it: its record (with the revision it was read
/// at) and its host's last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterVm {
    pub record: VmRecord,
    pub revision: i64,
    pub status: Option<VmStatus>,
}

impl ClusterVm {
    /// What the API shows: the host's report while it comes from the host
    /// the VM is placed on, the definition (pending) before that.
    pub fn view(&self) -> Vm {
        match &self.status {
            Some(status) if self.record.host.as_deref() == Some(status.host.as_str()) => {
                let mut vm = status.vm.clone();
                vm.host = Some(status.host.clone());
                vm.placement = self.record.spec.placement.clone();
                vm
            }
            _ => self.record.pending(),
        }
    }

    /// Whether this is VM `wanted` (id or name) of `tenant` (any tenant's
    /// by id when None).
    pub fn is(&self, tenant: Option<&str>, wanted: &str) -> bool {
        let record = &self.record;
        match tenant {
            Some(tenant) => {
                record.tenant_id == tenant && (record.id == wanted || record.spec.name == wanted)
            }
            None => record.id == wanted,
        }
    }
}

/// The end of the key range of every key under `prefix` (which ends
/// with '/', and '0' is the byte after '/').
pub(super) fn prefix_end(prefix: &str) -> String {
    format!("{}0", prefix.trim_end_matches('/'))
}

impl Cluster {
    /// A tenant's usage at `key` (`usage/{tenant}`) and the revision to
    /// condition its update on (0: none yet).
    pub(super) async fn usage(&self, key: &str) -> Result<(TenantUsage, i64), ClusterError> {
        let current = self.inner.etcd.get::<TenantUsage>(key).await?;
        Ok(match current {
            Some(stored) => (stored.value, stored.mod_revision),
            None => (TenantUsage::default(), 0),
        })
    }

    /// Every VM of the cluster, read at one revision; and that revision.
    pub async fn vms(&self) -> Result<(Vec<ClusterVm>, i64), ClusterError> {
        let keys = &self.inner.keys;
        let (records_prefix, status_prefix) = (keys.vms(), keys.vm_statuses());
        let (mut read, revision) = self
            .inner
            .etcd
            .get_prefixes_at::<serde_json::Value>(&[&records_prefix, &status_prefix])
            .await?;
        let statuses = read.pop().unwrap_or_default();
        let records = read.pop().unwrap_or_default();
        let mut reports = std::collections::HashMap::new();
        for (key, stored) in statuses {
            let status: VmStatus = typed(&key, stored.value)?;
            reports.insert(status.vm.id.clone(), status);
        }
        let mut vms = Vec::with_capacity(records.len());
        for (key, stored) in records {
            let record: VmRecord = typed(&key, stored.value)?;
            let status = reports.remove(&record.id);
            vms.push(ClusterVm {
                record,
                revision: stored.mod_revision,
                status,
            });
        }
        vms.sort_by(|a, b| {
            (a.record.created_at, &a.record.id).cmp(&(b.record.created_at, &b.record.id))
        });
        Ok((vms, revision))
    }

    /// VM `wanted` (id or name) as `tenant` sees it (any by id for None).
    pub async fn vm(&self, tenant: Option<&str>, wanted: &str) -> Result<ClusterVm, ClusterError> {
        self.vms()
            .await?
            .0
            .into_iter()
            .find(|vm| vm.is(tenant, wanted))
            .ok_or_else(|| ClusterError::NoSuchVm(wanted.to_string()))
    }

    /// Returns at the first change of a VM record, a report or a service
    /// after `revision`.
    pub async fn vms_changed(&self, revision: i64) -> Result<(), ClusterError> {
        // "service-names/" < "services/" < "status/" < "usage/" <
        // "vm-names/" < "vms/": watch from the first to the end of the last
        // (services change endpoints; usage and names change with the
        // records).
        let keys = &self.inner.keys;
        let (start, end) = (keys.service_names(), prefix_end(&keys.vms()));
        self.inner
            .etcd
            .changed("the VMs", (&start, &end), revision)
            .await
    }

    /// Defines `record` in the cluster, counting it against `quota`:
    /// refused when its name is taken, its tenant is gone or the quota
    /// would be exceeded. Its host is for the controller to write, but for
    /// a VM that exists already (a host's standalone past, published when
    /// it joins: counted without a `quota` to refuse it).
    pub async fn define_vm(
        &self,
        record: &VmRecord,
        quota: Option<&Quota>,
    ) -> Result<(), ClusterError> {
        self.define_vm_when(record, quota, None).await
    }

    /// [`Cluster::define_vm`] as the controller (a service's instance):
    /// written only while this host leads. Whether it was written.
    pub(super) async fn define_vm_as_controller(
        &self,
        record: &VmRecord,
        quota: &Quota,
    ) -> Result<bool, ClusterError> {
        let Some(leader_key) = self.inner.leader_key() else {
            return Ok(false);
        };
        match self
            .define_vm_when(record, Some(quota), Some(leader_key))
            .await
        {
            Ok(()) => Ok(true),
            Err(ClusterError::NotLeading) => Ok(false),
            Err(err) => Err(err),
        }
    }

    async fn define_vm_when(
        &self,
        record: &VmRecord,
        quota: Option<&Quota>,
        leader_key: Option<Vec<u8>>,
    ) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let tenant = &record.tenant_id;
        let (usage_key, name_key) = (keys.usage(tenant), keys.vm_name(tenant, &record.spec.name));
        let (tenant_key, record_key) = (keys.tenant(tenant), keys.vm(&record.id));
        let addresses = record.address_keys(keys);
        let claims_prefix = keys.claims_of(tenant);
        for _ in 0..ATTEMPTS {
            let (claimed, before, seen, revision) = self.claimed(tenant).await?;
            let usage = match quota {
                Some(quota) => {
                    super::claims::check_storage(&claimed, &before, record.storage_mib, quota)?;
                    before.with(record.usage(), quota)?
                }
                None => before.with(record.usage(), &UNLIMITED)?,
            };
            let owner = encode(&name_key, &VmName { id: &record.id })?;
            let mut conditions = vec![
                Compare::create_revision(tenant_key.as_str(), CompareOp::Greater, 0),
                Compare::create_revision(name_key.as_str(), CompareOp::Equal, 0),
                unchanged(&usage_key, seen),
                // No snapshot claimed its disk since the read.
                Compare::mod_revision(claims_prefix.as_str(), CompareOp::Less, revision + 1)
                    .with_prefix(),
            ];
            let mut puts = vec![
                TxnOp::put(record_key.as_str(), encode(&record_key, record)?, None),
                TxnOp::put(name_key.as_str(), owner.clone(), None),
                TxnOp::put(usage_key.as_str(), encode(&usage_key, &usage)?, None),
            ];
            for key in &addresses {
                conditions.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                puts.push(TxnOp::put(key.as_str(), owner.clone(), None));
            }
            if let Some(leader_key) = &leader_key {
                conditions.push(Compare::create_revision(
                    leader_key.clone(),
                    CompareOp::Greater,
                    0,
                ));
            }
            let txn = Txn::new().when(conditions).and_then(puts);
            let (done, _) = self
                .inner
                .etcd
                .txn(&format!("define VM {}", record.id), txn)
                .await?;
            if done {
                return Ok(());
            }
            let etcd = &self.inner.etcd;
            if let Some(leader_key) = &leader_key {
                let key = String::from_utf8_lossy(leader_key).into_owned();
                if etcd.get::<serde_json::Value>(&key).await?.is_none() {
                    return Err(ClusterError::NotLeading);
                }
            }
            self.require_tenant(tenant).await?;
            if etcd.get::<serde_json::Value>(&name_key).await?.is_some() {
                return Err(ClusterError::Exists(format!(
                    "a VM named '{}' of this tenant",
                    record.spec.name
                )));
            }
            for key in &addresses {
                if etcd.get::<serde_json::Value>(key).await?.is_some() {
                    return Err(ClusterError::Raced(format!("address {key}")));
                }
            }
        }
        Err(ClusterError::Contended {
            key: usage_key,
            attempts: ATTEMPTS,
        })
    }

    /// Deletes VM `id`'s record, name and report, and gives its share of
    /// the quota back.
    pub async fn delete_vm(&self, id: &str) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let record_key = keys.vm(id);
        for _ in 0..ATTEMPTS {
            let Some(stored) = self.inner.etcd.get::<VmRecord>(&record_key).await? else {
                return Ok(());
            };
            let record = stored.value;
            let usage_key = keys.usage(&record.tenant_id);
            let (current, seen) = self.usage(&usage_key).await?;
            let usage = current.without(record.usage());
            let usage_bytes = encode(&usage_key, &usage)?;
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(
                        record_key.as_str(),
                        CompareOp::Equal,
                        stored.mod_revision,
                    ),
                    unchanged(&usage_key, seen),
                ])
                .and_then(
                    [
                        TxnOp::delete(record_key.as_str(), None),
                        TxnOp::delete(keys.vm_name(&record.tenant_id, &record.spec.name), None),
                        TxnOp::delete(keys.vm_status(id), None),
                        TxnOp::put(usage_key.as_str(), usage_bytes, None),
                    ]
                    .into_iter()
                    .chain(
                        record
                            .address_keys(keys)
                            .into_iter()
                            .map(|key| TxnOp::delete(key, None)),
                    )
                    .collect::<Vec<_>>(),
                );
            let (done, _) = self.inner.etcd.txn(&format!("delete VM {id}"), txn).await?;
            if done {
                return Ok(());
            }
        }
        Err(ClusterError::Contended {
            key: record_key,
            attempts: ATTEMPTS,
        })
    }

    /// Changes VM `id`'s record with `change` (which may refuse), written
    /// only if nobody wrote it in between (tried again otherwise).
    pub async fn update_vm<F>(&self, id: &str, change: F) -> Result<VmRecord, ClusterError>
    where
        F: FnMut(&mut VmRecord) -> Result<(), ClusterError>,
    {
        let key = self.inner.keys.vm(id);
        self.update_record(&key, || ClusterError::NoSuchVm(id.to_string()), change)
            .await
    }

    /// Changes the record at `key` with `change` (which may refuse),
    /// written only if nobody wrote it in between (tried again otherwise);
    /// `missing` when there is none.
    pub(super) async fn update_record<T, F>(
        &self,
        key: &str,
        missing: impl Fn() -> ClusterError,
        mut change: F,
    ) -> Result<T, ClusterError>
    where
        T: Serialize + serde::de::DeserializeOwned,
        F: FnMut(&mut T) -> Result<(), ClusterError>,
    {
        self.inner
            .etcd
            .update(key, |current: Option<T>| {
                let mut record = current.ok_or_else(&missing)?;
                change(&mut record)?;
                Ok(record)
            })
            .await
    }

    /// Writes `host` as the host of VM `id`, as the controller, if the
    /// record is still at `revision` and this host still leads (its
    /// election key exists: a deposed controller's write fails). Whether
    /// it was written.
    pub(super) async fn place_vm(
        &self,
        record: &VmRecord,
        revision: i64,
    ) -> Result<bool, ClusterError> {
        let key = self.inner.keys.vm(&record.id);
        self.put_as_controller(&key, record, revision, &format!("place VM {}", record.id))
            .await
    }

    /// Puts `value` at `key` as the controller: if `key` is still at
    /// `revision` and this host still leads. Whether it was written.
    pub(super) async fn put_as_controller<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        revision: i64,
        action: &str,
    ) -> Result<bool, ClusterError> {
        let Some(leader_key) = self.inner.leader_key() else {
            return Ok(false);
        };
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key, CompareOp::Equal, revision),
                Compare::create_revision(leader_key, CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(key, encode(key, value)?, None)]);
        let (done, _) = self.inner.etcd.txn(action, txn).await?;
        Ok(done)
    }

    /// Reports VM `vm` as this host sees it (and, for a service instance
    /// with a probe, its health).
    pub async fn report_vm(
        &self,
        vm: &Vm,
        health: Option<nubis_api::InstanceHealth>,
    ) -> Result<(), ClusterError> {
        let status = VmStatus {
            host: self.inner.settings.host_name.to_string(),
            vm: vm.clone(),
            health,
        };
        let (record_key, status_key) = (
            self.inner.keys.vm(&vm.id),
            self.inner.keys.vm_status(&vm.id),
        );
        // Only while the record exists: a report racing the VM's deletion
        // through another host must not outlive it.
        let txn = Txn::new()
            .when([Compare::create_revision(
                record_key.as_str(),
                CompareOp::Greater,
                0,
            )])
            .and_then([TxnOp::put(
                status_key.as_str(),
                encode(&status_key, &status)?,
                None,
            )]);
        self.inner
            .etcd
            .txn(&format!("report VM {}", vm.id), txn)
            .await?;
        Ok(())
    }
}

/// `vm-names/{tenant}/{name}`.
#[derive(Serialize)]
struct VmName<'a> {
    id: &'a str,
}

/// "`key` was not written since `seen`" (0: "does not exist").
pub(super) fn unchanged(key: &str, seen: i64) -> Compare {
    if seen == 0 {
        Compare::create_revision(key, CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key, CompareOp::Equal, seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(vcpus: u32, memory_mib: u64) -> VmRecord {
        let mut spec = VmCreate::new("web-1", "img-1");
        spec.vcpus = vcpus;
        spec.memory_mib = memory_mib;
        VmRecord {
            id: "vm-1".into(),
            tenant_id: "t-1".into(),
            spec,
            host: None,
            created_at: 1,
            nics: Vec::new(),
            events: Vec::new(),
            storage_mib: 0,
            moving: None,
            failed_moves: 0,
            generation: 0,
            instance: None,
            retiring: None,
            ssh_keys: Vec::new(),
        }
    }

    #[test]
    fn usage_is_checked_against_every_limit() {
        let quota = Quota {
            max_vcpus: 4,
            max_memory_mib: 1024,
            max_vms: 2,
            ..Quota::default()
        };
        let one = TenantUsage::default()
            .with(record(2, 512).usage(), &quota)
            .unwrap();
        assert_eq!(
            one,
            TenantUsage {
                vms: 1,
                vcpus: 2,
                memory_mib: 512,
                networks: 0,
                storage_mib: 0,
            }
        );
        let two = one.with(record(2, 512).usage(), &quota).unwrap();
        for (vcpus, memory, what) in [(1, 32, "VMs"), (3, 32, "vCPUs"), (1, 600, "memory")] {
            let partial = if what == "VMs" { two } else { one };
            let err = partial
                .with(record(vcpus, memory).usage(), &quota)
                .unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
        }
        assert_eq!(two.without(record(2, 512).usage()), one);
        assert_eq!(TenantUsage::default().without(one), TenantUsage::default());
    }

    #[test]
    fn a_report_shows_only_from_the_host_the_vm_is_placed_on() {
        let mut placed = record(1, 128);
        placed.host = Some("b".into());
        let mut reported = placed.pending();
        reported.state = VmState::Running;
        reported.host = None;
        let vm = ClusterVm {
            record: placed.clone(),
            revision: 3,
            status: Some(VmStatus {
                host: "b".into(),
                vm: reported,
                health: None,
            }),
        };
        assert_eq!(vm.view().state, VmState::Running);
        assert_eq!(vm.view().host.as_deref(), Some("b"));
        let moved = ClusterVm {
            record: VmRecord {
                host: Some("c".into()),
                ..placed
            },
            ..vm
        };
        assert_eq!(moved.view().state, VmState::Pending);
        assert_eq!(moved.view().host.as_deref(), Some("c"));
    }

    #[test]
    fn events_are_bounded() {
        let mut vm = record(1, 128);
        for n in 0..(MAX_EVENTS + 5) {
            vm.record_event("unplaceable", format!("try {n}"));
        }
        assert_eq!(vm.events.len(), MAX_EVENTS);
        assert_eq!(vm.events[0].message, "try 5");
    }

    #[test]
    fn a_tenant_finds_its_vm_by_name_and_the_operator_by_id() {
        let vm = ClusterVm {
            record: record(1, 128),
            revision: 1,
            status: None,
        };
        assert!(vm.is(Some("t-1"), "web-1") && vm.is(Some("t-1"), "vm-1"));
        assert!(!vm.is(Some("t-2"), "vm-1"));
        assert!(vm.is(None, "vm-1") && !vm.is(None, "web-1"));
    }

    #[test]
    fn prefixes_end_after_their_last_key() {
        assert_eq!(prefix_end("/nubis/vms/"), "/nubis/vms0");
        assert!("/nubis/vms/zzz".as_bytes() < "/nubis/vms0".as_bytes());
    }
}
