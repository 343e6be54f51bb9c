//! The VM configuration: a versioned JSON document (`nubis-vmm --config vm.json`)
//! whose fields the command-line flags can also set.
//!
//! The document is the contract between the host agent and the VMM, so it is
//! strict: unknown fields are errors (a typo must not silently fall back to a
//! default), and every value is validated before any KVM object is created.
//! Here are the document's types and the checks that need nothing of the
//! host; the VMM adds the host's limits ([`HostLimits`]).
//!
//! ```json
//! {
//!   "version": 1,
//!   "boot": { "kernel": "vmlinux", "initrd": "initramfs.cpio", "cmdline": "console=ttyS0" },
//!   "machine": { "vcpus": 2, "memory_mib": 512 },
//!   "serial": { "mode": "file", "path": "/var/log/vm0.console" },
//!   "control_socket": "/run/nubis/vm0.sock"
//! }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod devices;
pub use devices::{
    valid_tap_name, ConsoleConfig, DiskConfig, MacAddr, NetConfig, VsockConfig, MAX_DISK_ID_LEN,
    MAX_VSOCK_SOCKET_LEN, NET_MTU_RANGE, VSOCK_CID_RANGE,
};

/// The configuration format version this VMM reads and writes.
pub const CONFIG_VERSION: u32 = 1;
/// Smallest guest RAM accepted: below this a Linux guest cannot boot.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Guest RAM when neither the config nor the flags name it.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// vCPUs when neither the config nor the flags name it.
pub const DEFAULT_VCPUS: u32 = 1;
/// Largest vCPU count the boot path supports: APIC ids are 8 bits (xAPIC) and
/// one id is taken by the IOAPIC.
pub const MAX_VCPUS: u32 = 254;
/// Largest guest RAM accepted regardless of the host: 1 TiB.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Errors in reading or validating a configuration.
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
    #[error("unsupported config version {0} (this VMM reads version {CONFIG_VERSION})")]
    UnsupportedVersion(u32),
    #[error("no kernel given: use --kernel PATH or boot.kernel in the config")]
    MissingKernel,
    #[error("vcpus must be at least 1, got 0")]
    ZeroVcpus,
    #[error("vcpus {requested} is above the maximum of {max}")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("memory_mib {0} is below the minimum of {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("memory_mib {requested} is above the host's memory of {host} MiB")]
    MemoryExceedsHost { requested: u64, host: u64 },
    #[error("memory_mib {0} is above the supported maximum of {MAX_MEMORY_MIB} MiB")]
    MemoryTooLarge(u64),
    #[error("invalid serial setting '{0}': expected stdout, off, file:PATH or unix:PATH")]
    InvalidSerial(String),
    #[error("cmdline is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cmdline contains a NUL or non-ASCII byte")]
    CmdlineInvalid,
    #[error("invalid disk '{value}': {reason} (expected path=FILE[,ro=on|off][,id=NAME][,bw=BYTES_PER_S][,iops=N])")]
    InvalidDisk { value: String, reason: String },
    #[error("invalid NIC '{value}': {reason} (expected tap=NAME|fd=N[,mac=MAC][,id=NAME][,bw=BYTES_PER_S][,pps=N][,mtu=N])")]
    InvalidNet { value: String, reason: String },
    #[error("invalid console '{value}': {reason} (expected fd=N|file=PATH)")]
    InvalidConsole { value: String, reason: String },
    #[error("invalid vsock device '{value}': {reason} (expected cid=N,socket=PATH)")]
    InvalidVsock { value: String, reason: String },
    #[error("{0} virtio devices requested; at most {MAX_VIRTIO_DEVICES} fit")]
    TooManyDevices(usize),
    #[error("disk id '{0}' is longer than {MAX_DISK_ID_LEN} bytes")]
    DiskIdTooLong(String),
    #[error("device id '{0}' is used twice")]
    DuplicateDeviceId(String),
    #[error("tap '{0}' is used by two NICs")]
    DuplicateTap(String),
    #[error("descriptor {0} is given to two devices")]
    DuplicateFd(i32),
    #[error("a rate of 0 would stop device '{0}' for good: leave the limit out instead")]
    ZeroRate(String),
}

/// virtio-mmio devices get IRQs 5-23 except the ACPI SCI (9).
pub const MAX_VIRTIO_DEVICES: usize = 18;

