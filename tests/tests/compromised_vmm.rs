//! A VMM that its guest has taken over runs as the VM's own user with its
//! VM directory writable: it can put links there where the agent, as
//! root, expects its files. Played here by a process of that user (and,
//! for the hard link a hardened kernel would refuse it, by the test as
//! root): every file of the directory becomes a link to a root-owned
//! canary, and its control socket a fake VMM's that answers what the agent
//! asks and writes links into the snapshot it is asked for. Through stop,
//! start, console reads, a snapshot and deletion, the agent must never
//! read, write, chown or chmod a canary.

use std::io::BufRead;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nubis_api::{Vm, VmCreate, VmDisk};
use nubis_tests::agent::{counter_vm, expect, one_agent_per_host, vmm_pid, Agent, CounterImages};
use nubis_tests::{require_kvm, TestDir};
use serde_json::json;

/// Hang guard, not a timing assertion.
const WAIT: Duration = Duration::from_secs(60);

/// A root-owned file (0600) whose content, mode and owner must not change.
struct Canary {
    path: PathBuf,
    content: String,
}

impl Canary {
    fn new(dir: &Path, name: &str) -> Self {
        let path = dir.join(format!("canary-{name}"));
        let content = format!("CANARY-{name}-{}\n", std::process::id());
        std::fs::write(&path, &content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self { path, content }
    }

    fn check(&self, when: &str) {
        let meta = std::fs::metadata(&self.path)
            .unwrap_or_else(|err| panic!("{when}: canary {}: {err}", self.path.display()));
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, 0, 0o600),
            "{when}: canary {} was chowned or chmodded",
            self.path.display()
        );
        assert_eq!(
            std::fs::read_to_string(&self.path).unwrap(),
            self.content,
            "{when}: canary {} was written",
            self.path.display()
        );
    }
}

