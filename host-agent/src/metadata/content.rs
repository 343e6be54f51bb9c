//! What the metadata service answers for each path, from what the host
//! knows of the VM ([`Instance`]). The layout is EC2's for the paths
//! cloud-init's EC2 datasource reads (so a Debian cloud image configures
//! itself), with a few Nubis keys beside them (a NIC's gateway, DNS, MTU).
//! A directory lists its entries, one a line, sub-directories ending in
//! `/`; every version cloud-init asks for is an alias of `latest`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The metadata versions answered (cloud-init probes these).
pub const VERSIONS: [&str; 5] = [
    "2009-04-04",
    "2016-09-02",
    "2018-09-24",
    "2021-03-23",
    "latest",
];

/// One NIC as the guest is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: u16,
}

/// What a VM may learn about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Instance {
    pub id: String,
    pub tenant_id: String,
    pub image_id: String,
    pub hostname: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub nics: Vec<Nic>,
    pub tags: BTreeMap<String, String>,
    /// (name, OpenSSH public key), in the order given.
    pub ssh_keys: Vec<(String, String)>,
    pub user_data: Option<Vec<u8>>,
    /// The host's zone (a label), in cluster mode.
    pub zone: Option<String>,
}

/// An answer's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Text(String),
    Json(String),
    Bytes(Vec<u8>),
}

fn listing<I: IntoIterator<Item = S>, S: AsRef<str>>(entries: I) -> Option<Answer> {
    let lines: Vec<String> = entries
        .into_iter()
        .map(|entry| entry.as_ref().to_string())
        .collect();
    Some(Answer::Text(lines.join("\n")))
}

fn text(value: impl ToString) -> Option<Answer> {
    Some(Answer::Text(value.to_string()))
}

/// The network's address of a NIC (its address with the host bits clear).
fn subnet(nic: &Nic) -> String {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(nic.prefix.min(32)))
        .unwrap_or(0);
    format!(
        "{}/{}",
        Ipv4Addr::from(u32::from(nic.address) & mask),
        nic.prefix
    )
}

impl Instance {
    fn instance_type(&self) -> String {
        format!("nubis.{}x{}", self.vcpus, self.memory_mib)
    }

    fn identity_document(&self) -> String {
        serde_json::json!({
            "instanceId": self.id,
            "instanceType": self.instance_type(),
            "imageId": self.image_id,
            "accountId": self.tenant_id,
            "privateIp": self.nics.first().map(|nic| nic.address.to_string()),
            "availabilityZone": self.zone,
            "region": "nubis",
            "architecture": "x86_64",
        })
        .to_string()
    }

