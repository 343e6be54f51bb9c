//! What a host has and a VM needs: vCPUs, memory and disk.
//!
//! The numbers come from etcd, written by other programs, so no value may
//! make placement overflow or panic: sums saturate (a host whose allocation
//! saturates is full, which is the truth) and differences stop at zero (a
//! host allocated beyond its capacity has nothing free).

use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of each resource a VM takes from its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

impl Resources {
    /// Nothing.
    pub const ZERO: Resources = Resources::new(0, 0, 0);

    pub const fn new(vcpus: u32, memory_mib: u64, disk_mib: u64) -> Self {
        Resources {
            vcpus,
            memory_mib,
            disk_mib,
        }
    }

    /// `self + other`, or `None` if a dimension overflows.
    pub fn checked_add(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            vcpus: self.vcpus.checked_add(other.vcpus)?,
            memory_mib: self.memory_mib.checked_add(other.memory_mib)?,
            disk_mib: self.disk_mib.checked_add(other.disk_mib)?,
        })
    }

    /// `self - other`, or `None` if a dimension would go below zero.
    pub fn checked_sub(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            vcpus: self.vcpus.checked_sub(other.vcpus)?,
            memory_mib: self.memory_mib.checked_sub(other.memory_mib)?,
            disk_mib: self.disk_mib.checked_sub(other.disk_mib)?,
        })
    }

    /// `self + other`, each dimension stopping at its maximum.
    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            disk_mib: self.disk_mib.saturating_add(other.disk_mib),
        }
    }

    /// `self - other`, each dimension stopping at zero.
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_mib: self.disk_mib.saturating_sub(other.disk_mib),
        }
    }

    /// Whether every dimension of `self` is at most that of `room`.
    pub fn fits_in(self, room: Resources) -> bool {
        self.vcpus <= room.vcpus
            && self.memory_mib <= room.memory_mib
            && self.disk_mib <= room.disk_mib
    }
}

/// `2 vCPUs, 512 MiB memory, 10 MiB disk`.
impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vCPUs, {} MiB memory, {} MiB disk",
            self.vcpus, self.memory_mib, self.disk_mib
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Resources = Resources::new(u32::MAX, u64::MAX, u64::MAX);

    #[test]
    fn arithmetic_never_overflows() {
        assert_eq!(MAX.checked_add(Resources::new(1, 0, 0)), None);
        assert_eq!(MAX.checked_add(Resources::new(0, 0, 1)), None);
        assert_eq!(MAX.checked_add(Resources::ZERO), Some(MAX));
        assert_eq!(MAX.saturating_add(MAX), MAX);
        assert_eq!(Resources::ZERO.saturating_sub(MAX), Resources::ZERO);
        assert_eq!(Resources::ZERO.checked_sub(Resources::new(0, 1, 0)), None);
        assert_eq!(
            Resources::new(4, 1024, 10).saturating_sub(Resources::new(1, 2048, 10)),
            Resources::new(3, 0, 0)
        );
        assert_eq!(
            Resources::new(4, 1024, 10).checked_add(Resources::new(1, 1, 1)),
            Some(Resources::new(5, 1025, 11))
        );
    }

    #[test]
    fn fits_in_needs_every_dimension() {
        let room = Resources::new(4, 1024, 10);
        assert!(Resources::ZERO.fits_in(Resources::ZERO));
        assert!(room.fits_in(room));
        assert!(!Resources::new(5, 1, 1).fits_in(room));
        assert!(!Resources::new(1, 1025, 1).fits_in(room));
        assert!(!Resources::new(1, 1, 11).fits_in(room));
        assert!(MAX.fits_in(MAX));
    }

    #[test]
    fn display_names_the_units() {
        assert_eq!(
            Resources::new(2, 512, 10).to_string(),
            "2 vCPUs, 512 MiB memory, 10 MiB disk"
        );
    }
}
