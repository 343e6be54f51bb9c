//! Linux boots on KVM, end to end: the guest images' kernel and init, run by
//! `nubis-vmm`. Each boot costs ~30 s on nested kvm_pvm hosts, so each test
//! boots once and checks many things in that boot.

use std::time::Duration;

use nubis_tests::vm::{assert_console_value, console_value, control_request, run_vmm, VmProcess};
use nubis_tests::{guest_images, require_kvm, TestDir};

/// Hang guard (not a timing assertion): four guests boot at once here, each
/// through the instruction emulator on two shared cores (one boot alone has
/// taken from 27 s to 90 s on this kind of machine).
const BOOT_GUARD: Duration = Duration::from_secs(900);

/// A guest command built from shell builtins only (every exec costs ~1 s
/// here): the online CPUs, MemTotal, then an exit code.
fn report_and_exit(code: u8) -> String {
    format!(
        "read online < /sys/devices/system/cpu/online; echo ONLINE=$online; \
         while read key value unit; do [ $key = MemTotal: ] && echo MEMTOTAL_KB=$value; \
         done < /proc/meminfo; exit {code}"
    )
}

fn memtotal_mib(console: &str) -> u64 {
    console_value(console, "MEMTOTAL_KB")
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or_else(|| panic!("no MEMTOTAL_KB line in the console:\n{console}"))
}

