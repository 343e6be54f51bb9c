//! Tenants' SSH public keys on a standalone host, found by id or name.

use nubis_api::SshKey;
use rusqlite::{params, OptionalExtension, Row};

use super::{exists_or, Store, StoreError};

const SSH_KEY_COLUMNS: &str = "id, tenant_id, name, public_key, fingerprint, created_at";

fn ssh_key_from_row(row: &Row) -> rusqlite::Result<SshKey> {
    Ok(SshKey {
        id: row.get(0)?,
        tenant_id: row.get(1)?,
        name: row.get(2)?,
        public_key: row.get(3)?,
        fingerprint: row.get(4)?,
        created_at: row.get(5)?,
    })
}

impl Store {
    /// Records `key` if its tenant holds fewer than `limit` keys (counted
    /// and inserted in one transaction).
    pub fn create_ssh_key(&self, key: &SshKey, limit: usize) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let held: u64 = tx.query_row(
            "SELECT COUNT(*) FROM ssh_keys WHERE tenant_id = ?1",
            [&key.tenant_id],
            |row| row.get(0),
        )?;
        if held >= limit as u64 {
            return Err(StoreError::Quota(format!(
                "the tenant holds {held} SSH keys, the most it may"
            )));
        }
        tx.execute(
            &format!("INSERT INTO ssh_keys ({SSH_KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
            params![
                key.id,
                key.tenant_id,
                key.name,
                key.public_key,
                key.fingerprint,
                key.created_at
            ],
        )
        .map_err(|err| exists_or(err, || format!("SSH key '{}'", key.name)))?;
        tx.commit()?;
        Ok(())
    }

    /// Key `id_or_name` of `tenant_id` (any tenant's by id for None).
    pub fn get_ssh_key(
        &self,
        tenant_id: Option<&str>,
        id_or_name: &str,
    ) -> Result<Option<SshKey>, StoreError> {
        let conn = self.conn();
        let found = match tenant_id {
            Some(tenant_id) => conn.query_row(
                &format!(
                    "SELECT {SSH_KEY_COLUMNS} FROM ssh_keys
                     WHERE tenant_id = ?1 AND (id = ?2 OR name = ?2)"
                ),
                [tenant_id, id_or_name],
                ssh_key_from_row,
            ),
            None => conn.query_row(
                &format!("SELECT {SSH_KEY_COLUMNS} FROM ssh_keys WHERE id = ?1"),
                [id_or_name],
                ssh_key_from_row,
            ),
        };
        Ok(found.optional()?)
    }

    /// The keys of `tenant_id` (every tenant's for None), oldest first.
    pub fn list_ssh_keys(&self, tenant_id: Option<&str>) -> Result<Vec<SshKey>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {SSH_KEY_COLUMNS} FROM ssh_keys
             WHERE ?1 IS NULL OR tenant_id = ?1 ORDER BY created_at, id"
        ))?;
        let keys = statement
            .query_map([tenant_id], ssh_key_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(keys)
    }

    /// Deletes key `id`; false when there was none.
    pub fn delete_ssh_key(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM ssh_keys WHERE id = ?1", [id])?
            > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, id: &str, name: &str) -> SshKey {
        SshKey {
            id: id.into(),
            tenant_id: tenant.into(),
            name: name.into(),
            public_key: "ssh-ed25519 AAAA".into(),
            fingerprint: "SHA256:x".into(),
            created_at: 1,
        }
    }

    #[test]
    fn keys_are_per_tenant_unique_by_name_and_limited() {
        let (store, tenant, _) = crate::store::fixture();
        store
            .create_ssh_key(&key(&tenant, "key-1", "laptop"), 2)
            .unwrap();
        assert!(matches!(
            store.create_ssh_key(&key(&tenant, "key-2", "laptop"), 2),
            Err(StoreError::Exists(_))
        ));
        store
            .create_ssh_key(&key(&tenant, "key-3", "ci"), 2)
            .unwrap();
        assert!(matches!(
            store.create_ssh_key(&key(&tenant, "key-4", "more"), 2),
            Err(StoreError::Quota(_))
        ));
        assert_eq!(
            store
                .get_ssh_key(Some(&tenant), "laptop")
                .unwrap()
                .unwrap()
                .id,
            "key-1"
        );
        assert!(store
            .get_ssh_key(Some("t-other"), "key-1")
            .unwrap()
            .is_none());
        assert_eq!(store.list_ssh_keys(Some(&tenant)).unwrap().len(), 2);
        assert_eq!(store.list_ssh_keys(Some("t-other")).unwrap().len(), 0);
        assert!(store.delete_ssh_key("key-1").unwrap());
        assert!(!store.delete_ssh_key("key-1").unwrap());
        assert_eq!(store.list_ssh_keys(None).unwrap().len(), 1);
    }
}
