//! virtio-vsock with a Linux guest (issue #18), one boot: the guest sends
//! 4 MiB to a host listener and checks the echo; eight host connections
//! at once send 1 MiB each to the guest's echo server and check theirs; a
//! port nobody listens on refuses; then the VM is snapshotted and restored
//! in a new process: the connection open at the snapshot is gone, the
//! guest's listener still answers, and the guest connects out again.

use std::time::Duration;

use nubis_tests::vm::{control_request, VmProcess};
use nubis_tests::vsock::{connect, connect_accepted, echo_round_trip, Connect, EchoListener};
use nubis_tests::{guest_images, require_kvm, TestDir};

/// Hang guard for the boot and the workload, not a timing assertion.
const GUARD: Duration = Duration::from_secs(900);
const MIB: usize = 1 << 20;
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;

/// Every `VSOCK_SEND=` value on a console, in order.
fn sends(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|line| line.trim_end_matches('\r').strip_prefix("VSOCK_SEND="))
        .map(str::to_string)
        .collect()
}

fn wait_for(vm: &mut VmProcess, needle: &str) {
    assert!(
        vm.wait_for_console(needle, GUARD),
        "the guest never printed {needle:?}:\n{}\n{}",
        vm.stdout(),
        vm.stderr()
    );
}

#[test]
fn streams_cross_vsock_both_ways_and_survive_a_restore() {
    require_kvm();
    let images = guest_images();
    let dir = TestDir::new("linux-vsock");
    let socket = dir.join("v.sock");
    let _host_echo = EchoListener::start(&socket, HOST_PORT);

    let command = [
        format!("nubis-guest-agent echo {GUEST_PORT} &"),
        format!("nubis-guest-agent send 2 {HOST_PORT} {}", 4 * MIB),
        "read x".to_string(),
        format!("nubis-guest-agent send 2 {HOST_PORT} 65536"),
        "echo RESTORED_DONE; read x".to_string(),
    ]
    .join("; ")
    .replace("&;", "&");
    let cmdline = format!(
        "{} root=/dev/vda ro nubis_cmd=\"{command}\"",
        images.cmdline
    );
    let args = |control: &str| {
        vec![
            "--kernel".to_string(),
            images.vmlinux.display().to_string(),
            "--memory-mib".into(),
            "128".into(),
            "--disk".into(),
            format!("path={},ro=on,id=root", images.rootfs.display()),
            "--cmdline".into(),
            cmdline.clone(),
            "--vsock".into(),
            format!("cid=3,socket={}", socket.display()),
            "--control-socket".into(),
            control.to_string(),
        ]
    };
    let first_control = dir.join("first.sock");
    let mut first = VmProcess::spawn(args(first_control.to_str().unwrap()));

    // Guest to host: 4 MiB out and back.
    wait_for(&mut first, "\nVSOCK_SEND=");
    wait_for(&mut first, &format!("\nVSOCK_ECHO_READY={GUEST_PORT}"));
    assert_eq!(
        sends(&first.stdout()),
        [format!("{},{},OK", 4 * MIB, 4 * MIB)],
        "{}",
        first.stderr()
    );

    // Host to guest: eight connections at once, 1 MiB each.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || echo_round_trip(connect_accepted(&socket, GUEST_PORT), MIB))
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), MIB);
    }
    match connect(&socket, GUEST_PORT + 1) {
        Connect::Refused(answer) => assert_eq!(answer, ""),
        Connect::Accepted(..) => panic!("a port nobody listens on accepted"),
    }

    // A connection open across the snapshot.
    let open = connect_accepted(&socket, GUEST_PORT);
    let paused = control_request(&first_control, r#"{"command":"pause"}"#);
    assert_eq!(paused["ok"], true, "{paused}");
    let snapshot = dir.join("snap");
    let request = format!(
        r#"{{"command":"snapshot","dir":{:?}}}"#,
        snapshot.display().to_string()
    );
    let taken = control_request(&first_control, &request);
    assert_eq!(taken["ok"], true, "{taken}");
    let stopped = control_request(&first_control, r#"{"command":"stop"}"#);
    assert_eq!(stopped["ok"], true, "{stopped}");
    first.wait(GUARD).assert_clean_stop();
    assert_eq!(
        echo_round_trip(open, 4096),
        0,
        "the connection outlived its VMM"
    );

    let second_control = dir.join("second.sock");
    let mut restore_args = args(second_control.to_str().unwrap());
    restore_args.extend(["--restore".to_string(), snapshot.display().to_string()]);
    let mut second = VmProcess::spawn(restore_args);
    assert!(
        second.wait_for_log("connections were reset", GUARD),
        "{}",
        second.stderr()
    );
    // The guest's listener survived the transport reset.
    assert_eq!(
        echo_round_trip(connect_accepted(&socket, GUEST_PORT), 256 * 1024),
        256 * 1024
    );
    second.type_input(b"go\n");
    wait_for(&mut second, "\nRESTORED_DONE");
    assert_eq!(
        sends(&second.stdout()),
        ["65536,65536,OK".to_string()],
        "{}",
        second.stderr()
    );
    let stopped = control_request(&second_control, r#"{"command":"stop"}"#);
    assert_eq!(stopped["ok"], true, "{stopped}");
    second.wait(GUARD).assert_clean_stop();
}
