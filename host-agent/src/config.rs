//! The agent's configuration: flags, and an optional JSON file for the rest.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors in assembling the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no operator token: set NUBIS_OPERATOR_TOKEN or operator_token_file in the config")]
    NoOperatorToken,
    #[error("cannot read the operator token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the operator token must be at least 16 characters")]
    WeakOperatorToken,
    #[error("jail_uid_first is 0: jailed VMMs never run as root")]
    RootJailUid,
    #[error("{field} '{value}' is not a port range like 30000-39999 (1024 to 65535, low to high)")]
    PortRange { field: &'static str, value: String },
    #[error(
        "port_forward_range {forwards} holds {what} port {port}: tenants' forwards would take it"
    )]
    ReservedPort {
        forwards: String,
        what: &'static str,
        port: u16,
    },
    #[error("port_forward_range {forwards} and migration_port_range {migrations} overlap")]
    RangesOverlap {
        forwards: String,
        migrations: String,
    },
    #[error("egress_deny entry '{0}' is not an IPv4 network like 10.0.0.0/8")]
    EgressDeny(String),
    #[error("image directory {image_dir} holds the data directory {data_dir} (and with it agent.db): tenants could register it as an image")]
    ImageDirHoldsData {
        image_dir: PathBuf,
        data_dir: PathBuf,
    },
}

/// An inclusive range of TCP/UDP ports, written "LOW-HIGH".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.low <= other.high && other.low <= self.high
    }

    fn parse(field: &'static str, text: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::PortRange {
            field,
            value: text.to_string(),
        };
        let (low, high) = text.split_once('-').ok_or_else(bad)?;
        let (low, high): (u16, u16) = (
            low.trim().parse().map_err(|_| bad())?,
            high.trim().parse().map_err(|_| bad())?,
        );
        if low < 1024 || low > high {
            return Err(bad());
        }
        Ok(Self { low, high })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

/// Host ports tenants' forwards come from by default: clear of the
/// kernel's well-known and registered services' usual ports.
pub const DEFAULT_PORT_FORWARD_RANGE: PortRange = PortRange {
    low: 30000,
    high: 39999,
};
/// Ports receiving VMMs listen on for migrations by default.
pub const DEFAULT_MIGRATION_PORT_RANGE: PortRange = PortRange {
    low: 40000,
    high: 40999,
};

/// The config file (`--config`): everything optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// File holding the operator token (one line).
    pub operator_token_file: Option<PathBuf>,
    /// The `nubis-vmm` binary; by default the one next to `nubis-agent`.
    pub vmm_binary: Option<PathBuf>,
    /// Seconds a graceful stop waits for the guest before forcing it.
    pub stop_timeout_s: Option<u64>,
    /// Directories tenants may register image files from; by default only
    /// `DATA_DIR/images`. A path elsewhere (say /etc/shadow as a "root
    /// disk") is refused.
    #[serde(default)]
    pub image_dirs: Vec<PathBuf>,
    /// This host's underlay IPv4 address: where the VXLAN tunnels of
    /// overlay networks start and end (`--underlay-address` wins).
    pub underlay_address: Option<Ipv4Addr>,
    /// The `nubis-jailer` binary; by default the one next to `nubis-agent`.
    pub jailer_binary: Option<PathBuf>,
    /// Where jails' roots are mounted (`DIR/<vm-id>/root`); by default
    /// `DATA_DIR/jails`.
    pub jail_dir: Option<PathBuf>,
    /// The cgroup that VMs' cgroups are made under (default `nubis`).
    pub parent_cgroup: Option<String>,
    /// The first uid (and gid) given to VMs' jailed VMMs, one each
    /// (default 900000), and how many there are (default 65536).
    pub jail_uid_first: Option<u32>,
    pub jail_uid_count: Option<u32>,
    /// Memory a VMM may use beyond its guest's RAM before its cgroup stops
    /// it (default 96 MiB).
    pub vmm_memory_overhead_mib: Option<u64>,
    /// Host ports tenants' port forwards may take, "LOW-HIGH" (default
    /// 30000-39999). It may not hold the API's port, VXLAN's 4789 or the
    /// migration ports.
    pub port_forward_range: Option<String>,
    /// Ports a VM migrating in is received on, "LOW-HIGH" (default
    /// 40000-40999).
    pub migration_port_range: Option<String>,
    /// The port of the peer API (mutual TLS) on the underlay address
    /// (default 7443).
    pub peer_port: Option<u16>,
    /// The port of the metadata service's listener, to which the host's
    /// rules send each VM's requests to 169.254.169.254:80 (default: any
    /// free port, chosen at start). Only VMs reach it.
    pub metadata_port: Option<u16>,
    /// MiB the data directory's filesystem keeps free whatever tenants
    /// ask for (default 1024): room for the database and running VMs.
    pub reserved_disk_mib: Option<u64>,
    /// DHCP requests a second each network's server answers (default 32,
    /// with a burst of twice that); a flood beyond it is dropped.
    pub dhcp_requests_per_s: Option<u32>,
    /// More IPv4 networks that tenants' NAT egress never reaches and their
    /// networks may not overlap (say the hosts' management network); the
    /// underlay, peers, link-local and the host's routes are always kept.
    #[serde(default)]
    pub egress_deny: Vec<String>,
    /// What this host offers VMs (`/v1/hosts`, placement); each part left
    /// out is measured (see `capacity.rs`).
    #[serde(default)]
    pub capacity: CapacitySettings,
}

