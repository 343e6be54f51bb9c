//! Live migration of a Linux guest between two simulated hosts (issue #6),
//! through the agents: the guest serves its count over TCP to a client in
//! a third network namespace (plugged into the tenant's overlay network on
//! host A, as a server on the tenant's network would be) and writes each
//! value to its data disk, while it moves from A to B. The connection
//! survives, the count neither repeats nor skips, the guest keeps its
//! address, and the disk on B holds what was written on A before the move
//! as well as after it. One boot.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nubis_api::{Network, NetworkCreate, Vm, VmCreate, VmDisk, VmNicCreate};
use nubis_tests::agent::{
    busybox_image, console_value, expect, migrate, register_peer, tenant, tenant_token,
    wait_for_console, Agent, RemoteHost, BOOT_GUARD,
};
use nubis_tests::netns::{simulated_host, NetNs};
use nubis_tests::{guest_images, require_kvm, TestDir};

const PORT: u16 = 8181;
const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const TOKEN_A: &str = "host-a-operator-token-0001";
const TOKEN_B: &str = "host-b-operator-token-0002";
const CLIENT: &str = "10.72.0.200";
const COUNT: u64 = 25;

/// Counts to COUNT once a second, writing each value to sector 0 of its
/// data disk and to whoever connects to port 7000; a marker written to
/// sector 1 before it starts; then reads both sectors back.
fn guest_script() -> String {
    [
        "echo written-before-the-move > /m",
        "dd if=/m of=/dev/vdb bs=512 seek=1 count=1 conv=sync 2>/dev/null",
        &format!(
            "i=0; while [ $i -lt {COUNT} ]; do i=$((i+1)); echo $i; echo $i > /c; dd if=/c of=/dev/vdb bs=512 count=1 conv=sync 2>/dev/null; sleep 1; done | nc -l -p 7000"
        ),
        "echo DISK_MARK $(dd if=/dev/vdb bs=512 skip=1 count=1 2>/dev/null | head -n 1)",
        "echo DISK_COUNT $(dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -n 1)",
        "echo MOVE_DONE; read x",
    ]
    .join("; ")
}

/// The client in the third namespace: connects to the guest (retrying
/// until it listens) and appends every line it gets to `out`.
fn start_client(netns: &NetNs, guest: &str, out: &std::path::Path) -> Child {
    let script = format!(
        r#"
import socket, time
while True:
    try:
        s = socket.create_connection(({guest:?}, 7000), timeout=5)
        break
    except OSError:
        time.sleep(0.5)
s.settimeout(None)
with open({out:?}, "a") as f:
    for line in s.makefile():
        f.write(line)
        f.flush()
"#,
        out = out.display().to_string()
    );
    netns
        .command("python3")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the client")
}

