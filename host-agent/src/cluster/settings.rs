//! What makes an agent a cluster member: where etcd is, this host's name,
//! its labels and roles. Everything here comes from the operator's command
//! line or config file and ends up in etcd keys and in placement decisions,
//! so it is parsed into typed values once, at start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why the cluster settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("--cluster '{0}' is not etcd=URL[,URL...]")]
    NotEtcd(String),
    #[error("etcd endpoint '{0}' is not http://HOST:PORT or https://HOST:PORT")]
    Endpoint(String),
    #[error("host name '{0}' is not 1 to 63 lower-case letters, digits and '-', starting with a letter or digit")]
    HostName(String),
    #[error(transparent)]
    Label(nubis_placement::LabelError),
    #[error("role '{0}' is not one of: compute, controller")]
    Role(String),
    #[error("no roles: a host is a compute host, a controller candidate or both")]
    NoRoles,
    #[error("etcd TLS needs all of ca, cert and key (got {0})")]
    PartialTls(&'static str),
    #[error("lease TTL {0} s is outside 2 to 600 s")]
    LeaseTtl(i64),
    #[error("key prefix '{0}' must start and end with '/' and hold only a-z 0-9 - _ /")]
    Prefix(String),
}

/// A cluster member's name: what placement, events and `/v1/hosts` call it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostName(String);

impl HostName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HostName {
    type Err = SettingsError;

    fn from_str(text: &str) -> Result<Self, SettingsError> {
        let ok = (1..=63).contains(&text.len())
            && text
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(HostName(text.to_string()))
        } else {
            Err(SettingsError::HostName(text.to_string()))
        }
    }
}

impl TryFrom<String> for HostName {
    type Error = SettingsError;
    fn try_from(text: String) -> Result<Self, SettingsError> {
        text.parse()
    }
}

impl From<HostName> for String {
    fn from(name: HostName) -> String {
        name.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a member does in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs VMs placed on it.
    Compute,
    /// May be elected the controller that places VMs.
    Controller,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Compute => "compute",
            Role::Controller => "controller",
        }
    }
}

impl FromStr for Role {
    type Err = SettingsError;
    fn from_str(text: &str) -> Result<Self, SettingsError> {
        match text {
            "compute" => Ok(Role::Compute),
            "controller" => Ok(Role::Controller),
            other => Err(SettingsError::Role(other.to_string())),
        }
    }
}

/// Parses "compute,controller".
pub fn parse_roles(text: &str) -> Result<BTreeSet<Role>, SettingsError> {
    let roles = text
        .split(',')
        .map(str::trim)
        .filter(|role| !role.is_empty())
        .map(Role::from_str)
        .collect::<Result<BTreeSet<_>, _>>()?;
    if roles.is_empty() {
        return Err(SettingsError::NoRoles);
    }
    Ok(roles)
}

/// Labels placement can require (`zone=cloud`) and that name a host's
/// fault and update domains (`fault-domain=1`, `update-domain=2`).
pub type Labels = BTreeMap<String, String>;

/// Parses "zone=onprem,fault-domain=1" (the placement crate owns what a
/// label may be).
pub fn parse_labels(text: &str) -> Result<Labels, SettingsError> {
    nubis_placement::parse_labels(text).map_err(SettingsError::Label)
}

/// An etcd client URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    /// HOST:PORT
    pub authority: String,
}

impl Endpoint {
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

impl FromStr for Endpoint {
    type Err = SettingsError;
    fn from_str(text: &str) -> Result<Self, SettingsError> {
        let bad = || SettingsError::Endpoint(text.to_string());
        let (tls, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port_ok = port.parse::<u16>().is_ok_and(|port| port != 0);
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !port_ok || !host_ok {
            return Err(bad());
        }
        Ok(Endpoint {
            tls,
            authority: rest.to_string(),
        })
    }
}

/// Parses "etcd=URL[,URL...]".
pub fn parse_cluster(text: &str) -> Result<Vec<Endpoint>, SettingsError> {
    let urls = text
        .strip_prefix("etcd=")
        .ok_or_else(|| SettingsError::NotEtcd(text.to_string()))?;
    let endpoints = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(Endpoint::from_str)
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err(SettingsError::NotEtcd(text.to_string()));
    }
    Ok(endpoints)
}

/// Client certificates for etcd (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdTls {
    /// All three or none.
    pub fn from_parts(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Self>, SettingsError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(EtcdTls { ca, cert, key })),
            (None, _, _) => Err(SettingsError::PartialTls("no CA")),
            (_, None, _) => Err(SettingsError::PartialTls("no certificate")),
            (_, _, None) => Err(SettingsError::PartialTls("no key")),
        }
    }
}