/// The whole configuration of one microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Format version; must be [`CONFIG_VERSION`].
    pub version: u32,
    pub boot: BootConfig,
    #[serde(default)]
    pub machine: MachineConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    /// virtio-blk disks, in order: the first is /dev/vda.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, in order: the first is eth0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// A virtio-rng entropy device fed by the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// virtio-console ports, in order: the first is /dev/hvc0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consoles: Vec<ConsoleConfig>,
    /// A virtio-vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Unix socket for the control protocol (see `control`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. The VMM appends what its devices need.
    #[serde(default)]
    pub cmdline: String,
}

/// The virtual hardware's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
}

fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}

fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
        }
    }
}

/// Where the guest's 8250 UART goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum SerialConfig {
    /// Output to the VMM's stdout, input from its stdin (raw mode on a tty).
    #[default]
    Stdout,
    /// Output appended to a file; no input.
    File { path: PathBuf },
    /// The VMM listens on a Unix socket; one client at a time gets the
    /// output and may type input.
    Unix { path: PathBuf },
    /// The UART exists but its output is discarded.
    Off,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = || ConfigError::InvalidSerial(value.to_string());
        match value {
            "stdout" => Ok(Self::Stdout),
            "off" => Ok(Self::Off),
            _ => match value.split_once(':') {
                Some(("file", path)) if !path.is_empty() => Ok(Self::File { path: path.into() }),
                Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix { path: path.into() }),
                _ => Err(invalid()),
            },
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => write!(f, "stdout"),
            Self::Off => write!(f, "off"),
            Self::File { path } => write!(f, "file:{}", path.display()),
            Self::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Settings given as flags; each one that is set overrides the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigOverrides {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub serial: Option<SerialConfig>,
    /// Disks added after the config file's.
    pub disks: Vec<DiskConfig>,
    /// NICs added after the config file's.
    pub nets: Vec<NetConfig>,
    /// Adds the entropy device.
    pub rng: bool,
    /// Console ports added after the config file's.
    pub consoles: Vec<ConsoleConfig>,
    /// The vsock device, replacing the config file's.
    pub vsock: Option<VsockConfig>,
    pub control_socket: Option<PathBuf>,
}

/// Limits that come from the host rather than from the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// KVM's recommended/maximum vCPU count on this host.
    pub max_vcpus: u32,
    /// The host's physical memory.
    pub host_memory_mib: u64,
}