fn received(out: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

#[test]
fn a_linux_guest_moves_over_the_overlay_with_its_connection_and_disk() {
    require_kvm();
    let images = guest_images();
    let dir = TestDir::new("agent-linux-migration");
    let image_dir = images.vmlinux.parent().unwrap().to_path_buf();
    let host_a = simulated_host("nbla", 5);
    let host_b = simulated_host("nblb", 6);
    host_a.link_to(
        &host_b,
        "under",
        &format!("{UNDERLAY_A}/24"),
        "under",
        &format!("{UNDERLAY_B}/24"),
    );
    let spec_a = RemoteHost {
        netns: &host_a.name,
        port: PORT,
        reach: Ipv4Addr::new(10, 97, 5, 2),
        operator_token: TOKEN_A,
        underlay: UNDERLAY_A,
    };
    let spec_b = RemoteHost {
        netns: &host_b.name,
        reach: Ipv4Addr::new(10, 97, 6, 2),
        operator_token: TOKEN_B,
        underlay: UNDERLAY_B,
        ..spec_a
    };
    let agent_a = Agent::start_remote(&dir.join("a"), &image_dir, &spec_a);
    let agent_b = Agent::start_remote(&dir.join("b"), &image_dir, &spec_b);
    register_peer(&agent_a, "b", UNDERLAY_B, &agent_b);
    register_peer(&agent_b, "a", UNDERLAY_A, &agent_a);
    let (tenant_id, acme_a) = tenant(&agent_a, "acme");
    busybox_image(&agent_a, &acme_a, &images);
    let span = NetworkCreate {
        hosts: vec!["b".to_string()],
        ..NetworkCreate::new("span", "10.72.0.0/24")
    };
    let span: Network = agent_a.create("/v1/networks", &acme_a, &span);
    let acme_b = tenant_token(&agent_b, &tenant_id);
    busybox_image(&agent_b, &acme_b, &images);

    // The third namespace, a server on the tenant's network at host A.
    let client = NetNs::create(&nubis_tests::net::interface_name("nblc"));
    let bridge = span.bridge.as_str();
    for args in [
        vec![
            "-n",
            &host_a.name,
            "link",
            "add",
            "client",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &client.name,
        ],
        vec![
            "-n",
            &host_a.name,
            "link",
            "set",
            "client",
            "master",
            bridge,
            "up",
        ],
        vec![
            "-n",
            &client.name,
            "addr",
            "add",
            &format!("{CLIENT}/24"),
            "dev",
            "eth0",
        ],
        vec!["-n", &client.name, "link", "set", "eth0", "up"],
    ] {
        let status = Command::new("ip").args(&args).status().expect("run ip");
        assert!(status.success(), "ip {}", args.join(" "));
    }

    let mover = VmCreate {
        memory_mib: 128,
        kernel_args: format!("nubis_cmd=\"{}\"", guest_script()),
        nics: vec![VmNicCreate::on_network("span")],
        disks: vec![VmDisk::new(8)],
        ..VmCreate::new("mover", "busybox")
    };
    let vm: Vm = agent_a.create("/v1/vms", &acme_a, &mover);
    let id = vm.id.clone();
    let address = vm.nics[0]
        .address
        .as_deref()
        .and_then(|address| address.split('/').next())
        .expect("an address")
        .to_string();
    expect(
        &agent_a.call("POST", &format!("/v1/vms/{id}/start"), Some(&acme_a), None),
        200,
    );
    let out = dir.join("client.out");
    let mut reader = start_client(&client, &address, &out);

    // Move once the client has a few values.
    let start = Instant::now();
    while received(&out).len() < 4 {
        if start.elapsed() > Duration::from_secs(300) {
            let console =
                agent_a.call("GET", &format!("/v1/vms/{id}/console"), Some(&acme_a), None);
            let fdb = host_a.run("bridge", &["fdb", "show", "br", bridge]);
            let neigh = client.run("ip", &["neigh"]);
            panic!(
                "the client got nothing:\nconsole:\n{}\nfdb:\n{}\nclient neighbours:\n{}\n{}",
                console.text,
                String::from_utf8_lossy(&fdb.stdout),
                String::from_utf8_lossy(&neigh.stdout),
                agent_a.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let progress = migrate(&agent_a, &acme_a, &id, "b", BOOT_GUARD);
    assert_eq!(
        progress.phase,
        "completed",
        "{progress:?}\n{}\n{}",
        agent_a.log(),
        agent_b.log()
    );
    let moved_at = received(&out).len();
    assert!(
        (moved_at as u64) < COUNT,
        "the guest finished before it moved"
    );

    // On B it finishes its count to the same client, then reads its disk.
    let console = wait_for_console(&agent_b, &acme_b, &id, "\nMOVE_DONE");
    let _ = reader.wait();
    let values = received(&out);
    assert_eq!(
        values,
        (1..=COUNT).collect::<Vec<_>>(),
        "the connection's stream broke across the move"
    );
    assert_eq!(
        console_value(&console, "DISK_MARK"),
        "written-before-the-move"
    );
    assert_eq!(console_value(&console, "DISK_COUNT"), COUNT.to_string());
    let on_b: Vm = agent_b.get(&format!("/v1/vms/{id}"), &acme_b);
    assert_eq!(on_b.nics[0].address, vm.nics[0].address);
    assert_eq!(
        agent_a
            .call("GET", &format!("/v1/vms/{id}"), Some(&acme_a), None)
            .status,
        404
    );
    assert_eq!(
        agent_b
            .call("DELETE", &format!("/v1/vms/{id}"), Some(&acme_b), None)
            .status,
        204
    );
}
