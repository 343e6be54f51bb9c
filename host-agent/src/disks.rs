//! Per-VM disks: the root disk is a copy-on-write clone of the image's
//! (a reflink where the filesystem has them, otherwise a sparse copy), so
//! no tenant ever writes to a shared image; data disks are sparse files.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `_IOW(0x94, 9, int)`: clone a whole file (btrfs, XFS with reflink).
const FICLONE: libc::c_ulong = 0x4004_9409;
const CHUNK: usize = 1 << 20;

/// Errors in preparing a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot read the disk to copy {path}: {source}")]
    Source {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the VM's disk {path}: {source}")]
    Target {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a root disk was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneKind {
    Reflink,
    SparseCopy,
}

/// Makes `target` through `make`, which writes `TARGET.partial`: the
/// target appears only whole. A copy cut short (a full disk, a crash)
/// never passes for a disk, since `target` existing means "prepared".
fn write_whole<T>(
    target: &Path,
    make: impl FnOnce(&Path) -> Result<T, DiskError>,
) -> Result<T, DiskError> {
    let target_error = |source| DiskError::Target {
        path: target.to_path_buf(),
        source,
    };
    if target.exists() {
        return Err(target_error(std::io::Error::from(
            std::io::ErrorKind::AlreadyExists,
        )));
    }
    let mut partial = target.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    // A leftover of an earlier attempt that was cut short.
    let _ = std::fs::remove_file(&partial);
    match make(&partial) {
        Ok(value) => {
            std::fs::rename(&partial, target).map_err(target_error)?;
            Ok(value)
        }
        Err(err) => {
            let _ = std::fs::remove_file(&partial);
            Err(err)
        }
    }
}

/// Clones `source` to a new file `target` (which must not exist).
pub fn clone_disk(source: &Path, target: &Path) -> Result<CloneKind, DiskError> {
    write_whole(target, |partial| clone_into(source, partial))
}

fn clone_into(source: &Path, target: &Path) -> Result<CloneKind, DiskError> {
    let input = File::open(source).map_err(|source_err| DiskError::Source {
        path: source.to_path_buf(),
        source: source_err,
    })?;
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(|source| DiskError::Target {
            path: target.to_path_buf(),
            source,
        })?;
    copy_file(input, source, output, target)
}

/// Copies the open file `input` (named `source` in errors) into the new,
/// empty `output` (named `target`): a reflink where the file system has
/// them, else a sparse copy. Callers open both files themselves when a
/// name cannot be trusted (see `supervisor/vmfs.rs`).
pub fn copy_file(
    mut input: File,
    source: &Path,
    mut output: File,
    target: &Path,
) -> Result<CloneKind, DiskError> {
    let source_error = |source_err| DiskError::Source {
        path: source.to_path_buf(),
        source: source_err,
    };
    let target_error = |source| DiskError::Target {
        path: target.to_path_buf(),
        source,
    };
    let len = input.metadata().map_err(source_error)?.len();
    // SAFETY: FICLONE takes the source descriptor by value; both
    // descriptors are open for the duration of the call.
    let cloned = unsafe { libc::ioctl(output.as_raw_fd(), FICLONE, input.as_raw_fd()) } == 0;
    if cloned {
        return Ok(CloneKind::Reflink);
    }
    // Only the source's data is read (its holes are holes in the copy
    // too), and of that only the chunks that are not all zeros written: a
    // 64 MiB image with 9 MiB of files costs 9 MiB of reads and writes.
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in data_extents(&input, len).map_err(source_error)? {
        input.seek(SeekFrom::Start(start)).map_err(source_error)?;
        output.seek(SeekFrom::Start(start)).map_err(target_error)?;
        let mut offset = start;
        while offset < end {
            let want = CHUNK.min((end - offset) as usize);
            input.read_exact(&mut buf[..want]).map_err(source_error)?;
            if buf[..want].iter().all(|b| *b == 0) {
                output
                    .seek(SeekFrom::Current(want as i64))
                    .map_err(target_error)?;
            } else {
                output.write_all(&buf[..want]).map_err(target_error)?;
            }
            offset += want as u64;
        }
    }
    output.set_len(len).map_err(target_error)?;
    output.sync_all().map_err(target_error)?;
    Ok(CloneKind::SparseCopy)
}

/// The `[start, end)` ranges of `file` (of `len` bytes) that hold data,
/// by `SEEK_DATA`/`SEEK_HOLE`; the whole file where the file system does
/// not tell holes apart.
fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let Ok(offset) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor this function borrows; it moves
        // only the file offset, which every reader here sets before use.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        match std::io::Error::last_os_error() {
            // No data at or after `offset`.
            err if err.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            err => Err(err),
        }
    };
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < len {
        let start = match seek(offset, libc::SEEK_DATA) {
            Ok(Some(start)) => start,
            Ok(None) => break,
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) && offset == 0 => {
                return Ok(vec![(0, len)]);
            }
            Err(err) => return Err(err),
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        extents.push((start, end));
        offset = end;
    }
    Ok(extents)
}

