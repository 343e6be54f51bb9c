//! Crash consistency: an agent killed (SIGKILL, through its debug-build
//! crash hook `NUBIS_AGENT_CRASH_AT`) in the middle of a multi-step change
//! and started again leaves no orphan process, cgroup, file or record, and
//! never runs a VM twice. Small test guests keep it to seconds.

use std::path::Path;
use std::time::{Duration, Instant};

use nubis_api::{Snapshot, Vm, VmCreate, VmDisk};
use nubis_tests::agent::{
    counter_vm, expect, jailed_pids, one_agent_per_host, parent_cgroup, vmm_pid, Agent,
    CounterImages,
};
use nubis_tests::vm::control_request;
use nubis_tests::{require_kvm, TestDir};
use serde_json::Value;

/// Hang guard, not a timing assertion.
const WAIT: Duration = Duration::from_secs(60);

fn console_len(data_dir: &Path, vm: &str) -> u64 {
    std::fs::metadata(data_dir.join("vms").join(vm).join("vm/console.log")).map_or(0, |m| m.len())
}

/// Waits until `vm`'s console grows (its guest runs).
fn wait_for_growth(data_dir: &Path, vm: &str) {
    let before = console_len(data_dir, vm);
    let start = Instant::now();
    while console_len(data_dir, vm) <= before {
        assert!(start.elapsed() < WAIT, "{vm}'s guest does not run");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The state the VM's own VMM reports.
fn vmm_state(data_dir: &Path, vm: &str) -> Value {
    let socket = data_dir.join("vms").join(vm).join("vm/control.sock");
    control_request(&socket, r#"{"command":"status"}"#)["status"]["state"].clone()
}

fn cgroup_exists(cgroup: &str, vm: &str) -> bool {
    ["memory", "cpu", "pids", ""].iter().any(|controller| {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(cgroup)
            .join(vm)
            .exists()
    })
}

/// Stops `vm` and checks that nothing of its jail is left.
fn stop_and_check_clean(agent: &Agent, token: &str, vm: &str) {
    let stopped = agent.call(
        "POST",
        &format!("/v1/vms/{vm}/force-stop"),
        Some(token),
        None,
    );
    assert_eq!(expect(&stopped, 200)["state"], "stopped", "{stopped:?}");
    let cgroup = parent_cgroup(&agent.data_dir);
    let start = Instant::now();
    while cgroup_exists(&cgroup, vm)
        || agent.data_dir.join("jails").join(vm).exists()
        || !jailed_pids(&cgroup, Some(vm)).is_empty()
    {
        assert!(start.elapsed() < WAIT, "the jail of a stopped VM remains");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn create_vm(agent: &Agent, token: &str, name: &str) -> String {
    let vm = VmCreate {
        disks: vec![VmDisk::new(4)],
        ..counter_vm(name)
    };
    agent.create::<Vm>("/v1/vms", token, &vm).id
}

/// Killed after the jailer started the VMM and before its pid was
/// recorded: the restarted agent finds it in its cgroup and adopts it,
/// once; it is never started a second time.
#[test]
fn a_vmm_started_just_before_a_crash_is_adopted_once() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("agent-crash-start");
    let images = CounterImages::new(&dir);
    let data_dir = dir.join("agent");
    let agent = Agent::start_crashing(&data_dir, &images.dir, &Value::Null, "vm_spawned");
    let (_, acme) = images.tenant(&agent, "acme");
    let vm = create_vm(&agent, &acme, "a");
    let reply = agent.call_crashing("POST", &format!("/v1/vms/{vm}/start"), Some(&acme), None);
    assert!(reply.is_none(), "the agent answered: {reply:?}");
    let (status, log) = agent.crashed();
    assert!(
        status.is_some_and(|status| !status.success()),
        "{status:?}: {log}"
    );
    let orphan = vmm_pid(&data_dir, &vm).expect("the VMM runs, its agent gone");

    let agent = Agent::start(&data_dir, &images.dir);
    let shown = agent.call("GET", &format!("/v1/vms/{vm}"), Some(&acme), None);
    let shown = expect(&shown, 200);
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["pid"].as_i64(), Some(i64::from(orphan)), "{shown}");
    assert_eq!(
        jailed_pids(&parent_cgroup(&data_dir), Some(&vm)),
        vec![orphan],
        "one VMM, the adopted one"
    );
    wait_for_growth(&data_dir, &vm);
    let again = agent.call("POST", &format!("/v1/vms/{vm}/start"), Some(&acme), None);
    assert_eq!(again.status, 409, "{again:?}");
    stop_and_check_clean(&agent, &acme, &vm);
    // It starts again as usual, and goes with its deletion.
    let started = agent.call("POST", &format!("/v1/vms/{vm}/start"), Some(&acme), None);
    assert_eq!(expect(&started, 200)["state"], "running", "{started:?}");
    let deleted = agent.call("DELETE", &format!("/v1/vms/{vm}"), Some(&acme), None);
    assert_eq!(deleted.status, 204, "{deleted:?}");
    assert!(jailed_pids(&parent_cgroup(&data_dir), None).is_empty());
    assert!(!data_dir.join("vms").join(&vm).exists());
}

/// Killed while a snapshot had the VM paused: the restarted agent resumes
/// it. Killed after the snapshot's files were written and before they were
/// recorded: they are swept. A tenant with a snapshot cannot be deleted
/// (409, naming it).
#[test]
fn a_snapshot_cut_short_leaves_the_vm_running_and_no_files() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("agent-crash-snapshot");
    let images = CounterImages::new(&dir);
    let data_dir = dir.join("agent");
    let snapshots = data_dir.join("snapshots");
    let files_left = || {
        std::fs::read_dir(&snapshots)
            .map(|entries| entries.count())
            .unwrap_or(0)
    };

    let agent = Agent::start_crashing(&data_dir, &images.dir, &Value::Null, "snapshot_paused");
    let (tenant_id, acme) = images.tenant(&agent, "acme");
    let vm = create_vm(&agent, &acme, "a");
    let started = agent.call("POST", &format!("/v1/vms/{vm}/start"), Some(&acme), None);
    assert_eq!(expect(&started, 200)["state"], "running", "{started:?}");
    wait_for_growth(&data_dir, &vm);
    let reply = agent.call_crashing(
        "POST",
        &format!("/v1/vms/{vm}/snapshots"),
        Some(&acme),
        None,
    );
    assert!(reply.is_none(), "the agent answered: {reply:?}");
    agent.crashed();
    assert_eq!(
        vmm_state(&data_dir, &vm),
        "paused",
        "the crash left it paused"
    );

    let agent = Agent::start_crashing(&data_dir, &images.dir, &Value::Null, "snapshot_written");
    assert_eq!(vmm_state(&data_dir, &vm), "running", "not resumed");
    let shown = agent.call("GET", &format!("/v1/vms/{vm}"), Some(&acme), None);
    assert_eq!(expect(&shown, 200)["state"], "running");
    wait_for_growth(&data_dir, &vm);
    assert_eq!(files_left(), 0);

    let reply = agent.call_crashing(
        "POST",
        &format!("/v1/vms/{vm}/snapshots"),
        Some(&acme),
        None,
    );
    assert!(reply.is_none(), "the agent answered: {reply:?}");
    agent.crashed();
    assert_eq!(files_left(), 1, "the crash was after the files");

    let agent = Agent::start(&data_dir, &images.dir);
    assert_eq!(files_left(), 0, "unrecorded snapshot files were kept");
    assert_eq!(agent.get::<Vec<Snapshot>>("/v1/snapshots", &acme), []);
    assert_eq!(vmm_state(&data_dir, &vm), "running");
    assert_eq!(
        jailed_pids(&parent_cgroup(&data_dir), Some(&vm)).len(),
        1,
        "one VMM"
    );

    // A whole snapshot, then the tenant's deletion: refused while it has one.
    let snapshot = agent.call(
        "POST",
        &format!("/v1/vms/{vm}/snapshots"),
        Some(&acme),
        None,
    );
    let snapshot = expect(&snapshot, 201)["id"].as_str().unwrap().to_string();
    stop_and_check_clean(&agent, &acme, &vm);
    let deleted = agent.call("DELETE", &format!("/v1/vms/{vm}"), Some(&acme), None);
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let operator = Some(agent.operator_token.as_str());
    let refused = agent.call(
        "DELETE",
        &format!("/v1/tenants/{tenant_id}"),
        operator,
        None,
    );
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(refused.text.contains("1 snapshot(s)"), "{refused:?}");
    let gone = agent.call(
        "DELETE",
        &format!("/v1/snapshots/{snapshot}"),
        Some(&acme),
        None,
    );
    assert_eq!(gone.status, 204, "{gone:?}");
    assert_eq!(files_left(), 0);
}
