//! Live migration between two VMM processes (issue #6), with the counting
//! test guest (it writes RAM all the time and prints every value): the
//! destination goes on with the very next value, and its local disk arrives
//! with it; a wrong token, a destination that vanishes mid-transfer and a
//! cancel leave the source running, and a later migration still succeeds;
//! strangers connecting to the destination first do not end its wait.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nubis_tests::guest::Program;
use nubis_tests::vm::{control_request, VmProcess};
use nubis_tests::{require_kvm, TestDir};
use serde_json::Value;

/// Hang guards, not timing assertions.
const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "migration-token-0123456789";

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

fn assert_counts(bytes: &[u8], what: &str) {
    for (index, pair) in bytes.windows(2).enumerate() {
        assert_eq!(
            pair[1],
            pair[0].wrapping_add(1),
            "{what}: byte {} breaks the count",
            index + 1
        );
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

fn migrate(socket: &Path, to: &str, token: &str) -> Value {
    let request =
        serde_json::json!({"command": "migrate", "to": to, "token": token, "disks": "copy"});
    control_request(socket, &request.to_string())
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
        let (mut stream, _) = listener.accept().unwrap();
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).unwrap();
        let len = u64::from_le_bytes(header[1..].try_into().unwrap());
        std::io::copy(&mut (&mut stream).take(len), &mut std::io::sink()).unwrap();
        stream.write_all(&[2, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap(); // Accept
        let mut pages = vec![0u8; 64 * 1024];
        stream.read_exact(&mut pages).unwrap();
    });
    let started = migrate(&source.socket, &fake, TOKEN);
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
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(&[2, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap(); // Accept
        let _ = released.recv();
    });
    let started = migrate(&source.socket, &stalling, TOKEN);
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

    // A real destination: strangers that reach its address first (a port
    // scanner, garbage, a huge frame, a source with another token, which
    // is refused and fails) are closed, and it waits on for its source.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dest_out = dir.join("dest.out");
    let dest_socket = dir.join("dest.sock");
    let mut args = vmm_args(&kernel, &dest_out, &dest_socket, &dest_disk);
    args.extend(["--migrate-listen".to_string(), listen.clone()]);
    let mut command = std::process::Command::new(nubis_tests::vmm_binary());
    command.args(&args).env("NUBIS_MIGRATION_TOKEN", TOKEN);
    let mut destination = VmProcess::spawn_command(command);
    assert!(
        destination.wait_for_log("waiting for a migration", WAIT),
        "{}",
        destination.stderr()
    );
    drop(std::net::TcpStream::connect(&listen).unwrap());
    let mut garbage = std::net::TcpStream::connect(&listen).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut huge = std::net::TcpStream::connect(&listen).unwrap();
    let mut header = vec![5u8]; // State
    header.extend_from_slice(&(64u64 << 20).to_le_bytes());
    huge.write_all(&header).unwrap();
    let started = migrate(&source.socket, &listen, "another-token-0123456789");
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

    let seen = console(&source.out).len();
    wait_for_growth(&source.out, seen, &source.vm);
    let started = migrate(&source.socket, &listen, TOKEN);
    assert_eq!(started["ok"], true, "{started}");
    // The source exits once the destination runs the guest (its log says
    // how long the guest was paused).
    let outcome = source.vm.wait(WAIT);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(
        outcome
            .stderr
            .contains(&format!("migrated to {listen} in ")),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("guest paused"),
        "{}",
        outcome.stderr
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