/// What this host offers VMs, where the operator says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacitySettings {
    /// vCPUs (default: the host's CPUs times `cpu_overcommit`).
    pub vcpus: Option<u32>,
    /// vCPUs per host CPU when `vcpus` is measured (default 4).
    pub cpu_overcommit: Option<u32>,
    /// MiB of guest memory (default: the host's memory less
    /// `reserved_memory_mib`).
    pub memory_mib: Option<u64>,
    /// MiB the host keeps for itself when `memory_mib` is measured
    /// (default 1024).
    pub reserved_memory_mib: Option<u64>,
    /// MiB of disk (default: the data directory's filesystem less
    /// `reserved_disk_mib`).
    pub disk_mib: Option<u64>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// The settings the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub operator_token: String,
    pub vmm_binary: PathBuf,
    pub stop_timeout_s: u64,
    pub image_dirs: Vec<PathBuf>,
    /// Without it this host carries no overlay networks.
    pub underlay_address: Option<Ipv4Addr>,
    pub jail: JailConfig,
    pub port_forward_range: PortRange,
    pub migration_port_range: PortRange,
    pub egress_deny: Vec<crate::ipv4::Cidr>,
    pub peer_port: u16,
    pub reserved_disk_mib: u64,
    pub dhcp_requests_per_s: u32,
    pub capacity: CapacitySettings,
    /// 0 until the agent listens: any free port.
    pub metadata_port: u16,
}

/// How every VMM is sandboxed (see `supervisor/jail.rs`).
#[derive(Debug, Clone)]
pub struct JailConfig {
    pub jailer_binary: PathBuf,
    pub jail_dir: PathBuf,
    pub parent_cgroup: String,
    pub uid_first: u32,
    pub uid_count: u32,
    pub memory_overhead_mib: u64,
}

