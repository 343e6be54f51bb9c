//! The jail's file system: a fresh tmpfs as root holding only what one VM
//! needs, each file bind mounted from the host, then `pivot_root` into it
//! so that nothing else of the host's tree is reachable.
//!
//! Every mount is made in the jail's own mount namespace (made private
//! first), so none of it shows on the host and all of it goes with the
//! jail's last process.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {what} {target}: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Fs {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("jail path {0}: must be absolute, without '..'")]
    BadJailPath(PathBuf),
    #[error("bind mount {0:?}: expected HOST_PATH:JAIL_PATH[:ro]")]
    Syntax(String),
    #[error("{path} is not a device node")]
    NotADevice { path: PathBuf },
}

/// A host file or directory made visible at `target` inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

impl BindMount {
    /// `HOST_PATH:JAIL_PATH[:ro]`.
    pub fn parse(text: &str) -> Result<Self, MountError> {
        let syntax = || MountError::Syntax(text.to_string());
        let (rest, read_only) = match text.strip_suffix(":ro") {
            Some(rest) => (rest, true),
            None => (text.strip_suffix(":rw").unwrap_or(text), false),
        };
        let (source, target) = rest.rsplit_once(':').ok_or_else(syntax)?;
        if source.is_empty() {
            return Err(syntax());
        }
        let target = PathBuf::from(target);
        check_jail_path(&target)?;
        Ok(Self {
            source: PathBuf::from(source),
            target,
            read_only,
        })
    }
}

/// A path inside the jail: absolute and plain, so that it cannot climb out
/// of the new root while the jail is built (`..` or a relative path).
pub fn check_jail_path(path: &Path) -> Result<(), MountError> {
    let plain = path.is_absolute()
        && path.components().count() > 1
        && path
            .components()
            .all(|part| matches!(part, Component::RootDir | Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(MountError::BadJailPath(path.to_path_buf()))
    }
}

/// A device node the VMM opens, recreated in the jail with the host node's
/// numbers, owned by the VM's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    pub host: PathBuf,
}

