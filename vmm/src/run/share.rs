//! `--share DIR[:ro|:rw]`: a host directory handed to the guest as an ext4
//! disk image built from it (`mkfs.ext4 -d`, no mounts, no root), and with
//! `:rw` the files the command wrote copied back afterwards (`debugfs
//! rdump`, then merged into the directory).
//!
//! Why a disk and not a shared filesystem: a disk is a device the VMM
//! already has and a warm snapshot can carry (the guest mounts it only after
//! the restore); virtio-fs or 9p would need a host daemon per run.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

/// The share disk's size: the guest sees this capacity whatever the
/// directory holds (the image is sparse, so it costs only what is in it),
/// and a warm snapshot is taken with a disk of exactly this size.
pub const SHARE_DISK_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("invalid --share '{0}': expected HOST_DIR, HOST_DIR:ro or HOST_DIR:rw")]
    Syntax(String),
    #[error("--share {path}: not a directory")]
    NotADirectory { path: PathBuf },
    #[error("--share {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--share {path} holds about {needed_mib} MiB; the share disk holds {limit_mib} MiB")]
    TooLarge {
        path: PathBuf,
        needed_mib: u64,
        limit_mib: u64,
    },
    #[error("cannot create the share disk {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{tool} failed on {path}: {detail}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("cannot copy {from} back to {to}: {source}")]
    CopyBack {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// A `--share` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub host_dir: PathBuf,
    /// `:rw`: what the command writes comes back to `host_dir`.
    pub writable: bool,
}

impl FromStr for Share {
    type Err = ShareError;

    /// `DIR`, `DIR:ro` or `DIR:rw` (a directory whose name ends in `:ro`
    /// is written `DIR:ro:ro`).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let (dir, writable) = match value.rsplit_once(':') {
            Some((dir, "ro")) => (dir, false),
            Some((dir, "rw")) => (dir, true),
            _ => (value, false),
        };
        if dir.is_empty() {
            return Err(ShareError::Syntax(value.to_string()));
        }
        Ok(Self {
            host_dir: PathBuf::from(dir),
            writable,
        })
    }
}

/// Bytes the files under `dir` take, in 4 KiB blocks, plus one block per
/// entry (inodes and directory blocks).
pub(crate) fn tree_bytes(dir: &Path) -> Result<u64, ShareError> {
    let read_error = |source| ShareError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            let meta = entry.path().symlink_metadata().map_err(read_error)?;
            total = total.saturating_add(meta.len().div_ceil(4096) * 4096 + 4096);
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Builds the share disk `image` (of [`SHARE_DISK_BYTES`]) from `share`'s
/// directory.
pub fn build_image(share: &Share, image: &Path) -> Result<(), ShareError> {
    let dir = &share.host_dir;
    if !dir.is_dir() {
        return Err(ShareError::NotADirectory { path: dir.clone() });
    }
    // ext4's own metadata (inode tables, bitmaps) takes about 2% here.
    let needed = tree_bytes(dir)?;
    let usable = SHARE_DISK_BYTES / 100 * 90;
    if needed > usable {
        return Err(ShareError::TooLarge {
            path: dir.clone(),
            needed_mib: needed >> 20,
            limit_mib: usable >> 20,
        });
    }
    create_sparse(image, SHARE_DISK_BYTES)?;
    run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-L", "nubis-share", "-d"])
            .arg(dir)
            .arg(image),
        "mkfs.ext4",
        image,
    )
}