/// The default lease: a host is `down` this long after its last heartbeat.
pub const DEFAULT_LEASE_TTL_S: i64 = 10;
/// Every key of a cluster starts with this unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/nubis/";

/// A cluster member's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub endpoints: Vec<Endpoint>,
    pub tls: Option<EtcdTls>,
    pub host_name: HostName,
    pub labels: Labels,
    pub roles: BTreeSet<Role>,
    pub lease_ttl_s: i64,
    pub prefix: String,
}

impl ClusterSettings {
    pub fn new(endpoints: Vec<Endpoint>, host_name: HostName) -> Self {
        ClusterSettings {
            endpoints,
            tls: None,
            host_name,
            labels: Labels::new(),
            roles: [Role::Compute, Role::Controller].into(),
            lease_ttl_s: DEFAULT_LEASE_TTL_S,
            prefix: DEFAULT_PREFIX.to_string(),
        }
    }

    /// Checks what `new` cannot: the TTL, the prefix, TLS for https.
    pub fn check(&self) -> Result<(), SettingsError> {
        if !(2..=600).contains(&self.lease_ttl_s) {
            return Err(SettingsError::LeaseTtl(self.lease_ttl_s));
        }
        let prefix_ok = self.prefix.len() >= 2
            && self.prefix.starts_with('/')
            && self.prefix.ends_with('/')
            && self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_/".contains(&b));
        if !prefix_ok {
            return Err(SettingsError::Prefix(self.prefix.clone()));
        }
        if self.roles.is_empty() {
            return Err(SettingsError::NoRoles);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_are_parsed() {
        let endpoints = parse_cluster("etcd=http://10.0.0.1:2379,https://etcd-2.lan:2379/")
            .expect("two endpoints");
        assert_eq!(endpoints[0].url(), "http://10.0.0.1:2379");
        assert_eq!(endpoints[1].url(), "https://etcd-2.lan:2379");
        assert!(endpoints[1].tls);
        for bad in [
            "http://10.0.0.1:2379",
            "etcd=",
            "etcd=10.0.0.1:2379",
            "etcd=http://10.0.0.1",
            "etcd=http://10.0.0.1:0",
            "etcd=http://:2379",
            "etcd=http://a b:2379",
            "etcd=http://10.0.0.1:2379;rm -rf /",
            "etcd=unix:///run/etcd.sock",
        ] {
            assert!(parse_cluster(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_names_are_dns_labels() {
        assert!("host-a1".parse::<HostName>().is_ok());
        for bad in ["", "-a", "A", "a_b", "a.b", &"a".repeat(64), "a/b", "a\n"] {
            assert!(bad.parse::<HostName>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<HostName>("\"../etc\"").is_err());
    }

    #[test]
    fn labels_are_key_value_pairs() {
        let labels = parse_labels("zone=onprem, fault-domain=1").expect("labels");
        assert_eq!(labels["zone"], "onprem");
        assert!(matches!(
            parse_labels("zone=x;y"),
            Err(SettingsError::Label(_))
        ));
    }

    #[test]
    fn roles_are_a_non_empty_set() {
        assert_eq!(
            parse_roles("controller, compute,compute").expect("roles"),
            [Role::Compute, Role::Controller].into()
        );
        assert_eq!(parse_roles(""), Err(SettingsError::NoRoles));
        assert!(parse_roles("storage").is_err());
    }

    #[test]
    fn tls_needs_all_three_files() {
        assert_eq!(EtcdTls::from_parts(None, None, None), Ok(None));
        assert!(EtcdTls::from_parts(Some("ca".into()), Some("c".into()), None).is_err());
        assert!(EtcdTls::from_parts(None, Some("c".into()), Some("k".into())).is_err());
    }

    #[test]
    fn settings_are_checked() {
        let endpoints = parse_cluster("etcd=http://127.0.0.1:2379").expect("endpoint");
        let mut settings = ClusterSettings::new(endpoints, "a".parse().expect("name"));
        assert_eq!(settings.check(), Ok(()));
        settings.lease_ttl_s = 1;
        assert!(settings.check().is_err());
        settings.lease_ttl_s = 10;
        settings.prefix = "nubis".into();
        assert!(settings.check().is_err());
        settings.prefix = "/nubis/prod/".into();
        assert_eq!(settings.check(), Ok(()));
    }
}