impl AgentConfig {
    /// From the data directory, the config file and the environment's
    /// `NUBIS_OPERATOR_TOKEN` (which wins over the file).
    pub fn assemble(
        data_dir: PathBuf,
        file: ConfigFile,
        env_token: Option<String>,
    ) -> Result<Self, ConfigError> {
        let operator_token = match (env_token, &file.operator_token_file) {
            (Some(token), _) => token,
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::TokenFile {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_string(),
            (None, None) => return Err(ConfigError::NoOperatorToken),
        };
        if operator_token.trim().len() < 16 {
            return Err(ConfigError::WeakOperatorToken);
        }
        let vmm_binary = file.vmm_binary.unwrap_or_else(default_vmm_binary);
        for image_dir in &file.image_dirs {
            if data_dir.starts_with(image_dir) {
                return Err(ConfigError::ImageDirHoldsData {
                    image_dir: image_dir.clone(),
                    data_dir: data_dir.clone(),
                });
            }
        }
        let port_forward_range = match &file.port_forward_range {
            Some(text) => PortRange::parse("port_forward_range", text)?,
            None => DEFAULT_PORT_FORWARD_RANGE,
        };
        let migration_port_range = match &file.migration_port_range {
            Some(text) => PortRange::parse("migration_port_range", text)?,
            None => DEFAULT_MIGRATION_PORT_RANGE,
        };
        if port_forward_range.overlaps(&migration_port_range) {
            return Err(ConfigError::RangesOverlap {
                forwards: port_forward_range.to_string(),
                migrations: migration_port_range.to_string(),
            });
        }
        let peer_port = file.peer_port.unwrap_or(nubis_api::host::DEFAULT_PEER_PORT);
        for (what, port) in [
            ("the peer API's", peer_port),
            ("VXLAN's", crate::network::vxlan::VXLAN_PORT),
        ] {
            if port_forward_range.contains(port) || migration_port_range.contains(port) || port == 0
            {
                return Err(ConfigError::ReservedPort {
                    forwards: port_forward_range.to_string(),
                    what,
                    port,
                });
            }
        }
        let metadata_port = file.metadata_port.unwrap_or(0);
        if metadata_port != 0
            && (port_forward_range.contains(metadata_port)
                || migration_port_range.contains(metadata_port)
                || metadata_port == peer_port
                || metadata_port == crate::network::vxlan::VXLAN_PORT)
        {
            return Err(ConfigError::ReservedPort {
                forwards: port_forward_range.to_string(),
                what: "the metadata service's",
                port: metadata_port,
            });
        }
        let egress_deny = file
            .egress_deny
            .iter()
            .map(|text| parse_any_cidr(text).ok_or_else(|| ConfigError::EgressDeny(text.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut image_dirs = vec![data_dir.join("images")];
        image_dirs.extend(file.image_dirs);
        // Tenants' uploads are reachable only by their owner (see
        // service/uploads.rs), never through a shared image directory.
        image_dirs.retain(|dir| !dir.starts_with(data_dir.join("uploads")));
        Ok(Self {
            operator_token,
            vmm_binary,
            stop_timeout_s: file.stop_timeout_s.unwrap_or(30),
            image_dirs,
            underlay_address: file.underlay_address,
            jail: JailConfig {
                jailer_binary: file
                    .jailer_binary
                    .unwrap_or_else(|| sibling_binary("nubis-jailer")),
                jail_dir: file.jail_dir.unwrap_or_else(|| data_dir.join("jails")),
                parent_cgroup: file.parent_cgroup.unwrap_or_else(|| "nubis".to_string()),
                uid_first: match file.jail_uid_first {
                    Some(0) => return Err(ConfigError::RootJailUid),
                    Some(first) => first,
                    None => 900_000,
                },
                uid_count: file.jail_uid_count.unwrap_or(65_536).max(1),
                memory_overhead_mib: file.vmm_memory_overhead_mib.unwrap_or(96),
            },
            data_dir,
            port_forward_range,
            migration_port_range,
            egress_deny,
            peer_port,
            reserved_disk_mib: file.reserved_disk_mib.unwrap_or(1024),
            dhcp_requests_per_s: file
                .dhcp_requests_per_s
                .unwrap_or(crate::network::dhcp_server::RateLimiter::DEFAULT_NETWORK_PER_SECOND),
            capacity: file.capacity,
            metadata_port,
        })
    }

    /// Refuses a forward range that holds the port the API listens on
    /// (peers' calls would reach a tenant's VM instead).
    pub fn check_api_port(&self, port: u16) -> Result<(), ConfigError> {
        if self.port_forward_range.contains(port)
            || self.migration_port_range.contains(port)
            || port == self.peer_port
        {
            return Err(ConfigError::ReservedPort {
                forwards: self.port_forward_range.to_string(),
                what: "the API's",
                port,
            });
        }
        Ok(())
    }
}

/// "A.B.C.D/N" with any prefix, host bits ignored.
fn parse_any_cidr(text: &str) -> Option<crate::ipv4::Cidr> {
    let (address, prefix) = text.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|prefix| *prefix <= 32)?;
    Some(crate::ipv4::Cidr::of(address.parse().ok()?, prefix))
}

/// `nubis-vmm` next to this executable.
fn default_vmm_binary() -> PathBuf {
    sibling_binary("nubis-vmm")
}

/// The program `name` next to this executable.
fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_token_comes_from_the_environment_or_a_file() {
        let dir = std::env::temp_dir().join(format!("nubis-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = ConfigFile::default();
        assert!(matches!(
            AgentConfig::assemble(dir.clone(), file, None),
            Err(ConfigError::NoOperatorToken)
        ));
        let config = AgentConfig::assemble(
            dir.clone(),
            ConfigFile::default(),
            Some("0123456789abcdef".into()),
        )
        .unwrap();
        assert_eq!(config.operator_token, "0123456789abcdef");
        assert!(matches!(
            AgentConfig::assemble(dir.clone(), ConfigFile::default(), Some("short".into())),
            Err(ConfigError::WeakOperatorToken)
        ));
        let token_file = dir.join("token");
        std::fs::write(&token_file, "from-a-file-0123456789\n").unwrap();
        let file = ConfigFile {
            operator_token_file: Some(token_file),
            ..ConfigFile::default()
        };
        let config = AgentConfig::assemble(dir.clone(), file, None).unwrap();
        assert_eq!(config.operator_token, "from-a-file-0123456789");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn port_ranges_keep_clear_of_the_hosts_own_ports() {
        let dir = std::env::temp_dir().join(format!("nubis-agent-ports-{}", std::process::id()));
        let token = || Some("0123456789abcdef".to_string());
        let with = |forwards: &str, migrations: Option<&str>| ConfigFile {
            port_forward_range: Some(forwards.into()),
            migration_port_range: migrations.map(str::to_string),
            ..ConfigFile::default()
        };
        let config = AgentConfig::assemble(dir.clone(), ConfigFile::default(), token()).unwrap();
        assert_eq!(config.port_forward_range, DEFAULT_PORT_FORWARD_RANGE);
        assert!(config.check_api_port(8080).is_ok());
        assert!(config.check_api_port(30080).is_err());
        assert!(config.check_api_port(40000).is_err());
        for (forwards, migrations) in [
            ("4000-5000", None),
            ("40500-41000", None),
            ("100-2000", None),
            ("3000-2000", None),
            ("30000", None),
            ("x-y", None),
            ("30000-39999", Some("39000-39100")),
        ] {
            assert!(
                AgentConfig::assemble(dir.clone(), with(forwards, migrations), token()).is_err(),
                "{forwards} {migrations:?}"
            );
        }
        let config = AgentConfig::assemble(
            dir.clone(),
            with("20000-20099", Some("20100-20199")),
            token(),
        )
        .unwrap();
        assert!(config.port_forward_range.contains(20099));
        assert!(!config.port_forward_range.contains(20100));
    }

    #[test]
    fn an_image_directory_may_not_hold_the_data_directory() {
        let file = ConfigFile {
            image_dirs: vec!["/var/lib".into()],
            ..ConfigFile::default()
        };
        let err = AgentConfig::assemble(
            "/var/lib/nubis".into(),
            file,
            Some("0123456789abcdef".into()),
        )
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::ImageDirHoldsData { .. }),
            "{err}"
        );
    }

    #[test]
    fn egress_deny_entries_are_networks() {
        let file = ConfigFile {
            egress_deny: vec!["10.0.0.0/8".into(), "192.0.2.7/32".into()],
            ..ConfigFile::default()
        };
        let config =
            AgentConfig::assemble("/tmp/x".into(), file, Some("0123456789abcdef".into())).unwrap();
        assert_eq!(config.egress_deny.len(), 2);
        let file = ConfigFile {
            egress_deny: vec!["10.0.0.0".into()],
            ..ConfigFile::default()
        };
        assert!(
            AgentConfig::assemble("/tmp/x".into(), file, Some("0123456789abcdef".into())).is_err()
        );
    }

    #[test]
    fn unknown_config_fields_are_refused() {
        assert!(serde_json::from_str::<ConfigFile>(r#"{"operator_token":"x"}"#).is_err());
        assert!(serde_json::from_str::<ConfigFile>(r#"{"stop_timeout_s":5}"#).is_ok());
        let file: ConfigFile = serde_json::from_str(r#"{"underlay_address":"192.0.2.1"}"#).unwrap();
        assert_eq!(file.underlay_address, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert!(serde_json::from_str::<ConfigFile>(r#"{"underlay_address":"nope"}"#).is_err());
    }
}
