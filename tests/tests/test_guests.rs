//! VMM behaviour checked with tiny purpose-built guests: console output and
//! input, the boot timer, guest reset, triple faults, SIGTERM, the control
//! socket, the config file and the serial backends. Each guest starts in
//! milliseconds.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nubis_tests::guest::Program;
use nubis_tests::vm::{control_request, run_vmm, VmProcess};
use nubis_tests::{require_kvm, TestDir};

/// Hang guards, not timing assertions.
const QUICK: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(20);

fn write_guest(dir: &TestDir, program: Program) -> String {
    let path = dir.join("guest.elf");
    program.write(&path);
    path.display().to_string()
}

#[test]
fn guest_prints_marks_boot_and_resets_cleanly() {
    require_kvm();
    let dir = TestDir::new("hello");
    let kernel = write_guest(
        &dir,
        Program::new()
            .print("hello from the guest\n")
            .boot_marker()
            .reset(),
    );
    let outcome = run_vmm(["--kernel", &kernel, "--memory-mib", "32"], QUICK);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.stdout, "hello from the guest\n");
    assert!(
        outcome.stderr.contains("Guest-boot-time ="),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("vCPU 0 entering the guest"),
        "{}",
        outcome.stderr
    );
    assert!(outcome.stderr.contains("guest reset"), "{}", outcome.stderr);
}

#[test]
fn two_vcpus_boot_and_reset() {
    require_kvm();
    let dir = TestDir::new("two-vcpus");
    let kernel = write_guest(&dir, Program::new().print("smp\n").reset());
    let outcome = run_vmm(["--kernel", &kernel, "--vcpus", "2"], QUICK);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.stdout, "smp\n");
    assert!(outcome.stderr.contains("2 vCPU(s)"), "{}", outcome.stderr);
}

#[test]
fn triple_fault_is_a_guest_crash_with_registers() {
    require_kvm();
    let dir = TestDir::new("triple-fault");
    let kernel = write_guest(
        &dir,
        Program::new().print("about to fault\n").triple_fault(),
    );
    let outcome = run_vmm(["--kernel", &kernel], QUICK);
    assert_eq!(outcome.code, Some(2), "{outcome:?}");
    assert_eq!(outcome.stdout, "about to fault\n");
    let errors = outcome.error_lines();
    assert_eq!(errors.len(), 1, "{outcome:?}");
    let line = errors[0];
    assert!(line.contains("triple fault"), "{line}");
    assert!(line.contains("RIP 0x"), "{line}");
    // The RIP points into the guest's code and the bytes there are `ud2`.
    assert!(line.contains("instruction bytes at RIP: 0f 0b"), "{line}");
}

#[test]
fn unrunnable_instruction_is_a_guest_crash_with_registers() {
    require_kvm();
    let dir = TestDir::new("xsave");
    let kernel = write_guest(
        &dir,
        Program::new()
            .print("xsave next\n")
            .xsave()
            .print("survived\n")
            .reset(),
    );
    let outcome = run_vmm(["--kernel", &kernel], QUICK);
    assert_eq!(outcome.code, Some(2), "{outcome:?}");
    assert_eq!(outcome.stdout, "xsave next\n");
    let errors = outcome.error_lines();
    assert_eq!(errors.len(), 1, "{outcome:?}");
    assert!(errors[0].contains("RIP 0x"), "{}", errors[0]);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(errors[0].contains("emulation failure"), "{}", errors[0]);
        assert!(
            errors[0].contains("instruction bytes at RIP: 0f ae 20"),
            "{}",
            errors[0]
        );
    } else {
        assert!(errors[0].contains("triple fault"), "{}", errors[0]);
    }
}

