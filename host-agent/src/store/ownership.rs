//! In a cluster, the ownership generation of `vms/{id}` each VM of this
//! host was defined (or taken over) at; none for a VM being received. A record whose host changed since
//! has a newer generation: the copy here was replaced elsewhere (a host
//! lost, then back) and is fenced off (`service/placed.rs`).

use rusqlite::OptionalExtension;

use super::{Store, StoreError};

impl Store {
    /// Records that VM `vm_id` runs here as of ownership `generation`.
    pub fn set_ownership(&self, vm_id: &str, generation: u64) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO vm_ownership (vm_id, generation) VALUES (?1, ?2)
             ON CONFLICT (vm_id) DO UPDATE SET generation = excluded.generation",
            rusqlite::params![vm_id, generation],
        )?;
        Ok(())
    }

    /// The generation VM `vm_id` was defined or taken over here at; None
    /// while this host does not own it (a VM being received).
    pub fn ownership(&self, vm_id: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT generation FROM vm_ownership WHERE vm_id = ?1",
                [vm_id],
                |row| row.get(0),
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ownership_is_kept_per_vm_and_goes_with_it() {
        let (store, tenant, image) = crate::store::fixture();
        let vm = crate::store::fixture_vm(&store, &tenant, &image, "web", vec![]);
        assert_eq!(store.ownership(&vm.id).unwrap(), None);
        store.set_ownership(&vm.id, 3).unwrap();
        store.set_ownership(&vm.id, 4).unwrap();
        assert_eq!(store.ownership(&vm.id).unwrap(), Some(4));
        store.delete_vm(&vm.id).unwrap();
        assert_eq!(store.ownership(&vm.id).unwrap(), None);
    }
}
