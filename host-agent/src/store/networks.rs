//! Tenant virtual networks. Their CIDRs may not overlap on a host (each is
//! a bridge with the gateway address in the host's routing table), nor the
//! range the agent keeps for its default tenant bridges; each gets a VXLAN
//! network identifier for the overlay. An overlay network is the same row,
//! id and VNI on every host that carries it: created on its home host,
//! adopted by the others; the home records the addresses it granted to the
//! other hosts' VMs.

use std::net::Ipv4Addr;

use nubis_api::{NetworkCreate, Overlay};
use rusqlite::{params, OptionalExtension, Row};

use super::{exists_or, new_id, now, Store, StoreError};
use crate::ipv4::Cidr;

/// The range of the per-tenant default bridges (see `network.rs`).
pub const RESERVED: &str = "10.88.0.0/16";
/// The first VXLAN network identifier handed out to a network of this
/// host alone.
const FIRST_VNI: u32 = 4096;
/// Overlay networks draw their VNI at random from the upper range, so that
/// the hosts they span (which allocate independently) rarely hold it
/// already; a host that does refuses the network.
const OVERLAY_VNIS: std::ops::Range<u32> = (1 << 20)..(1 << 24);

const NETWORK_COLUMNS: &str =
    "id, tenant_id, name, cidr, nat, vni, created_at, dhcp, dns, mtu, overlay_home, overlay_hosts";

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

/// A network as stored (the API's `Network` is made from it by the
/// service layer, `service::networks`; the host network renders bridges,
/// rules and DHCP from it). The gateway, bridge and VXLAN names are derived
/// from the CIDR and VNI, not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRow {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub cidr: String,
    pub gateway: String,
    pub nat: bool,
    pub dhcp: bool,
    pub dns: Vec<String>,
    pub mtu: u16,
    pub vni: u32,
    pub bridge: String,
    /// Where it spans hosts: its home and member hosts, and its VXLAN
    /// interface here.
    pub overlay: Option<Overlay>,
    /// Seconds since the epoch.
    pub created_at: u64,
}

fn network_from_row(row: &Row) -> rusqlite::Result<NetworkRow> {
    let cidr: String = row.get(3)?;
    let gateway = cidr
        .parse::<Cidr>()
        .map(|cidr| cidr.gateway().to_string())
        .unwrap_or_default();
    let vni: u32 = row.get(5)?;
    let dns: String = row.get(8)?;
    let home: Option<String> = row.get(10)?;
    let hosts: String = row.get(11)?;
    let overlay = home.map(|home| Overlay {
        home,
        hosts: split_list(&hosts),
        vxlan: crate::network::vxlan_name(vni).to_string(),
    });
    Ok(NetworkRow {
        id: row.get(0)?,
        tenant_id: row.get(1)?,
        name: row.get(2)?,
        cidr,
        gateway,
        nat: row.get(4)?,
        dhcp: row.get(7)?,
        dns: split_list(&dns),
        mtu: row.get(9)?,
        vni,
        bridge: crate::network::network_bridge_name(vni).to_string(),
        overlay,
        created_at: row.get(6)?,
    })
}

/// Refuses `cidr` when it overlaps the reserved range or another network
/// of this host; returns the VNIs in use. Only `tenant_id`'s own networks
/// are named in the refusal: another tenant's CIDR is not the asker's to
/// learn.
fn check_free(
    tx: &rusqlite::Transaction,
    tenant_id: &str,
    cidr: Cidr,
) -> Result<std::collections::HashSet<u32>, StoreError> {
    let reserved: Cidr = RESERVED
        .parse()
        .map_err(|err: String| StoreError::Corrupt(err))?;
    if cidr.overlaps(&reserved) {
        return Err(StoreError::InUse(format!(
            "{cidr} overlaps {RESERVED}, which the agent keeps for default tenant bridges"
        )));
    }
    let existing: Vec<(String, String, String, u32)> = tx
        .prepare("SELECT tenant_id, name, cidr, vni FROM networks")?
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    let clash = existing.iter().find(|(_, _, other, _)| {
        other
            .parse::<Cidr>()
            .is_ok_and(|other| other.overlaps(&cidr))
    });
    if let Some((owner, name, other, _)) = clash {
        return Err(StoreError::InUse(if owner == tenant_id {
            format!("{cidr} overlaps your network '{name}' ({other})")
        } else {
            format!("{cidr} overlaps an address range in use on this host: choose another")
        }));
    }
    Ok(existing.iter().map(|(_, _, _, vni)| *vni).collect())
}

