//! Snapshot and restore in the VMM (issue #6), with a purpose-built guest
//! that counts in a byte of RAM and prints each value: paused, saved and
//! stopped in one process, it must go on in a new process with the very
//! next value. Snapshots that are corrupt, of another format version or of
//! a machine of another shape are refused with a message saying so.

use std::path::Path;
use std::time::{Duration, Instant};

use nubis_tests::guest::{assert_counts, Program};
use nubis_tests::vm::{control_request, run_vmm, VmProcess};
use nubis_tests::{require_kvm, TestDir};

/// Hang guards, not timing assertions.
const WAIT: Duration = Duration::from_secs(30);

fn console(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// Waits until `path` holds at least `bytes` bytes.
fn wait_for_output(path: &Path, bytes: usize, vm: &VmProcess) -> Vec<u8> {
    let start = Instant::now();
    loop {
        let out = console(path);
        if out.len() >= bytes {
            return out;
        }
        assert!(
            start.elapsed() < WAIT,
            "only {} bytes on the console:\n{}",
            out.len(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vmm_args<'a>(kernel: &'a str, serial: &'a str, socket: &'a str) -> Vec<&'a str> {
    machine_args(kernel, serial, socket, "32", "2")
}

fn machine_args<'a>(
    kernel: &'a str,
    serial: &'a str,
    socket: &'a str,
    memory_mib: &'a str,
    vcpus: &'a str,
) -> Vec<&'a str> {
    vec![
        "--kernel",
        kernel,
        "--memory-mib",
        memory_mib,
        "--vcpus",
        vcpus,
        "--serial",
        serial,
        "--control-socket",
        socket,
    ]
}

#[test]
fn a_paused_guest_resumes_in_a_new_process_where_it_was() {
    require_kvm();
    let dir = TestDir::new("snapshot");
    let kernel = dir.join("count.elf");
    Program::new().count(20_000).write(&kernel);
    let kernel = kernel.display().to_string();
    let snapshot = dir.join("snap");
    let snapshot_arg = snapshot.display().to_string();

    let first_out = dir.join("first.out");
    let first_serial = format!("file:{}", first_out.display());
    let first_socket = dir.join("first.sock");
    let first_socket_arg = first_socket.display().to_string();
    let first = VmProcess::spawn(vmm_args(&kernel, &first_serial, &first_socket_arg));
    wait_for_output(&first_out, 300, &first);

    // A running VM is not snapshotted: its state would be torn.
    let request = format!(r#"{{"command":"snapshot","dir":{snapshot_arg:?}}}"#);
    let refused = control_request(&first_socket, &request);
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"]["code"], "invalid_state", "{refused}");

    let paused = control_request(&first_socket, r#"{"command":"pause"}"#);
    assert_eq!(paused["ok"], true, "{paused}");
    let before = console(&first_out);
    let taken = control_request(&first_socket, &request);
    assert_eq!(taken["ok"], true, "{taken}");
    assert_eq!(console(&first_out), before, "the paused guest printed");
    let memory = std::fs::metadata(snapshot.join("memory")).expect("a memory file");
    assert_eq!(memory.len(), 32 << 20);
    assert!(snapshot.join("state").exists());
    let stopped = control_request(&first_socket, r#"{"command":"stop"}"#);
    assert_eq!(stopped["ok"], true, "{stopped}");
    let outcome = first.wait(WAIT);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_counts(&before, "before the snapshot");

    // A new process goes on with the next value.
    let second_out = dir.join("second.out");
    let second_serial = format!("file:{}", second_out.display());
    let second_socket = dir.join("second.sock").display().to_string();
    let mut args = vmm_args(&kernel, &second_serial, &second_socket);
    args.extend(["--restore", &snapshot_arg]);
    let second = VmProcess::spawn(args);
    let after = wait_for_output(&second_out, 300, &second);
    let last = *before.last().unwrap();
    assert_eq!(
        after[0],
        last.wrapping_add(1),
        "the restored guest printed {} after {last}:\n{}",
        after[0],
        second.stderr()
    );
    assert_counts(&after, "after the restore");
    let status = control_request(Path::new(&second_socket), r#"{"command":"status"}"#);
    assert_eq!(status["status"]["state"], "running", "{status}");
    assert_eq!(status["status"]["vcpus"], 2, "{status}");
    drop(second);

    // Two clones at once from the same memory file, mapped privately: each
    // goes on with the next value, and the file is as it was.
    let memory_before = std::fs::read(snapshot.join("memory")).unwrap();
    let clones: Vec<(std::path::PathBuf, VmProcess)> = ["clone-a", "clone-b"]
        .iter()
        .map(|name| {
            let out = dir.join(&format!("{name}.out"));
            let serial = format!("file:{}", out.display());
            let socket = dir.join(&format!("{name}.sock")).display().to_string();
            let mut args = vmm_args(&kernel, &serial, &socket);
            args.extend(["--restore", &snapshot_arg, "--restore-as", "clone"]);
            (out, VmProcess::spawn(args))
        })
        .collect();
    for (out, clone) in &clones {
        let after = wait_for_output(out, 300, clone);
        assert_eq!(
            after[0],
            last.wrapping_add(1),
            "a clone printed {} after {last}:\n{}",
            after[0],
            clone.stderr()
        );
        assert_counts(&after, "in a clone");
    }
    drop(clones);
    assert!(
        std::fs::read(snapshot.join("memory")).unwrap() == memory_before,
        "a clone wrote to the snapshot's memory file"
    );

    // Refused: a flipped byte, another format version, another machine.
    let state = std::fs::read(snapshot.join("state")).unwrap();
    let broken = |name: &str, state: &[u8]| {
        let copy = dir.join(name);
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::write(copy.join("state"), state).unwrap();
        std::fs::copy(snapshot.join("memory"), copy.join("memory")).unwrap();
        copy.display().to_string()
    };
    let mut flipped = state.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    let mut newer = state.clone();
    newer[8] = newer[8].wrapping_add(1);
    for (copy, memory_mib, vcpus, expected) in [
        (broken("flipped", &flipped), "32", "2", "checksum"),
        (broken("newer", &newer), "32", "2", "format version"),
        (snapshot_arg.clone(), "64", "2", "MiB of RAM"),
        (snapshot_arg.clone(), "32", "1", "vCPU"),
    ] {
        let socket = dir.join("refused.sock").display().to_string();
        let serial = format!("file:{}", dir.join("refused.out").display());
        let mut args = machine_args(&kernel, &serial, &socket, memory_mib, vcpus);
        args.extend(["--restore", copy.as_str()]);
        let outcome = run_vmm(args, WAIT);
        assert_eq!(outcome.code, Some(1), "{expected}: {outcome:?}");
        let errors = outcome.error_lines();
        assert!(
            errors.len() == 1 && errors[0].contains(expected),
            "{expected}: {outcome:?}"
        );
    }
}
