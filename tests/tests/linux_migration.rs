//! Live migration of a Linux guest between two VMM processes (issue #6):
//! the guest counts, writes each value to its data disk and streams it over
//! one TCP connection to the host, while it is moved. The source and the
//! destination have their own taps on one bridge (as two hosts would have
//! their own ports on one network) and their own disk files: the
//! connection survives the move, the count never repeats or skips, the
//! disk arrives with everything written during the copy, and the guest
//! answers at its address through the destination's tap. One boot.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nubis_tests::net::{host_ping, interface_name};
use nubis_tests::vm::{assert_console_value, control_request, VmProcess};
use nubis_tests::{guest_images, require_kvm, TestDir};

/// Hang guard for the boot and the workload, not a timing assertion.
const GUARD: Duration = Duration::from_secs(900);
const TOKEN: &str = "linux-migration-token-0123";
/// The migration's key (64 hex digits): the stream is sealed with it.
const KEY: &str = "4c696e7578206d6967726174696f6e206b657920666f722074657374732e2e2e";
/// How many values the guest sends.
const COUNT: u64 = 20;

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {}", args.join(" "));
}

/// A bridge with the host's address and two taps on it; removed on drop.
struct Segment {
    bridge: String,
    taps: [String; 2],
}

impl Segment {
    fn create() -> Self {
        let bridge = interface_name("nbmb");
        let taps = [interface_name("nbms"), interface_name("nbmd")];
        for link in taps.iter().chain([&bridge]) {
            let _ = Command::new("ip")
                .args(["link", "del", link])
                .stderr(std::process::Stdio::null())
                .status();
        }
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", "172.31.4.1/24", "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for tap in &taps {
            ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
            ip(&["link", "set", tap, "master", &bridge]);
            ip(&["link", "set", tap, "up"]);
        }
        Self { bridge, taps }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        for link in self.taps.iter().chain([&self.bridge]) {
            let _ = Command::new("ip").args(["link", "del", link]).status();
        }
    }
}