impl VmConfig {
    /// Parses a configuration document.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_path_buf(),
            source,
        })
    }

    /// Reads and parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Builds a configuration from an optional base document and flags.
    pub fn assemble(base: Option<VmConfig>, flags: ConfigOverrides) -> Result<Self, ConfigError> {
        let mut config = match base {
            Some(config) => config,
            None => VmConfig {
                version: CONFIG_VERSION,
                boot: BootConfig {
                    kernel: flags.kernel.clone().ok_or(ConfigError::MissingKernel)?,
                    initrd: None,
                    cmdline: String::new(),
                },
                machine: MachineConfig::default(),
                serial: SerialConfig::default(),
                disks: Vec::new(),
                nets: Vec::new(),
                rng: false,
                consoles: Vec::new(),
                vsock: None,
                control_socket: None,
            },
        };
        if let Some(kernel) = flags.kernel {
            config.boot.kernel = kernel;
        }
        if let Some(initrd) = flags.initrd {
            config.boot.initrd = Some(initrd);
        }
        if let Some(cmdline) = flags.cmdline {
            config.boot.cmdline = cmdline;
        }
        if let Some(vcpus) = flags.vcpus {
            config.machine.vcpus = vcpus;
        }
        if let Some(memory_mib) = flags.memory_mib {
            config.machine.memory_mib = memory_mib;
        }
        if let Some(serial) = flags.serial {
            config.serial = serial;
        }
        config.disks.extend(flags.disks);
        config.nets.extend(flags.nets);
        config.rng |= flags.rng;
        config.consoles.extend(flags.consoles);
        if let Some(vsock) = flags.vsock {
            config.vsock = Some(vsock);
        }
        if let Some(socket) = flags.control_socket {
            config.control_socket = Some(socket);
        }
        Ok(config)
    }

    /// Checks every value against the format's and the host's limits.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(ConfigError::UnsupportedVersion(self.version));
        }
        if self.boot.kernel.as_os_str().is_empty() {
            return Err(ConfigError::MissingKernel);
        }
        let vcpus = self.machine.vcpus;
        if vcpus == 0 {
            return Err(ConfigError::ZeroVcpus);
        }
        let max_vcpus = limits.max_vcpus.min(MAX_VCPUS);
        if vcpus > max_vcpus {
            return Err(ConfigError::TooManyVcpus {
                requested: vcpus,
                max: max_vcpus,
            });
        }
        let memory_mib = self.machine.memory_mib;
        if memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(memory_mib));
        }
        if memory_mib > MAX_MEMORY_MIB {
            return Err(ConfigError::MemoryTooLarge(memory_mib));
        }
        if memory_mib > limits.host_memory_mib {
            return Err(ConfigError::MemoryExceedsHost {
                requested: memory_mib,
                host: limits.host_memory_mib,
            });
        }
        if !self.boot.cmdline.is_ascii() || self.boot.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineInvalid);
        }
        let devices = self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + self.consoles.len()
            + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        for disk in &self.disks {
            if let Some(id) = disk.id.as_ref().filter(|id| id.len() > MAX_DISK_ID_LEN) {
                return Err(ConfigError::DiskIdTooLong(id.clone()));
            }
        }
        let mut ids = std::collections::HashSet::new();
        let mut taps = std::collections::HashSet::new();
        let mut fds = std::collections::HashSet::new();
        for (id, limit) in self.device_ids() {
            if limit.has_zero_rate() {
                return Err(ConfigError::ZeroRate(id));
            }
            if !ids.insert(id.clone()) {
                return Err(ConfigError::DuplicateDeviceId(id));
            }
        }
        for net in &self.nets {
            net.check().map_err(|reason| ConfigError::InvalidNet {
                value: serde_json::to_string(net).unwrap_or_default(),
                reason,
            })?;
            if let Some(tap) = net.tap.as_ref().filter(|tap| !taps.insert(*tap)) {
                return Err(ConfigError::DuplicateTap(tap.clone()));
            }
            if let Some(fd) = net.fd.filter(|fd| !fds.insert(*fd)) {
                return Err(ConfigError::DuplicateFd(fd));
            }
        }
        for console in &self.consoles {
            console
                .check()
                .map_err(|reason| ConfigError::InvalidConsole {
                    value: serde_json::to_string(console).unwrap_or_default(),
                    reason,
                })?;
            if let Some(fd) = console.fd.filter(|fd| !fds.insert(*fd)) {
                return Err(ConfigError::DuplicateFd(fd));
            }
        }
        if let Some(vsock) = &self.vsock {
            vsock.check().map_err(|reason| ConfigError::InvalidVsock {
                value: serde_json::to_string(vsock).unwrap_or_default(),
                reason,
            })?;
        }
        Ok(())
    }

    /// Every disk's and NIC's id (the configured one or its default), with
    /// its rate limit, disks first.
    pub fn device_ids(&self) -> Vec<(String, crate::RateLimit)> {
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(index, disk)| (disk_id(disk, index), disk.rate_limit));
        let nets = self
            .nets
            .iter()
            .enumerate()
            .map(|(index, net)| (net_id(net, index), net.rate_limit));
        disks.chain(nets).collect()
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.machine.memory_mib << 20
    }
}

/// The id of disk number `index`: its configured id or `nubis-diskN`.
pub fn disk_id(disk: &DiskConfig, index: usize) -> String {
    disk.id
        .clone()
        .unwrap_or_else(|| format!("nubis-disk{index}"))
}

