//! VMs and their event logs. A VM's devices (disks, NICs, rate limits) are
//! one JSON column: they are read and written whole, never queried.

use nubis_api::{Quota, RateLimit, VmDisk, VmEvent, VmMetadata, VmNic, VmState};
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::{exists_or, new_id, now, Store, StoreError};

/// A VM to define.
#[derive(Debug, Clone)]
pub struct NewVm {
    pub tenant_id: String,
    pub name: String,
    pub image_id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel_args: String,
    pub root_rate_limit: RateLimit,
    pub disks: Vec<VmDisk>,
    pub nics: Vec<VmNic>,
    /// A snapshot the VM resumes from at its first start.
    pub restore_from: Option<String>,
    /// It resumes from `restore_from` as a clone: its memory mapped
    /// copy-on-write from the snapshot's, then a new identity given to its
    /// guest.
    pub restore_as_clone: bool,
    /// What the metadata service tells it beyond its definition.
    pub metadata: VmMetadata,
}

/// A VM as this host stores it: its definition, where its life is, and
/// the VMM that runs it here. `nubis_api::Vm` is what the API shows of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRow {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub image_id: String,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel_args: String,
    pub root_rate_limit: RateLimit,
    pub disks: Vec<VmDisk>,
    pub nics: Vec<VmNic>,
    /// The VMM's process id while one runs (a host-local fact).
    pub pid: Option<u32>,
    /// Why the VMM last exited.
    pub last_exit: Option<String>,
    /// A snapshot the VM resumes from at its next start.
    pub restore_from: Option<String>,
    /// It resumes from `restore_from` as a clone (see [`NewVm`]).
    pub restore_as_clone: bool,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// What the metadata service tells it beyond its definition.
    pub metadata: VmMetadata,
}

/// What a tenant's VMs take of its quota (every defined VM counts: a
/// stopped VM can be started again at any time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub vms: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct Spec {
    pub(super) root_rate_limit: RateLimit,
    pub(super) disks: Vec<VmDisk>,
    pub(super) nics: Vec<VmNic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) restore_from: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) restore_as_clone: bool,
    #[serde(default, skip_serializing_if = "VmMetadata::is_empty")]
    pub(super) metadata: VmMetadata,
}

const VM_COLUMNS: &str = "id, tenant_id, name, image_id, state, vcpus, memory_mib, kernel_args, spec, pid, last_exit, created_at";

fn vm_from_row(row: &Row) -> rusqlite::Result<VmRow> {
    let corrupt = |index: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            Box::new(StoreError::Corrupt(what)),
        )
    };
    let state: String = row.get(4)?;
    let spec: String = row.get(8)?;
    let spec: Spec =
        serde_json::from_str(&spec).map_err(|err| corrupt(8, format!("VM spec: {err}")))?;
    Ok(VmRow {
        id: row.get(0)?,
        tenant_id: row.get(1)?,
        name: row.get(2)?,
        image_id: row.get(3)?,
        state: VmState::parse(&state).ok_or_else(|| corrupt(4, format!("VM state '{state}'")))?,
        vcpus: row.get(5)?,
        memory_mib: row.get(6)?,
        kernel_args: row.get(7)?,
        root_rate_limit: spec.root_rate_limit,
        disks: spec.disks,
        nics: spec.nics,
        restore_from: spec.restore_from,
        restore_as_clone: spec.restore_as_clone,
        metadata: spec.metadata,
        pid: row.get(9)?,
        last_exit: row.get(10)?,
        created_at: row.get(11)?,
    })
}

impl Store {
    /// Defines a VM if the tenant's quota allows it (checked and inserted
    /// in one transaction, so concurrent requests cannot both squeeze in).
    /// Its id never shares the part that names taps with another VM's.
    pub fn create_vm(&self, new: &NewVm, quota: Quota) -> Result<VmRow, StoreError> {
        for _ in 0..16 {
            let id = new_id("vm")?;
            if tap_key_taken(&self.conn(), &id)?.is_none() {
                return self.create_vm_with_id(&id, new, quota);
            }
        }
        Err(StoreError::InUse(
            "no VM id with unused tap names was found".into(),
        ))
    }

