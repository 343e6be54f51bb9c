//! The VM configuration: a versioned JSON document (`nubis-vmm --config vm.json`)
//! whose fields the command-line flags can also set.
//!
//! The document is the contract between the host agent and the VMM, so its
//! types are in `nubis_contract::config`, re-exported here; this module adds
//! what needs the host: its memory (for [`HostLimits`]) and random MACs.

pub use nubis_contract::config::{
    disk_id, net_id, valid_tap_name, BootConfig, ConfigError, ConfigOverrides, ConsoleConfig,
    DiskConfig, HostLimits, MacAddr, MachineConfig, NetConfig, SerialConfig, VmConfig, VsockConfig,
    CONFIG_VERSION, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_DISK_ID_LEN, MAX_MEMORY_MIB, MAX_VCPUS,
    MAX_VIRTIO_DEVICES, MIN_MEMORY_MIB, NET_MTU_RANGE,
};

/// The kernel did not give the random bytes asked for: nothing random is
/// made up from a clock or a pid instead (two VMs could get the same MAC).
#[derive(Debug, thiserror::Error)]
pub enum RandomError {
    #[error("getrandom failed for {len} bytes: {source}")]
    Failed { len: usize, source: std::io::Error },
    #[error("getrandom gave {got} of {len} bytes")]
    Short { got: usize, len: usize },
}

/// `N` bytes from the kernel's random pool.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut bytes = [0u8; N];
    loop {
        // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
        let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        let err = std::io::Error::last_os_error();
        if got < 0 && err.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return checked_random(got, err, bytes);
    }
}

/// The bytes getrandom wrote, from its result `got` (its error `err` when
/// negative): all of them or an error.
fn checked_random<const N: usize>(
    got: isize,
    err: std::io::Error,
    bytes: [u8; N],
) -> Result<[u8; N], RandomError> {
    match usize::try_from(got) {
        Err(_) => Err(RandomError::Failed {
            len: N,
            source: err,
        }),
        Ok(got) if got != N => Err(RandomError::Short { got, len: N }),
        Ok(_) => Ok(bytes),
    }
}

/// A random locally administered unicast address.
pub fn random_mac() -> Result<MacAddr, RandomError> {
    random_bytes().map(local_unicast)
}

fn local_unicast(mut bytes: [u8; 6]) -> MacAddr {
    bytes[0] = (bytes[0] & 0xfc) | 0x02;
    MacAddr(bytes)
}

/// Reads the host's physical memory from `/proc/meminfo`.
pub fn host_memory_mib() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    parse_meminfo_total_mib(&meminfo).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemTotal line in /proc/meminfo",
        )
    })
}

fn parse_meminfo_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       24567808 kB\nMemFree: 1 kB\n";
        assert_eq!(parse_meminfo_total_mib(text), Some(23992));
        assert_eq!(parse_meminfo_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total_mib("MemTotal: x kB\n"), None);
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..32 {
            let random = random_mac().unwrap();
            assert!(random.is_unicast());
            assert_eq!(random.0[0] & 2, 2, "locally administered");
        }
    }

    #[test]
    fn nothing_random_is_made_up_when_getrandom_fails() {
        let failed = checked_random(-1, std::io::Error::from_raw_os_error(libc::ENOSYS), [0; 6]);
        assert!(
            matches!(failed, Err(RandomError::Failed { len: 6, .. })),
            "{failed:?}"
        );
        let short = checked_random(3, std::io::Error::other("unused"), [1; 6]);
        assert!(
            matches!(short, Err(RandomError::Short { got: 3, len: 6 })),
            "{short:?}"
        );
        let zero = checked_random(0, std::io::Error::other("unused"), [1; 6]);
        assert!(
            matches!(zero, Err(RandomError::Short { got: 0, len: 6 })),
            "{zero:?}"
        );
        let whole = checked_random(6, std::io::Error::other("unused"), [0xff; 6]).unwrap();
        assert_eq!(local_unicast(whole).to_string(), "fe:ff:ff:ff:ff:ff");
    }
}
