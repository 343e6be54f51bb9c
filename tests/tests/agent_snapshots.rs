//! Snapshots through the agent (issue #6), with the counting test guest as
//! the image's kernel: a snapshot of a running VM leaves it running; one
//! of a paused VM, restored into a new VM, resumes with the very next
//! value, on the disk as it was at the snapshot (a write to the original
//! VM's disk after it does not show); the snapshot cannot go while a VM
//! waits to resume from it; tenancy and bad input hold.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nubis_api::{Snapshot, SnapshotRestore, Vm, VmState};
use nubis_tests::agent::{
    counter_vm, expect, expect_as, one_agent_per_host, tenant, Agent, CounterImages,
};
use nubis_tests::guest::assert_counts;
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

fn head(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()[..6].to_vec()
}

#[test]
fn snapshots_restore_into_new_vms_that_resume_where_they_were() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("agent-snapshots");
    let images = CounterImages::new(&dir);
    let mut disk = b"BEFORE".to_vec();
    disk.resize(1 << 20, 0);
    std::fs::write(&images.rootfs, &disk).unwrap();

    let agent = Agent::start(&dir.join("agent"), &images.dir);
    let (_, acme) = images.tenant(&agent, "acme");
    let (_, globex) = tenant(&agent, "globex");
    let a = agent.create::<Vm>("/v1/vms", &acme, &counter_vm("a")).id;
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
    assert_eq!(expect_as::<Snapshot>(&running, 201).vm_id, a);
    let shown = agent.call("GET", &format!("/v1/vms/{a}"), Some(&acme), None);
    assert_eq!(expect(&shown, 200)["state"], "running");
    let seen = console(&agent, &a).len();
    wait_for_growth(&agent, &a, seen);

    // A paused one stays paused; its snapshot is the restore point.
    let paused = agent.call("POST", &format!("/v1/vms/{a}/pause"), Some(&acme), None);
    assert_eq!(expect(&paused, 200)["state"], "paused");
    let before = console(&agent, &a);
    let snapshot = agent.call("POST", &format!("/v1/vms/{a}/snapshots"), Some(&acme), None);
    let snapshot: Snapshot = expect_as(&snapshot, 201);
    let snapshot_id = snapshot.id.clone();
    assert!(snapshot.size_bytes > 0, "{snapshot:?}");
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
    assert_eq!(agent.get::<Vec<Snapshot>>("/v1/snapshots", &globex), []);
    assert_eq!(agent.get::<Vec<Snapshot>>("/v1/snapshots", &acme).len(), 2);
    let restore = format!("/v1/snapshots/{snapshot_id}/restore");
    let taken = agent.send(
        "POST",
        &restore,
        Some(&acme),
        &SnapshotRestore { name: "a".into() },
    );
    assert_eq!(taken.status, 409, "a VM named a exists: {taken:?}");
    // deliberately untyped: an unknown field (a restore takes only a name)
    let bad = agent.call(
        "POST",
        &restore,
        Some(&acme),
        Some(&json!({"name": "b", "vcpus": 4})),
    );
    assert_eq!(bad.status, 400, "{bad:?}");

    let restored: Vm = agent.create(&restore, &acme, &SnapshotRestore { name: "b".into() });
    let b = restored.id;
    assert_eq!(restored.restore_from, Some(snapshot_id.clone()));
    assert_eq!(restored.state, VmState::Stopped);
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
    let shown: Vm = agent.get(&format!("/v1/vms/{b}"), &acme);
    assert_eq!(shown.restore_from, None, "{shown:?}");

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