    /// What `path` (without a query) answers; None is 404.
    pub fn answer(&self, path: &str) -> Option<Answer> {
        let path = path.trim_start_matches('/');
        if path.is_empty() {
            return listing(VERSIONS);
        }
        let (version, rest) = path.split_once('/').unwrap_or((path, ""));
        if !VERSIONS.contains(&version) {
            return None;
        }
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [""] => {
                let mut entries = vec!["dynamic", "meta-data"];
                if self.user_data.is_some() {
                    entries.push("user-data");
                }
                listing(entries)
            }
            ["user-data"] => self.user_data.clone().map(Answer::Bytes),
            ["dynamic", ""] => listing(["instance-identity/"]),
            ["dynamic", "instance-identity", ""] => listing(["document"]),
            ["dynamic", "instance-identity", "document"] => {
                Some(Answer::Json(self.identity_document()))
            }
            ["meta-data", rest @ ..] => self.meta_data(rest),
            _ => None,
        }
    }

    fn meta_data(&self, parts: &[&str]) -> Option<Answer> {
        let first = self.nics.first();
        match parts {
            [] | [""] => {
                let mut entries =
                    vec!["hostname", "instance-id", "instance-type", "local-hostname"];
                if first.is_some() {
                    entries.extend(["local-ipv4", "mac", "network/"]);
                }
                if self.zone.is_some() {
                    entries.push("placement/");
                }
                if !self.ssh_keys.is_empty() {
                    entries.push("public-keys/");
                }
                if !self.tags.is_empty() {
                    entries.push("tags/");
                }
                listing(entries)
            }
            ["instance-id"] => text(&self.id),
            ["hostname"] | ["local-hostname"] => text(&self.hostname),
            ["instance-type"] => text(self.instance_type()),
            ["local-ipv4"] => first.and_then(|nic| text(nic.address)),
            ["mac"] => first.and_then(|nic| text(&nic.mac)),
            ["placement", ""] => self
                .zone
                .as_ref()
                .and_then(|_| listing(["availability-zone"])),
            ["placement", "availability-zone"] => self.zone.as_ref().and_then(text),
            ["public-keys", ""] if !self.ssh_keys.is_empty() => listing(
                self.ssh_keys
                    .iter()
                    .enumerate()
                    .map(|(index, (name, _))| format!("{index}={name}")),
            ),
            ["public-keys", index, rest @ ..] => {
                let (_, key) = self.ssh_keys.get(index.parse::<usize>().ok()?)?;
                match rest {
                    [""] => listing(["openssh-key"]),
                    ["openssh-key"] => text(key),
                    _ => None,
                }
            }
            ["tags", ""] if !self.tags.is_empty() => listing(["instance/"]),
            ["tags", "instance", ""] if !self.tags.is_empty() => listing(self.tags.keys()),
            ["tags", "instance", key] => self.tags.get(*key).and_then(text),
            ["network", ""] if first.is_some() => listing(["interfaces/"]),
            ["network", "interfaces", ""] if first.is_some() => listing(["macs/"]),
            ["network", "interfaces", "macs", ""] if first.is_some() => {
                listing(self.nics.iter().map(|nic| format!("{}/", nic.mac)))
            }
            ["network", "interfaces", "macs", mac, rest @ ..] => {
                let (index, nic) = self
                    .nics
                    .iter()
                    .enumerate()
                    .find(|(_, nic)| nic.mac == *mac)?;
                match rest {
                    [""] => listing([
                        "device-number",
                        "dns",
                        "gateway",
                        "local-ipv4s",
                        "mac",
                        "mtu",
                        "subnet-ipv4-cidr-block",
                    ]),
                    ["device-number"] => text(index),
                    ["local-ipv4s"] => text(nic.address),
                    ["mac"] => text(&nic.mac),
                    ["subnet-ipv4-cidr-block"] => text(subnet(nic)),
                    ["gateway"] => text(nic.gateway),
                    ["mtu"] => text(nic.mtu),
                    ["dns"] => listing(nic.dns.iter().map(Ipv4Addr::to_string)),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance {
            id: "vm-0123456789abcdef".into(),
            tenant_id: "t-1".into(),
            image_id: "img-1".into(),
            hostname: "web-1".into(),
            vcpus: 2,
            memory_mib: 256,
            nics: vec![Nic {
                mac: "02:4e:42:00:00:05".into(),
                address: Ipv4Addr::new(10, 70, 0, 5),
                prefix: 24,
                gateway: Ipv4Addr::new(10, 70, 0, 1),
                dns: vec![Ipv4Addr::new(10, 70, 0, 1), Ipv4Addr::new(9, 9, 9, 9)],
                mtu: 1450,
            }],
            tags: [("role".to_string(), "web".to_string())].into(),
            ssh_keys: vec![("laptop".into(), "ssh-ed25519 AAAAC3Nza me@laptop".into())],
            user_data: Some(b"#!/bin/sh\necho hello\n".to_vec()),
            zone: Some("cloud".into()),
        }
    }

    fn get(instance: &Instance, path: &str) -> Option<String> {
        instance.answer(path).map(|answer| match answer {
            Answer::Text(text) | Answer::Json(text) => text,
            Answer::Bytes(bytes) => String::from_utf8(bytes).unwrap(),
        })
    }

    #[test]
    fn the_paths_cloud_init_reads_answer() {
        let vm = instance();
        assert_eq!(get(&vm, "/").unwrap(), VERSIONS.join("\n"));
        assert_eq!(
            get(&vm, "/latest/").unwrap(),
            "dynamic\nmeta-data\nuser-data"
        );
        assert_eq!(
            get(&vm, "/2009-04-04/meta-data/instance-id").unwrap(),
            "vm-0123456789abcdef"
        );
        assert_eq!(
            get(&vm, "/latest/meta-data/local-hostname").unwrap(),
            "web-1"
        );
        assert_eq!(
            get(&vm, "/latest/meta-data/local-ipv4").unwrap(),
            "10.70.0.5"
        );
        assert_eq!(
            get(&vm, "/latest/meta-data/instance-type").unwrap(),
            "nubis.2x256"
        );
        assert_eq!(
            get(&vm, "/latest/meta-data/public-keys/").unwrap(),
            "0=laptop"
        );
        assert_eq!(
            get(&vm, "/latest/meta-data/public-keys/0/openssh-key").unwrap(),
            "ssh-ed25519 AAAAC3Nza me@laptop"
        );
        assert_eq!(
            get(&vm, "/latest/meta-data/placement/availability-zone").unwrap(),
            "cloud"
        );
        assert_eq!(
            get(&vm, "/latest/meta-data/tags/instance/").unwrap(),
            "role"
        );
        assert_eq!(
            get(&vm, "/latest/meta-data/tags/instance/role").unwrap(),
            "web"
        );
        assert_eq!(
            get(&vm, "/latest/user-data").unwrap(),
            "#!/bin/sh\necho hello\n"
        );
        let mac = "/latest/meta-data/network/interfaces/macs/02:4e:42:00:00:05/";
        assert_eq!(
            get(&vm, &format!("{mac}subnet-ipv4-cidr-block")).unwrap(),
            "10.70.0.0/24"
        );
        assert_eq!(get(&vm, &format!("{mac}gateway")).unwrap(), "10.70.0.1");
        assert_eq!(
            get(&vm, &format!("{mac}dns")).unwrap(),
            "10.70.0.1\n9.9.9.9"
        );
        assert_eq!(get(&vm, &format!("{mac}mtu")).unwrap(), "1450");
        assert_eq!(get(&vm, &format!("{mac}device-number")).unwrap(), "0");
        let document: serde_json::Value =
            serde_json::from_str(&get(&vm, "/latest/dynamic/instance-identity/document").unwrap())
                .unwrap();
        assert_eq!(document["instanceId"], "vm-0123456789abcdef");
        assert_eq!(document["availabilityZone"], "cloud");
    }

    #[test]
    fn what_a_vm_does_not_have_is_not_listed_nor_answered() {
        let bare = Instance {
            id: "vm-1".into(),
            hostname: "bare".into(),
            vcpus: 1,
            memory_mib: 128,
            ..Default::default()
        };
        assert_eq!(get(&bare, "/latest/").unwrap(), "dynamic\nmeta-data");
        assert_eq!(
            get(&bare, "/latest/meta-data/").unwrap(),
            "hostname\ninstance-id\ninstance-type\nlocal-hostname"
        );
        for path in [
            "/latest/user-data",
            "/latest/meta-data/local-ipv4",
            "/latest/meta-data/public-keys/",
            "/latest/meta-data/public-keys/0/openssh-key",
            "/latest/meta-data/tags/instance/role",
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/network/interfaces/macs/",
        ] {
            assert_eq!(bare.answer(path), None, "{path}");
        }
        let vm = instance();
        for path in [
            "/1999-01-01/meta-data/instance-id",
            "/latest/meta-data/../../etc/passwd",
            "/latest/meta-data/public-keys/9/openssh-key",
            "/latest/meta-data/public-keys/x/openssh-key",
            "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:00/mac",
            "/latest/meta-data/nope",
        ] {
            assert_eq!(vm.answer(path), None, "{path}");
        }
    }
}