fn insert(tx: &rusqlite::Transaction, network: &NetworkRow) -> Result<(), StoreError> {
    let (home, hosts) = match &network.overlay {
        Some(overlay) => (Some(overlay.home.as_str()), overlay.hosts.join(",")),
        None => (None, String::new()),
    };
    tx.execute(
        &format!(
            "INSERT INTO networks ({NETWORK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
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
            network.mtu,
            home,
            hosts
        ],
    )
    .map_err(|err| exists_or(err, || format!("network '{}' (or its VNI {})", network.name, network.vni)))?;
    Ok(())
}

/// A random VNI of the overlay range that `used` does not hold.
pub fn random_overlay_vni(used: &std::collections::HashSet<u32>) -> Result<u32, StoreError> {
    for _ in 0..64 {
        let bytes = super::random_hex(4)?;
        let random = u32::from_str_radix(&bytes, 16).unwrap_or_default();
        let vni = OVERLAY_VNIS.start + random % (OVERLAY_VNIS.end - OVERLAY_VNIS.start);
        if !used.contains(&vni) {
            return Ok(vni);
        }
    }
    Err(StoreError::Quota(
        "no free VXLAN network identifier found".into(),
    ))
}

impl Store {
    /// Defines a network; `cidr`, `dns` and `mtu` are already validated.
    /// Refused when it overlaps another network on this host or the
    /// reserved range. With `overlay` (home and member hosts' underlay
    /// addresses) it spans hosts and gets a VNI from the overlay range.
    #[allow(clippy::too_many_arguments)] // each is checked and stored as is
    pub fn create_network(
        &self,
        tenant_id: &str,
        request: &NetworkCreate,
        cidr: Cidr,
        dns: Vec<String>,
        mtu: u16,
        overlay: Option<(String, Vec<String>)>,
        max_networks: u32,
    ) -> Result<NetworkRow, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let count: u32 = tx.query_row(
            "SELECT COUNT(*) FROM networks WHERE tenant_id = ?1",
            [tenant_id],
            |row| row.get(0),
        )?;
        if count >= max_networks {
            return Err(StoreError::Quota(format!(
                "networks: {count} in use + 1 requested exceeds the tenant's quota of {max_networks}"
            )));
        }
        let used = check_free(&tx, tenant_id, cidr)?;
        let vni = match overlay {
            Some(_) => random_overlay_vni(&used)?,
            None => (FIRST_VNI..OVERLAY_VNIS.start)
                .find(|vni| !used.contains(vni))
                .ok_or_else(|| StoreError::Quota("no VXLAN network identifier left".into()))?,
        };
        let network = NetworkRow {
            id: new_id("net")?,
            tenant_id: tenant_id.to_string(),
            name: request.name.clone(),
            cidr: cidr.to_string(),
            gateway: cidr.gateway().to_string(),
            nat: request.nat,
            dhcp: request.dhcp,
            dns,
            mtu,
            vni,
            bridge: crate::network::network_bridge_name(vni).to_string(),
            overlay: overlay.map(|(home, hosts)| Overlay {
                home,
                hosts,
                vxlan: crate::network::vxlan_name(vni).to_string(),
            }),
            created_at: now(),
        };
        insert(&tx, &network)?;
        tx.commit()?;
        Ok(network)
    }

    /// Takes on an overlay network from its home host, as it is there (the
    /// same id, VNI and CIDR), or updates the member hosts of one already
    /// taken on. Refused when it clashes with a network of this host.
    pub fn adopt_network(&self, network: &NetworkRow) -> Result<NetworkRow, StoreError> {
        let overlay = network.overlay.as_ref().ok_or_else(|| {
            StoreError::InUse(format!("network {} does not span hosts", network.id))
        })?;
        let cidr: Cidr = network
            .cidr
            .parse()
            .map_err(|err: String| StoreError::InUse(format!("network {}: {err}", network.id)))?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let known: Option<(String, u32)> = tx
            .query_row(
                "SELECT cidr, vni FROM networks WHERE id = ?1",
                [&network.id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        match known {
            Some((known_cidr, known_vni)) => {
                if known_cidr != network.cidr || known_vni != network.vni {
                    return Err(StoreError::InUse(format!(
                        "network {} is here with CIDR {known_cidr} and VNI {known_vni}",
                        network.id
                    )));
                }
                tx.execute(
                    "UPDATE networks SET overlay_home = ?2, overlay_hosts = ?3 WHERE id = ?1",
                    params![network.id, overlay.home, overlay.hosts.join(",")],
                )?;
            }
            None => {
                let used = check_free(&tx, &network.tenant_id, cidr)?;
                if used.contains(&network.vni) {
                    return Err(StoreError::InUse(format!(
                        "VNI {} is taken by another network on this host",
                        network.vni
                    )));
                }
                let mut adopted = network.clone();
                adopted.bridge = crate::network::network_bridge_name(network.vni).to_string();
                if let Some(overlay) = &mut adopted.overlay {
                    overlay.vxlan = crate::network::vxlan_name(network.vni).to_string();
                }
                insert(&tx, &adopted)?;
            }
        }
        tx.commit()?;
        drop(conn);
        self.get_network(None, &network.id)?
            .ok_or_else(|| StoreError::Corrupt(format!("network {} vanished", network.id)))
    }

    /// Records that the home host granted `address` of an overlay network
    /// to VM `vm` (its name) on host `host`.
    pub fn grant_address(
        &self,
        network_id: &str,
        address: Ipv4Addr,
        host: &str,
        vm: &str,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO address_grants (network_id, address, host, vm, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![network_id, address.to_string(), host, vm, now()],
            )
            .map_err(|err| exists_or(err, || format!("address {address}")))?;
        Ok(())
    }

    /// The addresses of `network_id` granted to other hosts' VMs.
    pub fn granted_addresses(&self, network_id: &str) -> Result<Vec<Ipv4Addr>, StoreError> {
        let conn = self.conn();
        let mut statement =
            conn.prepare("SELECT address FROM address_grants WHERE network_id = ?1")?;
        let addresses: Vec<String> = statement
            .query_map([network_id], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        addresses
            .iter()
            .map(|address| {
                address
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("granted address '{address}'")))
            })
            .collect()
    }

    /// Takes back a granted address, if `host` holds it.
    pub fn release_address(
        &self,
        network_id: &str,
        address: Ipv4Addr,
        host: &str,
    ) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM address_grants WHERE network_id = ?1 AND address = ?2 AND host = ?3",
            params![network_id, address.to_string(), host],
        )? > 0)
    }

    /// A network by id or name; with `tenant_id`, only that tenant's.
    pub fn get_network(
        &self,
        tenant_id: Option<&str>,
        id_or_name: &str,
    ) -> Result<Option<NetworkRow>, StoreError> {
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

    pub fn list_networks(&self, tenant_id: Option<&str>) -> Result<Vec<NetworkRow>, StoreError> {
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
                hosts: vec![],
            },
            cidr.parse().unwrap(),
        )
    }

    fn create(
        store: &Store,
        tenant: &str,
        (request, cidr): &(NetworkCreate, Cidr),
    ) -> Result<NetworkRow, StoreError> {
        store.create_network(
            tenant,
            request,
            *cidr,
            vec!["192.0.2.53".into()],
            1500,
            None,
            3,
        )
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
        // Another tenant's network is refused without being revealed; the
        // tenant's own is named.
        let err = create(&store, &globex.id, &request("back", "10.10.0.128/25")).unwrap_err();
        assert!(matches!(err, StoreError::InUse(_)), "{err}");
        assert!(
            !err.to_string().contains("10.10.0.0") && !err.to_string().contains("front"),
            "{err}"
        );
        let err = create(&store, &acme.id, &request("back", "10.10.0.128/25")).unwrap_err();
        assert!(
            err.to_string()
                .contains("your network 'front' (10.10.0.0/24)"),
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

    #[test]
    fn a_tenant_has_at_most_its_quota_of_networks() {
        let store = Store::open_in_memory().unwrap();
        let acme = store.create_tenant("acme", Quota::default()).unwrap();
        let globex = store.create_tenant("globex", Quota::default()).unwrap();
        for index in 0..3 {
            let name = format!("n{index}");
            create(
                &store,
                &acme.id,
                &request(&name, &format!("10.1{index}.0.0/24")),
            )
            .unwrap();
        }
        let err = create(&store, &acme.id, &request("n3", "10.13.0.0/24")).unwrap_err();
        assert!(matches!(err, StoreError::Quota(_)), "{err}");
        // Another tenant's count is its own.
        create(&store, &globex.id, &request("n3", "10.13.0.0/24")).unwrap();
    }

    #[test]
    fn overlay_networks_are_adopted_as_they_are_and_grant_addresses() {
        let home = Store::open_in_memory().unwrap();
        let acme = home.create_tenant("acme", Quota::default()).unwrap();
        let (span_request, cidr) = request("span", "10.60.0.0/24");
        let hosts = vec!["192.0.2.1".to_string(), "192.0.2.2".to_string()];
        let span = home
            .create_network(
                &acme.id,
                &span_request,
                cidr,
                vec![],
                1450,
                Some(("192.0.2.1".into(), hosts.clone())),
                8,
            )
            .unwrap();
        assert!(OVERLAY_VNIS.contains(&span.vni), "{}", span.vni);
        let overlay = span.overlay.clone().unwrap();
        assert_eq!(
            (overlay.home.as_str(), &overlay.hosts),
            ("192.0.2.1", &hosts)
        );
        assert_eq!(overlay.vxlan, format!("nvx{}", span.vni));
        assert_eq!(
            home.get_network(None, &span.id).unwrap(),
            Some(span.clone())
        );

        // The peer takes it on as it is, once, and sees membership changes.
        let peer = Store::open_in_memory().unwrap();
        peer.create_tenant_with_id(&acme).unwrap();
        assert_eq!(peer.adopt_network(&span).unwrap(), span);
        let mut grown = span.clone();
        grown
            .overlay
            .as_mut()
            .unwrap()
            .hosts
            .push("192.0.2.3".into());
        assert_eq!(peer.adopt_network(&grown).unwrap(), grown);
        assert_eq!(peer.list_networks(None).unwrap().len(), 1);
        let mut moved = span.clone();
        moved.cidr = "10.61.0.0/24".into();
        assert!(matches!(
            peer.adopt_network(&moved),
            Err(StoreError::InUse(_))
        ));
        // A clash with the peer's own networks is refused.
        let other = Store::open_in_memory().unwrap();
        other.create_tenant_with_id(&acme).unwrap();
        create(&other, &acme.id, &request("mine", "10.60.0.128/25")).unwrap();
        let err = other.adopt_network(&span).unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
        let mut local = span.clone();
        local.overlay = None;
        assert!(peer.adopt_network(&local).is_err());

        // Grants: unique per address, released only by their holder, gone
        // with the network.
        let address = Ipv4Addr::new(10, 60, 0, 7);
        home.grant_address(&span.id, address, "192.0.2.2", "vm-1")
            .unwrap();
        assert!(matches!(
            home.grant_address(&span.id, address, "192.0.2.3", "vm-2"),
            Err(StoreError::Exists(_))
        ));
        assert_eq!(home.granted_addresses(&span.id).unwrap(), [address]);
        assert!(!home
            .release_address(&span.id, address, "192.0.2.3")
            .unwrap());
        assert!(home
            .release_address(&span.id, address, "192.0.2.2")
            .unwrap());
        home.grant_address(&span.id, address, "192.0.2.2", "vm-1")
            .unwrap();
        assert!(home.delete_network(&span.id).unwrap());
        assert!(home.granted_addresses(&span.id).unwrap().is_empty());
    }
}