#[test]
fn elf_kernel_initramfs_two_vcpus_one_gib_exit_code_42() {
    require_kvm();
    let images = guest_images();
    let cmdline = format!("{} nubis_cmd=\"{}\"", images.cmdline, report_and_exit(42));
    let outcome = run_vmm(
        [
            "--kernel",
            images.vmlinux.to_str().unwrap(),
            "--initrd",
            images.initramfs.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--vcpus",
            "2",
            "--memory-mib",
            "1024",
        ],
        BOOT_GUARD,
    );
    // The guest powers off (ACPI S5) when its command is done: a clean stop.
    outcome.assert_clean_stop();
    let console = &outcome.stdout;
    assert!(
        console.contains("nubis-init: user space started"),
        "{console}"
    );
    assert_console_value(console, "NUBIS_EXIT_CODE", "42");
    assert_console_value(console, "ONLINE", "0-1");
    let mem = memtotal_mib(console);
    assert!(
        (900..=1024).contains(&mem),
        "MemTotal {mem} MiB for a 1024 MiB guest"
    );
    assert!(
        outcome.stderr.contains("Guest-boot-time ="),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("the guest powered the VM off"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn bzimage_gzip_initramfs_one_vcpu_controlled_over_the_socket() {
    require_kvm();
    let images = guest_images();
    let dir = TestDir::new("linux-control");
    let socket = dir.join("control.sock");
    let command = format!(
        "{} ; echo READY; read line; echo GOT=$line; read wait_for_shutdown",
        report_and_exit(0)
    )
    .replace("exit 0 ;", "");
    let cmdline = format!("{} nubis_cmd=\"{command}\"", images.cmdline);
    let mut vm = VmProcess::spawn([
        "--kernel",
        images.bzimage.to_str().unwrap(),
        "--initrd",
        images.initramfs_gz.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--memory-mib",
        "128",
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    // At the start of a line: the kernel also echoes its command line.
    assert!(
        vm.wait_for_console("\nREADY", BOOT_GUARD),
        "no READY:\n{}\n{}",
        vm.stdout(),
        vm.stderr()
    );
    let console = vm.stdout();
    assert_console_value(&console, "ONLINE", "0");
    let mem = memtotal_mib(&console);
    assert!(
        (100..=128).contains(&mem),
        "MemTotal {mem} MiB for a 128 MiB guest"
    );

    let status = control_request(&socket, r#"{"command":"status"}"#);
    assert_eq!(status["status"]["state"], "running", "{status}");
    assert!(
        status["status"]["boot_time_ms"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );

    // Paused, the guest does not see its input; resumed, it does.
    assert_eq!(
        control_request(&socket, r#"{"command":"pause"}"#)["ok"],
        true
    );
    vm.type_input(b"hello-guest\n");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !vm.stdout().contains("GOT=hello-guest"),
        "guest ran while paused"
    );
    assert_eq!(
        control_request(&socket, r#"{"command":"resume"}"#)["ok"],
        true
    );
    assert!(
        vm.wait_for_console("GOT=hello-guest", BOOT_GUARD),
        "input not seen after resume:\n{}",
        vm.stdout()
    );

    // Ctrl-Alt-Del: the guest kernel restarts, and the VMM stops cleanly.
    let shutdown = control_request(&socket, r#"{"command":"shutdown"}"#);
    assert_eq!(shutdown["ok"], true, "{shutdown}");
    let outcome = vm.wait(BOOT_GUARD);
    assert!(
        !outcome.timed_out,
        "the guest ignored Ctrl-Alt-Del:\n{}",
        outcome.stdout
    );
    assert_eq!(
        outcome.code,
        Some(0),
        "{}\n{}",
        outcome.stdout,
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("sent Ctrl-Alt-Del"),
        "{}",
        outcome.stderr
    );
    assert!(outcome.stderr.contains("guest reset"), "{}", outcome.stderr);
}

#[test]
fn root_filesystem_on_a_read_only_virtio_disk_with_an_entropy_device() {
    require_kvm();
    let images = guest_images();
    let before = std::fs::read(&images.rootfs).expect("read rootfs.ext4");
    let command =
        "while read dev mnt fs rest; do [ $mnt = / ] && echo ROOTFS=$fs; done < /proc/mounts; \
                   echo probe > /written-file; echo WRITE_STATUS=$?; \
                   read rng < /sys/class/misc/hw_random/rng_current; echo RNG=$rng; \
                   head -c 64 /dev/hwrng > /dev/null; echo HWRNG_STATUS=$?; exit 7";
    let cmdline = format!(
        "{} root=/dev/vda ro nubis_cmd=\"{command}\"",
        images.cmdline
    );
    let disk = format!("path={},ro=on,id=rootfs", images.rootfs.display());
    let outcome = run_vmm(
        [
            "--kernel",
            images.vmlinux.to_str().unwrap(),
            "--disk",
            &disk,
            "--rng",
            "--cmdline",
            &cmdline,
        ],
        BOOT_GUARD,
    );
    outcome.assert_clean_stop();
    let console = &outcome.stdout;
    assert!(console.contains("[vda]"), "{console}");
    assert_console_value(console, "ROOTFS", "ext4");
    // The root is mounted read-only: the write fails inside the guest (the
    // line must be there: a guest that never got to the write is no proof).
    let write_status = console_value(console, "WRITE_STATUS")
        .unwrap_or_else(|| panic!("no WRITE_STATUS line on the console:\n{console}"));
    assert!(
        write_status
            .trim()
            .parse::<u32>()
            .is_ok_and(|status| status != 0),
        "the write to the read-only root gave status {write_status:?}:\n{console}"
    );
    assert!(
        console.contains("/written-file: Read-only file system"),
        "the write did not fail for the read-only root:\n{console}"
    );
    assert_console_value(console, "NUBIS_EXIT_CODE", "7");
    // The entropy device is the guest's hardware RNG and yields bytes.
    assert!(
        console_value(console, "RNG").is_some_and(|v| v.starts_with("virtio_rng")),
        "{console}"
    );
    assert_console_value(console, "HWRNG_STATUS", "0");
    assert!(
        outcome.stderr.contains("virtio-rng: active"),
        "{}",
        outcome.stderr
    );
    assert!(outcome.stderr.contains("virtio-blk"), "{}", outcome.stderr);
    let after = std::fs::read(&images.rootfs).expect("read rootfs.ext4");
    assert!(before == after, "the read-only image changed");
}

/// Data the guest wrote and flushed to a virtio-blk disk survives a SIGKILL
/// of the VMM right after the guest's `sync` returned; DISCARD works (fstrim).
#[test]
fn flushed_writes_survive_sigkill() {
    require_kvm();
    let images = guest_images();
    let dir = TestDir::new("linux-flush");
    let data = dir.join("data.ext4");
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "nubis-data"])
        .arg(&data)
        .arg("16M")
        .status()
        .expect("run mkfs.ext4");
    assert!(mkfs.success(), "mkfs.ext4 failed");
    // fstrim sends DISCARD requests for the free space first.
    let command = "mount -t ext4 /dev/vdb /mnt; read max < /sys/block/vdb/queue/discard_max_bytes; \
                   echo DISCARD_MAX=$max; fstrim /mnt; echo FSTRIM_STATUS=$?; \
                   echo durable-nubis-data > /mnt/proof && sync && echo SYNCED=1; read wait_for_kill";
    let cmdline = format!(
        "{} root=/dev/vda ro nubis_cmd=\"{command}\"",
        images.cmdline
    );
    let root = format!("path={},ro=on", images.rootfs.display());
    let data_disk = format!("path={}", data.display());
    let mut vm = VmProcess::spawn([
        "--kernel",
        images.vmlinux.to_str().unwrap(),
        "--disk",
        &root,
        "--disk",
        &data_disk,
        "--cmdline",
        &cmdline,
    ]);
    assert!(
        vm.wait_for_console("\nSYNCED=1", BOOT_GUARD),
        "no SYNCED:\n{}\n{}",
        vm.stdout(),
        vm.stderr()
    );
    let console = vm.stdout();
    vm.signal(libc::SIGKILL);
    let outcome = vm.wait(BOOT_GUARD);
    let discard_max: u64 = console_value(&console, "DISCARD_MAX")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        discard_max > 0,
        "the guest sees no DISCARD support:\n{console}"
    );
    assert_console_value(&console, "FSTRIM_STATUS", "0");
    assert_eq!(outcome.code, None, "the VMM was killed");
    // Recover as a mount would: replay the journal the guest committed.
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(&data)
        .output()
        .expect("run e2fsck");
    assert!(
        matches!(fsck.status.code(), Some(0) | Some(1)),
        "e2fsck found damage: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /proof"])
        .arg(&data)
        .output()
        .expect("run debugfs");
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout),
        "durable-nubis-data\n",
        "debugfs stderr: {}",
        String::from_utf8_lossy(&cat.stderr)
    );
}
