//! Bad input to `nubis-vmm`: each case must end with exit status 1 and one
//! line on stderr that names the problem, promptly, and never with a panic
//! or a hang.

use std::time::Duration;

use nubis_tests::guest::Program;
use nubis_tests::vm::{run_vmm, Outcome};
use nubis_tests::{require_kvm, TestDir};

/// A hang guard, not a timing assertion: bad input fails in milliseconds.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn expect_rejected(outcome: &Outcome, words: &[&str]) {
    assert!(!outcome.timed_out, "hung: {outcome:?}");
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    let errors = outcome.error_lines();
    assert_eq!(errors.len(), 1, "expected one error line: {outcome:?}");
    let line = errors[0];
    assert!(line.starts_with("nubis-vmm: error: "), "{line}");
    for word in words {
        assert!(line.contains(word), "{line:?} does not mention {word:?}");
    }
    assert!(!outcome.stderr.contains("panicked"), "{outcome:?}");
}

fn good_kernel(dir: &TestDir) -> String {
    let path = dir.join("guest.elf");
    Program::new().print("never").reset().write(&path);
    path.display().to_string()
}

#[test]
fn missing_kernel_file() {
    let outcome = run_vmm(["--kernel", "/nonexistent/vmlinux"], HANG_GUARD);
    expect_rejected(&outcome, &["/nonexistent/vmlinux", "No such file"]);
}

#[test]
fn no_kernel_at_all() {
    let outcome = run_vmm(["--memory-mib", "128"], HANG_GUARD);
    expect_rejected(&outcome, &["no kernel"]);
}

#[test]
fn kernel_that_is_not_a_kernel() {
    require_kvm();
    let dir = TestDir::new("not-a-kernel");
    let path = dir.join("notes.txt");
    std::fs::write(&path, "this is not a kernel\n".repeat(100)).unwrap();
    let outcome = run_vmm(["--kernel", path.to_str().unwrap()], HANG_GUARD);
    expect_rejected(&outcome, &["notes.txt", "not a kernel image"]);

    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let outcome = run_vmm(["--kernel", empty.to_str().unwrap()], HANG_GUARD);
    expect_rejected(&outcome, &["empty", "not a kernel image"]);

    let outcome = run_vmm(["--kernel", dir.path().to_str().unwrap()], HANG_GUARD);
    expect_rejected(&outcome, &["not a kernel image"]);
}

#[test]
fn truncated_elf_kernel() {
    require_kvm();
    let dir = TestDir::new("truncated-elf");
    let elf = Program::new().print("x").reset().elf();
    let path = dir.join("truncated.elf");
    std::fs::write(&path, &elf[..80]).unwrap();
    let outcome = run_vmm(["--kernel", path.to_str().unwrap()], HANG_GUARD);
    expect_rejected(&outcome, &["truncated.elf", "cannot load kernel"]);
}

#[test]
fn zero_memory() {
    let dir = TestDir::new("zero-memory");
    let kernel = good_kernel(&dir);
    let outcome = run_vmm(["--kernel", &kernel, "--memory-mib", "0"], HANG_GUARD);
    expect_rejected(&outcome, &["memory_mib 0"]);
}

#[test]
fn memory_beyond_the_host() {
    require_kvm();
    let dir = TestDir::new("huge-memory");
    let kernel = good_kernel(&dir);
    // 512 GiB: more than any machine of this kind has, less than the format's limit.
    let outcome = run_vmm(["--kernel", &kernel, "--memory-mib", "524288"], HANG_GUARD);
    expect_rejected(&outcome, &["524288", "host's memory"]);
}

#[test]
fn zero_vcpus() {
    let dir = TestDir::new("zero-vcpus");
    let kernel = good_kernel(&dir);
    let outcome = run_vmm(["--kernel", &kernel, "--vcpus", "0"], HANG_GUARD);
    expect_rejected(&outcome, &["vcpus", "0"]);
}

