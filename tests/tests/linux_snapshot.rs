//! Snapshot and restore of a Linux guest (issue #6): a shell counting in
//! memory, a file written to its data disk before the snapshot and a NIC on
//! a real tap. Paused, saved and stopped in one `nubis-vmm`, restored in a
//! second one: the count goes on from the next value, the file reads back,
//! and the network still works. One boot.

use std::time::{Duration, Instant};

use nubis_tests::net::{host_ping, interface_name, HostTap};
use nubis_tests::vm::{assert_console_value, control_request, VmProcess};
use nubis_tests::{guest_images, require_kvm, TestDir};

/// Hang guard for the boot and the workload, not a timing assertion.
const GUARD: Duration = Duration::from_secs(900);

/// The `COUNT=` values on a console, in order.
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|line| line.trim_end_matches('\r').strip_prefix("COUNT="))
        .filter_map(|value| value.trim().parse().ok())
        .collect()
}

fn wait_for_counts(vm: &mut VmProcess, at_least: usize) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let seen = counts(&vm.stdout());
        if seen.len() >= at_least {
            return seen;
        }
        assert!(
            start.elapsed() < GUARD,
            "the guest counted only {seen:?}:\n{}\n{}",
            vm.stdout(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_linux_guest_resumes_counting_with_its_disk_and_network() {
    require_kvm();
    let images = guest_images();
    let dir = TestDir::new("linux-snapshot");
    let data = dir.join("data.ext4");
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", data.to_str().unwrap(), "16M"])
        .status()
        .expect("run mkfs.ext4");
    assert!(mkfs.success(), "mkfs.ext4 failed");
    let tap = HostTap::create(&interface_name("nbsn"), "172.31.3.1/24");

    // Counts once a second until a line arrives on the console, then reads
    // the disk and pings the host, and says whether the kernel heard of its
    // new VM generation (its vmgenid driver bound to the VMM's device at
    // boot, and reseeded the RNG when notified after the restore; `[ ]`:
    // the kernel logs its command line, which holds the pattern).
    let command = [
        "mount -t ext4 /dev/vdb /mnt",
        "echo written-before-the-snapshot > /mnt/before; sync",
        "echo VMGENID_BOUND=$(ls /sys/bus/acpi/drivers/vmgenid | grep -c NUBS0001)",
        "i=0; while ! read -t 1 line; do i=$((i+1)); echo COUNT=$i; done",
        "echo DISK=$(cat /mnt/before)",
        "ping -c 2 -W 5 172.31.3.1 > /dev/null; echo PING=$?",
        "echo FORKS=$(dmesg | grep -c 'crng reseeded due to virtual[ ]machine fork')",
        "echo SNAPSHOT_DONE; read x",
    ]
    .join("; ");
    let cmdline = format!(
        "{} root=/dev/vda ro ip=172.31.3.2::172.31.3.1:255.255.255.0::eth0:off nubis_cmd=\"{command}\"",
        images.cmdline
    );
    let root = format!("path={},ro=on,id=root", images.rootfs.display());
    let data_disk = format!("path={},id=data", data.display());
    let nic = format!("tap={},mac=02:4e:42:00:03:02", tap.name);
    let kernel = images.vmlinux.display().to_string();
    let args = |socket: &str| {
        vec![
            "--kernel".to_string(),
            kernel.clone(),
            "--memory-mib".into(),
            "128".into(),
            "--disk".into(),
            root.clone(),
            "--disk".into(),
            data_disk.clone(),
            "--net".into(),
            nic.clone(),
            // Entropy: the guest's RNG is ready long before the snapshot
            // (it logs a reseed only then).
            "--rng".into(),
            "--cmdline".into(),
            cmdline.clone(),
            "--control-socket".into(),
            socket.to_string(),
        ]
    };
    let snapshot = dir.join("snap");
    let first_socket = dir.join("first.sock");
    let mut first = VmProcess::spawn(args(first_socket.to_str().unwrap()));
    wait_for_counts(&mut first, 3);
    let paused = control_request(&first_socket, r#"{"command":"pause"}"#);
    assert_eq!(paused["ok"], true, "{paused}");
    let request = format!(
        r#"{{"command":"snapshot","dir":{:?}}}"#,
        snapshot.display().to_string()
    );
    let taken = control_request(&first_socket, &request);
    assert_eq!(taken["ok"], true, "{taken}");
    let before = counts(&first.stdout());
    assert_console_value(&first.stdout(), "VMGENID_BOUND", "1");
    let stopped = control_request(&first_socket, r#"{"command":"stop"}"#);
    assert_eq!(stopped["ok"], true, "{stopped}");
    let outcome = first.wait(GUARD);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    let last = *before.last().unwrap();

    let second_socket = dir.join("second.sock");
    let mut restore_args = args(second_socket.to_str().unwrap());
    restore_args.extend(["--restore".to_string(), snapshot.display().to_string()]);
    let mut second = VmProcess::spawn(restore_args);
    let after = wait_for_counts(&mut second, 3);
    assert_eq!(
        after[0],
        last + 1,
        "counted {before:?} before the snapshot, {after:?} after:\n{}",
        second.stderr()
    );
    assert!(
        after.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "{after:?}"
    );
    second.type_input(b"go\n");
    assert!(
        second.wait_for_console("\nSNAPSHOT_DONE", GUARD),
        "{}\n{}",
        second.stdout(),
        second.stderr()
    );
    assert!(
        host_ping("172.31.3.2", 2),
        "the host cannot ping the restored guest"
    );
    let console = second.stdout();
    assert_console_value(&console, "DISK", "written-before-the-snapshot");
    assert_console_value(&console, "PING", "0");
    assert_console_value(&console, "FORKS", "1");
    let stopped = control_request(&second_socket, r#"{"command":"stop"}"#);
    assert_eq!(stopped["ok"], true, "{stopped}");
    let outcome = second.wait(GUARD);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
}
