//! Peer hosts (`/v1/peers`): name, underlay address, peer API port and
//! certificate fingerprint. No credential of a peer's is kept: hosts
//! authenticate each other by their certificates (`peer_tls`).

use nubis_api::Peer;
use rusqlite::{params, OptionalExtension, Row};

use super::{exists_or, now, Store, StoreError};

/// A registered peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRow {
    pub host: Peer,
}

const HOST_COLUMNS: &str = "name, address, peer_port, created_at, fingerprint";

fn peer_from_row(row: &Row) -> rusqlite::Result<PeerRow> {
    Ok(PeerRow {
        host: Peer {
            name: row.get(0)?,
            address: row.get(1)?,
            peer_port: row.get(2)?,
            created_at: row.get(3)?,
            fingerprint: row.get(4)?,
        },
    })
}

impl Store {
    /// Registers a peer; its name, address and fingerprint are unique.
    pub fn create_host(
        &self,
        name: &str,
        address: &str,
        peer_port: u16,
        fingerprint: &str,
    ) -> Result<Peer, StoreError> {
        let host = Peer {
            name: name.to_string(),
            address: address.to_string(),
            peer_port,
            fingerprint: fingerprint.to_string(),
            created_at: now(),
        };
        self.conn()
            .execute(
                "INSERT INTO hosts (name, address, api_url, token, created_at, peer_port, fingerprint)
                 VALUES (?1, ?2, '', '', ?3, ?4, ?5)",
                params![host.name, host.address, host.created_at, host.peer_port, host.fingerprint],
            )
            .map_err(|err| {
                exists_or(err, || {
                    format!("host '{name}', address {address} or fingerprint {fingerprint}")
                })
            })?;
        Ok(host)
    }

    /// A peer by name or underlay address.
    pub fn get_host(&self, name_or_address: &str) -> Result<Option<PeerRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = ?1 OR address = ?1"),
                [name_or_address],
                peer_from_row,
            )
            .optional()?)
    }

    pub fn list_hosts(&self) -> Result<Vec<Peer>, StoreError> {
        let conn = self.conn();
        let mut statement =
            conn.prepare(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name"))?;
        let hosts = statement
            .query_map([], |row| peer_from_row(row).map(|peer| peer.host))?
            .collect::<Result<_, _>>()?;
        Ok(hosts)
    }

    /// Removes a peer; refused while a network spans it.
    pub fn delete_host(&self, name: &str) -> Result<bool, StoreError> {
        let Some(peer) = self.get_host(name)? else {
            return Ok(false);
        };
        let spanning: Vec<String> = self
            .list_networks(None)?
            .into_iter()
            .filter(|net| {
                net.overlay
                    .as_ref()
                    .is_some_and(|overlay| overlay.hosts.contains(&peer.host.address))
            })
            .map(|net| net.id)
            .collect();
        if !spanning.is_empty() {
            return Err(StoreError::InUse(format!(
                "host '{}' carries network(s) {}: delete them first",
                peer.host.name,
                spanning.join(", ")
            )));
        }
        Ok(self
            .conn()
            .execute("DELETE FROM hosts WHERE name = ?1", [&peer.host.name])?
            > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_unique_by_name_address_and_fingerprint() {
        let store = Store::open_in_memory().unwrap();
        let (fp_b, fp_c) = ("b".repeat(64), "c".repeat(64));
        let b = store.create_host("b", "192.0.2.2", 7443, &fp_b).unwrap();
        assert!(matches!(
            store.create_host("b", "192.0.2.3", 7443, &fp_c),
            Err(StoreError::Exists(_))
        ));
        assert!(matches!(
            store.create_host("c", "192.0.2.2", 7443, &fp_c),
            Err(StoreError::Exists(_))
        ));
        assert!(matches!(
            store.create_host("c", "192.0.2.3", 7443, &fp_b),
            Err(StoreError::Exists(_))
        ));
        let peer = store.get_host("192.0.2.2").unwrap().unwrap();
        assert_eq!(peer.host, b);
        assert_eq!(store.get_host("b").unwrap().unwrap().host, b);
        assert_eq!(store.list_hosts().unwrap(), vec![b]);
        assert!(store.delete_host("b").unwrap());
        assert!(!store.delete_host("b").unwrap());
        assert!(store.list_hosts().unwrap().is_empty());
    }
}