/// `program` run as `uid`/`gid` (no groups) in `dir`: the directory is
/// entered while still root (its parent is root's only), as the jailed
/// VMM, which has it as `/vm`, reaches it.
fn as_vm_user(program: &str, uid: u32, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command.current_dir(dir);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (setgroups, setgid, setuid).
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// The fake VMM on the control socket: answers every command as the real
/// one would (the agent's client refuses malformed answers); a snapshot
/// gets links to `canary` for files, and Ctrl-Alt-Del or stop kills the
/// real VMM (same user).
const FAKE_VMM: &str = r#"
import json, os, signal, socket, sys
vmm, canary = int(sys.argv[1]), sys.argv[2]
try:
    os.unlink("control.sock")
except FileNotFoundError:
    pass
server = socket.socket(socket.AF_UNIX)
server.bind("control.sock")
server.listen(16)
print("ready", flush=True)
while True:
    client, _ = server.accept()
    try:
        request = json.loads(client.makefile().readline() or "{}")
    except ValueError:
        request = {}
    command = request.get("command")
    if command == "snapshot":
        for name in ("state", "memory", "root.raw", "data0.raw"):
            try:
                os.symlink(canary, os.path.join("snapshot", name))
            except OSError:
                pass
    if command in ("shutdown", "stop"):
        try:
            os.kill(vmm, signal.SIGKILL)
        except OSError:
            pass
    # Well-formed answers, so that the agent goes on to the files the
    # "VMM" planted (a malformed answer would stop it before them).
    answer = {"ok": True}
    if command == "status":
        answer["status"] = {"state": "running", "vcpus": 1, "memory_mib": 64,
                            "kernel": "/vmlinux", "pid": vmm, "uptime_ms": 1000}
    client.sendall((json.dumps(answer) + "\n").encode())
    client.close()
"#;

/// Kills the fake VMM when the test ends, however it ends.
struct Fake(Child);

impl Drop for Fake {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Every canary's content must be absent from `text`.
fn leaks(canaries: &[&Canary], text: &str, what: &str) {
    for canary in canaries {
        assert!(
            !text.contains(canary.content.trim()),
            "{what} shows canary {}: {text}",
            canary.path.display()
        );
    }
}

#[test]
fn a_compromised_vmm_cannot_make_the_agent_touch_host_files() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("compromised-vmm");
    let images = CounterImages::new(&dir);
    let data_dir = dir.join("agent");
    let agent = Agent::start_with(&data_dir, &images.dir, &json!({"stop_timeout_s": 5}));
    let (_, acme) = images.tenant(&agent, "acme");
    let evil = VmCreate {
        disks: vec![VmDisk::new(4)],
        ..counter_vm("evil")
    };
    let vm = agent.create::<Vm>("/v1/vms", &acme, &evil).id;
    let started = agent.call("POST", &format!("/v1/vms/{vm}/start"), Some(&acme), None);
    assert_eq!(expect(&started, 200)["state"], "running", "{started:?}");
    let pid = vmm_pid(&data_dir, &vm).expect("the VMM runs in its cgroup");
    let uid: u32 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .expect("the VMM's uid");

    // The directory the VMM can write: the VM's directory where it is the
    // VM user's, else the one in it that is.
    let vm_dir = data_dir.join("vms").join(&vm);
    let writable = if std::fs::metadata(&vm_dir).unwrap().uid() == uid {
        vm_dir.clone()
    } else {
        vm_dir.join("vm")
    };
    assert_eq!(std::fs::metadata(&writable).unwrap().uid(), uid);
    let start = Instant::now();
    while std::fs::metadata(writable.join("console.log")).map_or(0, |m| m.len()) < 16 {
        assert!(start.elapsed() < WAIT, "the guest printed nothing");
        std::thread::sleep(Duration::from_millis(20));
    }

    let canary_dir = dir.join("canaries");
    std::fs::create_dir(&canary_dir).unwrap();
    let names = [
        "console.log",
        "console.log.1",
        "root.raw",
        "vm.json",
        "vmm.log",
        "vmm.pid",
        "snapshot",
    ];
    let canaries: Vec<Canary> = names
        .iter()
        .map(|name| Canary::new(&canary_dir, name))
        .collect();
    let disk_canary = Canary::new(&canary_dir, "data0.raw");
    let snapshot_canary = Canary::new(&canary_dir, "snapshot-file");
    let all: Vec<&Canary> = canaries
        .iter()
        .chain([&disk_canary, &snapshot_canary])
        .collect();

    // The compromised VMM's links, made as its user.
    let mut script = String::new();
    for (name, canary) in names.iter().zip(&canaries) {
        script.push_str(&format!(
            "rm -rf '{name}' && ln -s '{}' '{name}' && ",
            canary.path.display()
        ));
    }
    script.push_str("true");
    let planted = as_vm_user("sh", uid, &writable)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(planted.status.success(), "{planted:?}");
    // A hard link to a root file, which only a kernel without
    // protected_hardlinks would let the VMM make.
    std::fs::remove_file(writable.join("data0.raw")).unwrap();
    std::fs::hard_link(&disk_canary.path, writable.join("data0.raw")).unwrap();
    let mut fake = as_vm_user("python3", uid, &writable)
        .args(["-c", FAKE_VMM, &pid.to_string()])
        .arg(&snapshot_canary.path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut ready = String::new();
    std::io::BufReader::new(fake.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let _fake = Fake(fake);
    assert_eq!(ready.trim(), "ready");
    for canary in &all {
        canary.check("after planting");
    }

    // Console: never the canary's content (an error or nothing instead).
    let console = agent.call("GET", &format!("/v1/vms/{vm}/console"), Some(&acme), None);
    leaks(&all, &console.text, "the console");
    for canary in &all {
        canary.check("after a console read");
    }

    // A snapshot: the fake VMM "writes" links; the agent must not seal,
    // copy or keep them.
    let snapshot = agent.call(
        "POST",
        &format!("/v1/vms/{vm}/snapshots"),
        Some(&acme),
        None,
    );
    for canary in &all {
        canary.check("after a snapshot");
    }
    assert_eq!(snapshot.status, 409, "a snapshot of links: {snapshot:?}");
    if let Ok(entries) = std::fs::read_dir(data_dir.join("snapshots")) {
        for entry in entries.flatten() {
            for file in std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let meta = std::fs::symlink_metadata(file.path()).unwrap();
                assert!(
                    meta.file_type().is_file() && meta.nlink() == 1,
                    "the snapshot kept {} ({snapshot:?})",
                    file.path().display()
                );
                let content = std::fs::read(file.path()).unwrap_or_default();
                leaks(&all, &String::from_utf8_lossy(&content), "a snapshot file");
            }
        }
    }

    // Stop: the fake VMM kills the real one when told to.
    let stopped = agent.call("POST", &format!("/v1/vms/{vm}/stop"), Some(&acme), None);
    assert_eq!(stopped.status, 200, "{stopped:?}");
    for canary in &all {
        canary.check("after stop");
    }
    let shown = agent.call("GET", &format!("/v1/vms/{vm}"), Some(&acme), None);
    leaks(&all, &shown.text, "the VM's record");
    let events = agent.call("GET", &format!("/v1/vms/{vm}/events"), Some(&acme), None);
    leaks(&all, &events.text, "the VM's events");

    // Start: the disks are links now; whatever the agent answers, it
    // touches no canary.
    let restarted = agent.call("POST", &format!("/v1/vms/{vm}/start"), Some(&acme), None);
    for canary in &all {
        canary.check("after start");
    }
    leaks(&all, &restarted.text, "the start's answer");
    assert_eq!(restarted.status, 409, "{restarted:?}");
    assert!(restarted.text.contains("root.raw"), "{restarted:?}");
    let console = agent.call("GET", &format!("/v1/vms/{vm}/console"), Some(&acme), None);
    leaks(&all, &console.text, "the console after start");
    let shown = agent.call("GET", &format!("/v1/vms/{vm}"), Some(&acme), None);
    leaks(&all, &shown.text, "the VM's record after start");

    // Deletion removes the links, never their targets.
    let deleted = agent.call("DELETE", &format!("/v1/vms/{vm}"), Some(&acme), None);
    assert_eq!(deleted.status, 204, "{deleted:?}");
    assert!(!vm_dir.exists());
    for canary in &all {
        canary.check("after delete");
    }
    // The agent serves on.
    assert_eq!(agent.call("GET", "/healthz", None, None).status, 200);
}
