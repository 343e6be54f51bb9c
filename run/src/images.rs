//! Where a run's kernel, initramfs and root disk come from: the Nubis guest
//! images (`guest-images/build.sh`) unless the user names their own, and a
//! root disk built from a directory tree (`--image DIR`), cached.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::share::{create_sparse, tree_bytes};
use super::RunError;

/// The guest images' files a run uses.
pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRD_FILE: &str = "run-initramfs.cpio";
/// The default root: busybox user space.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
pub const CMDLINE_FILE: &str = "cmdline";

/// The environment variable naming the guest images' directory.
pub const IMAGES_ENV: &str = "NUBIS_GUEST_IMAGES";

/// Finds the guest images: `$NUBIS_GUEST_IMAGES`, else a `guest-images/out`
/// or `share/nubis/guest-images` next to or above the running program (a
/// cargo build's `target/debug/nubis`, a test binary in `target/debug/deps`,
/// or an installed `PREFIX/bin/nubis`).
pub fn find_images_dir() -> Result<PathBuf, RunError> {
    if let Some(dir) = std::env::var_os(IMAGES_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().map_err(|source| RunError::Io {
        what: "find the running program".into(),
        source,
    })?;
    let mut tried = Vec::new();
    for ancestor in exe.ancestors().skip(1) {
        for candidate in [
            ancestor.join("guest-images/out"),
            ancestor.join("share/nubis/guest-images"),
        ] {
            if candidate.join(INITRD_FILE).is_file() {
                return Ok(candidate);
            }
            tried.push(candidate);
        }
    }
    Err(RunError::NoImages {
        tried: tried
            .iter()
            .take(6)
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// What a file is, for cache keys: where it is, its size, modification
/// time and inode. A file that changes in any of them is another file.
pub fn identity(path: &Path) -> Result<String, RunError> {
    let canonical = fs::canonicalize(path).map_err(|source| RunError::Io {
        what: format!("find {}", path.display()),
        source,
    })?;
    let meta = fs::metadata(&canonical).map_err(|source| RunError::Io {
        what: format!("inspect {}", canonical.display()),
        source,
    })?;
    Ok(format!(
        "{} size={} mtime={}.{:09} ino={}:{}",
        canonical.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.dev(),
        meta.ino()
    ))
}

/// A fingerprint of a directory tree: every entry's path, type, mode,
/// size and modification time (a file changed in place changes its mtime).
pub fn tree_fingerprint(dir: &Path) -> Result<String, RunError> {
    let io = |what: String| move |source| RunError::Io { what, source };
    let mut hash = Sha256::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let mut entries: Vec<_> = fs::read_dir(&current)
            .map_err(io(format!("read {}", current.display())))?
            .collect::<Result<_, _>>()
            .map_err(io(format!("read {}", current.display())))?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let path = entry.path();
            let meta = path
                .symlink_metadata()
                .map_err(io(format!("inspect {}", path.display())))?;
            hash.update(
                format!(
                    "{}\0{:o}\0{}\0{}.{}\0{}:{}\n",
                    path.strip_prefix(dir).unwrap_or(&path).display(),
                    meta.mode(),
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    meta.uid(),
                    meta.gid()
                )
                .as_bytes(),
            );
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(hex(&hash.finalize()[..16]))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The root disk for `--image DIR`: an ext4 image of the tree, built once
/// per version of the tree and kept in `cache`.
pub fn root_disk_from_tree(tree: &Path, cache: &Path) -> Result<PathBuf, RunError> {
    if !tree.is_dir() {
        return Err(RunError::Invalid(format!(
            "--image {}: not a directory",
            tree.display()
        )));
    }
    let fingerprint = tree_fingerprint(tree)?;
    let dir = cache.join("images");
    let image = dir.join(format!("{fingerprint}.ext4"));
    if image.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(&dir).map_err(|source| RunError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    let needed = tree_bytes(tree).map_err(RunError::Share)?;
    // Room for ext4's metadata and the tree's growth between rebuilds.
    let size = (needed + needed / 4 + (64 << 20)).div_ceil(1 << 20) << 20;
    let partial = dir.join(format!("{fingerprint}.ext4.partial-{}", std::process::id()));
    create_sparse(&partial, size).map_err(RunError::Share)?;
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-L", "nubis-image", "-d"])
        .arg(tree)
        .arg(&partial)
        .output()
        .map_err(|source| RunError::Io {
            what: "run mkfs.ext4 (Debian's e2fsprogs)".into(),
            source,
        })?;
    if !output.status.success() {
        let _ = fs::remove_file(&partial);
        return Err(RunError::Invalid(format!(
            "--image {}: mkfs.ext4 failed: {}",
            tree.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    fs::rename(&partial, &image).map_err(|source| RunError::Io {
        what: format!("move the image into {}", dir.display()),
        source,
    })?;
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_fingerprint_follows_its_content() {
        let dir = std::env::temp_dir().join(format!("nubis-fp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/tool"), "v1").unwrap();
        let first = tree_fingerprint(&dir).unwrap();
        assert_eq!(first, tree_fingerprint(&dir).unwrap(), "stable");
        fs::write(dir.join("bin/tool"), "v2 longer").unwrap();
        let second = tree_fingerprint(&dir).unwrap();
        assert_ne!(first, second, "a changed file changes it");
        fs::write(dir.join("new"), "").unwrap();
        assert_ne!(second, tree_fingerprint(&dir).unwrap(), "a new file too");
        let id = identity(&dir.join("new")).unwrap();
        assert!(id.contains("size=0"), "{id}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// `--image DIR`: the tree becomes an ext4 image, built once per
    /// version of the tree.
    #[test]
    fn a_tree_becomes_a_cached_root_disk() {
        let base = std::env::temp_dir().join(format!("nubis-tree-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let tree = base.join("tree");
        fs::create_dir_all(tree.join("bin")).unwrap();
        fs::write(tree.join("bin/tool"), "#!/bin/sh\necho hi\n").unwrap();
        let cache = base.join("cache");
        let image = root_disk_from_tree(&tree, &cache).unwrap();
        assert_eq!(root_disk_from_tree(&tree, &cache).unwrap(), image, "cached");
        let listing = Command::new("debugfs")
            .args(["-R", "cat /bin/tool"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&listing.stdout),
            "#!/bin/sh\necho hi\n"
        );
        fs::write(tree.join("bin/tool"), "changed, longer").unwrap();
        assert_ne!(
            root_disk_from_tree(&tree, &cache).unwrap(),
            image,
            "rebuilt"
        );
        assert!(matches!(
            root_disk_from_tree(&base.join("missing"), &cache),
            Err(RunError::Invalid(_))
        ));
        fs::remove_dir_all(&base).unwrap();
    }
}