    /// [`Store::create_vm`] with a given id: a VM migrating in keeps the
    /// id it had on its source host.
    pub fn create_vm_with_id(
        &self,
        id: &str,
        new: &NewVm,
        quota: Quota,
    ) -> Result<VmRow, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(other) = tap_key_taken(&tx, id)? {
            return Err(StoreError::InUse(format!(
                "VM {id} would have the tap names of VM {other} on this host"
            )));
        }
        let usage = usage(&tx, &new.tenant_id)?;
        let over = |what: &str, used: u64, asked: u64, max: u64| {
            StoreError::Quota(format!(
                "{what}: {used} in use + {asked} requested exceeds the tenant's quota of {max}"
            ))
        };
        if usage.vms + 1 > u64::from(quota.max_vms) {
            return Err(over("VMs", usage.vms, 1, u64::from(quota.max_vms)));
        }
        if usage.vcpus + u64::from(new.vcpus) > u64::from(quota.max_vcpus) {
            return Err(over(
                "vCPUs",
                usage.vcpus,
                u64::from(new.vcpus),
                u64::from(quota.max_vcpus),
            ));
        }
        if usage.memory_mib + new.memory_mib > quota.max_memory_mib {
            return Err(over(
                "memory MiB",
                usage.memory_mib,
                new.memory_mib,
                quota.max_memory_mib,
            ));
        }
        let vm = VmRow {
            id: id.to_string(),
            tenant_id: new.tenant_id.clone(),
            name: new.name.clone(),
            image_id: new.image_id.clone(),
            state: VmState::Stopped,
            vcpus: new.vcpus,
            memory_mib: new.memory_mib,
            kernel_args: new.kernel_args.clone(),
            root_rate_limit: new.root_rate_limit,
            disks: new.disks.clone(),
            nics: new.nics.clone(),
            pid: None,
            last_exit: None,
            restore_from: new.restore_from.clone(),
            restore_as_clone: new.restore_as_clone,
            metadata: new.metadata.clone(),
            created_at: now(),
        };
        tx.execute(
            &format!("INSERT INTO vms ({VM_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
            params![
                vm.id,
                vm.tenant_id,
                vm.name,
                vm.image_id,
                vm.state.as_str(),
                vm.vcpus,
                vm.memory_mib,
                vm.kernel_args,
                spec_json(&vm)?,
                vm.pid,
                vm.last_exit,
                vm.created_at
            ],
        )
        .map_err(|err| exists_or(err, || format!("VM '{}'", new.name)))?;
        tx.commit()?;
        Ok(vm)
    }

    /// A VM by id or name; with `tenant_id`, only that tenant's.
    pub fn get_vm(
        &self,
        tenant_id: Option<&str>,
        id_or_name: &str,
    ) -> Result<Option<VmRow>, StoreError> {
        let conn = self.conn();
        let vm = match tenant_id {
            Some(tenant) => conn
                .query_row(
                    &format!("SELECT {VM_COLUMNS} FROM vms WHERE tenant_id = ?1 AND (id = ?2 OR name = ?2)"),
                    [tenant, id_or_name],
                    vm_from_row,
                )
                .optional()?,
            None => conn
                .query_row(
                    &format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"),
                    [id_or_name],
                    vm_from_row,
                )
                .optional()?,
        };
        Ok(vm)
    }

