//! Each VM's serial console log, capped: the guest writes it (through its
//! VMM, append-only) as fast as it likes, so once `console.log` passes
//! [`CONSOLE_CAP`] the agent moves its content to `console.log.1` (the one
//! older file kept, replaced each time) and truncates it; the VMM appends
//! on at the start. Checked every [`ROTATE_EVERY`] and at each start; the
//! jail's RLIMIT_FSIZE bounds what a guest writes in between.
//!
//! Offsets of `GET /v1/vms/{id}/console` count every byte the console
//! ever had: `console.base` (root's, in the agent's VM directory) holds the
//! offset of `console.log`'s first byte, `console.log.1` ends there. A
//! reader sees one stream; one that fell behind by more than what is kept
//! resumes at the oldest byte kept (the offset header tells where), and
//! the few bytes a guest writes while a rotation copies are lost.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::vmfs::{self, Dir};
use super::{SupervisorError, CONSOLE};
use crate::disks;

/// Size at which `console.log` is rotated.
pub const CONSOLE_CAP: u64 = 8 << 20;
/// How often running VMs' console logs are checked.
pub const ROTATE_EVERY: Duration = Duration::from_secs(5);
/// The offset of `console.log`'s first byte, in the agent's VM directory.
pub const BASE_FILE: &str = "console.base";

fn old_name() -> String {
    format!("{CONSOLE}.1")
}

/// The stream offset at which `console.log` starts, from the agent's VM
/// directory `dir`.
fn base(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(BASE_FILE))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Rotates the console log in `jail` (the VMM's directory, user `uid`)
/// if it reached `cap`; `dir` is the agent's VM directory. Returns whether
/// it did.
pub fn rotate(dir: &Path, jail: &Dir, uid: u32, cap: u64) -> Result<bool, SupervisorError> {
    let current = match jail.open_file(CONSOLE, libc::O_RDWR, uid) {
        Ok(file) => file,
        Err(err) if err.is_not_found() => return Ok(false),
        Err(err) => return Err(err.into()),
    };
    let path = jail.join(CONSOLE);
    let files = |source| SupervisorError::Files {
        path: path.clone(),
        source,
    };
    if current.metadata().map_err(files)?.len() < cap {
        return Ok(false);
    }
    let old = old_name();
    jail.remove(&old)?;
    let output = jail.create_new(&old, 0o600)?;
    vmfs::set_owner_mode(&output, &jail.join(&old), uid, 0o600)?;
    let input = current.try_clone().map_err(files)?;
    let kept = output.try_clone().map_err(files)?;
    disks::copy_file(input, &path, output, &jail.join(&old))?;
    let copied = kept.metadata().map_err(files)?.len();
    current.set_len(0).map_err(files)?;
    let next = base(dir) + copied;
    let target = dir.join(BASE_FILE);
    let partial = dir.join(format!("{BASE_FILE}.partial"));
    std::fs::write(&partial, next.to_string())
        .and_then(|()| std::fs::rename(&partial, &target))
        .map_err(|source| SupervisorError::Files {
            path: target,
            source,
        })?;
    Ok(true)
}

fn read_at(file: &mut std::fs::File, at: u64, limit: u64, path: &Path) -> std::io::Result<Vec<u8>> {
    let _ = path;
    file.seek(SeekFrom::Start(at))?;
    let mut data = Vec::new();
    file.take(limit).read_to_end(&mut data)?;
    Ok(data)
}

fn open(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    vmfs::open_owned_by_dir(path).map_err(|err| std::io::Error::other(err.to_string()))
}

/// Reads the console stream whose current file is `path`
/// (`DATA_DIR/vms/ID/vm/console.log`) from stream offset `offset`, at most
/// `limit` bytes; returns them and the offset after them. Files are read
/// only as regular files of their directory's owner (see vmfs.rs).
pub fn read(path: &Path, offset: u64, limit: usize) -> std::io::Result<(Vec<u8>, u64)> {
    let jail = path.parent().unwrap_or(Path::new("/"));
    let dir: PathBuf = jail.parent().unwrap_or(Path::new("/")).to_path_buf();
    let base = base(&dir);
    let mut old = open(&jail.join(old_name()))?;
    let old_len = match &old {
        Some(file) => file.metadata()?.len(),
        None => 0,
    };
    let oldest = base.saturating_sub(old_len);
    let offset = offset.max(oldest);
    if let (Some(file), true) = (old.as_mut(), offset < base) {
        let data = read_at(
            file,
            offset - oldest,
            (base - offset).min(limit as u64),
            path,
        )?;
        let next = offset + data.len() as u64;
        return Ok((data, next));
    }
    let Some(mut current) = open(path)? else {
        return Ok((Vec::new(), base));
    };
    let len = current.metadata()?.len();
    let start = offset.saturating_sub(base).min(len);
    let data = read_at(&mut current, start, limit as u64, path)?;
    let next = base + start + data.len() as u64;
    Ok((data, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_console_reads_as_one_stream() {
        let root = std::env::temp_dir().join(format!(
            "nubis-console-rotate-{}-{}",
            std::process::id(),
            crate::store::random_hex(4).unwrap()
        ));
        let jail_path = root.join("vm");
        std::fs::create_dir_all(&jail_path).unwrap();
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let jail = Dir::open(&jail_path).unwrap();
        let console = jail_path.join(CONSOLE);
        let append = |text: &[u8]| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&console)
                .unwrap()
                .write_all(text)
                .unwrap();
        };
        assert_eq!(read(&console, 0, 100).unwrap(), (vec![], 0));
        append(b"0123456789");
        assert!(!rotate(&root, &jail, uid, 11).unwrap(), "under the cap");
        assert!(rotate(&root, &jail, uid, 10).unwrap());
        assert_eq!(std::fs::metadata(&console).unwrap().len(), 0);
        append(b"abcdef");
        // One stream: the old file, then the current one.
        assert_eq!(
            read(&console, 0, 100).unwrap(),
            (b"0123456789".to_vec(), 10)
        );
        assert_eq!(read(&console, 4, 3).unwrap(), (b"456".to_vec(), 7));
        assert_eq!(read(&console, 10, 100).unwrap(), (b"abcdef".to_vec(), 16));
        assert_eq!(read(&console, 12, 2).unwrap(), (b"cd".to_vec(), 14));
        assert_eq!(read(&console, 99, 2).unwrap(), (vec![], 16));
        // A second rotation drops the oldest: a reader behind resumes at
        // the oldest byte kept.
        append(b"ghij");
        assert!(rotate(&root, &jail, uid, 10).unwrap());
        append(b"XY");
        assert_eq!(
            read(&console, 0, 100).unwrap(),
            (b"abcdefghij".to_vec(), 20)
        );
        assert_eq!(read(&console, 20, 100).unwrap(), (b"XY".to_vec(), 22));
        // A link where the old file goes is replaced, never followed.
        let canary = root.join("canary");
        std::fs::write(&canary, b"secret").unwrap();
        std::fs::remove_file(jail_path.join(old_name())).unwrap();
        std::os::unix::fs::symlink(&canary, jail_path.join(old_name())).unwrap();
        assert!(read(&console, 0, 100).is_err(), "read through a link");
        append(b"0123456789");
        assert!(rotate(&root, &jail, uid, 10).unwrap());
        assert_eq!(std::fs::read(&canary).unwrap(), b"secret");
        std::fs::remove_dir_all(&root).ok();
    }
}