/// The id of NIC number `index`: its configured id or `nubis-netN`.
pub fn net_id(net: &NetConfig, index: usize) -> String {
    net.id
        .clone()
        .unwrap_or_else(|| format!("nubis-net{index}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        max_vcpus: 1024,
        host_memory_mib: 16 * 1024,
    };

    fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_json(text, Path::new("test.json"))
    }

    #[test]
    fn full_document_round_trips() {
        let text = r#"{"version":1,"boot":{"kernel":"/k","initrd":"/i","cmdline":"console=ttyS0"},
            "machine":{"vcpus":2,"memory_mib":512},"serial":{"mode":"file","path":"/tmp/c"},
            "control_socket":"/tmp/s"}"#;
        let config = parse(text).unwrap();
        assert_eq!(config.machine.vcpus, 2);
        assert_eq!(config.machine.memory_mib, 512);
        assert_eq!(
            config.serial,
            SerialConfig::File {
                path: "/tmp/c".into()
            }
        );
        let again = parse(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(config, again);
        config.validate(&LIMITS).unwrap();
    }

    #[test]
    fn defaults_fill_optional_sections() {
        let config = parse(r#"{"version":1,"boot":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(config.machine, MachineConfig::default());
        assert_eq!(config.serial, SerialConfig::Stdout);
        assert_eq!(config.boot.cmdline, "");
        assert_eq!(config.memory_bytes(), DEFAULT_MEMORY_MIB << 20);
    }

    #[test]
    fn unknown_fields_are_rejected_and_named() {
        for text in [
            r#"{"version":1,"boot":{"kernel":"/k"},"machin":{}}"#,
            r#"{"version":1,"boot":{"kernel":"/k","kernal":"/x"}}"#,
            r#"{"version":1,"boot":{"kernel":"/k"},"machine":{"cpus":2}}"#,
            r#"{"version":1,"boot":{"kernel":"/k"},"serial":{"mode":"file","path":"/x","extra":1}}"#,
        ] {
            let message = parse(text).unwrap_err().to_string();
            assert!(message.contains("unknown field"), "{message}");
        }
    }

    #[test]
    fn malformed_documents_are_rejected() {
        for text in [
            "",
            "{",
            "[]",
            r#"{"boot":{"kernel":"/k"}}"#,
            r#"{"version":1}"#,
            r#"{"version":1,"boot":{"kernel":"/k"},"machine":{"vcpus":-1}}"#,
            r#"{"version":1,"boot":{"kernel":"/k"},"machine":{"memory_mib":"lots"}}"#,
            r#"{"version":1,"boot":{"kernel":"/k"},"serial":{"mode":"tty"}}"#,
        ] {
            assert!(parse(text).is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn version_is_checked() {
        let config = parse(r#"{"version":2,"boot":{"kernel":"/k"}}"#).unwrap();
        assert!(matches!(
            config.validate(&LIMITS),
            Err(ConfigError::UnsupportedVersion(2))
        ));
    }

    fn with_machine(vcpus: u32, memory_mib: u64) -> VmConfig {
        VmConfig::assemble(
            None,
            ConfigOverrides {
                kernel: Some("/k".into()),
                vcpus: Some(vcpus),
                memory_mib: Some(memory_mib),
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn vcpu_limits() {
        assert!(matches!(
            with_machine(0, 128).validate(&LIMITS),
            Err(ConfigError::ZeroVcpus)
        ));
        assert!(matches!(
            with_machine(255, 128).validate(&LIMITS),
            Err(ConfigError::TooManyVcpus {
                requested: 255,
                max: 254
            })
        ));
        let small_host = HostLimits {
            max_vcpus: 8,
            ..LIMITS
        };
        assert!(matches!(
            with_machine(9, 128).validate(&small_host),
            Err(ConfigError::TooManyVcpus {
                requested: 9,
                max: 8
            })
        ));
        with_machine(8, 128).validate(&small_host).unwrap();
    }

    #[test]
    fn memory_limits() {
        assert!(matches!(
            with_machine(1, 0).validate(&LIMITS),
            Err(ConfigError::MemoryTooSmall(0))
        ));
        assert!(matches!(
            with_machine(1, 31).validate(&LIMITS),
            Err(ConfigError::MemoryTooSmall(31))
        ));
        with_machine(1, 32).validate(&LIMITS).unwrap();
        assert!(matches!(
            with_machine(1, 16 * 1024 + 1).validate(&LIMITS),
            Err(ConfigError::MemoryExceedsHost { .. })
        ));
        assert!(matches!(
            with_machine(1, u64::MAX).validate(&LIMITS),
            Err(ConfigError::MemoryTooLarge(_))
        ));
    }

    #[test]
    fn flags_override_the_document() {
        let base =
            parse(r#"{"version":1,"boot":{"kernel":"/k","cmdline":"a"},"machine":{"vcpus":2}}"#)
                .unwrap();
        let config = VmConfig::assemble(
            Some(base),
            ConfigOverrides {
                cmdline: Some("b".into()),
                memory_mib: Some(256),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(config.boot.cmdline, "b");
        assert_eq!(config.machine.vcpus, 2);
        assert_eq!(config.machine.memory_mib, 256);
    }

    #[test]
    fn kernel_is_required_without_a_document() {
        assert!(matches!(
            VmConfig::assemble(None, ConfigOverrides::default()),
            Err(ConfigError::MissingKernel)
        ));
    }

    #[test]
    fn serial_flag_syntax() {
        assert_eq!(
            "stdout".parse::<SerialConfig>().unwrap(),
            SerialConfig::Stdout
        );
        assert_eq!("off".parse::<SerialConfig>().unwrap(), SerialConfig::Off);
        assert_eq!(
            "file:/a:b".parse::<SerialConfig>().unwrap(),
            SerialConfig::File {
                path: "/a:b".into()
            }
        );
        assert_eq!(
            "unix:/s".parse::<SerialConfig>().unwrap(),
            SerialConfig::Unix { path: "/s".into() }
        );
        for bad in ["", "file:", "tty", "unix", "pipe:/x"] {
            assert!(bad.parse::<SerialConfig>().is_err(), "accepted {bad}");
        }
        for good in ["stdout", "off", "file:/x", "unix:/y"] {
            assert_eq!(good.parse::<SerialConfig>().unwrap().to_string(), good);
        }
    }

    #[test]
    fn cmdline_must_be_ascii() {
        let mut config = with_machine(1, 128);
        config.boot.cmdline = "console=ttyS0 é".into();
        assert!(matches!(
            config.validate(&LIMITS),
            Err(ConfigError::CmdlineInvalid)
        ));
    }

    #[test]
    fn disks_in_documents_and_limits() {
        let config = parse(
            r#"{"version":1,"boot":{"kernel":"/k"},"disks":[{"path":"/a"},{"path":"/b","read_only":true}]}"#,
        )
        .unwrap();
        assert_eq!(config.disks.len(), 2);
        assert!(config.disks[1].read_only);
        assert!(
            parse(r#"{"version":1,"boot":{"kernel":"/k"},"disks":[{"path":"/a","ro":true}]}"#)
                .is_err()
        );
        let mut many = with_machine(1, 128);
        many.disks = vec!["path=/d".parse().unwrap(); MAX_VIRTIO_DEVICES + 1];
        assert!(matches!(
            many.validate(&LIMITS),
            Err(ConfigError::TooManyDevices(19))
        ));
        let mut long_id = with_machine(1, 128);
        long_id.disks = vec!["path=/d,id=aaaaaaaaaaaaaaaaaaaaa".parse().unwrap()];
        assert!(matches!(
            long_id.validate(&LIMITS),
            Err(ConfigError::DiskIdTooLong(_))
        ));
    }

    #[test]
    fn device_ids_rates_taps_and_fds_are_checked() {
        let mut config = with_machine(1, 128);
        config.disks = vec![
            "path=/a".parse().unwrap(),
            "path=/b,id=nubis-net0".parse().unwrap(),
        ];
        config.nets = vec!["tap=t0".parse().unwrap()];
        assert!(matches!(
            config.validate(&LIMITS),
            Err(ConfigError::DuplicateDeviceId(id)) if id == "nubis-net0"
        ));
        config.disks.pop();
        assert!(config.validate(&LIMITS).is_ok());
        assert_eq!(
            config
                .device_ids()
                .into_iter()
                .map(|(id, _)| id)
                .collect::<Vec<_>>(),
            ["nubis-disk0", "nubis-net0"]
        );
        config.nets.push("tap=t0,id=second".parse().unwrap());
        assert!(matches!(
            config.validate(&LIMITS),
            Err(ConfigError::DuplicateTap(_))
        ));
        config.nets = vec!["fd=5".parse().unwrap(), "fd=5,id=x".parse().unwrap()];
        assert!(matches!(
            config.validate(&LIMITS),
            Err(ConfigError::DuplicateFd(5))
        ));
        config.nets = vec!["fd=5".parse().unwrap()];
        config.consoles = vec!["fd=5".parse().unwrap()];
        assert!(matches!(
            config.validate(&LIMITS),
            Err(ConfigError::DuplicateFd(5))
        ));
        config.consoles = vec!["fd=6".parse().unwrap(), "file=/x".parse().unwrap()];
        assert!(config.validate(&LIMITS).is_ok());
        config.consoles = vec![];
        let zero = parse(
            r#"{"version":1,"boot":{"kernel":"/k"},"disks":[{"path":"/a","rate_limit":{"ops_per_s":0}}]}"#,
        )
        .unwrap();
        assert!(matches!(
            zero.validate(&LIMITS),
            Err(ConfigError::ZeroRate(_))
        ));
        let bad_tap =
            parse(r#"{"version":1,"boot":{"kernel":"/k"},"nets":[{"mac":"02:00:00:00:00:01"}]}"#)
                .unwrap();
        assert!(matches!(
            bad_tap.validate(&LIMITS),
            Err(ConfigError::InvalidNet { .. })
        ));
    }
}
