//! Where each piece of cluster state lives in etcd, and who writes it.
//! Every key is under one prefix (`/nubis/` unless configured), so that a
//! cluster can share an etcd with others and be listed or wiped whole. The
//! layout, with its writers, is documented in `docs/cluster.md`; this
//! module is the only place that spells a key.

use super::settings::HostName;

/// The keys of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` starts and ends with '/' (`ClusterSettings::check`).
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// `members/{host}`: a member's lasting record (fingerprint, roles,
    /// labels, cordon). Written by the host when it joins and by operators
    /// cordoning it; deleted only when an operator forgets a down host.
    pub fn member(&self, host: &HostName) -> String {
        format!("{}members/{host}", self.prefix)
    }

    pub fn members(&self) -> String {
        format!("{}members/", self.prefix)
    }

    /// The first key after every `members/` key (the end of a range).
    pub fn members_end(&self) -> String {
        format!("{}members0", self.prefix)
    }

    /// `alive/{host}`: a member's heartbeat (addresses, capacity, usage),
    /// bound to its lease: it vanishes when the host stops renewing it.
    /// Written by that host only.
    pub fn alive(&self, host: &HostName) -> String {
        format!("{}alive/{host}", self.prefix)
    }

    pub fn alive_all(&self) -> String {
        format!("{}alive/", self.prefix)
    }

    /// The name of etcd's election among the controller candidates; the
    /// election API keeps one key per candidate under it, bound to the
    /// candidate's lease, with the host name as its value.
    pub fn controller_election(&self) -> String {
        format!("{}election/controller", self.prefix)
    }

    /// `tenants/{id}`: a tenant (name, quota). Written by the agent that
    /// takes the operator's request, together with `tenant-names/{name}`,
    /// which keeps names unique.
    pub fn tenant(&self, id: &str) -> String {
        format!("{}tenants/{id}", self.prefix)
    }

    pub fn tenants(&self) -> String {
        format!("{}tenants/", self.prefix)
    }

    pub fn tenant_name(&self, name: &str) -> String {
        format!("{}tenant-names/{name}", self.prefix)
    }

    /// `tokens/{sha256}`: a tenant's API token, by the hash of its secret
    /// (the secret itself is never stored).
    pub fn token(&self, hash: &str) -> String {
        format!("{}tokens/{hash}", self.prefix)
    }

    pub fn tokens(&self) -> String {
        format!("{}tokens/", self.prefix)
    }

    /// `holdings/{tenant}/{host}`: host `host` holds resources of
    /// `tenant` (VMs, images, networks, snapshots). Written by that host
    /// before it makes the tenant's first resource there (conditioned on
    /// the tenant existing), deleted once it holds none; a tenant is
    /// deleted only while no such key exists.
    pub fn holding(&self, tenant: &str, host: &HostName) -> String {
        format!("{}holdings/{tenant}/{host}", self.prefix)
    }

    pub fn holdings_of(&self, tenant: &str) -> String {
        format!("{}holdings/{tenant}/", self.prefix)
    }

    pub fn holdings(&self) -> String {
        format!("{}holdings/", self.prefix)
    }

    /// `images/{id}`: a tenant's image (metadata and the SHA-256 of its
    /// files, and the host that has them). Written with `image-names/` by
    /// the host that registered it; deleted by any host while no VM
    /// record names it.
    pub fn image(&self, id: &str) -> String {
        format!("{}images/{id}", self.prefix)
    }

    pub fn images(&self) -> String {
        format!("{}images/", self.prefix)
    }

    /// `image-names/{tenant}/{name}`: keeps a tenant's image names unique.
    pub fn image_name(&self, tenant: &str, name: &str) -> String {
        format!("{}image-names/{tenant}/{name}", self.prefix)
    }

    /// `ssh-keys/{id}`: a tenant's SSH public key (`nubis_api::SshKey`).
    pub fn ssh_key(&self, id: &str) -> String {
        format!("{}ssh-keys/{id}", self.prefix)
    }

    pub fn ssh_keys(&self) -> String {
        format!("{}ssh-keys/", self.prefix)
    }

    /// `ssh-key-names/{tenant}/{name}`: keeps a tenant's key names unique.
    pub fn ssh_key_name(&self, tenant: &str, name: &str) -> String {
        format!("{}ssh-key-names/{tenant}/{name}", self.prefix)
    }

    /// `networks/{id}`: a tenant's network (CIDR, gateway, VNI, DHCP,
    /// DNS, MTU): one L2 segment over VXLAN across the hosts with VMs on
    /// it. Written with `network-names/` and `vnis/` by the host that
    /// takes the request; deleted while no address of it is taken.
    pub fn network(&self, id: &str) -> String {
        format!("{}networks/{id}", self.prefix)
    }

    pub fn networks(&self) -> String {
        format!("{}networks/", self.prefix)
    }

    pub fn network_name(&self, tenant: &str, name: &str) -> String {
        format!("{}network-names/{tenant}/{name}", self.prefix)
    }

    /// `vnis/{vni}`: keeps VXLAN network identifiers unique.
    pub fn vni(&self, vni: u32) -> String {
        format!("{}vnis/{vni}", self.prefix)
    }

    /// `ipam/{network}/{address}`: the address is a VM's; taken (create if
    /// absent) in the transaction that defines the VM, freed with it.
    pub fn address(&self, network: &str, address: std::net::Ipv4Addr) -> String {
        format!("{}ipam/{network}/{address}", self.prefix)
    }

    pub fn addresses_of(&self, network: &str) -> String {
        format!("{}ipam/{network}/", self.prefix)
    }

    /// `inventory/{host}`: the snapshots and port forwards that live on
    /// that host. Written by that host only.
    pub fn inventory(&self, host: &HostName) -> String {
        format!("{}inventory/{host}", self.prefix)
    }

    pub fn inventories(&self) -> String {
        format!("{}inventory/", self.prefix)
    }

    /// `claims/{tenant}/{host}/{id}`: a snapshot or port forward of the
    /// tenant on that host, counted against its quota (`claims.rs`).
    /// Written by that host only: before it makes the resource, in a
    /// transaction conditioned on the tenant's other claims.
    pub fn claim(&self, tenant: &str, host: &str, id: &str) -> String {
        format!("{}claims/{tenant}/{host}/{id}", self.prefix)
    }

    pub fn claims_of(&self, tenant: &str) -> String {
        format!("{}claims/{tenant}/", self.prefix)
    }

    pub fn claims(&self) -> String {
        format!("{}claims/", self.prefix)
    }

    /// The host a `claims/` key names.
    pub fn claim_host<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("claims/")?;
        let mut parts = rest.split('/');
        let (_tenant, host, _id) = (parts.next()?, parts.next()?, parts.next()?);
        parts.next().is_none().then_some(host)
    }

    /// `vms/{id}`: a VM's definition, its placement constraints and the
    /// host it is placed on. Created (with `vm-names/` and `usage/`) by
    /// the agent that takes the tenant's request; placed by the
    /// controller; moved by a migration's source; deleted with the VM.
    pub fn vm(&self, id: &str) -> String {
        format!("{}vms/{id}", self.prefix)
    }

    pub fn vms(&self) -> String {
        format!("{}vms/", self.prefix)
    }

    /// `vm-names/{tenant}/{name}`: keeps a tenant's VM names unique.
    pub fn vm_name(&self, tenant: &str, name: &str) -> String {
        format!("{}vm-names/{tenant}/{name}", self.prefix)
    }

    pub fn vm_names_of(&self, tenant: &str) -> String {
        format!("{}vm-names/{tenant}/", self.prefix)
    }

    /// `services/{id}`: a service's roles and rollouts.
    pub fn service(&self, id: &str) -> String {
        format!("{}services/{id}", self.prefix)
    }

    pub fn services(&self) -> String {
        format!("{}services/", self.prefix)
    }

    /// `service-names/{tenant}/{name}`: keeps a tenant's service names
    /// unique.
    pub fn service_name(&self, tenant: &str, name: &str) -> String {
        format!("{}service-names/{tenant}/{name}", self.prefix)
    }

    pub fn service_names_of(&self, tenant: &str) -> String {
        format!("{}service-names/{tenant}/", self.prefix)
    }

    pub fn service_names(&self) -> String {
        format!("{}service-names/", self.prefix)
    }

    /// `host-ports/{protocol}/{port}`: a service endpoint's port on every
    /// host, held by its service.
    pub fn host_port(&self, protocol: nubis_api::Protocol, port: u16) -> String {
        format!("{}host-ports/{}/{port}", self.prefix, protocol.as_str())
    }

    /// `lb-hosts/{network}/{host}`: the address host `host` has on
    /// `network` to balance flows from (its `ipam/` key is the host's).
    pub fn lb_host(&self, network: &str, host: &str) -> String {
        format!("{}lb-hosts/{network}/{host}", self.prefix)
    }

    pub fn lb_hosts(&self) -> String {
        format!("{}lb-hosts/", self.prefix)
    }

    pub fn lb_hosts_of(&self, network: &str) -> String {
        format!("{}lb-hosts/{network}/", self.prefix)
    }

    /// `status/{vm}`: the VM as the host that runs it last saw it.
    /// Written by that host only.
    pub fn vm_status(&self, id: &str) -> String {
        format!("{}status/{id}", self.prefix)
    }

    pub fn vm_statuses(&self) -> String {
        format!("{}status/", self.prefix)
    }

    /// `usage/{tenant}`: what the tenant's VMs take cluster-wide, updated
    /// in the same transaction as the VM records it counts, so that two
    /// racing creations cannot both take the last of a quota.
    pub fn usage(&self, tenant: &str) -> String {
        format!("{}usage/{tenant}", self.prefix)
    }

    /// The range that holds `tenant-names/`, `tenants/` and `tokens/`
    /// ("tenant-names/" < "tenants/" < "tokens/"): start and end.
    pub fn tenants_range(&self) -> (String, String) {
        (
            format!("{}tenant", self.prefix),
            format!("{}tokens0", self.prefix),
        )
    }

    /// The host name a `members/` or `alive/` key names.
    pub fn host_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(&self.prefix)?;
        rest.strip_prefix("members/")
            .or_else(|| rest.strip_prefix("alive/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_under_the_prefix() {
        let keys = Keys::new("/nubis/");
        let host: HostName = "host-a".parse().expect("name");
        assert_eq!(keys.member(&host), "/nubis/members/host-a");
        assert_eq!(keys.alive(&host), "/nubis/alive/host-a");
        assert_eq!(keys.controller_election(), "/nubis/election/controller");
        assert!(keys.member(&host).starts_with(&keys.members()));
        assert!(keys.alive(&host).starts_with(&keys.alive_all()));
        assert_eq!(keys.host_of("/nubis/alive/host-a"), Some("host-a"));
        assert_eq!(keys.host_of("/nubis/members/host-a"), Some("host-a"));
        assert_eq!(keys.host_of("/other/alive/host-a"), None);
        let claim = keys.claim("t-1", "host-b", "snap-9");
        assert_eq!(claim, "/nubis/claims/t-1/host-b/snap-9");
        assert!(claim.starts_with(&keys.claims_of("t-1")));
        assert!(claim.starts_with(&keys.claims()));
        assert_eq!(keys.claim_host(&claim), Some("host-b"));
        assert_eq!(keys.claim_host("/nubis/claims/t-1/host-b"), None);
        assert_eq!(keys.claim_host("/nubis/claims/t-1/host-b/x/y"), None);
        assert_eq!(keys.host_of("/nubis/election/controller"), None);
        // The controller's service pass watches from the service names to
        // the end of the VM records.
        let (first, last) = (keys.service_names(), keys.vms());
        for key in [
            keys.service("svc-1"),
            keys.service_name("t-1", "shop"),
            keys.vm_status("vm-1"),
            keys.usage("t-1"),
            keys.vm_name("t-1", "web"),
            keys.vm("vm-1"),
        ] {
            assert!(
                first <= key && key < format!("{}0", last.trim_end_matches('/')),
                "{key}"
            );
        }
        let (start, end) = keys.tenants_range();
        for key in [
            keys.tenant("t-1"),
            keys.tenant_name("acme"),
            keys.token("ab12"),
        ] {
            assert!(start <= key && key < end, "{key} outside {start}..{end}");
        }
        for key in [
            keys.member(&host),
            keys.alive(&host),
            keys.controller_election(),
        ] {
            assert!(!(start <= key && key < end), "{key} inside {start}..{end}");
        }
    }
}
