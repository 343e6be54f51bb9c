//! Tenants and their API tokens. A token is 256 random bits shown once;
//! only its SHA-256 is stored, so a leaked database leaks no credential.

use nubis_api::{Quota, TokenCreated, TokenInfo};
use rusqlite::{params, OptionalExtension, Row};
use sha2::{Digest, Sha256};

use super::{exists_or, new_id, now, random_hex, Store, StoreError};

/// The stored form of a token.
/// What [`Store::mirror_tenants`] left behind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mirrored {
    /// Tenants the cluster no longer has that still hold something here.
    pub kept: Vec<String>,
    /// The default-bridge subnets of the tenants that went (their bridges
    /// are to be removed).
    pub freed_subnets: Vec<u8>,
}

pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tenant as stored (the API's `Tenant` is made from it by the service
/// layer, `service::tenants`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub quota: Quota,
    /// Seconds since the epoch.
    pub created_at: u64,
}

fn tenant_from_row(row: &Row) -> rusqlite::Result<TenantRow> {
    Ok(TenantRow {
        id: row.get(0)?,
        name: row.get(1)?,
        quota: Quota {
            max_vcpus: row.get(2)?,
            max_memory_mib: row.get(3)?,
            max_vms: row.get(4)?,
            max_networks: row.get(6)?,
            max_port_forwards: row.get(7)?,
            max_snapshots: row.get(8)?,
            max_storage_mib: row.get(9)?,
        },
        created_at: row.get(5)?,
    })
}

const TENANT_COLUMNS: &str = "id, name, max_vcpus, max_memory_mib, max_vms, created_at, \
     max_networks, max_port_forwards, max_snapshots, max_storage_mib";

impl Store {
    pub fn create_tenant(&self, name: &str, quota: Quota) -> Result<TenantRow, StoreError> {
        let tenant = TenantRow {
            id: new_id("t")?,
            name: name.to_string(),
            quota,
            created_at: now(),
        };
        self.create_tenant_with_id(&tenant)?;
        Ok(tenant)
    }

    /// Records `tenant` as it is: a tenant replicated from the home host of
    /// one of its overlay networks keeps its id on every host.
    pub fn create_tenant_with_id(&self, tenant: &TenantRow) -> Result<(), StoreError> {
        let (name, quota) = (&tenant.name, tenant.quota);
        self.conn()
            .execute(
                &format!("INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    tenant.id,
                    tenant.name,
                    quota.max_vcpus,
                    quota.max_memory_mib,
                    quota.max_vms,
                    tenant.created_at,
                    quota.max_networks,
                    quota.max_port_forwards,
                    quota.max_snapshots,
                    quota.max_storage_mib
                ],
            )
            .map_err(|err| exists_or(err, || format!("tenant '{name}'")))?;
        Ok(())
    }

