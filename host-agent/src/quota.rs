//! Quotas for what costs the host beyond CPU and memory (which the store
//! checks as it defines a VM): disk space. A tenant's storage is the full
//! size of its VMs' root and data disks (sparse or not: it may fill them),
//! its snapshots and its uploaded files, partial uploads included.

use std::path::Path;

use nubis_api::Quota;

use crate::store::{Store, StoreError};

/// Bytes as whole MiB, rounded up.
pub fn mib_of(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Disk MiB VM `vm`'s disks take: the root disk at its image's size, the
/// data disks at their full size.
pub fn disks_mib(store: &Store, vm: &crate::store::VmRow) -> Result<u64, StoreError> {
    let root_mib = store
        .get_image(&vm.tenant_id, &vm.image_id)?
        .map_or(0, |image| mib_of(image.rootfs_bytes));
    Ok(root_mib + vm.disks.iter().map(|disk| disk.size_mib).sum::<u64>())
}

/// Bytes of the regular files in `dir` (not following links); a missing
/// directory holds nothing.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(|meta| meta.is_file())
        .map(|meta| meta.len())
        .sum()
}

/// A tenant's upload directory under the agent's data directory.
pub fn uploads_dir(data_dir: &Path, tenant_id: &str) -> std::path::PathBuf {
    data_dir.join("uploads").join(tenant_id)
}

/// Errors in checking the host's free space.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("cannot read the free space of {path}: {source}")]
    Statvfs {
        path: String,
        source: std::io::Error,
    },
    #[error("the host's disk has {free_mib} MiB free and keeps {reserve_mib} MiB for itself: {asked_mib} MiB more does not fit")]
    Full {
        free_mib: u64,
        reserve_mib: u64,
        asked_mib: u64,
    },
}

/// The filesystem of `dir`, as statvfs sees it.
fn statvfs(dir: &Path) -> Result<libc::statvfs, SpaceError> {
    let failed = |source| SpaceError::Statvfs {
        path: dir.display().to_string(),
        source,
    };
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| failed(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `stat` a live,
    // writable statvfs for the call to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(stat)
}

/// Bytes free for unprivileged use on the filesystem of `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64, SpaceError> {
    let stat = statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The size of the filesystem of `dir`, in MiB.
pub fn filesystem_mib(dir: &Path) -> Result<u64, SpaceError> {
    let stat = statvfs(dir)?;
    Ok(stat.f_blocks.saturating_mul(stat.f_frsize) >> 20)
}

/// Whether `asked_mib` more fits on the host above its reserve.
pub fn fits_host(free_bytes: u64, reserve_mib: u64, asked_mib: u64) -> Result<(), SpaceError> {
    let free_mib = free_bytes / (1 << 20);
    if free_mib < reserve_mib.saturating_add(asked_mib) {
        return Err(SpaceError::Full {
            free_mib,
            reserve_mib,
            asked_mib,
        });
    }
    Ok(())
}

/// Refuses `asked_mib` more on the data directory's filesystem when it
/// would go below the reserve.
pub fn check_host_space(
    data_dir: &Path,
    reserve_mib: u64,
    asked_mib: u64,
) -> Result<(), SpaceError> {
    fits_host(free_bytes(data_dir)?, reserve_mib, asked_mib)
}

/// MiB of storage the tenant uses now.
pub fn storage_used_mib(
    store: &Store,
    data_dir: &Path,
    tenant_id: &str,
) -> Result<u64, StoreError> {
    Ok(store.storage_used_mib(tenant_id)? + mib_of(dir_bytes(&uploads_dir(data_dir, tenant_id))))
}

/// Whether `used` plus `asked` MiB fits `quota`, as the refusal to give.
pub fn fits(quota: &Quota, used: u64, asked: u64) -> Result<(), StoreError> {
    if used.saturating_add(asked) > quota.max_storage_mib {
        return Err(StoreError::Quota(format!(
            "storage MiB: {used} in use + {asked} requested exceeds the tenant's quota of {}",
            quota.max_storage_mib
        )));
    }
    Ok(())
}

/// Refuses `asked` more MiB of storage beyond the tenant's quota.
pub fn check_storage(
    store: &Store,
    data_dir: &Path,
    tenant_id: &str,
    quota: &Quota,
    asked: u64,
) -> Result<(), StoreError> {
    fits(quota, storage_used_mib(store, data_dir, tenant_id)?, asked)
}

/// Bytes of storage left to the tenant (for a streamed upload).
pub fn storage_left_bytes(
    store: &Store,
    data_dir: &Path,
    tenant_id: &str,
    quota: &Quota,
) -> Result<u64, StoreError> {
    let used = storage_used_mib(store, data_dir, tenant_id)?;
    Ok(quota
        .max_storage_mib
        .saturating_sub(used)
        .saturating_mul(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_whole_mib() {
        assert_eq!(mib_of(0), 0);
        assert_eq!(mib_of(1), 1);
        assert_eq!(mib_of(1 << 20), 1);
        assert_eq!(mib_of((1 << 20) + 1), 2);
        assert_eq!(mib_of(u64::MAX), u64::MAX / (1 << 20) + 1);
    }

    #[test]
    fn storage_fits_up_to_the_quota_and_not_beyond() {
        let quota = Quota {
            max_storage_mib: 100,
            ..Quota::default()
        };
        assert!(fits(&quota, 40, 60).is_ok());
        let err = fits(&quota, 40, 61).unwrap_err();
        assert!(
            err.to_string().contains("40 in use + 61 requested"),
            "{err}"
        );
        assert!(fits(&quota, u64::MAX, 1).is_err());
    }

    #[test]
    fn the_host_keeps_its_reserve() {
        assert!(fits_host(2048 << 20, 1024, 1024).is_ok());
        let err = fits_host(2048 << 20, 1024, 1025).unwrap_err();
        assert!(err.to_string().contains("2048 MiB free"), "{err}");
        assert!(fits_host(0, 0, 0).is_ok());
        assert!(fits_host(u64::MAX, u64::MAX, 1).is_err());
        let free = free_bytes(&std::env::temp_dir()).unwrap();
        assert!(free > 0);
        assert!(free_bytes(Path::new("/nonexistent/nubis")).is_err());
    }

    #[test]
    fn uploads_count_every_file_of_the_tenant() {
        let dir = std::env::temp_dir().join(format!("nubis-quota-{}", std::process::id()));
        let uploads = uploads_dir(&dir, "t-1");
        std::fs::create_dir_all(&uploads).unwrap();
        std::fs::write(uploads.join("a"), vec![0u8; 3 << 20]).unwrap();
        std::fs::write(uploads.join(".b.partial"), vec![0u8; 10]).unwrap();
        assert_eq!(dir_bytes(&uploads), (3 << 20) + 10);
        assert_eq!(dir_bytes(&dir.join("nope")), 0);
        let (store, tenant, _image) = crate::store::fixture();
        let uploads = uploads_dir(&dir, &tenant);
        std::fs::create_dir_all(&uploads).unwrap();
        std::fs::write(uploads.join("disk"), vec![0u8; 5 << 20]).unwrap();
        let used = storage_used_mib(&store, &dir, &tenant).unwrap();
        assert_eq!(used, 5);
        std::fs::remove_dir_all(&dir).ok();
    }
}