    /// VMs, optionally of one tenant and in one state.
    pub fn list_vms(
        &self,
        tenant_id: Option<&str>,
        state: Option<VmState>,
    ) -> Result<Vec<VmRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {VM_COLUMNS} FROM vms
             WHERE (?1 IS NULL OR tenant_id = ?1) AND (?2 IS NULL OR state = ?2)
             ORDER BY created_at, id"
        ))?;
        let vms = statement
            .query_map(params![tenant_id, state.map(VmState::as_str)], vm_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(vms)
    }

    /// Records a VM's state, VMM pid and last exit reason.
    pub fn set_vm_state(
        &self,
        id: &str,
        state: VmState,
        pid: Option<u32>,
        last_exit: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE vms SET state = ?2, pid = ?3, last_exit = COALESCE(?4, last_exit) WHERE id = ?1",
            params![id, state.as_str(), pid, last_exit],
        )?;
        Ok(())
    }

    /// Replaces a VM's devices and restore point (its JSON spec).
    pub fn set_vm_spec(&self, vm: &VmRow) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE vms SET spec = ?2 WHERE id = ?1",
            params![vm.id, spec_json(vm)?],
        )?;
        Ok(())
    }

    /// Removes VM `id`'s record; its jail uid is free again.
    pub fn delete_vm(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        conn.execute("DELETE FROM jail_users WHERE vm_id = ?1", [id])?;
        Ok(conn.execute("DELETE FROM vms WHERE id = ?1", [id])? > 0)
    }

    pub fn tenant_usage(&self, tenant_id: &str) -> Result<Usage, StoreError> {
        usage(&self.conn(), tenant_id)
    }

    /// Records an event of VM `vm_id`; none for a VM that is gone (a
    /// VMM's exit seen after its VM moved away or was deleted).
    pub fn add_event(&self, vm_id: &str, kind: &str, message: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO vm_events (vm_id, at, kind, message)
             SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM vms WHERE id = ?1)",
            params![vm_id, now(), kind, message],
        )?;
        Ok(())
    }

    pub fn events(&self, vm_id: &str) -> Result<Vec<VmEvent>, StoreError> {
        let conn = self.conn();
        let mut statement =
            conn.prepare("SELECT at, kind, message FROM vm_events WHERE vm_id = ?1 ORDER BY seq")?;
        let events = statement
            .query_map([vm_id], |row| {
                Ok(VmEvent {
                    at: row.get(0)?,
                    kind: row.get(1)?,
                    message: row.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(events)
    }
}

fn spec_json(vm: &VmRow) -> Result<String, StoreError> {
    serde_json::to_string(&Spec {
        root_rate_limit: vm.root_rate_limit,
        disks: vm.disks.clone(),
        nics: vm.nics.clone(),
        restore_from: vm.restore_from.clone(),
        restore_as_clone: vm.restore_as_clone,
        metadata: vm.metadata.clone(),
    })
    .map_err(|err| StoreError::Corrupt(format!("cannot encode a VM spec: {err}")))
}

/// The first characters of a VM id that name its taps (`network::tap_name`
/// takes 8 of the random part, after "vm-").
const TAP_KEY_LEN: usize = 11;

/// Another VM whose taps would have `id`'s names.
fn tap_key_taken(conn: &rusqlite::Connection, id: &str) -> Result<Option<String>, StoreError> {
    let key: String = id.chars().take(TAP_KEY_LEN).collect();
    Ok(conn
        .query_row(
            "SELECT id FROM vms WHERE substr(id, 1, ?1) = ?2 AND id != ?3",
            params![TAP_KEY_LEN as i64, key, id],
            |row| row.get(0),
        )
        .optional()?)
}

impl Store {
    /// MiB of disk the tenant's VMs (root disks at their image's size,
    /// data disks at full size) and snapshots take.
    pub fn storage_used_mib(&self, tenant_id: &str) -> Result<u64, StoreError> {
        self.storage_mib(Some(tenant_id))
    }

    /// What all VMs here take of the host: vCPUs, memory, disk as
    /// [`Store::storage_used_mib`] counts it, and how many VMs there are.
    pub fn host_usage(&self) -> Result<(Usage, u64), StoreError> {
        let usage = self.conn().query_row(
            "SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0), COUNT(*) FROM vms",
            [],
            |row| {
                Ok(Usage {
                    vcpus: row.get(0)?,
                    memory_mib: row.get(1)?,
                    vms: row.get(2)?,
                })
            },
        )?;
        Ok((usage, self.storage_mib(None)?))
    }

    /// Disk MiB of one tenant's VMs and snapshots, or everyone's.
    fn storage_mib(&self, tenant_id: Option<&str>) -> Result<u64, StoreError> {
        let conn = self.conn();
        let vms: Vec<(String, u64)> = conn
            .prepare(
                "SELECT vms.spec, COALESCE(images.rootfs_bytes, 0) FROM vms
                 LEFT JOIN images ON images.id = vms.image_id
                 WHERE ?1 IS NULL OR vms.tenant_id = ?1",
            )?
            .query_map([tenant_id], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut used = 0u64;
        for (spec, root_bytes) in vms {
            let spec: Spec = serde_json::from_str(&spec)
                .map_err(|err| StoreError::Corrupt(format!("VM spec: {err}")))?;
            used = used
                .saturating_add(crate::quota::mib_of(root_bytes))
                .saturating_add(spec.disks.iter().map(|disk| disk.size_mib).sum::<u64>());
        }
        let snapshot_bytes: u64 = conn.query_row(
            "SELECT COALESCE(SUM(size_bytes), 0) FROM snapshots WHERE ?1 IS NULL OR tenant_id = ?1",
            [tenant_id],
            |row| row.get(0),
        )?;
        Ok(used.saturating_add(crate::quota::mib_of(snapshot_bytes)))
    }
}

fn usage(conn: &rusqlite::Connection, tenant_id: &str) -> Result<Usage, StoreError> {
    Ok(conn.query_row(
        "SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0), COUNT(*)
         FROM vms WHERE tenant_id = ?1",
        [tenant_id],
        |row| {
            Ok(Usage {
                vcpus: row.get(0)?,
                memory_mib: row.get(1)?,
                vms: row.get(2)?,
            })
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::ImageCreate;

    fn setup(quota: Quota) -> (Store, String, String) {
        let store = Store::open_in_memory().unwrap();
        let tenant = store.create_tenant("acme", quota).unwrap();
        let image = store
            .create_image(
                &tenant.id,
                &ImageCreate {
                    name: "debian".into(),
                    kernel: "/k".into(),
                    rootfs: "/r".into(),
                    initrd: None,
                    cmdline: String::new(),
                },
                1,
            )
            .unwrap();
        (store, tenant.id, image.id)
    }

    fn new_vm(tenant: &str, image: &str, name: &str, vcpus: u32, memory_mib: u64) -> NewVm {
        NewVm {
            tenant_id: tenant.into(),
            name: name.into(),
            image_id: image.into(),
            vcpus,
            memory_mib,
            kernel_args: String::new(),
            root_rate_limit: RateLimit::default(),
            disks: vec![VmDisk {
                size_mib: 16,
                rate_limit: RateLimit {
                    bytes_per_s: Some(1),
                    ops_per_s: None,
                },
            }],
            nics: vec![VmNic::default()],
            restore_from: None,
            restore_as_clone: false,
            metadata: Default::default(),
        }
    }

    #[test]
    fn vms_round_trip_with_their_devices_and_state() {
        let (store, tenant, image) = setup(Quota::default());
        let vm = store
            .create_vm(&new_vm(&tenant, &image, "web", 2, 256), Quota::default())
            .unwrap();
        assert_eq!(vm.state, VmState::Stopped);
        assert_eq!(
            store.get_vm(Some(&tenant), "web").unwrap(),
            Some(vm.clone())
        );
        assert_eq!(store.get_vm(Some("t-other"), &vm.id).unwrap(), None);
        assert_eq!(store.get_vm(None, &vm.id).unwrap(), Some(vm.clone()));
        store
            .set_vm_state(&vm.id, VmState::Running, Some(42), None)
            .unwrap();
        store
            .set_vm_state(&vm.id, VmState::Failed, None, Some("exit 2"))
            .unwrap();
        let failed = store.get_vm(None, &vm.id).unwrap().unwrap();
        assert_eq!((failed.state, failed.pid), (VmState::Failed, None));
        assert_eq!(failed.last_exit.as_deref(), Some("exit 2"));
        assert_eq!(failed.disks, vm.disks);
        assert_eq!(
            store
                .list_vms(Some(&tenant), Some(VmState::Failed))
                .unwrap()
                .len(),
            1
        );
        assert!(store
            .list_vms(Some(&tenant), Some(VmState::Running))
            .unwrap()
            .is_empty());
        assert!(matches!(
            store.delete_image(&tenant, &image),
            Err(StoreError::InUse(_))
        ));
        store.add_event(&vm.id, "created", "defined").unwrap();
        assert_eq!(store.events(&vm.id).unwrap()[0].kind, "created");
        assert!(store.delete_vm(&vm.id).unwrap());
        assert!(store.events(&vm.id).unwrap().is_empty());
    }

    #[test]
    fn quotas_hold() {
        let quota = Quota {
            max_vcpus: 3,
            max_memory_mib: 512,
            max_vms: 2,
            ..Quota::default()
        };
        let (store, tenant, image) = setup(quota);
        store
            .create_vm(&new_vm(&tenant, &image, "a", 2, 256), quota)
            .unwrap();
        let err = store
            .create_vm(&new_vm(&tenant, &image, "b", 2, 128), quota)
            .unwrap_err();
        assert!(
            err.to_string().contains("vCPUs: 2 in use + 2 requested"),
            "{err}"
        );
        let err = store
            .create_vm(&new_vm(&tenant, &image, "b", 1, 512), quota)
            .unwrap_err();
        assert!(err.to_string().contains("memory MiB"), "{err}");
        store
            .create_vm(&new_vm(&tenant, &image, "b", 1, 128), quota)
            .unwrap();
        let err = store
            .create_vm(&new_vm(&tenant, &image, "c", 0, 0), quota)
            .unwrap_err();
        assert!(matches!(err, StoreError::Quota(_)), "{err}");
        assert_eq!(
            store.tenant_usage(&tenant).unwrap(),
            Usage {
                vcpus: 3,
                memory_mib: 384,
                vms: 2
            }
        );
        assert!(matches!(
            store.create_vm(&new_vm(&tenant, &image, "a", 0, 0), Quota::default()),
            Err(StoreError::Exists(_))
        ));
    }

    fn vm_with_disks(tenant: &str, image: &str, name: &str, disks: &[u64]) -> NewVm {
        NewVm {
            tenant_id: tenant.to_string(),
            name: name.into(),
            image_id: image.to_string(),
            vcpus: 1,
            memory_mib: 64,
            kernel_args: String::new(),
            root_rate_limit: RateLimit::default(),
            disks: disks
                .iter()
                .map(|size_mib| VmDisk {
                    size_mib: *size_mib,
                    rate_limit: RateLimit::default(),
                })
                .collect(),
            nics: vec![],
            restore_from: None,
            restore_as_clone: false,
            metadata: Default::default(),
        }
    }

    #[test]
    fn no_two_vms_share_tap_names() {
        let (store, tenant, image) = crate::store::fixture();
        let a = store
            .create_vm_with_id(
                "vm-0123456789abcdef",
                &vm_with_disks(&tenant, &image, "a", &[]),
                Quota::default(),
            )
            .unwrap();
        // Same first 8 characters of the random part: same taps.
        let err = store
            .create_vm_with_id(
                "vm-01234567ffffffff",
                &vm_with_disks(&tenant, &image, "b", &[]),
                Quota::default(),
            )
            .unwrap_err();
        assert!(err.to_string().contains(&a.id), "{err}");
        let b = store
            .create_vm(&vm_with_disks(&tenant, &image, "b", &[]), Quota::default())
            .unwrap();
        assert_ne!(
            crate::network::tap_name(&a.id, 0),
            crate::network::tap_name(&b.id, 0)
        );
    }

    #[test]
    fn storage_counts_root_and_data_disks_at_full_size() {
        let (store, tenant, image) = crate::store::fixture();
        let before = store.storage_used_mib(&tenant).unwrap();
        store
            .create_vm(
                &vm_with_disks(&tenant, &image, "a", &[100, 20]),
                Quota::default(),
            )
            .unwrap();
        let root = crate::quota::mib_of(
            store
                .get_image(&tenant, "img")
                .unwrap()
                .unwrap()
                .rootfs_bytes,
        );
        assert_eq!(
            store.storage_used_mib(&tenant).unwrap(),
            before + root + 120
        );
        assert_eq!(store.storage_used_mib("t-other").unwrap(), 0);
        let (host, disk) = store.host_usage().unwrap();
        assert_eq!(
            disk,
            store.storage_used_mib(&tenant).unwrap(),
            "one tenant here"
        );
        assert!(host.vms >= 1 && host.vcpus >= 1, "{host:?}");
    }

    #[test]
    fn events_of_a_vm_that_is_gone_are_not_kept() {
        let (store, tenant, image) = crate::store::fixture();
        let vm = crate::store::fixture_vm(&store, &tenant, &image, "web", vec![]);
        store.add_event(&vm.id, "started", "pid 7").unwrap();
        store.delete_vm(&vm.id).unwrap();
        // A VMM's exit seen after its VM moved away: no error, no event.
        store.add_event(&vm.id, "exited", "status 0").unwrap();
        assert!(store.events(&vm.id).unwrap().is_empty());
    }
}
