//! Host-side network fixtures for the NIC tests: tap devices with an
//! address, a tap descriptor handed to the VMM, and a small HTTP server the
//! guest downloads from and uploads to (busybox `wget`), so that transfers
//! are checked byte for byte on the host.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {} failed", args.join(" "));
}

/// A tap interface created on the host with an address, removed on drop.
pub struct HostTap {
    pub name: String,
}

impl HostTap {
    /// Creates tap `name` with address `address` (CIDR), link up.
    pub fn create(name: &str, address: &str) -> Self {
        assert!(name.len() < 16, "interface name {name} is too long");
        // A tap left behind by an earlier, killed run is replaced.
        Command::new("ip")
            .args(["link", "del", name])
            .stderr(std::process::Stdio::null())
            .status()
            .ok();
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        let tap = Self {
            name: name.to_string(),
        };
        Command::new("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{name}.disable_ipv6=1")])
            .status()
            .ok();
        ip(&["addr", "add", address, "dev", name]);
        ip(&["link", "set", "dev", name, "up"]);
        tap
    }

    /// Opens the tap as the VMM expects a passed-in descriptor: IFF_TAP,
    /// IFF_NO_PI, IFF_VNET_HDR, and inheritable by a child process.
    pub fn open_inheritable_fd(&self) -> OwnedFd {
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let mut request = IfReq {
            name: [0; 16],
            flags: 0x0002 | 0x1000 | 0x4000,
            _pad: [0; 22],
        };
        request.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: opening a device node with a NUL-terminated path; no
        // O_CLOEXEC on purpose, the VMM inherits it.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
        assert!(
            fd >= 0,
            "open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: TUNSETIFF reads a struct ifreq, which `request` is.
        let ret = unsafe { libc::ioctl(fd, TUNSETIFF, &mut request) };
        assert_eq!(ret, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        owned
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        Command::new("ip")
            .args(["link", "del", &self.name])
            .stderr(std::process::Stdio::null())
            .status()
            .ok();
    }
}

/// The host's network interfaces whose names start with `prefix`.
pub fn links_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().to_string())
                .filter(|name| name.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A name for a host interface, unique per test process: `prefix` (at most
/// 5 bytes) and the pid.
pub fn interface_name(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id() % 1_000_000)
}

/// Whether `address` answers the host's pings: up to `count` replies are
/// awaited for as long as a deadline of 60 s allows, and one reply is
/// enough. A guest under KVM's emulator can take seconds to answer its
/// first ping after idling (the CI run that failed on a 3-ping, 5 s window
/// had a guest that answered everything else); a guest that does not
/// answer at all still fails. busybox's ping: busybox-static is already
/// needed for the guest images.
pub fn host_ping(address: &str, count: u32) -> bool {
    // busybox's exit status with a deadline asks for all `count` replies
    // (seen: 3 sent, 2 answered, a failure): its summary is read instead.
    Command::new("busybox")
        .args(["ping", "-c", &count.to_string(), "-w", "60", "-q", address])
        .output()
        .map(|out| replies_in_summary(&String::from_utf8_lossy(&out.stdout)) > 0)
        .unwrap_or(false)
}

/// The replies ping's summary counts ("3 packets transmitted, 2 packets
/// received, 33% packet loss"); none without a summary.
fn replies_in_summary(output: &str) -> u32 {
    output
        .lines()
        .find_map(|line| {
            let (_, after) = line.split_once("transmitted, ")?;
            after.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// `len` bytes of deterministic noise (xorshift), so that any corruption
/// or reordering shows. No byte is zero: busybox `wget --post-file` sends
/// its file only up to the first NUL.
pub fn test_blob(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 24) as u8).max(1)
        })
        .collect()
}

/// An HTTP/1.0 server for the guest: `GET /blob` returns the blob, `POST`
/// to any path stores the body. One connection at a time.
///
/// Its connections use CUBIC congestion control whatever the host's default
/// is: guests on nested kvm_pvm hosts answer slowly (round trips of seconds
/// under load), and BBR's pacing then sends one segment at a time, halving
/// the throughput to the guest.
pub struct HttpServer {
    pub uploads: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(address: SocketAddr, blob: Vec<u8>) -> Self {
        let listener = TcpListener::bind(address)
            .unwrap_or_else(|err| panic!("bind the test HTTP server on {address}: {err}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let cubic = b"cubic";
        // SAFETY: TCP_CONGESTION reads `cubic.len()` bytes from the pointer,
        // which points at `cubic`; a failure only leaves the default.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&listener),
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                cubic.as_ptr().cast(),
                cubic.len() as libc::socklen_t,
            )
        };
        let uploads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (uploads, stop) = (uploads.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Some(body) = serve(stream, &blob) {
                                uploads.lock().unwrap().push(body);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Self {
            uploads,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

/// Serves one request; returns a POST's body.
fn serve(stream: TcpStream, blob: &[u8]) -> Option<Vec<u8>> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((key, value)) = line.split_once(':') {
            if key.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut writer = stream;
    if request_line.starts_with("POST ") {
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body).ok()?;
        writer
            .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .ok()?;
        return Some(body);
    }
    let header = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    );
    writer.write_all(header.as_bytes()).ok()?;
    writer.write_all(blob).ok()?;
    None
}

#[cfg(test)]
mod tests {
    use super::replies_in_summary;

    #[test]
    fn the_summary_says_how_many_replies_came() {
        let lost_one = "--- 10.88.1.2 ping statistics ---\n\
                        3 packets transmitted, 2 packets received, 33% packet loss\n\
                        round-trip min/avg/max = 11.018/12.951/14.884 ms\n";
        assert_eq!(replies_in_summary(lost_one), 2);
        let none = "--- 10.0.0.9 ping statistics ---\n\
                    60 packets transmitted, 0 packets received, 100% packet loss\n";
        assert_eq!(replies_in_summary(none), 0);
        assert_eq!(replies_in_summary("ping: bad address 'x'\n"), 0);
    }
}
