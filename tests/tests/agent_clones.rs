//! Clones from a warm snapshot, end to end: a real guest is snapshotted
//! while it runs, and ten clones are made of it in one request. Each runs
//! on its own MAC and address with its own hostname, and their kernels'
//! RNGs were reseeded apart (by the guest agent, and by the kernel on its new
//! VM generation id): no two draw the same `/dev/urandom` bytes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nubis_api::{
    Image, ImageCreate, Quota, Snapshot, SnapshotClones, SnapshotClonesMade, Vm, VmCreate, VmEvent,
    VmNicCreate, VmState,
};
use nubis_tests::agent::{
    exec_stdout, host_path, keyed_value, tenant_with_quota, wait_for_console, Agent,
};
use nubis_tests::{guest_images, require_kvm, TestDir};

const CLONES: u32 = 10;

/// Waits until `vm` has an event of `kind` (or `identity_failed`).
fn wait_for_event(agent: &Agent, token: &str, vm: &str, kind: &str) -> VmEvent {
    let start = Instant::now();
    loop {
        let events: Vec<VmEvent> = agent.get(&format!("/v1/vms/{vm}/events"), token);
        if let Some(event) = events.iter().find(|event| event.kind == kind) {
            return event.clone();
        }
        if let Some(failed) = events.iter().find(|event| event.kind == "identity_failed") {
            let console = agent.call("GET", &format!("/v1/vms/{vm}/console"), Some(token), None);
            panic!(
                "{vm}: {failed:?}\n--- its console ---\n{}\n--- the agent's log ---\n{}",
                console.text,
                agent.log()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{vm} had no {kind} event: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn ten_clones_of_a_running_guest_each_have_their_own_identity() {
    require_kvm();
    let _host = nubis_tests::agent::one_agent_per_host();
    let images = guest_images();
    let dir = TestDir::new("agent-clones");
    let data_dir = dir.join("agent");
    let image_dir = images.vmlinux.parent().unwrap().to_path_buf();
    let agent = Agent::start(&data_dir, &image_dir);
    let (_, acme) = tenant_with_quota(
        &agent,
        "acme",
        Quota {
            max_vcpus: 16,
            max_memory_mib: 16 * 128,
            max_vms: 16,
            ..Quota::default()
        },
    );
    let image = agent
        .create::<Image>(
            "/v1/images",
            &acme,
            &ImageCreate {
                name: "busybox".into(),
                kernel: host_path(&images.vmlinux),
                rootfs: host_path(&images.rootfs),
                initrd: None,
                cmdline: format!(
                    "{} root=/dev/vda rw nubis_cmd=\"echo CLONE_BASE_UP; read wait_forever\"",
                    images.cmdline
                ),
            },
        )
        .id;
    let base: Vm = agent.create(
        "/v1/vms",
        &acme,
        &VmCreate {
            nics: vec![VmNicCreate::default()],
            start: true,
            ..VmCreate::new("base", &image)
        },
    );
    // Warm: booted, its guest agent and first-boot step done.
    wait_for_console(&agent, &acme, &base.id, "nubis-metadata: hostname base");
    let taken = agent.call(
        "POST",
        &format!("/v1/vms/{}/snapshots", base.id),
        Some(&acme),
        None,
    );
    let snapshot: Snapshot = nubis_tests::agent::expect_as(&taken, 201);

    let too_many = agent.send(
        "POST",
        &format!("/v1/snapshots/{}/clones", snapshot.id),
        Some(&acme),
        &SnapshotClones {
            count: 33,
            name_prefix: "c".into(),
        },
    );
    assert_eq!(too_many.status, 400, "{too_many:?}");
    let made: SnapshotClonesMade = agent.create(
        &format!("/v1/snapshots/{}/clones", snapshot.id),
        &acme,
        &SnapshotClones {
            count: CLONES,
            name_prefix: "c".into(),
        },
    );
    eprintln!(
        "agent_clones: {CLONES} clones running after {:?} ms",
        made.running_after_ms
    );
    assert_eq!(made.vms.len(), CLONES as usize);
    let base_nic = &base.nics[0];
    let mut macs = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    for (index, vm) in made.vms.iter().enumerate() {
        assert_eq!(vm.name, format!("c-{}", index + 1));
        assert_eq!(vm.state, VmState::Running, "{vm:?}");
        let nic = &vm.nics[0];
        assert_ne!(nic.mac, base_nic.mac);
        assert_ne!(nic.address, base_nic.address);
        macs.insert(nic.mac.clone().unwrap());
        addresses.insert(nic.address.clone().unwrap());
    }
    assert_eq!(macs.len(), CLONES as usize, "{macs:?}");
    assert_eq!(addresses.len(), CLONES as usize, "{addresses:?}");

    // Each guest took its identity, and answers as itself on its address.
    let mut draws = BTreeSet::new();
    for vm in &made.vms {
        let event = wait_for_event(&agent, &acme, &vm.id, "identity");
        assert!(event.message.contains(&vm.name), "{event:?}");
        let address = vm.nics[0].address.as_deref().unwrap();
        let out = exec_stdout(
            &agent,
            &acme,
            &vm.id,
            "echo H=$(hostname); echo R=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
             echo A=$(ip -4 -o addr show dev eth0); echo M=$(cat /sys/class/net/eth0/address); \
             echo F=$(dmesg | grep -c 'crng reseeded due to virtual[ ]machine fork')",
        );
        let value = |key: &str| keyed_value(&out, key).to_string();
        assert_eq!(value("H"), vm.name, "{out}");
        // The kernel itself reseeded on the new VM generation id.
        assert_eq!(value("F"), "1", "{out}");
        assert!(value("A").contains(&format!("inet {address}")), "{out}");
        assert_eq!(Some(value("M")), vm.nics[0].mac, "{out}");
        let draw = value("R");
        assert_eq!(draw.len(), 32, "{out}");
        assert!(draws.insert(draw), "two clones drew the same bytes: {out}");
        let bare = address.split('/').next().unwrap();
        assert!(
            nubis_tests::net::host_ping(bare, 2),
            "{} does not answer at {bare}",
            vm.name
        );
    }
    // The original runs on as itself.
    let out = exec_stdout(
        &agent,
        &acme,
        &base.id,
        "hostname; dmesg | grep -c 'virtual[ ]machine fork'; true",
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["base", "0"]);

    for vm in made.vms.iter().chain([&base]) {
        let stopped = agent.call(
            "POST",
            &format!("/v1/vms/{}/force-stop", vm.id),
            Some(&acme),
            None,
        );
        assert_eq!(stopped.status, 200, "{stopped:?}");
        let deleted = agent.call("DELETE", &format!("/v1/vms/{}", vm.id), Some(&acme), None);
        assert_eq!(deleted.status, 204, "{deleted:?}");
    }
}
