//! Files in a directory that a jailed VMM can write (`DATA_DIR/vms/ID/vm`,
//! `/vm` in its jail), reached by the agent as root without trusting what
//! is there.
//!
//! A VMM that a guest has taken over can put anything in its directory: a
//! symlink or a hard link to a host file, a FIFO that blocks its reader.
//! Root following such a name would read, write, chown or chmod a host file
//! for the guest. So nothing here resolves a name by path: the directory is
//! opened once (`O_DIRECTORY|O_NOFOLLOW`; its parent is root's, so the name
//! cannot be swapped), and each file relative to it with `O_NOFOLLOW` and
//! `O_NONBLOCK`, then checked on the open descriptor (a regular file, one
//! link, the expected owner) before it is used; changes go through the
//! descriptor (`fchown`, `fchmod`), new files are made with `O_EXCL`.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors of safe file access.
#[derive(Debug, thiserror::Error)]
pub enum VmFsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {found}, not {wanted}: refused (a jailed VMM may have planted it)")]
    Unsafe {
        path: PathBuf,
        found: String,
        wanted: String,
    },
}

impl VmFsError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the file did not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn c_name(name: &str, path: &Path) -> Result<CString, VmFsError> {
    // Names only: a slash would resolve further components by path.
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(VmFsError::io("use", path)(std::io::Error::from(
            std::io::ErrorKind::InvalidInput,
        )));
    }
    CString::new(name)
        .map_err(|_| VmFsError::io("use", path)(std::io::ErrorKind::InvalidInput.into()))
}

fn c_path(path: &Path) -> Result<CString, VmFsError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VmFsError::io("use", path)(std::io::ErrorKind::InvalidInput.into()))
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// `fstat` of an open descriptor.
pub fn fstat(fd: &impl AsRawFd, path: &Path) -> Result<libc::stat, VmFsError> {
    // SAFETY: an all-zero stat is a valid value for fstat to fill.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `stat` only; the descriptor is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(VmFsError::io("stat", path)(last_error()));
    }
    Ok(stat)
}

/// What a file mode is, in words.
fn kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symlink",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "of an unknown kind",
    }
}

/// Checks that `stat` is a regular file with one link owned by `owner`.
pub fn check_regular(stat: &libc::stat, owner: u32, path: &Path) -> Result<(), VmFsError> {
    let wanted = format!("a regular file with one link owned by uid {owner}");
    let found = if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        kind(stat.st_mode).to_string()
    } else if stat.st_nlink != 1 {
        format!("a file with {} links", stat.st_nlink)
    } else if stat.st_uid != owner {
        format!("a file owned by uid {}", stat.st_uid)
    } else {
        return Ok(());
    };
    Err(VmFsError::Unsafe {
        path: path.to_path_buf(),
        found,
        wanted,
    })
}