    pub fn get_tenant(&self, id: &str) -> Result<Option<TenantRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?1"),
                [id],
                tenant_from_row,
            )
            .optional()?)
    }

    pub fn list_tenants(&self) -> Result<Vec<TenantRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants ORDER BY created_at, id"
        ))?;
        let tenants = statement
            .query_map([], tenant_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(tenants)
    }

    /// Deletes a tenant and its tokens; refused while it has VMs or images.
    pub fn delete_tenant(&self, id: &str) -> Result<bool, StoreError> {
        self.check_tenant_empty(id)?;
        Ok(self
            .conn()
            .execute("DELETE FROM tenants WHERE id = ?1", [id])?
            > 0)
    }

    /// Refuses, naming what is left, while tenant `id` holds VMs, images,
    /// networks or snapshots here.
    pub fn check_tenant_empty(&self, id: &str) -> Result<(), StoreError> {
        let owned: [u32; 4] = self.conn().query_row(
            "SELECT (SELECT COUNT(*) FROM vms WHERE tenant_id = ?1),
                    (SELECT COUNT(*) FROM images WHERE tenant_id = ?1),
                    (SELECT COUNT(*) FROM networks WHERE tenant_id = ?1),
                    (SELECT COUNT(*) FROM snapshots WHERE tenant_id = ?1)",
            [id],
            |row| Ok([row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?]),
        )?;
        let left: Vec<String> = owned
            .iter()
            .zip(["VM(s)", "image(s)", "network(s)", "snapshot(s)"])
            .filter(|(count, _)| **count > 0)
            .map(|(count, what)| format!("{count} {what}"))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(StoreError::InUse(format!(
                "tenant {id} still has {}: delete them first",
                left.join(", ")
            )))
        }
    }

    /// A new token for `tenant_id`; the secret is in the result only.
    pub fn create_token(&self, tenant_id: &str) -> Result<TokenCreated, StoreError> {
        let created = TokenCreated {
            id: new_id("tok")?,
            tenant_id: tenant_id.to_string(),
            token: format!("nbs_{}", random_hex(32)?),
            created_at: now(),
        };
        self.conn().execute(
            "INSERT INTO tokens (id, tenant_id, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                created.id,
                created.tenant_id,
                token_hash(&created.token),
                created.created_at
            ],
        )?;
        Ok(created)
    }

    pub fn list_tokens(&self, tenant_id: &str) -> Result<Vec<TokenInfo>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT id, tenant_id, created_at FROM tokens WHERE tenant_id = ?1
             ORDER BY created_at, id",
        )?;
        let tokens = statement
            .query_map([tenant_id], |row| {
                Ok(TokenInfo {
                    id: row.get(0)?,
                    tenant_id: row.get(1)?,
                    created_at: row.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(tokens)
    }

    pub fn delete_token(&self, tenant_id: &str, token_id: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM tokens WHERE id = ?1 AND tenant_id = ?2",
            [token_id, tenant_id],
        )? > 0)
    }

    /// Every token with the hash of its secret (what a host joining a
    /// cluster publishes).
    pub fn token_hashes(&self) -> Result<Vec<(TokenInfo, String)>, StoreError> {
        let conn = self.conn();
        let mut statement =
            conn.prepare("SELECT id, tenant_id, created_at, hash FROM tokens ORDER BY id")?;
        let tokens = statement
            .query_map([], |row| {
                Ok((
                    TokenInfo {
                        id: row.get(0)?,
                        tenant_id: row.get(1)?,
                        created_at: row.get(2)?,
                    },
                    row.get(3)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(tokens)
    }

    /// Makes the tenants and tokens those of the cluster (`tenants`, and
    /// `tokens` with their hashes), in one transaction. A tenant the
    /// cluster no longer has but that still holds something here is kept
    /// (without tokens).
    pub fn mirror_tenants(
        &self,
        tenants: &[TenantRow],
        tokens: &[(TokenInfo, String)],
    ) -> Result<Mirrored, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for tenant in tenants {
            let quota = tenant.quota;
            tx.execute(
                &format!(
                    "INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT(id) DO UPDATE SET name = ?2, max_vcpus = ?3, max_memory_mib = ?4,
                       max_vms = ?5, max_networks = ?7, max_port_forwards = ?8,
                       max_snapshots = ?9, max_storage_mib = ?10"
                ),
                params![
                    tenant.id,
                    tenant.name,
                    quota.max_vcpus,
                    quota.max_memory_mib,
                    quota.max_vms,
                    tenant.created_at,
                    quota.max_networks,
                    quota.max_port_forwards,
                    quota.max_snapshots,
                    quota.max_storage_mib
                ],
            )?;
        }
        tx.execute("DELETE FROM tokens", [])?;
        for (token, hash) in tokens {
            tx.execute(
                "INSERT INTO tokens (id, tenant_id, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![token.id, token.tenant_id, hash, token.created_at],
            )?;
        }
        let wanted: std::collections::HashSet<&str> =
            tenants.iter().map(|tenant| tenant.id.as_str()).collect();
        let local: Vec<String> = tx
            .prepare("SELECT id FROM tenants")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        let mut mirrored = Mirrored::default();
        for id in local.iter().filter(|id| !wanted.contains(id.as_str())) {
            if holds_anything(&tx, id)? {
                mirrored.kept.push(id.clone());
            } else {
                let subnet: Option<u8> = tx
                    .query_row(
                        "SELECT subnet FROM tenant_subnets WHERE tenant_id = ?1",
                        [id],
                        |row| row.get(0),
                    )
                    .optional()?;
                mirrored.freed_subnets.extend(subnet);
                tx.execute("DELETE FROM tenants WHERE id = ?1", [id])?;
            }
        }
        tx.commit()?;
        Ok(mirrored)
    }

    /// The tenants that hold anything on this host (VMs, images, networks,
    /// snapshots).
    pub fn tenants_holding(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT tenant_id FROM vms UNION SELECT tenant_id FROM images
             UNION SELECT tenant_id FROM networks UNION SELECT tenant_id FROM snapshots",
        )?;
        let holding = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(holding)
    }

    /// The tenant's subnet number (1 to 254), allocated lowest-first at the
    /// first call.
    pub fn tenant_subnet(&self, tenant_id: &str) -> Result<u8, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<u8> = tx
            .query_row(
                "SELECT subnet FROM tenant_subnets WHERE tenant_id = ?1",
                [tenant_id],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(subnet) = existing {
            return Ok(subnet);
        }
        let used: std::collections::HashSet<u8> = tx
            .prepare("SELECT subnet FROM tenant_subnets")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        let subnet = (1..=254u8)
            .find(|subnet| !used.contains(subnet))
            .ok_or_else(|| StoreError::Quota("every tenant subnet of this host is taken".into()))?;
        tx.execute(
            "INSERT INTO tenant_subnets (tenant_id, subnet) VALUES (?1, ?2)",
            params![tenant_id, subnet],
        )?;
        tx.commit()?;
        Ok(subnet)
    }

    /// Every tenant's subnet: (tenant id, subnet number).
    pub fn list_tenant_subnets(&self) -> Result<Vec<(String, u8)>, StoreError> {
        let conn = self.conn();
        let mut statement =
            conn.prepare("SELECT tenant_id, subnet FROM tenant_subnets ORDER BY subnet")?;
        let subnets = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(subnets)
    }

    /// The tenant's subnet if it has one.
    pub fn existing_tenant_subnet(&self, tenant_id: &str) -> Result<Option<u8>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT subnet FROM tenant_subnets WHERE tenant_id = ?1",
                [tenant_id],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// The tenant a token belongs to, if it is a known token.
    pub fn tenant_for_token(&self, token: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT tenant_id FROM tokens WHERE hash = ?1",
                [token_hash(token)],
                |row| row.get(0),
            )
            .optional()?)
    }
}

