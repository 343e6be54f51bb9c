//! The host side of a virtio-net device: a tap interface opened through
//! `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking.
//! Every frame read or written starts with a 12-byte `virtio_net_hdr_v1`,
//! the same header the guest's driver uses, so offload metadata (checksum
//! positions, GSO type and size) passes through unchanged.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of `struct virtio_net_hdr_v1` (virtio 1.x, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Offloads the tap may hand us (what the guest accepted to receive).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFNAMSIZ: usize = 16;

// The tun ioctls (linux/if_tun.h): _IOW('T', nr, int) and _IOR('T', nr, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// Errors in opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name '{0}': 1 to 15 bytes of letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("cannot attach to tap '{name}': {source}")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("descriptor {fd} is not an open tap device: {source}")]
    NotATap { fd: RawFd, source: std::io::Error },
    #[error(
        "tap on descriptor {fd} lacks {what}: open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"
    )]
    WrongFlags { fd: RawFd, what: &'static str },
    #[error("cannot configure tap '{name}' ({what}): {source}")]
    Configure {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
}

/// `struct ifreq` as the tun ioctls use it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        Self {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Whether `name` is acceptable as an interface name (the VMM config's rule).
pub use nubis_contract::config::valid_tap_name;

/// An open, configured tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates) the tap interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_tap_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut request = IfReq::new();
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        request.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads a `struct ifreq`, which `request` is (with
        // the layout the kernel expects), valid for the whole call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Self {
            file,
            name: request.name(),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Adopts a tap that the caller opened (the agent passes one in).
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let raw = fd.as_raw_fd();
        let mut request = IfReq::new();
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `request`, which is
        // one and stays valid for the call; a non-tun fd fails with an error.
        let ret = unsafe { libc::ioctl(raw, TUNGETIFF, &mut request) };
        if ret < 0 {
            return Err(TapError::NotATap {
                fd: raw,
                source: std::io::Error::last_os_error(),
            });
        }
        for (flag, what) in [
            (IFF_TAP, "IFF_TAP"),
            (IFF_NO_PI, "IFF_NO_PI"),
            (IFF_VNET_HDR, "IFF_VNET_HDR"),
        ] {
            if request.flags & flag == 0 {
                return Err(TapError::WrongFlags { fd: raw, what });
            }
        }
        let name = request.name();
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no
        // memory is passed and the results are checked.
        let ret = unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        if ret < 0 {
            return Err(TapError::Configure {
                name,
                what: "non-blocking mode",
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Self {
            file: File::from(fd),
            name,
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Takes over descriptor `fd` inherited from the parent process.
    ///
    /// The caller promises that nothing else in this process uses `fd`; the
    /// configuration validation refuses the same number twice.
    pub fn from_inherited_fd(fd: RawFd) -> Result<Self, TapError> {
        // SAFETY: F_GETFD only inspects the descriptor table; it tells
        // whether `fd` is open before ownership is taken.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotATap {
                fd,
                source: std::io::Error::from_raw_os_error(libc::EBADF),
            });
        }
        // SAFETY: `fd` is open (checked above) and, by this function's
        // contract, owned by nothing else in this process.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::from_fd(owned)
    }

    fn configure(&self) -> Result<(), TapError> {
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which
        // points at `header_len` for the whole call.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &header_len) };
        if ret < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: "virtio-net header size",
                source: std::io::Error::last_os_error(),
            });
        }
        // No offloads until the guest's driver says what it can take.
        self.set_offload(0)
    }

    /// Tells the kernel which offloads the tap may use on frames it hands
    /// us (`TUN_F_*`): exactly what the guest negotiated to receive.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // passed.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: "offloads",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included); `WouldBlock` when there is none.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name rules are the contract's (tested there); opening a tap
    /// applies them before any system call.
    #[test]
    fn a_tap_with_an_invalid_name_is_never_opened() {
        for bad in ["", "x234567890123456", "tap/0", "..", "tap\0"] {
            assert!(!valid_tap_name(bad), "{bad:?}");
            assert!(matches!(Tap::open(bad), Err(TapError::InvalidName(_))));
        }
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        let err = Tap::from_fd(OwnedFd::from(file)).unwrap_err();
        assert!(matches!(err, TapError::NotATap { .. }), "{err}");
        let err = Tap::from_inherited_fd(987_654).unwrap_err();
        assert!(err.to_string().contains("987654"), "{err}");
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