/// A new sparse data disk of `size_mib`.
pub fn create_data_disk(path: &Path, size_mib: u64) -> Result<(), DiskError> {
    write_whole(path, |partial| sparse_file(partial, size_mib))
}

fn sparse_file(path: &Path, size_mib: u64) -> Result<(), DiskError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| DiskError::Target {
            path: path.to_path_buf(),
            source,
        })?;
    size_file(&file, path, size_mib)
}

/// Makes the open, empty `file` (named `path`) a disk of `size_mib`, its
/// blocks allocated up front (reading as zeros): a guest that fills its
/// disk then uses space the host granted when the disk was made (and the
/// host's reserve was checked), never space the host needs for itself.
/// A filesystem that cannot allocate ahead gets a sparse file.
pub fn size_file(file: &File, path: &Path, size_mib: u64) -> Result<(), DiskError> {
    let failed = |source| DiskError::Target {
        path: path.to_path_buf(),
        source,
    };
    let len = size_mib
        .checked_mul(1 << 20)
        .and_then(|len| libc::off_t::try_from(len).ok())
        .ok_or_else(|| failed(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor `file` owns, with plain integers.
    let rc = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(file), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) => {
            tracing::warn!(
                "{}: the filesystem cannot allocate ahead; the disk is sparse",
                path.display()
            );
            file.set_len(size_mib << 20).map_err(failed)
        }
        _ => Err(failed(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A fresh directory for one test (removed by the test when it passes).
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir
    }

    #[test]
    fn an_empty_disk_is_allocated_up_front_and_reads_as_zeros() {
        let dir = scratch_dir("nubis-disks-alloc");
        let path = dir.join("data.raw");
        let file = File::create(&path).unwrap();
        size_file(&file, &path, 4).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 4 << 20);
        // Allocated, unless the test directory's filesystem cannot.
        assert!(
            meta.blocks() * 512 >= 4 << 20 || meta.blocks() == 0,
            "{} blocks",
            meta.blocks()
        );
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_data_extents_skip_the_holes() {
        let dir = scratch_dir("nubis-disks-extents");
        let path = dir.join("sparse.raw");
        let mut file = File::create(&path).unwrap();
        file.write_all(&[1u8; 4096]).unwrap();
        file.seek(SeekFrom::Start(32 << 20)).unwrap();
        file.write_all(&[2u8; 4096]).unwrap();
        file.set_len(64 << 20).unwrap();
        drop(file);
        let file = File::open(&path).unwrap();
        let extents = data_extents(&file, 64 << 20).unwrap();
        // Every byte written is in an extent, and the holes mostly not.
        assert!(
            extents.iter().any(|(s, e)| *s == 0 && *e >= 4096),
            "{extents:?}"
        );
        assert!(
            extents
                .iter()
                .any(|(s, e)| *s <= 32 << 20 && *e >= (32 << 20) + 4096),
            "{extents:?}"
        );
        let covered: u64 = extents.iter().map(|(s, e)| e - s).sum();
        assert!(covered < 8 << 20, "{extents:?}");
        assert!(data_extents(&file, 0).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_clone_has_the_same_bytes_and_stays_sparse() {
        let dir = scratch_dir("nubis-disks");
        let source = dir.join("image.raw");
        let mut file = File::create(&source).unwrap();
        file.write_all(b"boot sector").unwrap();
        file.seek(SeekFrom::Start(64 << 20)).unwrap();
        file.write_all(b"tail").unwrap();
        drop(file);
        let target = dir.join("vm.raw");
        clone_disk(&source, &target).unwrap();
        let (a, b) = (
            std::fs::read(&source).unwrap(),
            std::fs::read(&target).unwrap(),
        );
        assert!(a == b, "the clone differs");
        let meta = std::fs::metadata(&target).unwrap();
        assert!(meta.blocks() * 512 < 8 << 20, "the 64 MiB hole was copied");
        // Never over an existing file.
        assert!(clone_disk(&source, &target).is_err());
        // A failed clone leaves nothing that could pass for a disk.
        assert!(clone_disk(&dir.join("missing"), &dir.join("x")).is_err());
        assert!(!dir.join("x").exists() && !dir.join("x.partial").exists());
        // A copy cut short by an earlier crash is redone, not used.
        std::fs::write(dir.join("y.partial"), b"half").unwrap();
        clone_disk(&source, &dir.join("y")).unwrap();
        assert!(std::fs::read(dir.join("y")).unwrap() == a);
        assert!(!dir.join("y.partial").exists());
        create_data_disk(&dir.join("data.raw"), 16).unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("data.raw")).unwrap().len(),
            16 << 20
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
