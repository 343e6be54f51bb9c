//! The jail around every VMM the agent starts (nubis-jailer): looked at
//! from the host while the VMs run. Small test guests (a counter in RAM)
//! keep it to seconds; the Linux guests of the other agent tests boot,
//! use their disks and reach the network through the same jail.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nubis_api::{Network, NetworkCreate, RateLimit, Vm, VmCreate, VmDisk, VmNicCreate};
use nubis_tests::agent::{
    counter_vm, expect, one_agent_per_host, parent_cgroup, vmm_pid, Agent, CounterImages,
};
use nubis_tests::guest::Program;
use nubis_tests::vm::control_request;
use nubis_tests::{require_kvm, TestDir};
use serde_json::json;

/// Hang guard, not a timing assertion.
const WAIT: Duration = Duration::from_secs(60);

/// The fields of `/proc/PID/status`, by name.
fn proc_status(pid: i32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|err| panic!("/proc/{pid}/status: {err}"))
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.to_string(), value.trim().to_string()))
        .collect()
}

/// Every path under `root` (relative, directories included), not
/// descending into /proc.
fn tree(root: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&relative)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = relative.join(entry.file_name());
            let name = path.display().to_string();
            let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
            if is_dir && name != "proc" {
                pending.push(path);
            }
            found.insert(name);
        }
    }
    found
}

/// A path under the jail's /lib, /lib64 or /usr that is a directory on
/// the way to a shared library, or the library (or dynamic loader) itself:
/// nothing else of the host's library trees.
fn is_library_path(root: &Path, path: &str) -> bool {
    let top = path.split('/').next().unwrap_or("");
    let name = path.rsplit('/').next().unwrap_or("");
    let under_a_library_tree = ["lib", "lib64", "usr"].contains(&top);
    let is_dir = std::fs::symlink_metadata(root.join(path)).is_ok_and(|meta| meta.is_dir());
    let is_library = (name.starts_with("lib") || name.starts_with("ld-")) && name.contains(".so");
    under_a_library_tree && (is_dir || is_library)
}

/// A cgroup file of VM `vm`: the v1 file in `controller`'s hierarchy, or
/// the v2 file in the unified one, whichever the host uses.
fn cgroup_value(cgroup: &str, vm: &str, controller: &str, v1: &str, v2: &str) -> String {
    let v1_path = Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(cgroup)
        .join(vm)
        .join(v1);
    let v2_path = Path::new("/sys/fs/cgroup").join(cgroup).join(vm).join(v2);
    std::fs::read_to_string(&v1_path)
        .or_else(|_| std::fs::read_to_string(&v2_path))
        .unwrap_or_else(|_| panic!("neither {} nor {}", v1_path.display(), v2_path.display()))
        .trim()
        .to_string()
}

fn cgroup_dirs_exist(cgroup: &str, vm: &str) -> bool {
    ["memory", "cpu", "pids", ""].iter().any(|controller| {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(cgroup)
            .join(vm)
            .exists()
    })
}