/// A directory opened without following a link, whose files are reached
/// relative to it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens directory `path`; its last component is not followed (the
    /// directories above it must be ones no VMM can write).
    pub fn open(path: &Path) -> Result<Self, VmFsError> {
        let c = c_path(path)?;
        // SAFETY: open with a NUL-terminated path and flags; returns a new
        // descriptor or -1.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = last_error();
            if err.raw_os_error() == Some(libc::ELOOP) || err.raw_os_error() == Some(libc::ENOTDIR)
            {
                return Err(VmFsError::Unsafe {
                    path: path.to_path_buf(),
                    found: "a symlink or not a directory".into(),
                    wanted: "a directory".into(),
                });
            }
            return Err(VmFsError::io("open", path)(err));
        }
        // SAFETY: `fd` was just returned by open and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory (for messages).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn stat(&self) -> Result<libc::stat, VmFsError> {
        fstat(&self.fd, &self.path)
    }

    /// `fchown` and `fchmod` of the directory itself.
    pub fn set_owner_mode(&self, uid: u32, mode: u32) -> Result<(), VmFsError> {
        set_owner_mode(&self.fd, &self.path, uid, mode)
    }

    /// The entry `name` itself (a link is not followed), or None.
    pub fn stat_at(&self, name: &str) -> Result<Option<libc::stat>, VmFsError> {
        let path = self.join(name);
        let c = c_name(name, &path)?;
        // SAFETY: an all-zero stat is a valid value for fstatat to fill.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstatat reads the name and writes `stat`; the directory
        // descriptor is open.
        let ret = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut stat,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if ret == 0 {
            return Ok(Some(stat));
        }
        let err = last_error();
        if err.kind() == std::io::ErrorKind::NotFound {
            return Ok(None);
        }
        Err(VmFsError::io("stat", &path)(err))
    }

    /// `openat` without following a link and without blocking on a FIFO
    /// (`O_NONBLOCK` is cleared again once open).
    fn open_raw(&self, name: &str, flags: libc::c_int, mode: u32) -> Result<File, VmFsError> {
        let path = self.join(name);
        let c = c_name(name, &path)?;
        // SAFETY: openat with an open directory, a NUL-terminated name and
        // flags; returns a new descriptor or -1.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        if fd < 0 {
            let err = last_error();
            if err.raw_os_error() == Some(libc::ELOOP) {
                return Err(VmFsError::Unsafe {
                    path,
                    found: "a symlink".into(),
                    wanted: "a regular file".into(),
                });
            }
            return Err(VmFsError::io("open", &path)(err));
        }
        // SAFETY: `fd` was just returned by openat and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: fcntl on an open descriptor with integer arguments.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0
            // SAFETY: as above.
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) }
                != 0
        {
            return Err(VmFsError::io("fcntl", &path)(last_error()));
        }
        Ok(file)
    }

    /// Opens the regular file `name` (one link, owned by `owner`) with
    /// `flags` (`O_RDONLY`, `O_RDWR`...); a missing file is an error that
    /// [`VmFsError::is_not_found`] tells.
    pub fn open_file(&self, name: &str, flags: libc::c_int, owner: u32) -> Result<File, VmFsError> {
        let file = self.open_raw(name, flags, 0)?;
        check_regular(&fstat(&file, &self.join(name))?, owner, &self.join(name))?;
        Ok(file)
    }

    /// Opens regular file `name` (one link, owned by `owner`), creating it
    /// with `mode` if missing.
    pub fn open_or_create(
        &self,
        name: &str,
        flags: libc::c_int,
        mode: u32,
        owner: u32,
    ) -> Result<File, VmFsError> {
        let file = self.open_raw(name, flags | libc::O_CREAT, mode)?;
        check_regular(&fstat(&file, &self.join(name))?, owner, &self.join(name))?;
        Ok(file)
    }

    /// Creates the new file `name` (`O_CREAT|O_EXCL`: never an existing
    /// entry, link or not) with `mode`, open for reading and writing.
    pub fn create_new(&self, name: &str, mode: u32) -> Result<File, VmFsError> {
        self.open_raw(name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, mode)
    }

    /// Opens directory `name` in this one (not following a link).
    pub fn open_dir(&self, name: &str) -> Result<Dir, VmFsError> {
        let path = self.join(name);
        let c = c_name(name, &path)?;
        // SAFETY: openat with an open directory, a NUL-terminated name and
        // flags; returns a new descriptor or -1.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = last_error();
            if matches!(err.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
                return Err(VmFsError::Unsafe {
                    path,
                    found: "a symlink or not a directory".into(),
                    wanted: "a directory".into(),
                });
            }
            return Err(VmFsError::io("open", &path)(err));
        }
        // SAFETY: `fd` was just returned by openat and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Dir { fd, path })
    }

    /// Makes directory `name` (mode `mode`) unless it exists, and opens it.
    pub fn make_dir(&self, name: &str, mode: u32) -> Result<Dir, VmFsError> {
        let path = self.join(name);
        let c = c_name(name, &path)?;
        // SAFETY: mkdirat with an open directory and a NUL-terminated name.
        let ret = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) };
        if ret != 0 {
            let err = last_error();
            if err.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(VmFsError::io("create", &path)(err));
            }
        }
        self.open_dir(name)
    }

    /// Removes entry `name` if it is there: a file, link, FIFO or socket is
    /// unlinked (a link itself, never its target), a directory removed
    /// with everything in it (std's `remove_dir_all` follows no links).
    pub fn remove(&self, name: &str) -> Result<(), VmFsError> {
        let path = self.join(name);
        let c = c_name(name, &path)?;
        let Some(stat) = self.stat_at(name)? else {
            return Ok(());
        };
        if stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
            // Reached through this descriptor, so that no component of
            // the path is resolved again.
            let through =
                PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd())).join(name);
            return match std::fs::remove_dir_all(&through) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    Err(VmFsError::io("remove", &path)(err))
                }
                _ => Ok(()),
            };
        }
        // SAFETY: unlinkat with an open directory and a NUL-terminated name;
        // it removes the entry itself and follows no link.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            let err = last_error();
            if err.kind() != std::io::ErrorKind::NotFound {
                return Err(VmFsError::io("remove", &path)(err));
            }
        }
        Ok(())
    }

    /// Moves entry `name` to `to`/`to_name` (whatever it is: a link moves
    /// as a link); with `no_replace`, an existing target is an error.
    pub fn rename_to(
        &self,
        name: &str,
        to: &Dir,
        to_name: &str,
        no_replace: bool,
    ) -> Result<(), VmFsError> {
        let path = self.join(name);
        let from_c = c_name(name, &path)?;
        let to_c = c_name(to_name, &to.join(to_name))?;
        let flags = if no_replace {
            libc::RENAME_NOREPLACE
        } else {
            0
        };
        // SAFETY: renameat2 with two open directories and NUL-terminated
        // names; no memory is written.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                self.fd.as_raw_fd(),
                from_c.as_ptr(),
                to.fd.as_raw_fd(),
                to_c.as_ptr(),
                flags,
            )
        };
        if ret != 0 {
            return Err(VmFsError::io("rename", &path)(last_error()));
        }
        Ok(())
    }

    /// Names of the entries (without `.` and `..`).
    pub fn names(&self) -> Result<Vec<String>, VmFsError> {
        let through = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        let entries = std::fs::read_dir(&through).map_err(VmFsError::io("list", &self.path))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(VmFsError::io("list", &self.path))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }
}