/// Whether tenant `id` holds anything on this host.
fn holds_anything(conn: &rusqlite::Connection, id: &str) -> Result<bool, StoreError> {
    Ok(conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM vms WHERE tenant_id = ?1)
             OR EXISTS(SELECT 1 FROM images WHERE tenant_id = ?1)
             OR EXISTS(SELECT 1 FROM networks WHERE tenant_id = ?1)
             OR EXISTS(SELECT 1 FROM snapshots WHERE tenant_id = ?1)",
        [id],
        |row| row.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_are_unique_by_name_and_listed() {
        let store = Store::open_in_memory().unwrap();
        let a = store.create_tenant("acme", Quota::default()).unwrap();
        assert!(matches!(
            store.create_tenant("acme", Quota::default()),
            Err(StoreError::Exists(_))
        ));
        let b = store.create_tenant("globex", Quota::default()).unwrap();
        assert_eq!(store.get_tenant(&a.id).unwrap(), Some(a.clone()));
        assert_eq!(store.list_tenants().unwrap().len(), 2);
        assert!(store.delete_tenant(&b.id).unwrap());
        assert!(!store.delete_tenant(&b.id).unwrap());
        assert_eq!(store.get_tenant(&b.id).unwrap(), None);
    }

    #[test]
    fn the_mirror_takes_the_clusters_tenants_and_tokens() {
        let (store, holder, _image) = crate::store::fixture();
        let idle = store.create_tenant("idle", Quota::default()).unwrap();
        let old_token = store.create_token(&idle.id).unwrap();
        let cluster = TenantRow {
            id: "t-00000000000000aa".into(),
            name: "from-etcd".into(),
            quota: Quota {
                max_vcpus: 7,
                ..Quota::default()
            },
            created_at: 5,
        };
        let mut renamed = store.get_tenant(&holder).unwrap().unwrap();
        renamed.quota.max_vms = 3;
        let token = TokenInfo {
            id: "tok-00000000000000bb".into(),
            tenant_id: cluster.id.clone(),
            created_at: 6,
        };
        let kept = store
            .mirror_tenants(
                &[cluster.clone(), renamed.clone()],
                &[(token.clone(), token_hash("secret"))],
            )
            .unwrap();
        assert!(kept.kept.is_empty(), "{kept:?}");
        assert_eq!(
            store.get_tenant(&cluster.id).unwrap(),
            Some(cluster.clone())
        );
        assert_eq!(store.get_tenant(&holder).unwrap().unwrap().quota.max_vms, 3);
        assert_eq!(
            store.get_tenant(&idle.id).unwrap(),
            None,
            "gone from the cluster"
        );
        assert_eq!(
            store.tenant_for_token("secret").unwrap(),
            Some(cluster.id.clone())
        );
        assert_eq!(store.tenant_for_token(&old_token.token).unwrap(), None);
        // The holder (it has an image here) stays when the cluster drops it.
        let kept = store
            .mirror_tenants(std::slice::from_ref(&cluster), &[])
            .unwrap();
        assert_eq!(kept.kept, vec![holder.clone()]);
        assert!(store.get_tenant(&holder).unwrap().is_some());
        assert_eq!(store.tenants_holding().unwrap(), [holder].into());
    }

    #[test]
    fn subnets_are_allocated_once_per_tenant_and_freed_with_it() {
        let store = Store::open_in_memory().unwrap();
        let a = store.create_tenant("a", Quota::default()).unwrap();
        let b = store.create_tenant("b", Quota::default()).unwrap();
        assert_eq!(store.existing_tenant_subnet(&a.id).unwrap(), None);
        assert_eq!(store.tenant_subnet(&a.id).unwrap(), 1);
        assert_eq!(store.tenant_subnet(&a.id).unwrap(), 1);
        assert_eq!(store.tenant_subnet(&b.id).unwrap(), 2);
        store.delete_tenant(&a.id).unwrap();
        let c = store.create_tenant("c", Quota::default()).unwrap();
        assert_eq!(
            store.tenant_subnet(&c.id).unwrap(),
            1,
            "a's subnet is free again"
        );
    }

    #[test]
    fn tokens_are_stored_hashed_and_resolve_to_their_tenant() {
        let store = Store::open_in_memory().unwrap();
        let tenant = store.create_tenant("acme", Quota::default()).unwrap();
        let token = store.create_token(&tenant.id).unwrap();
        assert!(token.token.starts_with("nbs_") && token.token.len() == 68);
        assert_eq!(
            store.tenant_for_token(&token.token).unwrap(),
            Some(tenant.id.clone())
        );
        assert_eq!(store.tenant_for_token("nbs_wrong").unwrap(), None);
        let stored: String = store
            .conn()
            .query_row("SELECT hash FROM tokens", [], |row| row.get(0))
            .unwrap();
        assert_ne!(stored, token.token, "the secret itself is not stored");
        assert_eq!(stored, token_hash(&token.token));
        assert_eq!(store.list_tokens(&tenant.id).unwrap().len(), 1);
        assert!(!store.delete_token("t-other", &token.id).unwrap());
        assert!(store.delete_token(&tenant.id, &token.id).unwrap());
        assert_eq!(store.tenant_for_token(&token.token).unwrap(), None);
        // Deleting a tenant takes its tokens with it.
        let again = store.create_token(&tenant.id).unwrap();
        assert!(store.delete_tenant(&tenant.id).unwrap());
        assert_eq!(store.tenant_for_token(&again.token).unwrap(), None);
    }
}