#[test]
fn a_linux_guest_moves_with_its_connection_disk_and_address() {
    require_kvm();
    let images = guest_images();
    let dir = TestDir::new("linux-migration");
    let source_disk = dir.join("source.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", source_disk.to_str().unwrap(), "16M"])
        .status()
        .expect("run mkfs.ext4");
    assert!(mkfs.success());
    let dest_disk = dir.join("dest.ext4");
    // Each "host" has its own copy of the root image: the destination
    // writes the disks it receives into its own files, and must never be
    // given the very file the source reads.
    let dest_root = dir.join("dest-root.ext4");
    std::fs::copy(&images.rootfs, &dest_root).expect("copy the root image");
    let original_root = std::fs::read(&images.rootfs).expect("read the root image");
    let segment = Segment::create();

    // The host's end of the guest's connection: the values, in order.
    let listener = TcpListener::bind("172.31.4.1:7000").expect("listen on the bridge");
    let received = Arc::new(Mutex::new(Vec::<u64>::new()));
    let sink = received.clone();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("the guest connects");
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Ok(value) = line.trim().parse() {
                sink.lock().unwrap().push(value);
            }
        }
    });

    let command = [
        "mount -t ext4 /dev/vdb /mnt",
        &format!(
            "i=0; while [ $i -lt {COUNT} ]; do i=$((i+1)); echo $i; echo $i > /mnt/count; sleep 1; done | nc 172.31.4.1 7000"
        ),
        // A VM that only moved is the same generation: no vmfork reseed
        // (`[ ]`: the kernel logs its command line, which holds this).
        "echo FORKS=$(dmesg | grep -c 'crng reseeded due to virtual[ ]machine fork')",
        "echo COUNT_FILE=$(cat /mnt/count); umount /mnt; echo MIGRATION_DONE; read x",
    ]
    .join("; ");
    let cmdline = format!(
        "{} root=/dev/vda ro ip=172.31.4.2::172.31.4.1:255.255.255.0::eth0:off nubis_cmd=\"{command}\"",
        images.cmdline
    );
    let args =
        |tap: &str, root: &std::path::Path, disk: &std::path::Path, socket: &std::path::Path| {
            vec![
                "--kernel".to_string(),
                images.vmlinux.display().to_string(),
                "--memory-mib".into(),
                "128".into(),
                "--disk".into(),
                format!("path={},ro=on,id=root", root.display()),
                "--disk".into(),
                format!("path={},id=data", disk.display()),
                "--net".into(),
                format!("tap={tap},mac=02:4e:42:00:04:02"),
                "--cmdline".into(),
                cmdline.clone(),
                "--control-socket".into(),
                socket.display().to_string(),
            ]
        };
    let source_socket = dir.join("source.sock");
    let source = VmProcess::spawn(args(
        &segment.taps[0],
        &images.rootfs,
        &source_disk,
        &source_socket,
    ));
    let start = Instant::now();
    while received.lock().unwrap().len() < 5 {
        assert!(
            start.elapsed() < GUARD,
            "the guest never sent its count:\n{}\n{}",
            source.stdout(),
            source.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let listen = format!(
        "127.0.0.1:{}",
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let dest_socket = dir.join("dest.sock");
    let mut dest_args = args(&segment.taps[1], &dest_root, &dest_disk, &dest_socket);
    dest_args.extend(["--migrate-listen".to_string(), listen.clone()]);
    let mut command = Command::new(nubis_tests::vmm_binary());
    command
        .args(&dest_args)
        .env("NUBIS_MIGRATION_TOKEN", TOKEN)
        .env("NUBIS_MIGRATION_KEY", KEY);
    let mut destination = VmProcess::spawn_command(command);
    std::thread::sleep(Duration::from_millis(300));
    let before_move = received.lock().unwrap().len();
    let request = serde_json::json!({"command": "migrate", "to": listen, "token": TOKEN, "key": KEY, "disks": "copy"});
    let started = control_request(&source_socket, &request.to_string());
    assert_eq!(started["ok"], true, "{started}");
    let outcome = source.wait(GUARD);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(
        outcome.stderr.contains("guest paused"),
        "{}",
        outcome.stderr
    );

    assert!(
        destination.wait_for_console("\nMIGRATION_DONE", GUARD),
        "{}\n{}",
        destination.stdout(),
        destination.stderr()
    );
    server.join().unwrap();
    let values = received.lock().unwrap().clone();
    let expected: Vec<u64> = (1..=COUNT).collect();
    assert_eq!(values, expected, "the stream broke across the move");
    assert!(
        before_move < values.len(),
        "nothing was sent after the move"
    );
    assert_console_value(&destination.stdout(), "COUNT_FILE", &COUNT.to_string());
    assert_console_value(&destination.stdout(), "FORKS", "0");
    assert!(
        destination.stderr().contains("announced on tap"),
        "{}",
        destination.stderr()
    );
    assert!(
        host_ping("172.31.4.2", 3),
        "the moved guest does not answer"
    );
    let stopped = control_request(&dest_socket, r#"{"command":"stop"}"#);
    assert_eq!(stopped["ok"], true, "{stopped}");
    let outcome = destination.wait(GUARD);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    // The disk, read on the host: it holds the last value the guest wrote,
    // written on the destination after the copy.
    let count = Command::new("debugfs")
        .args(["-R", "cat /count", dest_disk.to_str().unwrap()])
        .output()
        .expect("run debugfs");
    assert_eq!(
        String::from_utf8_lossy(&count.stdout).trim(),
        COUNT.to_string()
    );
    // The source's root image, shared by every test, is as it was.
    assert!(
        std::fs::read(&images.rootfs).expect("read the root image") == original_root,
        "the migration changed the source's root image"
    );
}
