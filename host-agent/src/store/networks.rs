//! Tenant virtual networks. Their CIDRs may not overlap on a host (each is
//! a bridge with the gateway address in the host's routing table), nor the
//! range the agent keeps for its default tenant bridges; each gets a VXLAN
//! network identifier for the overlay.

use nubis_api::{Network, NetworkCreate};
use rusqlite::{params, OptionalExtension, Row};

use super::{exists_or, new_id, now, Store, StoreError};
use crate::ipv4::Cidr;

/// The range of the per-tenant default bridges (see `network.rs`).
pub const RESERVED: &str = "10.88.0.0/16";
/// The first VXLAN network identifier handed out.
const FIRST_VNI: u32 = 4096;

const NETWORK_COLUMNS: &str = "id, tenant_id, name, cidr, nat, vni, created_at, dhcp, dns, mtu";

fn network_from_row(row: &Row) -> rusqlite::Result<Network> {
    let cidr: String = row.get(3)?;
    let gateway = cidr
        .parse::<Cidr>()
        .map(|cidr| cidr.gateway().to_string())
        .unwrap_or_default();
    let vni: u32 = row.get(5)?;
    let dns: String = row.get(8)?;
    Ok(Network {
        id: row.get(0)?,
        tenant_id: row.get(1)?,
        name: row.get(2)?,
        cidr,
        gateway,
        nat: row.get(4)?,
        dhcp: row.get(7)?,
        dns: dns
            .split(',')
            .filter(|server| !server.is_empty())
            .map(str::to_string)
            .collect(),
        mtu: row.get(9)?,
        vni,
        bridge: crate::network::network_bridge_name(vni),
        created_at: row.get(6)?,
    })
}

impl Store {
    /// Defines a network; `cidr`, `dns` and `mtu` are already validated.
    /// Refused when it overlaps another network on this host or the
    /// reserved range.
    pub fn create_network(
        &self,
        tenant_id: &str,
        request: &NetworkCreate,
        cidr: Cidr,
        dns: Vec<String>,
        mtu: u16,
    ) -> Result<Network, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let reserved: Cidr = RESERVED
            .parse()
            .map_err(|err: String| StoreError::Corrupt(err))?;
        if cidr.overlaps(&reserved) {
            return Err(StoreError::InUse(format!(
                "{cidr} overlaps {RESERVED}, which the agent keeps for default tenant bridges"
            )));
        }
        let existing: Vec<(String, u32)> = tx
            .prepare("SELECT cidr, vni FROM networks")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        if let Some((other, _)) = existing.iter().find(|(other, _)| {
            other
                .parse::<Cidr>()
                .is_ok_and(|other| other.overlaps(&cidr))
        }) {
            return Err(StoreError::InUse(format!(
                "{cidr} overlaps network {other} on this host"
            )));
        }
        let used: std::collections::HashSet<u32> = existing.iter().map(|(_, vni)| *vni).collect();
        let vni = (FIRST_VNI..(1 << 24))
            .find(|vni| !used.contains(vni))
            .ok_or_else(|| StoreError::Quota("no VXLAN network identifier left".into()))?;
        let network = Network {
            id: new_id("net"),
            tenant_id: tenant_id.to_string(),
            name: request.name.clone(),
            cidr: cidr.to_string(),
            gateway: cidr.gateway().to_string(),
            nat: request.nat,
            dhcp: request.dhcp,
            dns,
            mtu,
            vni,
            bridge: crate::network::network_bridge_name(vni),
            created_at: now(),
        };
        tx.execute(
            &format!(
                "INSERT INTO networks ({NETWORK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ),
            params![
                network.id,
                network.tenant_id,
                network.name,
                network.cidr,
                network.nat,
                network.vni,
                network.created_at,
                network.dhcp,
                network.dns.join(","),
                network.mtu
            ],
        )
        .map_err(|err| exists_or(err, || format!("network '{}'", request.name)))?;
        tx.commit()?;
        Ok(network)
    }

    /// A network by id or name; with `tenant_id`, only that tenant's.
    pub fn get_network(
        &self,
        tenant_id: Option<&str>,
        id_or_name: &str,
    ) -> Result<Option<Network>, StoreError> {
        let conn = self.conn();
        Ok(match tenant_id {
            Some(tenant) => conn
                .query_row(
                    &format!("SELECT {NETWORK_COLUMNS} FROM networks WHERE tenant_id = ?1 AND (id = ?2 OR name = ?2)"),
                    [tenant, id_or_name],
                    network_from_row,
                )
                .optional()?,
            None => conn
                .query_row(
                    &format!("SELECT {NETWORK_COLUMNS} FROM networks WHERE id = ?1"),
                    [id_or_name],
                    network_from_row,
                )
                .optional()?,
        })
    }

    pub fn list_networks(&self, tenant_id: Option<&str>) -> Result<Vec<Network>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {NETWORK_COLUMNS} FROM networks WHERE (?1 IS NULL OR tenant_id = ?1) ORDER BY created_at, id"
        ))?;
        let networks = statement
            .query_map(params![tenant_id], network_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(networks)
    }

    pub fn delete_network(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM networks WHERE id = ?1", [id])?
            > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::Quota;

    fn request(name: &str, cidr: &str) -> (NetworkCreate, Cidr) {
        (
            NetworkCreate {
                name: name.into(),
                cidr: cidr.into(),
                nat: false,
                dhcp: true,
                dns: None,
                mtu: None,
            },
            cidr.parse().unwrap(),
        )
    }

    fn create(
        store: &Store,
        tenant: &str,
        (request, cidr): &(NetworkCreate, Cidr),
    ) -> Result<Network, StoreError> {
        store.create_network(tenant, request, *cidr, vec!["192.0.2.53".into()], 1500)
    }

    #[test]
    fn networks_do_not_overlap_and_get_distinct_vnis() {
        let store = Store::open_in_memory().unwrap();
        let acme = store.create_tenant("acme", Quota::default()).unwrap();
        let globex = store.create_tenant("globex", Quota::default()).unwrap();
        let front = create(&store, &acme.id, &request("front", "10.10.0.0/24")).unwrap();
        assert_eq!(
            (front.gateway.as_str(), front.vni),
            ("10.10.0.1", FIRST_VNI)
        );
        assert_eq!(front.bridge, "nbn4096");
        assert_eq!(front.dns, ["192.0.2.53"]);
        assert!(front.dhcp);
        let err = create(&store, &globex.id, &request("back", "10.10.0.128/25")).unwrap_err();
        assert!(
            err.to_string().contains("overlaps network 10.10.0.0/24"),
            "{err}"
        );
        assert!(matches!(
            create(&store, &acme.id, &request("res", "10.88.4.0/24")),
            Err(StoreError::InUse(_))
        ));
        let d = request("front", "10.20.0.0/24");
        assert!(matches!(
            create(&store, &acme.id, &d),
            Err(StoreError::Exists(_))
        ));
        let back = create(&store, &globex.id, &d).unwrap();
        assert_eq!(back.vni, FIRST_VNI + 1);
        assert_eq!(
            store.get_network(Some(&acme.id), "front").unwrap(),
            Some(front.clone())
        );
        assert_eq!(
            store.get_network(Some(&globex.id), &front.id).unwrap(),
            None
        );
        assert_eq!(store.list_networks(None).unwrap().len(), 2);
        assert_eq!(store.list_networks(Some(&globex.id)).unwrap(), vec![back]);
        assert!(store.delete_network(&front.id).unwrap());
        assert!(store.get_network(None, &front.id).unwrap().is_none());
    }
}
