//! Live migration between two VMM processes (issue #6), with the counting
//! test guest (it writes RAM all the time and prints every value): the
//! destination goes on with the very next value, and its local disk arrives
//! with it; a wrong token, a destination that vanishes mid-transfer and a
//! cancel leave the source running, and a later migration still succeeds;
//! strangers connecting to the destination first do not end its wait.
//! The stream is encrypted and authenticated (issue #14): a relay between
//! the two VMMs sees neither the guest's RAM nor its disk in clear, and
//! one byte it changes fails the migration, the source running on.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nubis_tests::guest::{assert_counts, Program};
use nubis_tests::vm::{control_request, VmProcess};
use nubis_tests::{require_kvm, TestDir};
use serde_json::Value;
use vmm::migration::protocol::{self, Kind};
use vmm::migration::secure::{Keys, MigrationKey, Role, SecureStream, SALT_LEN};

/// Hang guards, not timing assertions.
const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "migration-token-0123456789";
const KEY: &str = "6e75626973206d6967726174696f6e206b657920666f722074657374732e2e2e";
const OTHER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn console(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

fn wait_for_growth(path: &Path, beyond: usize, vm: &VmProcess) -> Vec<u8> {
    let start = Instant::now();
    loop {
        let out = console(path);
        if out.len() > beyond + 100 {
            return out;
        }
        assert!(
            start.elapsed() < WAIT,
            "the guest stopped printing at {} bytes:\n{}",
            out.len(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// A VMM running the counting guest.
struct Counter {
    vm: VmProcess,
    out: PathBuf,
    socket: PathBuf,
}

fn vmm_args(kernel: &str, out: &Path, socket: &Path, disk: &Path) -> Vec<String> {
    vec![
        "--disk".into(),
        format!("path={}", disk.display()),
        "--kernel".into(),
        kernel.into(),
        "--memory-mib".into(),
        "64".into(),
        "--vcpus".into(),
        "2".into(),
        "--serial".into(),
        format!("file:{}", out.display()),
        "--control-socket".into(),
        socket.display().to_string(),
    ]
}

fn migrate(socket: &Path, to: &str, token: &str, key: &str) -> Value {
    let request = serde_json::json!({
        "command": "migrate", "to": to, "token": token, "key": key, "disks": "copy"
    });
    control_request(socket, &request.to_string())
}

/// A fake destination's end of the sealed stream (after the source's
/// salt).
fn sealed(mut stream: TcpStream) -> SecureStream<TcpStream> {
    let key = MigrationKey::from_hex(KEY).unwrap();
    let mut salt = [0u8; SALT_LEN];
    stream.read_exact(&mut salt).unwrap();
    SecureStream::new(
        stream,
        Keys::derive(&key, &salt, Role::Destination).expect("keys"),
    )
}

/// A relay between the source and the destination: it records what goes
/// each way and may flip one bit of the source's stream at `flip_at`.
struct Relay {
    address: String,
    done: std::thread::JoinHandle<(Vec<u8>, Vec<u8>)>,
}

impl Relay {
    fn start(to: &str, flip_at: Option<usize>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let to = to.to_string();
        let done = std::thread::spawn(move || {
            let (source, _) = listener.accept().unwrap();
            let destination = TcpStream::connect(&to).unwrap();
            let forward = {
                let (from, to) = (
                    source.try_clone().unwrap(),
                    destination.try_clone().unwrap(),
                );
                std::thread::spawn(move || pump(from, to, flip_at))
            };
            let back = pump(destination, source, None);
            (forward.join().unwrap(), back)
        });
        Relay { address, done }
    }

    /// What went (source to destination, back), once both ends closed.
    fn recorded(self) -> (Vec<u8>, Vec<u8>) {
        self.done.join().unwrap()
    }
}

/// Copies `from` to `to` until either ends, then shuts both (and so the
/// other direction) down; returns what went.
fn pump(mut from: TcpStream, mut to: TcpStream, flip_at: Option<usize>) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let got = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(got) => got,
        };
        if let Some(at) = flip_at {
            if (seen.len()..seen.len() + got).contains(&at) {
                buffer[at - seen.len()] ^= 0x01;
            }
        }
        seen.extend_from_slice(&buffer[..got]);
        if to.write_all(&buffer[..got]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
    seen
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Starts a destination VMM listening on a free port; returns it and its
/// address once it waits.
fn spawn_destination(
    kernel: &str,
    out: &Path,
    socket: &Path,
    disk: &Path,
    key: &str,
) -> (VmProcess, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vmm_args(kernel, out, socket, disk);
    args.extend(["--migrate-listen".to_string(), listen.clone()]);
    let mut command = std::process::Command::new(nubis_tests::vmm_binary());
    command
        .args(&args)
        .env("NUBIS_MIGRATION_TOKEN", TOKEN)
        .env("NUBIS_MIGRATION_KEY", key);
    let mut destination = VmProcess::spawn_command(command);
    assert!(
        destination.wait_for_log("waiting for a migration", WAIT),
        "{}",
        destination.stderr()
    );
    (destination, listen)
}

/// Polls the source's migration until it has ended; returns its progress.
fn wait_for_end(socket: &Path) -> Value {
    let start = Instant::now();
    loop {
        let status = control_request(socket, r#"{"command":"migration_status"}"#);
        let phase = status["migration"]["phase"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if ["completed", "failed", "cancelled", "unconfirmed"].contains(&phase.as_str()) {
            return status["migration"].clone();
        }
        assert!(
            start.elapsed() < WAIT,
            "the migration never ended: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_running_guest_moves_to_another_process_and_failures_leave_it_running() {
    require_kvm();
    let dir = TestDir::new("migration");
    let kernel = dir.join("count.elf");
    Program::new().count(20_000).write(&kernel);
    let kernel = kernel.display().to_string();
    // A local disk with data all over it, and holes.
    let source_disk = dir.join("source.img");
    let mut contents = vec![0u8; 3 << 20];
    for (index, byte) in contents.iter_mut().enumerate().take(2 << 20) {
        *byte = (index * 7 % 251) as u8 + 1;
    }
    std::fs::write(&source_disk, &contents).unwrap();
    let dest_disk = dir.join("dest.img");
    std::fs::write(&dest_disk, b"stale data that must not survive").unwrap();
    let source = Counter {
        out: dir.join("source.out"),
        socket: dir.join("source.sock"),
        vm: VmProcess::spawn(vmm_args(
            &kernel,
            &dir.join("source.out"),
            &dir.join("source.sock"),
            &source_disk,
        )),
    };
    wait_for_growth(&source.out, 0, &source.vm);

    // A destination that accepts, takes a few pages and vanishes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = listener.local_addr().unwrap().to_string();
    let vanishing = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut stream = sealed(stream);
        let (kind, _) = protocol::receive(&mut stream).unwrap();
        assert_eq!(kind, Kind::Hello);
        protocol::send(&mut stream, Kind::Accept, &[]).unwrap();
        let mut pages = vec![0u8; 64 * 1024];
        stream.read_exact(&mut pages).unwrap();
    });
    let started = migrate(&source.socket, &fake, TOKEN, KEY);
    assert_eq!(started["ok"], true, "{started}");
    let ended = wait_for_end(&source.socket);
    vanishing.join().unwrap();
    assert_eq!(ended["phase"], "failed", "{ended}");
    let seen = console(&source.out).len();
    wait_for_growth(&source.out, seen, &source.vm);

    // A destination that stalls after accepting: the migration is cancelled.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stalling = listener.local_addr().unwrap().to_string();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let staller = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut stream = sealed(stream);
        protocol::send(&mut stream, Kind::Accept, &[]).unwrap();
        let _ = released.recv();
    });
    let started = migrate(&source.socket, &stalling, TOKEN, KEY);
    assert_eq!(started["ok"], true, "{started}");
    std::thread::sleep(Duration::from_millis(300));
    let cancel = control_request(&source.socket, r#"{"command":"migrate_cancel"}"#);
    assert_eq!(cancel["ok"], true, "{cancel}");
    let ended = wait_for_end(&source.socket);
    assert_eq!(ended["phase"], "cancelled", "{ended}");
    release.send(()).unwrap();
    staller.join().unwrap();
    let seen = console(&source.out).len();
    wait_for_growth(&source.out, seen, &source.vm);

    // A fake destination that answers in clear (no key): the source
    // refuses what it cannot open, and runs on.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let clear = listener.local_addr().unwrap().to_string();
    let clear_answer = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut first = [0u8; 4];
        stream.read_exact(&mut first).unwrap();
        protocol::send(&mut stream, Kind::Accept, &[]).unwrap();
        // The source closes the connection once it gave up.
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut rest = Vec::new();
        let closed = stream.read_to_end(&mut rest);
        assert!(closed.is_ok(), "{closed:?}");
    });
    let started = migrate(&source.socket, &clear, TOKEN, KEY);
    assert_eq!(started["ok"], true, "{started}");
    let ended = wait_for_end(&source.socket);
    clear_answer.join().unwrap();
    assert_eq!(ended["phase"], "failed", "{ended}");
    assert!(
        ended["error"].as_str().unwrap_or("").contains("record"),
        "{ended}"
    );

    // A migrate request without a key, or with a malformed one, is refused.
    for request in [
        serde_json::json!({"command": "migrate", "to": clear, "token": TOKEN}),
        serde_json::json!({"command": "migrate", "to": clear, "token": TOKEN, "key": "abcd"}),
    ] {
        let refused = control_request(&source.socket, &request.to_string());
        assert_eq!(refused["ok"], false, "{refused}");
        assert_eq!(refused["error"]["code"], "bad_request", "{refused}");
    }

    // A real destination: strangers that reach its address first (a port
    // scanner, garbage, a huge record, a source with another key, then one
    // with the key and another token, which is refused and fails) are
    // closed, and it waits on for its source.
    let dest_out = dir.join("dest.out");
    let dest_socket = dir.join("dest.sock");
    let (mut destination, listen) =
        spawn_destination(&kernel, &dest_out, &dest_socket, &dest_disk, KEY);
    drop(std::net::TcpStream::connect(&listen).unwrap());
    let mut garbage = std::net::TcpStream::connect(&listen).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut huge = std::net::TcpStream::connect(&listen).unwrap();
    huge.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let started = migrate(&source.socket, &listen, TOKEN, OTHER_KEY);
    assert_eq!(started["ok"], true, "{started}");
    let ended = wait_for_end(&source.socket);
    assert_eq!(ended["phase"], "failed", "{ended}");
    assert!(
        ended["error"]
            .as_str()
            .unwrap_or("")
            .contains("another migration key"),
        "{ended}"
    );
    assert!(
        destination.wait_for_log("does not authenticate", WAIT),
        "{}",
        destination.stderr()
    );
    let started = migrate(&source.socket, &listen, "another-token-0123456789", KEY);
    assert_eq!(started["ok"], true, "{started}");
    let ended = wait_for_end(&source.socket);
    assert_eq!(ended["phase"], "failed", "{ended}");
    assert!(
        ended["error"].as_str().unwrap_or("").contains("token"),
        "{ended}"
    );
    assert!(
        destination.wait_for_log("wrong migration token", WAIT),
        "{}",
        destination.stderr()
    );
    drop((garbage, huge));

    // Through a relay that flips one bit of the stream (in the disk's
    // copy): the destination refuses the record and exits with an error,
    // the source's migration fails and its guest runs on.
    let seen = console(&source.out).len();
    wait_for_growth(&source.out, seen, &source.vm);
    let relay = Relay::start(&listen, Some(300_000));
    let started = migrate(&source.socket, &relay.address, TOKEN, KEY);
    assert_eq!(started["ok"], true, "{started}");
    let ended = wait_for_end(&source.socket);
    assert_eq!(ended["phase"], "failed", "{ended}");
    let outcome = destination.wait(WAIT);
    assert_eq!(
        outcome.code,
        Some(vmm::runtime::exit::EXIT_NOT_RECEIVED),
        "the destination's exit says nothing was handed over to it: {outcome:?}"
    );
    assert!(
        outcome.stderr.contains("does not authenticate"),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("panicked"), "{}", outcome.stderr);
    let (forward, _) = relay.recorded();
    assert!(forward.len() > 300_000, "{} bytes went", forward.len());
    let seen = console(&source.out).len();
    wait_for_growth(&source.out, seen, &source.vm);
    let status = control_request(&source.socket, r#"{"command":"status"}"#);
    assert_eq!(status["status"]["state"], "running", "{status}");

    // A new destination, through a relay that records the stream: the
    // migration succeeds, and neither the guest's RAM (its program, loaded
    // at 1 MiB) nor its disk crossed in clear.
    let dest_out = dir.join("dest2.out");
    let dest_socket = dir.join("dest2.sock");
    let (destination, listen) =
        spawn_destination(&kernel, &dest_out, &dest_socket, &dest_disk, KEY);
    let relay = Relay::start(&listen, None);
    let started = migrate(&source.socket, &relay.address, TOKEN, KEY);
    assert_eq!(started["ok"], true, "{started}");
    // The source exits once the destination runs the guest (its log says
    // how long the guest was paused).
    let outcome = source.vm.wait(WAIT);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(
        outcome
            .stderr
            .contains(&format!("migrated to {} in ", relay.address)),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("guest paused"),
        "{}",
        outcome.stderr
    );
    let (forward, back) = relay.recorded();
    assert!(
        forward.len() > 2 << 20,
        "{} bytes went: not the disk's 2 MiB",
        forward.len()
    );
    let elf = std::fs::read(&kernel).unwrap();
    assert!(!contains(&forward, &elf[..64]), "the guest's RAM in clear");
    for at in [0usize, 4096 * 77 + 13, 1 << 20, (2 << 20) - 64] {
        assert!(
            !contains(&forward, &contents[at..at + 64]),
            "the disk's bytes at {at} in clear"
        );
    }
    assert!(!contains(&forward, TOKEN.as_bytes()), "the token in clear");
    assert!(
        !contains(&back, b"\x02\0\0\0\0\0\0\0\0"),
        "an Accept in clear"
    );
    let before = console(&source.out);
    assert_counts(&before, "on the source");

    let after = wait_for_growth(&dest_out, 0, &destination);
    assert_eq!(
        after[0],
        before.last().unwrap().wrapping_add(1),
        "the destination went on from {} after {}:\n{}",
        after[0],
        before.last().unwrap(),
        destination.stderr()
    );
    assert_counts(&after, "on the destination");
    let status = control_request(&dest_socket, r#"{"command":"status"}"#);
    assert_eq!(status["status"]["state"], "running", "{status}");
    assert!(
        std::fs::read(&dest_disk).unwrap() == contents,
        "the destination's disk differs from the source's"
    );
}
