//! What this host offers VMs and what they take of it: the figures its
//! heartbeat carries and placement weighs. Capacity is measured at
//! start-up (CPUs with an overcommit ratio, memory less a reserve for the
//! host, the data directory's filesystem less its reserve) unless the
//! operator states it (`capacity` in the config file).

use std::path::Path;

use nubis_api::HostResources;

use crate::config::{AgentConfig, CapacitySettings};
use crate::store::{Store, StoreError};

/// vCPUs per host CPU unless configured.
pub const DEFAULT_CPU_OVERCOMMIT: u32 = 4;
/// Memory the host keeps for itself unless configured.
pub const DEFAULT_RESERVED_MEMORY_MIB: u64 = 1024;

/// The host as measured: CPUs, memory and its data filesystem's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

impl Measured {
    /// Measures this host; a figure that cannot be read is 0 (nothing is
    /// offered that is not known to be there).
    pub fn host(data_dir: &Path) -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_total_kib(&text))
            .map_or(0, |kib| kib / 1024);
        let disk_mib = crate::quota::filesystem_mib(data_dir).unwrap_or(0);
        Measured {
            cpus,
            memory_mib,
            disk_mib,
        }
    }
}

/// `MemTotal` of /proc/meminfo, in KiB.
fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// What the host offers: the operator's figures, else measured ones.
pub fn offered(
    settings: &CapacitySettings,
    measured: Measured,
    reserved_disk_mib: u64,
) -> HostResources {
    let overcommit = settings.cpu_overcommit.unwrap_or(DEFAULT_CPU_OVERCOMMIT);
    let reserved_memory = settings
        .reserved_memory_mib
        .unwrap_or(DEFAULT_RESERVED_MEMORY_MIB);
    HostResources {
        vcpus: settings
            .vcpus
            .unwrap_or_else(|| measured.cpus.saturating_mul(overcommit)),
        memory_mib: settings
            .memory_mib
            .unwrap_or_else(|| measured.memory_mib.saturating_sub(reserved_memory)),
        disk_mib: settings
            .disk_mib
            .unwrap_or_else(|| measured.disk_mib.saturating_sub(reserved_disk_mib)),
    }
}

/// This host's capacity under `config`.
pub fn of_host(config: &AgentConfig) -> HostResources {
    offered(
        &config.capacity,
        Measured::host(&config.data_dir),
        config.reserved_disk_mib,
    )
}

/// What the VMs here take, and how many there are.
pub fn used(store: &Store) -> Result<(HostResources, u32), StoreError> {
    let (usage, disk_mib) = store.host_usage()?;
    Ok((
        HostResources {
            vcpus: u32::try_from(usage.vcpus).unwrap_or(u32::MAX),
            memory_mib: usage.memory_mib,
            disk_mib,
        },
        u32::try_from(usage.vms).unwrap_or(u32::MAX),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Measured = Measured {
        cpus: 2,
        memory_mib: 24_000,
        disk_mib: 100_000,
    };

    #[test]
    fn measured_figures_less_reserves() {
        let offered = offered(&CapacitySettings::default(), HOST, 1024);
        assert_eq!(
            offered,
            HostResources {
                vcpus: 8,
                memory_mib: 24_000 - 1024,
                disk_mib: 100_000 - 1024
            }
        );
    }

    #[test]
    fn the_operators_figures_win() {
        let settings = CapacitySettings {
            vcpus: Some(3),
            memory_mib: Some(512),
            cpu_overcommit: Some(16),
            reserved_memory_mib: Some(0),
            disk_mib: None,
        };
        let offered = offered(&settings, HOST, 0);
        assert_eq!((offered.vcpus, offered.memory_mib), (3, 512));
        assert_eq!(offered.disk_mib, 100_000);
        let tiny = Measured {
            cpus: u32::MAX,
            memory_mib: 10,
            disk_mib: 0,
        };
        let offered = super::offered(&CapacitySettings::default(), tiny, 1024);
        assert_eq!(offered.vcpus, u32::MAX, "saturates");
        assert_eq!((offered.memory_mib, offered.disk_mib), (0, 0));
    }

    #[test]
    fn mem_total_is_read_from_meminfo() {
        assert_eq!(
            mem_total_kib("MemTotal:       24563712 kB\nMemFree: 1 kB\n"),
            Some(24_563_712)
        );
        assert_eq!(mem_total_kib("MemFree: 1 kB\n"), None);
    }
}
