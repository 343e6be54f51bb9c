//! Snapshots through the agent (issue #6), with the counting test guest as
//! the image's kernel: a snapshot of a running VM leaves it running; one
//! of a paused VM, restored into a new VM, resumes with the very next
//! value, on the disk as it was at the snapshot (a write to the original
//! VM's disk after it does not show); the snapshot cannot go while a VM
//! waits to resume from it; tenancy and bad input hold.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nubis_tests::agent::{expect, one_agent_per_host, tenant, Agent};
use nubis_tests::guest::Program;
use nubis_tests::{require_kvm, TestDir};
use serde_json::json;

/// Hang guard, not a timing assertion.
const WAIT: Duration = Duration::from_secs(60);

fn console(agent: &Agent, vm: &str) -> Vec<u8> {
    std::fs::read(vm_dir(agent, vm).join("console.log")).unwrap_or_default()
}

/// The VM's files that its jailed VMM writes (disks, console).
fn vm_dir(agent: &Agent, vm: &str) -> PathBuf {
    agent.data_dir.join("vms").join(vm).join("vm")
}

fn wait_for_growth(agent: &Agent, vm: &str, beyond: usize) -> Vec<u8> {
    let start = Instant::now();
    loop {
        let out = console(agent, vm);
        if out.len() > beyond + 100 {
            return out;
        }
        assert!(
            start.elapsed() < WAIT,
            "{vm} printed only {} bytes:\n{}",
            out.len(),
            agent.log()
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

fn head(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()[..6].to_vec()
}

#[test]
fn snapshots_restore_into_new_vms_that_resume_where_they_were() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("agent-snapshots");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let kernel = images.join("count.elf");
    Program::new().count(20_000).write(&kernel);
    let rootfs = images.join("root.img");
    let mut disk = b"BEFORE".to_vec();
    disk.resize(1 << 20, 0);
    std::fs::write(&rootfs, &disk).unwrap();

    let agent = Agent::start(&dir.join("agent"), &images);
    let (_, acme) = tenant(&agent, "acme");
    let (_, globex) = tenant(&agent, "globex");
    let image = agent.call(
        "POST",
        "/v1/images",
        Some(&acme),
        Some(&json!({"name": "counter", "kernel": kernel, "rootfs": rootfs, "cmdline": ""})),
    );
    expect(&image, 201);
    let created = agent.call(
        "POST",
        "/v1/vms",
        Some(&acme),
        Some(&json!({"name": "a", "image": "counter", "memory_mib": 32})),
    );
    let a = expect(&created, 201)["id"].as_str().unwrap().to_string();
    let stopped = agent.call("POST", &format!("/v1/vms/{a}/snapshots"), Some(&acme), None);
    assert_eq!(
        stopped.status, 409,
        "a stopped VM has nothing to snapshot: {stopped:?}"
    );
    let started = agent.call("POST", &format!("/v1/vms/{a}/start"), Some(&acme), None);
    assert_eq!(expect(&started, 200)["state"], "running");
    wait_for_growth(&agent, &a, 0);

    // A running VM runs on after its snapshot.
    let running = agent.call("POST", &format!("/v1/vms/{a}/snapshots"), Some(&acme), None);
    let running = expect(&running, 201).clone();
    assert_eq!(running["vm_id"], a.as_str());
    let shown = agent.call("GET", &format!("/v1/vms/{a}"), Some(&acme), None);
    assert_eq!(expect(&shown, 200)["state"], "running");
    let seen = console(&agent, &a).len();
    wait_for_growth(&agent, &a, seen);

    // A paused one stays paused; its snapshot is the restore point.
    let paused = agent.call("POST", &format!("/v1/vms/{a}/pause"), Some(&acme), None);
    assert_eq!(expect(&paused, 200)["state"], "paused");
    let before = console(&agent, &a);
    let snapshot = agent.call("POST", &format!("/v1/vms/{a}/snapshots"), Some(&acme), None);
    let snapshot = expect(&snapshot, 201).clone();
    let snapshot_id = snapshot["id"].as_str().unwrap().to_string();
    assert!(snapshot["size_bytes"].as_u64().unwrap() > 0, "{snapshot}");
    let shown = agent.call("GET", &format!("/v1/vms/{a}"), Some(&acme), None);
    assert_eq!(expect(&shown, 200)["state"], "paused");
    assert_eq!(console(&agent, &a), before, "the paused VM printed");
    assert_counts(&before, "before the snapshot");
    // The original's disk changes after the snapshot.
    std::fs::write(
        vm_dir(&agent, &a).join("root.raw"),
        [b"AFTER!".as_slice(), &[0; (1 << 20) - 6]].concat(),
    )
    .unwrap();

    // Tenancy: another tenant sees neither the snapshot nor the list.
    let foreign = agent.call(
        "GET",
        &format!("/v1/snapshots/{snapshot_id}"),
        Some(&globex),
        None,
    );
    assert_eq!(foreign.status, 404, "{foreign:?}");
    let listed = agent.call("GET", "/v1/snapshots", Some(&globex), None);
    assert_eq!(expect(&listed, 200).as_array().unwrap().len(), 0);
    let listed = agent.call("GET", "/v1/snapshots", Some(&acme), None);
    assert_eq!(expect(&listed, 200).as_array().unwrap().len(), 2);
    let taken = agent.call(
        "POST",
        &format!("/v1/snapshots/{snapshot_id}/restore"),
        Some(&acme),
        Some(&json!({"name": "a"})),
    );
    assert_eq!(taken.status, 409, "a VM named a exists: {taken:?}");
    let bad = agent.call(
        "POST",
        &format!("/v1/snapshots/{snapshot_id}/restore"),
        Some(&acme),
        Some(&json!({"name": "b", "vcpus": 4})),
    );
    assert_eq!(bad.status, 400, "{bad:?}");

    let restored = agent.call(
        "POST",
        &format!("/v1/snapshots/{snapshot_id}/restore"),
        Some(&acme),
        Some(&json!({"name": "b"})),
    );
    let restored = expect(&restored, 201).clone();
    let b = restored["id"].as_str().unwrap().to_string();
    assert_eq!(restored["restore_from"], snapshot_id.as_str());
    assert_eq!(restored["state"], "stopped");
    let busy = agent.call(
        "DELETE",
        &format!("/v1/snapshots/{snapshot_id}"),
        Some(&acme),
        None,
    );
    assert_eq!(
        busy.status, 409,
        "b still waits to resume from it: {busy:?}"
    );
    let deleted = agent.call("DELETE", &format!("/v1/vms/{a}"), Some(&acme), None);
    assert_eq!(deleted.status, 204, "{deleted:?}");

    let started = agent.call("POST", &format!("/v1/vms/{b}/start"), Some(&acme), None);
    assert_eq!(expect(&started, 200)["state"], "running");
    let after = wait_for_growth(&agent, &b, 0);
    let last = *before.last().unwrap();
    assert_eq!(
        after[0],
        last.wrapping_add(1),
        "b printed {} after the snapshot's {last}",
        after[0]
    );
    assert_counts(&after, "after the restore");
    assert_eq!(head(&vm_dir(&agent, &b).join("root.raw")), b"BEFORE");
    let shown = agent.call("GET", &format!("/v1/vms/{b}"), Some(&acme), None);
    assert!(
        expect(&shown, 200).get("restore_from").is_none(),
        "{shown:?}"
    );

    let deleted = agent.call(
        "DELETE",
        &format!("/v1/snapshots/{snapshot_id}"),
        Some(&acme),
        None,
    );
    assert_eq!(deleted.status, 204, "{deleted:?}");
    assert!(!agent.data_dir.join("snapshots").join(&snapshot_id).exists());
    let deleted = agent.call("DELETE", &format!("/v1/vms/{b}"), Some(&acme), None);
    assert_eq!(deleted.status, 204, "{deleted:?}");
}