#[test]
fn memory_on_both_sides_of_the_mmio_gap() {
    require_kvm();
    let dir = TestDir::new("big-memory");
    let kernel = write_guest(&dir, Program::new().print("big\n").reset());
    // 5 GiB: 3 GiB below the gap and 2 GiB above 4 GiB (memfd pages are
    // only allocated when touched).
    let outcome = run_vmm(["--kernel", &kernel, "--memory-mib", "5120"], QUICK);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.stdout, "big\n");
    let outcome = run_vmm(["--kernel", &kernel, "--memory-mib", "32"], QUICK);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    require_kvm();
    let dir = TestDir::new("sigterm");
    let kernel = write_guest(&dir, Program::new().print("spinning\n").spin());
    let mut vm = VmProcess::spawn(["--kernel", kernel.as_str()]);
    assert!(vm.wait_for_console("spinning", WAIT), "{}", vm.stderr());
    vm.signal(libc::SIGTERM);
    let outcome = vm.wait(QUICK);
    assert!(!outcome.timed_out, "{outcome:?}");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(
        outcome.stderr.contains("stopped by SIGTERM"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn console_input_reaches_the_guest() {
    require_kvm();
    let dir = TestDir::new("echo");
    let kernel = write_guest(&dir, Program::new().print("ready\n").echo());
    let mut vm = VmProcess::spawn(["--kernel", kernel.as_str()]);
    assert!(vm.wait_for_console("ready\n", WAIT), "{}", vm.stderr());
    // More than the UART's 64-byte FIFO, so the VMM must throttle and resume.
    let message: String = (0..300)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    vm.type_input(message.as_bytes());
    let echoed = vm.wait_for_console(&format!("ready\n{message}"), WAIT);
    let console = vm.stdout();
    vm.signal(libc::SIGTERM);
    let outcome = vm.wait(QUICK);
    assert!(echoed, "console: {console:?}\nlog: {}", outcome.stderr);
}

#[test]
fn control_socket_status_pause_resume_stop() {
    require_kvm();
    let dir = TestDir::new("control");
    let kernel = write_guest(&dir, Program::new().boot_marker().heartbeat(b'.', 2000));
    let socket = dir.join("control.sock");
    let mut vm = VmProcess::spawn([
        "--kernel",
        kernel.as_str(),
        "--vcpus",
        "2",
        "--memory-mib",
        "64",
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    assert!(vm.wait_for_console("...", WAIT), "{}", vm.stderr());

    let status = control_request(&socket, r#"{"command":"status"}"#);
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["status"]["state"], "running");
    assert_eq!(status["status"]["vcpus"], 2);
    assert_eq!(status["status"]["memory_mib"], 64);
    assert_eq!(status["status"]["pid"], vm.pid());
    assert!(status["status"]["boot_time_ms"].is_u64(), "{status}");

    let resume_early = control_request(&socket, r#"{"command":"resume"}"#);
    assert_eq!(resume_early["ok"], false);
    assert_eq!(resume_early["error"]["code"], "invalid_state");

    let paused = control_request(&socket, r#"{"command":"pause"}"#);
    assert_eq!(paused["ok"], true, "{paused}");
    let status = control_request(&socket, r#"{"command":"status"}"#);
    assert_eq!(status["status"]["state"], "paused");
    // While paused the guest makes no progress.
    let before = vm.stdout().len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.stdout().len(), before, "console grew while paused");
    let again = control_request(&socket, r#"{"command":"pause"}"#);
    assert_eq!(again["error"]["code"], "invalid_state");

    let resumed = control_request(&socket, r#"{"command":"resume"}"#);
    assert_eq!(resumed["ok"], true, "{resumed}");
    let deadline = Instant::now() + WAIT;
    while vm.stdout().len() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(vm.stdout().len() > before, "no progress after resume");

    let bad = control_request(&socket, r#"{"command":"explode"}"#);
    assert_eq!(bad["ok"], false);
    assert_eq!(bad["error"]["code"], "bad_request");

    let stopped = control_request(&socket, r#"{"command":"stop"}"#);
    assert_eq!(stopped["ok"], true, "{stopped}");
    let outcome = vm.wait(QUICK);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(outcome
        .stderr
        .contains("stopped by a control-socket request"));
    assert!(
        !socket.exists(),
        "the control socket file is removed at exit"
    );
}

#[test]
fn config_file_boots_like_flags() {
    require_kvm();
    let dir = TestDir::new("config-file");
    let kernel = write_guest(&dir, Program::new().print("from config\n").reset());
    let console = dir.join("console.log");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "version": 1,
            "boot": {"kernel": kernel, "cmdline": "console=ttyS0"},
            "machine": {"vcpus": 1, "memory_mib": 48},
            "serial": {"mode": "file", "path": console},
        })
        .to_string(),
    )
    .unwrap();
    let outcome = run_vmm(["--config", config.to_str().unwrap()], QUICK);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.stdout, "", "serial went to the file, not stdout");
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "from config\n");
    assert!(outcome.stderr.contains("48 MiB"), "{}", outcome.stderr);
}

#[test]
fn serial_over_a_unix_socket() {
    require_kvm();
    let dir = TestDir::new("serial-socket");
    let kernel = write_guest(&dir, Program::new().print("R").echo());
    let socket = dir.join("serial.sock");
    let serial = format!("unix:{}", socket.display());
    let vm = VmProcess::spawn(["--kernel", kernel.as_str(), "--serial", serial.as_str()]);
    let deadline = Instant::now() + WAIT;
    let mut client = loop {
        match UnixStream::connect(&socket) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => panic!("cannot connect to the serial socket: {err}"),
        }
    };
    client.set_read_timeout(Some(WAIT)).unwrap();
    use std::io::Write;
    client.write_all(b"ping").unwrap();
    // The guest's "R" goes out at its start: to this client if it was
    // already connected, else nowhere (a console without a client drops
    // output rather than stall the guest). Then the echo.
    let mut echoed = Vec::new();
    let mut byte = [0u8; 1];
    while !echoed.ends_with(b"ping") && echoed.len() < 5 {
        client.read_exact(&mut byte).unwrap();
        echoed.push(byte[0]);
    }
    assert!(
        echoed == b"ping" || echoed == b"Rping",
        "{:?}",
        String::from_utf8_lossy(&echoed)
    );
    vm.signal(libc::SIGTERM);
    let outcome = vm.wait(QUICK);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
}