#[test]
fn vcpus_above_the_maximum() {
    require_kvm();
    let dir = TestDir::new("many-vcpus");
    let kernel = good_kernel(&dir);
    let outcome = run_vmm(["--kernel", &kernel, "--vcpus", "4096"], HANG_GUARD);
    expect_rejected(&outcome, &["vcpus 4096", "maximum"]);
}

#[test]
fn non_numeric_flag_values() {
    let outcome = run_vmm(["--kernel", "/k", "--vcpus", "two"], HANG_GUARD);
    expect_rejected(&outcome, &["--vcpus", "two"]);
    let outcome = run_vmm(["--kernel", "/k", "--memory-mib", "-5"], HANG_GUARD);
    expect_rejected(&outcome, &["-5"]);
}

#[test]
fn unknown_flag() {
    let outcome = run_vmm(["--kernel", "/k", "--cpus", "2"], HANG_GUARD);
    expect_rejected(&outcome, &["--cpus"]);
}

#[test]
fn bad_serial_setting() {
    let outcome = run_vmm(["--kernel", "/k", "--serial", "tty:/dev/x"], HANG_GUARD);
    expect_rejected(&outcome, &["tty:/dev/x", "serial"]);
}

#[test]
fn malformed_config_file() {
    let dir = TestDir::new("malformed-config");
    let path = dir.join("vm.json");
    std::fs::write(&path, r#"{"version": 1, "boot": {"kernel": "/k""#).unwrap();
    let outcome = run_vmm(["--config", path.to_str().unwrap()], HANG_GUARD);
    expect_rejected(&outcome, &["vm.json", "EOF"]);
}

#[test]
fn unknown_config_field() {
    let dir = TestDir::new("unknown-field");
    let path = dir.join("vm.json");
    std::fs::write(
        &path,
        r#"{"version": 1, "boot": {"kernel": "/k"}, "machine": {"vcpus": 1, "memroy_mib": 64}}"#,
    )
    .unwrap();
    let outcome = run_vmm(["--config", path.to_str().unwrap()], HANG_GUARD);
    expect_rejected(&outcome, &["vm.json", "unknown field", "memroy_mib"]);
}

#[test]
fn missing_config_file() {
    let outcome = run_vmm(["--config", "/nonexistent/vm.json"], HANG_GUARD);
    expect_rejected(&outcome, &["/nonexistent/vm.json"]);
}

#[test]
fn unreadable_initrd() {
    require_kvm();
    let dir = TestDir::new("bad-initrd");
    let kernel = good_kernel(&dir);
    let outcome = run_vmm(
        ["--kernel", &kernel, "--initrd", "/nonexistent/initrd.img"],
        HANG_GUARD,
    );
    expect_rejected(&outcome, &["initrd", "/nonexistent/initrd.img"]);
    // A directory opens but cannot be read as a file.
    let outcome = run_vmm(
        [
            "--kernel",
            &kernel,
            "--initrd",
            dir.path().to_str().unwrap(),
        ],
        HANG_GUARD,
    );
    expect_rejected(&outcome, &["initrd", "Is a directory"]);
}

#[test]
fn initrd_larger_than_guest_memory() {
    require_kvm();
    let dir = TestDir::new("huge-initrd");
    let kernel = good_kernel(&dir);
    let initrd = dir.join("big.img");
    let file = std::fs::File::create(&initrd).unwrap();
    file.set_len(200 << 20).unwrap();
    let outcome = run_vmm(
        [
            "--kernel",
            &kernel,
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory-mib",
            "64",
        ],
        HANG_GUARD,
    );
    expect_rejected(&outcome, &["big.img", "does not fit"]);
}

#[test]
fn command_line_too_long() {
    require_kvm();
    let dir = TestDir::new("long-cmdline");
    let kernel = good_kernel(&dir);
    let cmdline = "x".repeat(4096);
    let outcome = run_vmm(["--kernel", &kernel, "--cmdline", &cmdline], HANG_GUARD);
    expect_rejected(&outcome, &["command line", "4096"]);
}

#[test]
fn control_socket_path_in_the_way() {
    require_kvm();
    let dir = TestDir::new("socket-in-the-way");
    let kernel = good_kernel(&dir);
    let blocker = dir.join("control.sock");
    std::fs::write(&blocker, b"precious data").unwrap();
    let outcome = run_vmm(
        [
            "--kernel",
            &kernel,
            "--control-socket",
            blocker.to_str().unwrap(),
        ],
        HANG_GUARD,
    );
    expect_rejected(&outcome, &["control.sock", "not a socket"]);
    assert_eq!(std::fs::read(&blocker).unwrap(), b"precious data");
}

#[test]
fn bad_disks() {
    require_kvm();
    let dir = TestDir::new("bad-disk");
    let kernel = good_kernel(&dir);
    let outcome = run_vmm(
        ["--kernel", &kernel, "--disk", "path=/nonexistent/disk.img"],
        HANG_GUARD,
    );
    expect_rejected(&outcome, &["/nonexistent/disk.img", "No such file"]);
    let outcome = run_vmm(["--kernel", &kernel, "--disk", "file=/x.img"], HANG_GUARD);
    expect_rejected(&outcome, &["file=/x.img", "invalid disk"]);
    let outcome = run_vmm(
        [
            "--kernel",
            &kernel,
            "--disk",
            &format!("path={}", dir.path().display()),
        ],
        HANG_GUARD,
    );
    expect_rejected(&outcome, &["bad-disk", "Is a directory"]);
}

#[test]
fn bad_nics() {
    require_kvm();
    let dir = TestDir::new("bad-nic");
    let kernel = good_kernel(&dir);
    for (flag, words) in [
        ("tap=", &["tap=", "invalid NIC"][..]),
        ("mac=02:00:00:00:00:01", &["tap=NAME or fd=N"][..]),
        ("tap=much-too-long-name", &["1 to 15"][..]),
        ("tap=t0,mac=ff:ff:ff:ff:ff:ff", &["not a unicast"][..]),
        ("tap=t0,mac=nope", &["MAC address"][..]),
        ("tap=t0,bw=0", &["positive"][..]),
        ("tap=t0,mtu=40", &["mtu 40", "68..=9000"][..]),
        ("tap=t0,fd=9", &["exclude"][..]),
        ("fd=2", &["stderr"][..]),
    ] {
        let outcome = run_vmm(["--kernel", &kernel, "--net", flag], HANG_GUARD);
        expect_rejected(&outcome, words);
    }
    // A descriptor that is not open, and one that is open but not a tap.
    let outcome = run_vmm(["--kernel", &kernel, "--net", "fd=987"], HANG_GUARD);
    expect_rejected(&outcome, &["descriptor 987", "not an open tap"]);
    let outcome = run_vmm(
        [
            "--kernel",
            &kernel,
            "--net",
            "tap=nbdup0",
            "--net",
            "tap=nbdup0,id=second",
        ],
        HANG_GUARD,
    );
    expect_rejected(&outcome, &["nbdup0", "two NICs"]);
    let outcome = run_vmm(
        [
            "--kernel",
            &kernel,
            "--disk",
            "path=/d,id=same",
            "--net",
            "tap=t0,id=same",
        ],
        HANG_GUARD,
    );
    expect_rejected(&outcome, &["'same'", "used twice"]);
}

#[test]
fn bad_rate_limits() {
    require_kvm();
    let dir = TestDir::new("bad-limit");
    let kernel = good_kernel(&dir);
    for (flag, words) in [
        ("path=/d,bw=0", &["bw must be a positive integer"][..]),
        ("path=/d,iops=1.5", &["iops must be a positive integer"][..]),
        ("path=/d,pps=5", &["unknown key 'pps'"][..]),
    ] {
        let outcome = run_vmm(["--kernel", &kernel, "--disk", flag], HANG_GUARD);
        expect_rejected(&outcome, words);
    }
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"version":1,"boot":{{"kernel":"{kernel}"}},"disks":[{{"path":"/d","rate_limit":{{"ops_per_s":0}}}}]}}"#
        ),
    )
    .unwrap();
    let outcome = run_vmm(["--config", config.to_str().unwrap()], HANG_GUARD);
    expect_rejected(&outcome, &["rate of 0", "nubis-disk0"]);
}
