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
}

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
        let mut image_dirs = vec![data_dir.join("images")];
        image_dirs.extend(file.image_dirs);
        // Tenants' uploads are reachable only by their owner (see
        // http/uploads.rs), never through a shared image directory.
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
        })
    }
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
    fn unknown_config_fields_are_refused() {
        assert!(serde_json::from_str::<ConfigFile>(r#"{"operator_token":"x"}"#).is_err());
        assert!(serde_json::from_str::<ConfigFile>(r#"{"stop_timeout_s":5}"#).is_ok());
        let file: ConfigFile = serde_json::from_str(r#"{"underlay_address":"192.0.2.1"}"#).unwrap();
        assert_eq!(file.underlay_address, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert!(serde_json::from_str::<ConfigFile>(r#"{"underlay_address":"nope"}"#).is_err());
    }
}