fn wait_for_console(agent: &Agent, vm: &str) {
    let console = agent.data_dir.join("vms").join(vm).join("vm/console.log");
    let start = Instant::now();
    while std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0) < 16 {
        assert!(start.elapsed() < WAIT, "{vm} printed nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A VMM under the agent: its own unprivileged user per VM, no
/// capabilities, its own namespaces, a root with only its files, rlimits,
/// cgroup limits from its size; the control socket admits root and no one
/// else; nothing of the jail is left once the VM stops.
#[test]
fn vmms_run_jailed_unprivileged_and_limited() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("agent-jail");
    let images = CounterImages::new(&dir);
    let data_dir = dir.join("agent");
    let agent = Agent::start(&data_dir, &images.dir);
    let (_, acme) = images.tenant(&agent, "acme");
    let jailnet = NetworkCreate::new("jailnet", "10.93.0.0/24");
    let network = agent.create::<Network>("/v1/networks", &acme, &jailnet).id;
    let bandwidth = |bytes_per_s| RateLimit {
        bytes_per_s: Some(bytes_per_s),
        ops_per_s: None,
    };
    let mut ids = Vec::new();
    for (name, vcpus, memory_mib) in [("a", 2, 64), ("b", 1, 32)] {
        let vm = VmCreate {
            vcpus,
            memory_mib,
            root_rate_limit: bandwidth(4_000_000),
            disks: vec![VmDisk {
                size_mib: 4,
                rate_limit: bandwidth(1_000_000),
            }],
            nics: vec![VmNicCreate::on_network("jailnet")],
            ..counter_vm(name)
        };
        let id = agent.create::<Vm>("/v1/vms", &acme, &vm).id;
        let started = agent.call("POST", &format!("/v1/vms/{id}/start"), Some(&acme), None);
        assert_eq!(expect(&started, 200)["state"], "running", "{started:?}");
        wait_for_console(&agent, &id);
        ids.push(id);
    }
    let (a, b) = (&ids[0], &ids[1]);
    let pid = vmm_pid(&data_dir, a).expect("a's VMM runs in its cgroup");
    let pid_b = vmm_pid(&data_dir, b).expect("b's VMM runs in its cgroup");
    let shown = agent.call("GET", &format!("/v1/vms/{a}"), Some(&acme), None);
    assert_eq!(
        expect(&shown, 200)["pid"].as_i64(),
        Some(i64::from(pid)),
        "the agent records the VMM itself"
    );

    // Its own unprivileged user, no groups, no capabilities at all.
    let status = proc_status(pid);
    let uid: u32 = status["Uid"]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(uid >= 900_000, "uid {uid}");
    assert_eq!(status["Uid"], format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(status["Gid"], format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(status["Groups"], "");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status[set], "0000000000000000", "{set}");
    }
    assert_eq!(status["NoNewPrivs"], "1");
    // Every thread (the event loop, each vCPU) runs under a seccomp filter.
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    assert!(tasks.len() >= 3, "main and two vCPU threads expected");
    for task in tasks {
        let text = std::fs::read_to_string(task.path().join("status")).unwrap();
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        assert!(
            text.lines().any(|line| line == "Seccomp:\t2"),
            "thread {} ({}) has no seccomp filter",
            task.file_name().to_string_lossy(),
            comm.trim()
        );
    }
    let uid_b: u32 = proc_status(pid_b)["Uid"]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(uid, uid_b, "two VMs share a user");

    // Namespaces of its own, a PID namespace in which it is the first.
    for ns in ["mnt", "pid", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the VMM shares the host's {ns} namespace");
    }
    assert!(
        status["NSpid"].ends_with("\t1"),
        "NSpid {:?}",
        status["NSpid"]
    );

    // Its root: the VMM, its libraries, the kernel, the VM's directory,
    // two device nodes; nothing else of the host.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let listed = tree(&root);
    let vm_files: BTreeSet<&str> = [
        "root.raw",
        "data0.raw",
        "console.log",
        "control.sock",
        "vsock.sock",
    ]
    .into();
    for path in &listed {
        let allowed = matches!(
            path.as_str(),
            "nubis-vmm"
                | "boot"
                | "boot/kernel"
                | "dev"
                | "dev/kvm"
                | "dev/net"
                | "dev/net/tun"
                | "vm"
                | "vm.json"
                | "proc"
                | "sys"
                | "sys/module"
                | "sys/module/kvm_pvm"
        ) || path
            .strip_prefix("vm/")
            .is_some_and(|name| vm_files.contains(name))
            || is_library_path(&root, path);
        assert!(allowed, "{path} is in the jail: {listed:#?}");
    }
    for needed in [
        "nubis-vmm",
        "boot/kernel",
        "dev/kvm",
        "dev/net/tun",
        "vm.json",
        "vm/root.raw",
        "vm/data0.raw",
        "vm/control.sock",
        "vm/vsock.sock",
    ] {
        assert!(listed.contains(needed), "{needed} is missing: {listed:#?}");
    }
    assert!(!root.join("etc").exists() && !root.join("bin").exists());
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert!(kvm.file_type().is_char_device());
    assert_eq!((kvm.uid(), kvm.mode() & 0o777), (uid, 0o600));
    // The jail's root cannot be written to, even by root; nor its config.
    assert!(std::fs::write(root.join("boot/planted"), b"x").is_err());
    assert!(std::fs::write(root.join("vm.json"), b"x").is_err());

    // The VM's directory is root's (the config, the VMM's log); the one
    // its VMM writes in it and the control socket are its user's only.
    let vm_dir = data_dir.join("vms").join(a);
    let meta = std::fs::metadata(&vm_dir).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o700));
    for name in ["vm.json", "vmm.log", "vmm.pid"] {
        assert_eq!(
            std::fs::metadata(vm_dir.join(name)).unwrap().uid(),
            0,
            "{name}"
        );
    }
    let meta = std::fs::metadata(vm_dir.join("vm")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));
    let socket = vm_dir.join("vm/control.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));
    // The tap is the VM user's, which is how the VMM attached to it
    // without any capability.
    let tap = format!("nbt{}0", &a[3..11]);
    let owner = std::fs::read_to_string(format!("/sys/class/net/{tap}/owner")).unwrap();
    assert_eq!(owner.trim(), uid.to_string());

    // Resource limits.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|line| line.starts_with(name))
            .map(|line| {
                line[name.len()..]
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| panic!("no {name} in {limits}"))
    };
    assert_eq!(limit("Max core file size"), "0 0");
    assert_eq!(limit("Max open files"), "2048 2048");
    // No file larger than its largest (64 MiB of RAM, in a snapshot) and
    // 64 MiB of room.
    assert_eq!(limit("Max file size"), "134217728 134217728");

    // cgroup limits from the VM's size: 2 vCPUs, 64 MiB + 96 MiB of VMM
    // overhead, vCPUs + 32 tasks.
    let cgroup = parent_cgroup(&data_dir);
    let memory = cgroup_value(&cgroup, a, "memory", "memory.limit_in_bytes", "memory.max");
    assert_eq!(memory, ((64u64 + 96) << 20).to_string());
    let quota = cgroup_value(&cgroup, a, "cpu", "cpu.cfs_quota_us", "cpu.max");
    assert!(quota == "200000" || quota == "200000 100000", "cpu {quota}");
    assert_eq!(
        cgroup_value(&cgroup, a, "pids", "pids.max", "pids.max"),
        "34"
    );
    // I/O: the disks' limits (4 MB/s + 1 MB/s) added up on the whole disk
    // their files are on, as the agent finds it (`backing_device`: a
    // partition's disk). On a filesystem with no block device under it
    // (tmpfs, overlayfs) the agent sets no I/O limit and there is nothing
    // to check: that fails here, it is not passed over.
    let root_disk = data_dir.join("vms").join(a).join("vm/root.raw");
    let dev = std::fs::metadata(&root_disk).unwrap().dev();
    let device = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let sys = Path::new("/sys/dev/block").join(&device);
    assert!(
        sys.exists(),
        "{} is on device {device}, which is not a block device (tmpfs or overlayfs?): \
         the agent sets no I/O limits there and this test cannot check them; run the \
         tests with TMPDIR on a filesystem of a block device",
        root_disk.display()
    );
    let disk = if sys.join("partition").exists() {
        std::fs::read_to_string(sys.join("..").join("dev"))
            .expect("the partition's disk")
            .trim()
            .to_string()
    } else {
        device
    };
    let v1_blkio = Path::new("/sys/fs/cgroup/blkio").join(&cgroup).join(a);
    if v1_blkio.exists() {
        for file in [
            "blkio.throttle.read_bps_device",
            "blkio.throttle.write_bps_device",
        ] {
            let limits = std::fs::read_to_string(v1_blkio.join(file))
                .unwrap_or_else(|err| panic!("read {file}: {err}"));
            assert!(
                limits
                    .lines()
                    .any(|line| line.trim() == format!("{disk} 5000000")),
                "{file} has no 5 MB/s limit on {disk}: {limits:?}"
            );
        }
    } else {
        let path = Path::new("/sys/fs/cgroup")
            .join(&cgroup)
            .join(a)
            .join("io.max");
        let limits = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
        assert!(
            limits
                .lines()
                .any(|line| line.starts_with(&format!("{disk} "))
                    && line.contains("rbps=5000000")
                    && line.contains("wbps=5000000")),
            "io.max has no 5 MB/s limits on {disk}: {limits:?}"
        );
    }
    let memory_b = cgroup_value(&cgroup, b, "memory", "memory.limit_in_bytes", "memory.max");
    assert_eq!(memory_b, ((32u64 + 96) << 20).to_string());

    // The control socket answers root (the agent)...
    let answer = control_request(&socket, r#"{"command":"status"}"#);
    assert_eq!(answer["status"]["state"], "running", "{answer}");
    // ... and refuses another user even when file modes would let it in
    // (CAP_DAC_OVERRIDE): the peer's credentials are checked.
    let client = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(10)
try:
    s.sendall(b'{"command":"status"}\n')
    reply = s.recv(4096)
except (ConnectionResetError, BrokenPipeError):
    reply = b''
print("answered" if reply else "closed")
"#;
    let foreign = Command::new("setpriv")
        .args([
            "--reuid=12345",
            "--regid=12345",
            "--clear-groups",
            "--inh-caps=+dac_override",
            "--ambient-caps=+dac_override",
            "python3",
            "-c",
            client,
        ])
        .arg(&socket)
        .output()
        .expect("run setpriv");
    assert_eq!(
        String::from_utf8_lossy(&foreign.stdout).trim(),
        "closed",
        "another user's request was answered: {}",
        String::from_utf8_lossy(&foreign.stderr)
    );
    let vmm_log = std::fs::read_to_string(vm_dir.join("vmm.log")).unwrap();
    assert!(vmm_log.contains("runs as uid 12345"), "{vmm_log}");

    // Stopped: the jail's cgroups and root mount point are gone.
    let stopped = agent.call(
        "POST",
        &format!("/v1/vms/{a}/force-stop"),
        Some(&acme),
        None,
    );
    assert_eq!(expect(&stopped, 200)["state"], "stopped", "{stopped:?}");
    let start = Instant::now();
    while cgroup_dirs_exist(&cgroup, a) || data_dir.join("jails").join(a).exists() {
        assert!(start.elapsed() < WAIT, "the jail of a stopped VM remains");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(vmm_pid(&data_dir, b).is_some(), "b stopped with a");
    for vm in [a, b] {
        let deleted = agent.call("DELETE", &format!("/v1/vms/{vm}"), Some(&acme), None);
        assert_eq!(deleted.status, 204, "{deleted:?}");
    }
    let deleted = agent.call(
        "DELETE",
        &format!("/v1/networks/{network}"),
        Some(&acme),
        None,
    );
    assert_eq!(deleted.status, 204, "{deleted:?}");
    assert!(!cgroup_dirs_exist(&cgroup, b), "b's cgroup outlived it");
}

/// A VM whose image file was swapped for a link out of the image
/// directories since it was registered does not start; restored, it does.
#[test]
fn a_vm_whose_files_left_the_image_directories_is_not_started() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("agent-jail-files");
    let images = CounterImages::new(&dir);
    let kernel = images.kernel.clone();
    let secret = dir.join("outside-secret");
    std::fs::write(&secret, b"not the tenant's").unwrap();
    let agent = Agent::start(&dir.join("agent"), &images.dir);
    let (_, acme) = images.tenant(&agent, "acme");
    let a = agent.create::<Vm>("/v1/vms", &acme, &counter_vm("a")).id;
    let saved = images.dir.join("count.elf.saved");
    std::fs::rename(&kernel, &saved).unwrap();
    std::os::unix::fs::symlink(&secret, &kernel).unwrap();
    let refused = agent.call("POST", &format!("/v1/vms/{a}/start"), Some(&acme), None);
    assert_eq!(refused.status, 422, "{refused:?}");
    assert_eq!(refused.body["error"]["field"], "kernel", "{refused:?}");
    assert!(
        refused
            .text
            .contains("outside the agent's image directories"),
        "{refused:?}"
    );
    let shown = agent.call("GET", &format!("/v1/vms/{a}"), Some(&acme), None);
    assert_eq!(expect(&shown, 200)["state"], "stopped");
    std::fs::remove_file(&kernel).unwrap();
    std::fs::rename(&saved, &kernel).unwrap();
    let started = agent.call("POST", &format!("/v1/vms/{a}/start"), Some(&acme), None);
    assert_eq!(expect(&started, 200)["state"], "running", "{started:?}");
}

/// A guest that writes all of its RAM, with (for this test) no room left
/// for the VMM beyond it (`vmm_memory_overhead_mib` 0: the VMM's own few
/// MiB do not fit): its cgroup's limit stops its VMM alone; the agent and
/// the other VM go on.
#[test]
fn a_vm_that_outgrows_its_memory_limit_is_stopped_alone() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("agent-jail-memory");
    let images = CounterImages::new(&dir);
    let filler = images.dir.join("fill.elf");
    Program::new()
        .print("FILLING\n")
        .touch_memory(0x11_0000, 64 << 20)
        .print("FILLED\n")
        .spin()
        .write(&filler);
    let data_dir = dir.join("agent");
    let agent = Agent::start_with(
        &data_dir,
        &images.dir,
        &json!({"vmm_memory_overhead_mib": 0}),
    );
    let (_, acme) = images.tenant(&agent, "acme");
    images.register(&agent, &acme, "filler", Some(&filler));
    let mut ids = Vec::new();
    for (name, image) in [("steady", "counter"), ("greedy", "filler")] {
        let vm = VmCreate {
            memory_mib: 64,
            ..VmCreate::new(name, image)
        };
        let id = agent.create::<Vm>("/v1/vms", &acme, &vm).id;
        let started = agent.call("POST", &format!("/v1/vms/{id}/start"), Some(&acme), None);
        assert_eq!(expect(&started, 200)["state"], "running", "{started:?}");
        ids.push(id);
    }
    let (steady, greedy) = (&ids[0], &ids[1]);
    // The greedy VMM is killed by its cgroup before its guest is done.
    let start = Instant::now();
    let shown = loop {
        let shown = agent.call("GET", &format!("/v1/vms/{greedy}"), Some(&acme), None);
        let shown = expect(&shown, 200).clone();
        if shown["state"] != "running" {
            break shown;
        }
        assert!(
            start.elapsed() < WAIT,
            "the greedy VM outgrew its limit and runs on"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(shown["state"], "failed", "{shown}");
    assert!(
        shown["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("signal 9"),
        "{shown}"
    );
    let console = std::fs::read_to_string(data_dir.join("vms").join(greedy).join("vm/console.log"))
        .unwrap_or_default();
    assert!(
        console.contains("FILLING") && !console.contains("FILLED"),
        "{console}"
    );
    // The other VM counts on and the agent answers.
    let steady_console = data_dir.join("vms").join(steady).join("vm/console.log");
    let before = std::fs::metadata(&steady_console).unwrap().len();
    let start = Instant::now();
    while std::fs::metadata(&steady_console).unwrap().len() == before {
        assert!(
            start.elapsed() < WAIT,
            "the steady VM stopped with the greedy one"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let steady_shown = agent.call("GET", &format!("/v1/vms/{steady}"), Some(&acme), None);
    assert_eq!(expect(&steady_shown, 200)["state"], "running");
    assert_eq!(agent.call("GET", "/healthz", None, None).status, 200);
}