/// `fchown` and `fchmod` of an open file or directory.
pub fn set_owner_mode(
    fd: &impl AsRawFd,
    path: &Path,
    uid: u32,
    mode: u32,
) -> Result<(), VmFsError> {
    // SAFETY: fchown and fchmod on an open descriptor with integers.
    if unsafe { libc::fchown(fd.as_raw_fd(), uid, uid) } != 0 {
        return Err(VmFsError::io("chown", path)(last_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) } != 0 {
        return Err(VmFsError::io("chmod", path)(last_error()));
    }
    Ok(())
}

/// Opens a file at `path` for reading without following its last
/// component or blocking on a FIFO, as a regular file with one link owned
/// by whoever owns its directory (for a file that a jailed VMM writes in
/// its own directory, whose own parent is root's). None if it is missing.
pub fn open_owned_by_dir(path: &Path) -> Result<Option<File>, VmFsError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(VmFsError::io("open", path)(
            std::io::ErrorKind::InvalidInput.into(),
        ));
    };
    let dir = match Dir::open(parent) {
        Ok(dir) => dir,
        Err(err) if err.is_not_found() => return Ok(None),
        Err(err) => return Err(err),
    };
    let owner = dir.stat()?.st_uid;
    match dir.open_file(&name.to_string_lossy(), libc::O_RDONLY, owner) {
        Ok(file) => Ok(Some(file)),
        Err(err) if err.is_not_found() => Ok(None),
        Err(err) => Err(err),
    }
}

