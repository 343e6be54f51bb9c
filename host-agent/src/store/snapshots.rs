//! Snapshots of VMs: the record of what was saved (the VM's definition at
//! that moment, to restore it into a new VM) and how much disk it takes.

use rusqlite::{params, OptionalExtension, Row};

use super::vms::Spec;
use super::{new_id, now, NewVm, Store, StoreError, VmRow};

/// A snapshot as stored (the API's `Snapshot` is made from it by the
/// service layer, `service::snapshots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub id: String,
    pub tenant_id: String,
    /// The VM it was taken of (which may be gone since).
    pub vm_id: String,
    pub vm_name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// What its files take on the host's disk.
    pub size_bytes: u64,
    /// Seconds since the epoch.
    pub created_at: u64,
}

/// A snapshot with the definition of the VM it was taken of.
#[derive(Debug, Clone)]
pub struct SavedVm {
    pub snapshot: SnapshotRow,
    /// The VM as it was: a restored VM gets this definition (with its
    /// MACs and addresses, which the guest's memory holds).
    pub vm: NewVm,
}

const SNAPSHOT_COLUMNS: &str =
    "id, tenant_id, vm_id, vm_name, image_id, vcpus, memory_mib, kernel_args, spec, size_bytes, created_at";

fn saved_from_row(row: &Row) -> rusqlite::Result<SavedVm> {
    let spec: String = row.get(8)?;
    let spec: Spec = serde_json::from_str(&spec).map_err(|err| {
        rusqlite::Error::FromSqlConversionFailure(
            8,
            rusqlite::types::Type::Text,
            Box::new(StoreError::Corrupt(format!("snapshot spec: {err}"))),
        )
    })?;
    let snapshot = SnapshotRow {
        id: row.get(0)?,
        tenant_id: row.get(1)?,
        vm_id: row.get(2)?,
        vm_name: row.get(3)?,
        vcpus: row.get(5)?,
        memory_mib: row.get(6)?,
        size_bytes: row.get(9)?,
        created_at: row.get(10)?,
    };
    Ok(SavedVm {
        vm: NewVm {
            tenant_id: snapshot.tenant_id.clone(),
            name: snapshot.vm_name.clone(),
            image_id: row.get(4)?,
            vcpus: snapshot.vcpus,
            memory_mib: snapshot.memory_mib,
            kernel_args: row.get(7)?,
            root_rate_limit: spec.root_rate_limit,
            disks: spec.disks,
            nics: spec.nics,
            restore_from: None,
            restore_as_clone: false,
            metadata: spec.metadata,
        },
        snapshot,
    })
}

impl Store {
    /// A new snapshot id (its files are written before it is recorded).
    pub fn new_snapshot_id(&self) -> Result<String, StoreError> {
        new_id("snap")
    }