fn c_path(path: &Path) -> Result<CString, MountError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| MountError::Fs {
        op: "use",
        path: path.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), MountError> {
    let failed = |source: std::io::Error| MountError::Mount {
        what: format!(
            "{} ({})",
            fstype.unwrap_or("bind"),
            data.unwrap_or_default()
        ),
        target: target.to_path_buf(),
        source,
    };
    let source_c = source.map(c_path).transpose()?;
    let target_c = c_path(target)?;
    let fstype_c = fstype
        .map(|name| CString::new(name).map_err(|_| failed(std::io::ErrorKind::InvalidInput.into())))
        .transpose()?;
    let data_c = data
        .map(|text| CString::new(text).map_err(|_| failed(std::io::ErrorKind::InvalidInput.into())))
        .transpose()?;
    // SAFETY: every pointer is either null or a NUL-terminated string that
    // lives until the call returns; mount(2) reads them only.
    let ret = unsafe {
        libc::mount(
            source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(failed(std::io::Error::last_os_error()))
    }
}

fn fs_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Fs {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// `target` inside `root`, with the parent directories made.
fn prepare_target(root: &Path, target: &Path, directory: bool) -> Result<PathBuf, MountError> {
    check_jail_path(target)?;
    let inside = root.join(target.strip_prefix("/").unwrap_or(target));
    if let Some(parent) = inside.parent() {
        std::fs::create_dir_all(parent).map_err(fs_error("create", parent))?;
    }
    if directory {
        std::fs::create_dir_all(&inside).map_err(fs_error("create", &inside))?;
    } else if !inside.exists() {
        std::fs::File::create(&inside).map_err(fs_error("create", &inside))?;
    }
    Ok(inside)
}

/// Makes every mount of this (new) namespace private, so that nothing done
/// in the jail propagates to the host and back.
pub fn make_private() -> Result<(), MountError> {
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
}

/// Mounts the jail's tmpfs root at `root` (a directory on the host).
pub fn mount_root(root: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(root).map_err(fs_error("create", root))?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755,size=1m,nr_inodes=256"),
    )
}

/// Bind mounts `bind` into the jail at `root`: read-only if asked, never
/// with set-uid programs or device nodes.
pub fn bind(root: &Path, bind: &BindMount) -> Result<(), MountError> {
    let metadata = std::fs::metadata(&bind.source).map_err(fs_error("stat", &bind.source))?;
    let inside = prepare_target(root, &bind.target, metadata.is_dir())?;
    mount(Some(&bind.source), &inside, None, libc::MS_BIND, None)?;
    // Flags of a bind mount change only by remounting it.
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if bind.read_only {
        flags |= libc::MS_RDONLY;
    }
    mount(None, &inside, None, flags, None)
}

/// Recreates the host's device node `device` at the same path in the jail,
/// owned by `uid`/`gid`, mode 0600.
pub fn device(root: &Path, device: &DeviceNode, uid: u32, gid: u32) -> Result<(), MountError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let metadata = std::fs::metadata(&device.host).map_err(fs_error("stat", &device.host))?;
    if !metadata.file_type().is_char_device() {
        return Err(MountError::NotADevice {
            path: device.host.clone(),
        });
    }
    check_jail_path(&device.host)?;
    let inside = root.join(device.host.strip_prefix("/").unwrap_or(&device.host));
    if let Some(parent) = inside.parent() {
        std::fs::create_dir_all(parent).map_err(fs_error("create", parent))?;
    }
    let path = c_path(&inside)?;
    // SAFETY: mknod reads the NUL-terminated path; the mode and device
    // number are plain integers.
    let ret = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, metadata.rdev()) };
    if ret != 0 {
        return Err(fs_error("mknod", &inside)(std::io::Error::last_os_error()));
    }
    // SAFETY: chown reads the NUL-terminated path; ids are plain integers.
    if unsafe { libc::chown(path.as_ptr(), uid, gid) } != 0 {
        return Err(fs_error("chown", &inside)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// An empty directory at `path` in the jail (a marker such as
/// `/sys/module/kvm_pvm`, which the VMM's platform detection looks for).
pub fn directory(root: &Path, path: &Path) -> Result<(), MountError> {
    prepare_target(root, path, true).map(|_| ())
}

/// A /proc of the jail's own PID namespace: only the jail's processes.
pub fn proc(root: &Path) -> Result<(), MountError> {
    let inside = prepare_target(root, Path::new("/proc"), true)?;
    mount(
        Some(Path::new("proc")),
        &inside,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
}

/// Makes `root` the process's `/` and detaches the host's tree from it;
/// the root is read-only from then on (what the VMM writes lives in its
/// bind-mounted VM directory).
pub fn pivot_into(root: &Path) -> Result<(), MountError> {
    std::env::set_current_dir(root).map_err(fs_error("chdir", root))?;
    let dot = c_path(Path::new("."))?;
    // SAFETY: pivot_root reads two NUL-terminated paths. With both "." the
    // old root is stacked on the new one and detached just below.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if ret != 0 {
        return Err(fs_error("pivot_root", root)(std::io::Error::last_os_error()));
    }
    // SAFETY: umount2 reads the NUL-terminated path.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(fs_error("detach the old root", root)(
            std::io::Error::last_os_error(),
        ));
    }
    std::env::set_current_dir("/").map_err(fs_error("chdir", Path::new("/")))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    )
}

/// The shared libraries (and dynamic loader) that `binary` needs, as
/// `ldd` lists them: absolute paths only. A static binary needs none.
pub fn library_closure(binary: &Path) -> Result<Vec<PathBuf>, MountError> {
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(fs_error("run ldd on", binary))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(parse_ldd(&text))
}

/// Absolute paths in `ldd` output ("libc.so.6 => /lib/.../libc.so.6 (0x..)",
/// "/lib64/ld-linux-x86-64.so.2 (0x..)"); the vDSO has none.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let candidate = match line.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => line,
            };
            let path = candidate.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_mounts_parse() {
        assert_eq!(
            BindMount::parse("/var/lib/nubis/vms/a:/vm").unwrap(),
            BindMount {
                source: "/var/lib/nubis/vms/a".into(),
                target: "/vm".into(),
                read_only: false
            }
        );
        let kernel = BindMount::parse("/images/vmlinux:/boot/kernel:ro").unwrap();
        assert!(kernel.read_only);
        assert_eq!(kernel.target, PathBuf::from("/boot/kernel"));
        assert!(!BindMount::parse("/a:/b:rw").unwrap().read_only);
        for bad in ["/a", ":/b", "/a:b", "/a:/b/../../etc", "/a:/", "/a:/b/.."] {
            assert!(BindMount::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ldd_output_gives_absolute_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd5b9f6000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0b)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f0d)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }
}
