//! Where a console port's bytes go and come from: a descriptor the VMM
//! inherited (a socket or pipe, read and written without blocking, or a
//! regular file, written only) or a file the VMM appends to.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleBackendError {
    #[error("console descriptor {fd} is not open in the VMM")]
    NotOpen { fd: RawFd },
    #[error("cannot inspect console descriptor {fd}: {source}")]
    Inspect { fd: RawFd, source: std::io::Error },
    #[error("cannot open console file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct ConsoleBackend {
    file: File,
    /// epoll can watch it (sockets, pipes, ttys; not regular files).
    pollable: bool,
    /// The guest may receive from it.
    readable: bool,
}

impl ConsoleBackend {
    /// Takes over descriptor `fd` inherited from the parent process.
    ///
    /// The caller promises that nothing else in this process uses `fd`; the
    /// configuration validation refuses the same number twice.
    pub fn from_inherited_fd(fd: RawFd) -> Result<Self, ConsoleBackendError> {
        let flags = if fd < 0 {
            -1
        } else {
            // SAFETY: F_GETFL only inspects the descriptor table entry; it
            // also tells whether `fd` is open before ownership is taken.
            unsafe { libc::fcntl(fd, libc::F_GETFL) }
        };
        if flags < 0 {
            return Err(ConsoleBackendError::NotOpen { fd });
        }
        // SAFETY: `fd` is open (checked above) and, by this function's
        // contract, owned by nothing else in this process.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let regular = file
            .metadata()
            .map_err(|source| ConsoleBackendError::Inspect { fd, source })?
            .is_file();
        let access = flags & libc::O_ACCMODE;
        if !regular {
            // SAFETY: F_SETFL on a descriptor we own; no memory is passed.
            if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
                return Err(ConsoleBackendError::Inspect {
                    fd,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        // SAFETY: F_SETFD on a descriptor we own; no memory is passed.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Self {
            file,
            pollable: !regular,
            readable: !regular && access != libc::O_WRONLY,
        })
    }

    /// A file that the guest's output is appended to (created 0600).
    pub fn append_to(path: &Path) -> Result<Self, ConsoleBackendError> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| ConsoleBackendError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            file,
            pollable: false,
            readable: false,
        })
    }

    /// The descriptor the event loop watches (readable and writable,
    /// edge-triggered), if it can be watched.
    pub fn poll_fd(&self) -> Option<RawFd> {
        self.pollable.then(|| self.file.as_raw_fd())
    }

    pub fn is_readable(&self) -> bool {
        self.readable
    }

    pub fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    pub fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_socket_is_pollable_and_readable_a_file_is_neither() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let backend = ConsoleBackend::from_inherited_fd(theirs.into_raw_fd()).unwrap();
        assert!(backend.poll_fd().is_some());
        assert!(backend.is_readable());
        drop(ours);

        let dir = std::env::temp_dir().join(format!("nubis-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out");
        let mut file = ConsoleBackend::append_to(&path).unwrap();
        assert!(file.poll_fd().is_none());
        assert!(!file.is_readable());
        file.write(b"a").unwrap();
        let inherited = File::open(&path).unwrap().into_raw_fd();
        let backend = ConsoleBackend::from_inherited_fd(inherited).unwrap();
        assert!(backend.poll_fd().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_closed_descriptor_is_refused() {
        assert!(matches!(
            ConsoleBackend::from_inherited_fd(-1),
            Err(ConsoleBackendError::NotOpen { fd: -1 })
        ));
        assert!(matches!(
            ConsoleBackend::from_inherited_fd(1_000_000),
            Err(ConsoleBackendError::NotOpen { .. })
        ));
    }
}