/// Connects to the Unix socket at `path`, which is in a directory a
/// jailed VMM writes: the name is opened without following a link
/// (`O_PATH`), must be a socket, and is connected to through that
/// descriptor, so that a VMM cannot point the agent at another VM's
/// socket or a host service's.
pub async fn connect_socket(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    let c_path = c_path(path).map_err(std::io::Error::other)?;
    // SAFETY: open with a NUL-terminated path and flags; returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let stat = fstat(&fd, path).map_err(std::io::Error::other)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(std::io::Error::other(
            "not a socket (a link or another kind of file): refused",
        ));
    }
    let through = format!("/proc/self/fd/{}", fd.as_raw_fd());
    tokio::net::UnixStream::connect(&through).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "nubis-vmfs-{name}-{}-{}",
                std::process::id(),
                crate::store::random_hex(4).unwrap()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn uid() -> u32 {
        // SAFETY: getuid has no preconditions.
        unsafe { libc::getuid() }
    }

    #[test]
    fn links_fifos_and_foreign_files_are_refused() {
        let scratch = Scratch::new("refuse");
        let outside = scratch.0.join("canary");
        std::fs::write(&outside, b"secret").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
        let dir_path = scratch.0.join("vm");
        std::fs::create_dir(&dir_path).unwrap();
        std::fs::write(dir_path.join("good"), b"console").unwrap();
        std::os::unix::fs::symlink(&outside, dir_path.join("symlink")).unwrap();
        std::fs::hard_link(&outside, dir_path.join("hardlink")).unwrap();
        let fifo = CString::new(dir_path.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::create_dir(dir_path.join("subdir")).unwrap();

        let dir = Dir::open(&dir_path).unwrap();
        let mut text = String::new();
        dir.open_file("good", libc::O_RDONLY, uid())
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "console");
        for name in ["symlink", "hardlink", "fifo", "subdir"] {
            let err = dir.open_file(name, libc::O_RDONLY, uid()).unwrap_err();
            assert!(matches!(err, VmFsError::Unsafe { .. }), "{name}: {err}");
        }
        // Another owner than the expected one.
        let err = dir
            .open_file("good", libc::O_RDONLY, uid() + 1)
            .unwrap_err();
        assert!(err.to_string().contains("owned by uid"), "{err}");
        assert!(dir
            .open_file("missing", libc::O_RDONLY, uid())
            .unwrap_err()
            .is_not_found());
        // O_EXCL: never over an entry, a dangling link included.
        std::os::unix::fs::symlink(scratch.0.join("nowhere"), dir_path.join("dangling")).unwrap();
        for name in ["good", "symlink", "dangling"] {
            assert!(dir.create_new(name, 0o600).is_err(), "{name}");
        }
        assert!(!scratch.0.join("nowhere").exists());
        let mut made = dir.create_new("new", 0o600).unwrap();
        made.write_all(b"x").unwrap();
        // Removal takes the links, not their targets.
        for name in ["symlink", "hardlink", "fifo", "dangling", "missing"] {
            dir.remove(name).unwrap();
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
        let meta = std::fs::metadata(&outside).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.nlink()), (0o600, 1));
        // A directory opened as such: a link to one is refused.
        std::os::unix::fs::symlink(&scratch.0, dir_path.join("dirlink")).unwrap();
        assert!(matches!(
            dir.open_dir("dirlink"),
            Err(VmFsError::Unsafe { .. })
        ));
        assert!(matches!(
            Dir::open(&dir_path.join("dirlink")),
            Err(VmFsError::Unsafe { .. })
        ));
        // Reading through the directory's owner.
        assert!(open_owned_by_dir(&dir_path.join("good")).unwrap().is_some());
        assert!(open_owned_by_dir(&dir_path.join("missing"))
            .unwrap()
            .is_none());
        assert!(open_owned_by_dir(&dir_path.join("dirlink")).is_err());
    }

    #[test]
    fn removing_a_tree_of_links_leaves_their_targets() {
        let scratch = Scratch::new("remove");
        let outside = scratch.0.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"keep").unwrap();
        let dir_path = scratch.0.join("vm");
        std::fs::create_dir_all(dir_path.join("snapshot/deeper")).unwrap();
        std::os::unix::fs::symlink(&outside, dir_path.join("snapshot/link")).unwrap();
        std::os::unix::fs::symlink(&outside, dir_path.join("snapshot/deeper/link")).unwrap();
        std::os::unix::fs::symlink(&outside, dir_path.join("top")).unwrap();
        let dir = Dir::open(&dir_path).unwrap();
        dir.remove("snapshot").unwrap();
        dir.remove("top").unwrap();
        assert!(dir.names().unwrap().is_empty());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
        // And std's remove_dir_all of the whole tree, as a VM's deletion does.
        std::os::unix::fs::symlink(&outside, dir_path.join("again")).unwrap();
        std::fs::remove_dir_all(&dir_path).unwrap();
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    }

    #[test]
    fn renames_move_entries_and_can_refuse_to_replace() {
        let scratch = Scratch::new("rename");
        std::fs::create_dir(scratch.0.join("a")).unwrap();
        std::fs::create_dir(scratch.0.join("b")).unwrap();
        let a = Dir::open(&scratch.0.join("a")).unwrap();
        let b = Dir::open(&scratch.0.join("b")).unwrap();
        a.create_new("f", 0o600).unwrap();
        b.create_new("g", 0o600).unwrap();
        a.rename_to("f", &b, "g", true).unwrap_err();
        a.rename_to("f", &b, "h", true).unwrap();
        assert!(b.stat_at("h").unwrap().is_some() && a.stat_at("f").unwrap().is_none());
        let made = b.make_dir("sub", 0o700).unwrap();
        made.set_owner_mode(uid(), 0o711).unwrap();
        assert_eq!(made.stat().unwrap().st_mode & 0o777, 0o711);
        assert!(
            b.make_dir("sub", 0o700).is_ok(),
            "an existing directory opens"
        );
    }
}