/// A sparse file of `len` bytes (an empty share disk).
pub fn create_sparse(path: &Path, len: u64) -> Result<(), ShareError> {
    let create_error = |source| ShareError::Create {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::create(path).map_err(create_error)?;
    file.set_len(len).map_err(create_error)
}

fn run_tool(command: &mut Command, tool: &'static str, path: &Path) -> Result<(), ShareError> {
    let output = command.output().map_err(|err| ShareError::Tool {
        tool,
        path: path.to_path_buf(),
        detail: format!("cannot run it ({err}); it is in Debian's e2fsprogs"),
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // debugfs prints its banner on stderr and exits 0 even when a request
    // fails; its errors are the lines after the banner.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.starts_with("debugfs ") && !line.trim().is_empty())
        .collect();
    if !output.status.success() || !complaints.is_empty() {
        return Err(ShareError::Tool {
            tool,
            path: path.to_path_buf(),
            detail: if complaints.is_empty() {
                output.status.to_string()
            } else {
                complaints.join("; ")
            },
        });
    }
    Ok(())
}

/// What copying back did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyBack {
    pub files: u64,
    pub bytes: u64,
}

/// Copies what the guest left on the share disk `image` into `share`'s
/// directory: new and changed files, directories and symlinks. Files the
/// guest deleted stay on the host (a copy back never destroys host data).
pub fn copy_back(image: &Path, share: &Share, scratch: &Path) -> Result<CopyBack, ShareError> {
    let extracted = scratch.join("share-out");
    let _ = fs::remove_dir_all(&extracted);
    fs::create_dir_all(&extracted).map_err(|source| ShareError::Create {
        path: extracted.clone(),
        source,
    })?;
    run_tool(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / {}", extracted.display()))
            .arg(image),
        "debugfs",
        image,
    )?;
    let _ = fs::remove_dir(extracted.join("lost+found"));
    let mut stats = CopyBack::default();
    merge(&extracted, &share.host_dir, &mut stats)?;
    let _ = fs::remove_dir_all(&extracted);
    Ok(stats)
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(meta_a), Ok(meta_b)) = (fs::metadata(a), fs::symlink_metadata(b)) else {
        return false;
    };
    if !meta_b.is_file() || meta_a.len() != meta_b.len() {
        return false;
    }
    let (Ok(mut file_a), Ok(mut file_b)) = (fs::File::open(a), fs::File::open(b)) else {
        return false;
    };
    let mut buf_a = vec![0u8; 64 * 1024];
    let mut buf_b = vec![0u8; 64 * 1024];
    loop {
        let Ok(got) = file_a.read(&mut buf_a) else {
            return false;
        };
        if got == 0 {
            return true;
        }
        if file_b.read_exact(&mut buf_b[..got]).is_err() || buf_a[..got] != buf_b[..got] {
            return false;
        }
    }
}

fn merge(from: &Path, to: &Path, stats: &mut CopyBack) -> Result<(), ShareError> {
    let copy_error = |source| ShareError::CopyBack {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    fs::create_dir_all(to).map_err(copy_error)?;
    for entry in fs::read_dir(from).map_err(copy_error)? {
        let entry = entry.map_err(copy_error)?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let meta = source.symlink_metadata().map_err(copy_error)?;
        if meta.is_dir() {
            merge(&source, &target, stats)?;
        } else if meta.file_type().is_symlink() {
            let link = fs::read_link(&source).map_err(copy_error)?;
            if fs::read_link(&target).ok().as_ref() != Some(&link) {
                let _ = fs::remove_file(&target);
                std::os::unix::fs::symlink(&link, &target).map_err(copy_error)?;
                stats.files += 1;
            }
        } else if meta.is_file() && !same_content(&source, &target) {
            if target.symlink_metadata().is_ok_and(|m| !m.is_file()) {
                let _ = fs::remove_file(&target);
            }
            let bytes = fs::copy(&source, &target).map_err(|source_err| ShareError::CopyBack {
                from: source.clone(),
                to: target.clone(),
                source: source_err,
            })?;
            let _ = fs::set_permissions(&target, fs::Permissions::from_mode(meta.mode() & 0o7777));
            stats.files += 1;
            stats.bytes += bytes;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nubis-share-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn share_syntax() {
        assert_eq!(
            "/data".parse::<Share>().unwrap(),
            Share {
                host_dir: "/data".into(),
                writable: false
            }
        );
        assert!("/data:rw".parse::<Share>().unwrap().writable);
        assert!(!"/data:ro".parse::<Share>().unwrap().writable);
        assert_eq!(
            "/a:b".parse::<Share>().unwrap().host_dir,
            PathBuf::from("/a:b")
        );
        assert_eq!(
            "/x:ro:ro".parse::<Share>().unwrap().host_dir,
            PathBuf::from("/x:ro")
        );
        for bad in ["", ":rw", ":ro"] {
            assert!(bad.parse::<Share>().is_err(), "accepted {bad:?}");
        }
    }

    /// mkfs.ext4 -d and debugfs rdump, as the guest would leave the disk:
    /// new, changed and unchanged files, a symlink and a subdirectory.
    #[test]
    fn an_image_round_trips_and_only_changes_come_back() {
        let dir = scratch("roundtrip");
        let host = dir.join("host");
        fs::create_dir_all(host.join("sub")).unwrap();
        fs::write(host.join("keep"), "same").unwrap();
        fs::write(host.join("sub/change"), "old").unwrap();
        let share = Share {
            host_dir: host.clone(),
            writable: true,
        };
        let image = dir.join("share.img");
        build_image(&share, &image).unwrap();
        assert_eq!(fs::metadata(&image).unwrap().len(), SHARE_DISK_BYTES);

        // What a guest would write: a changed file and a new one, put
        // into the image with debugfs the way the guest's ext4 would.
        let edits = dir.join("edits");
        fs::create_dir_all(&edits).unwrap();
        fs::write(edits.join("change"), "new content").unwrap();
        fs::write(edits.join("made"), "by the guest").unwrap();
        fs::remove_file(host.join("sub/change")).unwrap();
        let script = format!(
            "cd /sub\nrm change\nwrite {} change\ncd /\nwrite {} made\nsymlink link made\n",
            edits.join("change").display(),
            edits.join("made").display()
        );
        fs::write(dir.join("script"), script).unwrap();
        run_tool(
            Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(dir.join("script"))
                .arg(&image),
            "debugfs",
            &image,
        )
        .unwrap();
        fs::write(host.join("sub/change"), "old").unwrap();

        let stats = copy_back(&image, &share, &dir).unwrap();
        assert_eq!(
            fs::read_to_string(host.join("sub/change")).unwrap(),
            "new content"
        );
        assert_eq!(
            fs::read_to_string(host.join("made")).unwrap(),
            "by the guest"
        );
        assert_eq!(
            fs::read_link(host.join("link")).unwrap(),
            PathBuf::from("made")
        );
        assert_eq!(fs::read_to_string(host.join("keep")).unwrap(), "same");
        assert!(!host.join("lost+found").exists());
        assert_eq!(
            stats.files, 3,
            "changed, new and the link; not the unchanged file"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_refused() {
        let dir = scratch("missing");
        let share = Share {
            host_dir: dir.join("nope"),
            writable: false,
        };
        assert!(matches!(
            build_image(&share, &dir.join("img")),
            Err(ShareError::NotADirectory { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