    /// How many snapshots the tenant keeps.
    pub fn count_snapshots(&self, tenant_id: &str) -> Result<u32, StoreError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM snapshots WHERE tenant_id = ?1",
            [tenant_id],
            |row| row.get(0),
        )?)
    }

    /// Records snapshot `id` of `vm`, whose files take `size_bytes`.
    pub fn record_snapshot(
        &self,
        id: &str,
        vm: &VmRow,
        size_bytes: u64,
    ) -> Result<SnapshotRow, StoreError> {
        let spec = serde_json::to_string(&Spec {
            root_rate_limit: vm.root_rate_limit,
            disks: vm.disks.clone(),
            nics: vm.nics.clone(),
            restore_from: None,
            restore_as_clone: false,
            metadata: vm.metadata.clone(),
        })
        .map_err(|err| StoreError::Corrupt(format!("cannot encode a VM spec: {err}")))?;
        let snapshot = SnapshotRow {
            id: id.to_string(),
            tenant_id: vm.tenant_id.clone(),
            vm_id: vm.id.clone(),
            vm_name: vm.name.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            size_bytes,
            created_at: now(),
        };
        self.conn().execute(
            &format!("INSERT INTO snapshots ({SNAPSHOT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
            params![
                snapshot.id,
                snapshot.tenant_id,
                snapshot.vm_id,
                snapshot.vm_name,
                vm.image_id,
                snapshot.vcpus,
                snapshot.memory_mib,
                vm.kernel_args,
                spec,
                snapshot.size_bytes,
                snapshot.created_at
            ],
        )?;
        Ok(snapshot)
    }

    /// A snapshot by id; with `tenant_id`, only that tenant's.
    pub fn get_snapshot(
        &self,
        tenant_id: Option<&str>,
        id: &str,
    ) -> Result<Option<SavedVm>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?1 AND (?2 IS NULL OR tenant_id = ?2)"
                ),
                params![id, tenant_id],
                saved_from_row,
            )
            .optional()?)
    }

    pub fn list_snapshots(&self, tenant_id: Option<&str>) -> Result<Vec<SnapshotRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE (?1 IS NULL OR tenant_id = ?1) ORDER BY created_at, id"
        ))?;
        let snapshots = statement
            .query_map(params![tenant_id], |row| {
                saved_from_row(row).map(|saved| saved.snapshot)
            })?
            .collect::<Result<_, _>>()?;
        Ok(snapshots)
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?
            > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::{Quota, VmDisk, VmNic};

    #[test]
    fn snapshots_keep_the_vm_s_definition_per_tenant() {
        let (store, tenant, image) = crate::store::fixture();
        let vm = store
            .create_vm(
                &NewVm {
                    tenant_id: tenant.clone(),
                    name: "web".into(),
                    image_id: image.clone(),
                    vcpus: 2,
                    memory_mib: 256,
                    kernel_args: "quiet".into(),
                    root_rate_limit: Default::default(),
                    disks: vec![VmDisk {
                        size_mib: 64,
                        rate_limit: Default::default(),
                    }],
                    nics: vec![VmNic {
                        mac: Some("02:4e:42:00:00:09".into()),
                        ..VmNic::default()
                    }],
                    restore_from: None,
                    restore_as_clone: false,
                    metadata: Default::default(),
                },
                Quota::default(),
            )
            .unwrap();
        let id = store.new_snapshot_id().unwrap();
        let snapshot = store.record_snapshot(&id, &vm, 4096).unwrap();
        assert_eq!(
            (snapshot.vm_id.as_str(), snapshot.size_bytes),
            (vm.id.as_str(), 4096)
        );
        let saved = store.get_snapshot(Some(&tenant), &id).unwrap().unwrap();
        assert_eq!(saved.snapshot, snapshot);
        assert_eq!(saved.vm.image_id, image);
        assert_eq!((saved.vm.vcpus, saved.vm.memory_mib), (2, 256));
        assert_eq!(saved.vm.kernel_args, "quiet");
        assert_eq!(saved.vm.disks.len(), 1);
        assert_eq!(saved.vm.nics[0].mac.as_deref(), Some("02:4e:42:00:00:09"));
        assert!(store.get_snapshot(Some("t-other"), &id).unwrap().is_none());
        assert_eq!(store.list_snapshots(None).unwrap(), vec![snapshot]);
        // The VM may go; its snapshot stays, and so does its tenant.
        assert!(store.delete_vm(&vm.id).unwrap());
        assert!(store.get_snapshot(None, &id).unwrap().is_some());
        match store.delete_tenant(&tenant) {
            Err(StoreError::InUse(message)) => {
                assert!(message.contains("1 snapshot(s)"), "{message}");
                assert!(!message.contains("VM(s)"), "{message}");
            }
            other => panic!("a tenant with a snapshot was deleted: {other:?}"),
        }
        assert!(store.delete_snapshot(&id).unwrap());
        assert!(store.list_snapshots(Some(&tenant)).unwrap().is_empty());
    }
}
