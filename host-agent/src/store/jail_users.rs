//! Each VM's own unprivileged user (and group, the same number) that its
//! jailed VMM runs as: two VMs never share one, so that one VMM cannot
//! touch another's files or signal its process. Taken from a configured
//! range at a VM's first start, kept while the VM exists.

use rusqlite::OptionalExtension;

use super::{Store, StoreError};

impl Store {
    /// VM `vm_id`'s uid: the one it has, or the lowest free one in
    /// `first..first + count`.
    pub fn jail_uid(&self, vm_id: &str, first: u32, count: u32) -> Result<u32, StoreError> {
        let conn = self.conn();
        let known: Option<u32> = conn
            .query_row(
                "SELECT uid FROM jail_users WHERE vm_id = ?1",
                [vm_id],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(uid) = known {
            return Ok(uid);
        }
        let last = u64::from(first) + u64::from(count);
        // The lowest uid in the range that no VM has: the range's first, or
        // one above a taken one.
        let free: Option<u32> = conn
            .query_row(
                "SELECT candidate FROM (
                    SELECT ?1 AS candidate
                    UNION SELECT uid + 1 FROM jail_users WHERE uid >= ?1 AND uid + 1 < ?2
                 )
                 WHERE candidate < ?2
                   AND candidate NOT IN (SELECT uid FROM jail_users)
                 ORDER BY candidate LIMIT 1",
                rusqlite::params![first, last],
                |row| row.get(0),
            )
            .optional()?;
        let uid = free.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "no free jail uid left in {first}..{last}: raise jail_uid_count"
            ))
        })?;
        conn.execute(
            "INSERT INTO jail_users (vm_id, uid) VALUES (?1, ?2)",
            rusqlite::params![vm_id, uid],
        )?;
        Ok(uid)
    }

    /// Gives VM `vm_id`'s uid back (the VM is deleted).
    pub fn release_jail_uid(&self, vm_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM jail_users WHERE vm_id = ?1", [vm_id])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vm_has_its_own_uid_and_freed_ones_come_back() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.jail_uid("a", 1000, 3).unwrap(), 1000);
        assert_eq!(store.jail_uid("b", 1000, 3).unwrap(), 1001);
        // Asked again: the same.
        assert_eq!(store.jail_uid("a", 1000, 3).unwrap(), 1000);
        assert_eq!(store.jail_uid("c", 1000, 3).unwrap(), 1002);
        let full = store.jail_uid("d", 1000, 3).unwrap_err().to_string();
        assert!(full.contains("1000..1003"), "{full}");
        store.release_jail_uid("a").unwrap();
        assert_eq!(store.jail_uid("d", 1000, 3).unwrap(), 1000);
        store.release_jail_uid("b").unwrap();
        assert_eq!(store.jail_uid("e", 1000, 3).unwrap(), 1001);
    }
}
