//! Port forwards: a host port (per protocol, unique on the host) that
//! leads to a port on one of a VM's NICs. They go with their VM.

use nubis_api::Protocol;
use rusqlite::{params, OptionalExtension, Row};

use super::{exists_or, now, Store, StoreError};

/// A port forward as stored (the API's `PortForward` is made from it by
/// the service layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardRow {
    pub id: String,
    pub tenant_id: String,
    pub vm_id: String,
    /// The index of the VM's NIC.
    pub nic: usize,
    pub protocol: Protocol,
    pub host_port: u16,
    pub vm_port: u16,
    /// Seconds since the epoch.
    pub created_at: u64,
}

const COLUMNS: &str = "id, tenant_id, vm_id, nic, protocol, host_port, vm_port, created_at";

fn protocol_from(text: &str) -> Protocol {
    match text {
        "udp" => Protocol::Udp,
        _ => Protocol::Tcp,
    }
}

fn forward_from_row(row: &Row) -> rusqlite::Result<PortForwardRow> {
    let protocol: String = row.get(4)?;
    let nic: i64 = row.get(3)?;
    Ok(PortForwardRow {
        id: row.get(0)?,
        tenant_id: row.get(1)?,
        vm_id: row.get(2)?,
        nic: usize::try_from(nic).unwrap_or_default(),
        protocol: protocol_from(&protocol),
        host_port: row.get(5)?,
        vm_port: row.get(6)?,
        created_at: row.get(7)?,
    })
}

impl Store {
    /// Records a forward; refused when the host port is taken for the
    /// protocol.
    #[allow(clippy::too_many_arguments)] // each is checked and stored as is
    pub fn create_port_forward(
        &self,
        id: &str,
        tenant_id: &str,
        vm_id: &str,
        nic: usize,
        protocol: Protocol,
        host_port: u16,
        vm_port: u16,
        max_port_forwards: u32,
    ) -> Result<PortForwardRow, StoreError> {
        let forward = PortForwardRow {
            id: id.to_string(),
            tenant_id: tenant_id.to_string(),
            vm_id: vm_id.to_string(),
            nic,
            protocol,
            host_port,
            vm_port,
            created_at: now(),
        };
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let count: u32 = tx.query_row(
            "SELECT COUNT(*) FROM port_forwards WHERE tenant_id = ?1",
            [tenant_id],
            |row| row.get(0),
        )?;
        if count >= max_port_forwards {
            return Err(StoreError::Quota(format!(
                "port forwards: {count} in use + 1 requested exceeds the tenant's quota of {max_port_forwards}"
            )));
        }
        tx.execute(
            &format!(
                "INSERT INTO port_forwards ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ),
            params![
                forward.id,
                forward.tenant_id,
                forward.vm_id,
                forward.nic as i64,
                forward.protocol.as_str(),
                forward.host_port,
                forward.vm_port,
                forward.created_at
            ],
        )
        .map_err(|err| {
            exists_or(err, || {
                format!("a forward of {} port {host_port}", protocol.as_str())
            })
        })?;
        tx.commit()?;
        Ok(forward)
    }

    /// With `tenant_id`, only that tenant's.
    pub fn get_port_forward(
        &self,
        tenant_id: Option<&str>,
        id: &str,
    ) -> Result<Option<PortForwardRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM port_forwards WHERE id = ?1 AND (?2 IS NULL OR tenant_id = ?2)"
                ),
                params![id, tenant_id],
                forward_from_row,
            )
            .optional()?)
    }

    pub fn list_port_forwards(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<PortForwardRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM port_forwards WHERE (?1 IS NULL OR tenant_id = ?1) ORDER BY protocol, host_port"
        ))?;
        let forwards = statement
            .query_map(params![tenant_id], forward_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(forwards)
    }

    pub fn delete_port_forward(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM port_forwards WHERE id = ?1", [id])?
            > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_are_unique_per_protocol_and_forwards_go_with_their_vm() {
        let (store, tenant, image) = crate::store::fixture();
        let vm = crate::store::fixture_vm(&store, &tenant, &image, "web", vec![]);
        let http = store
            .create_port_forward(
                &crate::store::new_id("pf").unwrap(),
                &tenant,
                &vm.id,
                0,
                Protocol::Tcp,
                18080,
                80,
                2,
            )
            .unwrap();
        assert!(matches!(
            store.create_port_forward(
                &crate::store::new_id("pf").unwrap(),
                &tenant,
                &vm.id,
                0,
                Protocol::Tcp,
                18080,
                81,
                2
            ),
            Err(StoreError::Exists(_))
        ));
        let dns = store
            .create_port_forward(
                &crate::store::new_id("pf").unwrap(),
                &tenant,
                &vm.id,
                0,
                Protocol::Udp,
                18080,
                53,
                2,
            )
            .unwrap();
        // The tenant's quota of two is used up.
        assert!(matches!(
            store.create_port_forward(
                &crate::store::new_id("pf").unwrap(),
                &tenant,
                &vm.id,
                0,
                Protocol::Udp,
                18081,
                53,
                2
            ),
            Err(StoreError::Quota(_))
        ));
        assert_eq!(
            store.get_port_forward(Some(&tenant), &http.id).unwrap(),
            Some(http.clone())
        );
        assert_eq!(
            store.get_port_forward(Some("t-other"), &http.id).unwrap(),
            None
        );
        assert_eq!(
            store.list_port_forwards(None).unwrap(),
            vec![http.clone(), dns]
        );
        assert!(store.delete_port_forward(&http.id).unwrap());
        assert!(!store.delete_port_forward(&http.id).unwrap());
        store.delete_vm(&vm.id).unwrap();
        assert!(store.list_port_forwards(None).unwrap().is_empty());
    }
}
