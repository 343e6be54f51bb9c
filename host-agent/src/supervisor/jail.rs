//! Every VMM the agent starts runs in a jail made by `nubis-jailer`: its
//! own mount, PID and IPC namespaces with a root that holds only this VM's
//! files, the VM's own unprivileged uid/gid, no capabilities, rlimits, and
//! a cgroup whose limits follow the VM's size.
//!
//! Inside the jail the VM's directory is `/vm` (its config, disks, control
//! socket and console), the image's kernel and initrd are read-only under
//! `/boot`, and a snapshot being restored is read-only at `/restore`. The
//! VMM's config names those paths; the agent reaches the same files
//! through the VM's directory on the host.

use std::path::{Path, PathBuf};

use nubis_api::{Image, Vm};

use super::process::Launch;
use super::{SupervisorError, VmPaths};
use crate::config::JailConfig;

/// The VM's directory inside its jail.
pub const VM_DIR: &str = "/vm";
pub const KERNEL: &str = "/boot/kernel";
pub const INITRD: &str = "/boot/initrd";
pub const RESTORE: &str = "/restore";
/// The directory in a VM's directory that a snapshot is written to (then
/// moved to the snapshot store).
pub const SNAPSHOT_OUT: &str = "snapshot";
/// Where the jailer writes the VMM's pid, in the VM's directory.
pub const PID_FILE: &str = "vmm.pid";

/// The VM's paths as its jailed VMM sees them.
pub fn inside_paths() -> VmPaths {
    VmPaths::under(PathBuf::from(VM_DIR))
}

/// The image as the jailed VMM sees it.
pub fn inside_image(image: &Image) -> Image {
    let mut inside = image.clone();
    inside.kernel = KERNEL.to_string();
    if inside.initrd.is_some() {
        inside.initrd = Some(INITRD.to_string());
    }
    inside
}

/// The cgroup limits of `vm`: its vCPUs' worth of CPU time, its RAM plus
/// the VMM's bounded overhead, and room for its threads.
pub fn cgroup_limits(vm: &Vm, overhead_mib: u64) -> Vec<String> {
    const PERIOD_US: u64 = 100_000;
    let quota = u64::from(vm.vcpus) * PERIOD_US;
    let memory = (vm.memory_mib + overhead_mib) << 20;
    // vCPU threads, the event loop, the control socket, a migration's
    // sender and receiver, and slack for short-lived helpers.
    let pids = u64::from(vm.vcpus) + 32;
    vec![
        format!("cpu.max={quota} {PERIOD_US}"),
        format!("memory.max={memory}"),
        format!("pids.max={pids}"),
    ]
}

/// The whole block device (`MAJ:MIN`) that the file at `path` is on, if it
/// is on one (a partition counts as its disk; tmpfs, overlays and network
/// file systems have none).
pub fn backing_device(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let device = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from("/sys/dev/block").join(&device);
    if !sys.exists() {
        return None;
    }
    if sys.join("partition").exists() {
        let disk = std::fs::read_to_string(sys.join("..").join("dev")).ok()?;
        return Some(disk.trim().to_string());
    }
    Some(device)
}

/// `io.max` settings for disks given as (block device, rate limit): one per
/// device, the sum of its disks' limits, for each kind of limit that every
/// disk on it has (a disk without one leaves the device unlimited). The
/// VMM's own rate limiters hold each disk to its limit; these hold a VMM
/// that no longer cooperates.
pub fn io_limits(disks: &[(String, nubis_api::RateLimit)]) -> Vec<String> {
    let mut devices: Vec<&str> = disks.iter().map(|(device, _)| device.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    let mut settings = Vec::new();
    for device in devices {
        let limits: Vec<&nubis_api::RateLimit> = disks
            .iter()
            .filter(|(on, _)| on == device)
            .map(|(_, limit)| limit)
            .collect();
        let sum = |pick: fn(&nubis_api::RateLimit) -> Option<u64>| {
            limits.iter().map(|limit| pick(limit)).sum::<Option<u64>>()
        };
        let mut parts = Vec::new();
        if let Some(bytes) = sum(|limit| limit.bytes_per_s) {
            parts.push(format!("rbps={bytes} wbps={bytes}"));
        }
        if let Some(ops) = sum(|limit| limit.ops_per_s) {
            parts.push(format!("riops={ops} wiops={ops}"));
        }
        if !parts.is_empty() {
            settings.push(format!("io.max={device} {}", parts.join(" ")));
        }
    }
    settings
}

/// The rate limits of `vm`'s disks with the block devices their files
/// are on (disks on no block device are left out).
pub fn disk_devices(vm: &Vm, paths: &VmPaths) -> Vec<(String, nubis_api::RateLimit)> {
    let mut disks = vec![(paths.root_disk.clone(), vm.root_rate_limit)];
    disks.extend(
        vm.disks
            .iter()
            .enumerate()
            .map(|(index, disk)| (paths.data_disk(index), disk.rate_limit)),
    );
    disks
        .into_iter()
        .filter_map(|(path, limit)| backing_device(&path).map(|device| (device, limit)))
        .collect()
}

/// The marker that a process's `/proc/PID/cgroup` lines end with when it
/// is VM `vm_id`'s VMM.
pub fn cgroup_marker(config: &JailConfig, vm_id: &str) -> String {
    format!("/{}/{vm_id}", config.parent_cgroup)
}

/// The `nubis-jailer` command that starts `vm`'s VMM as `uid`.
pub fn command(
    config: &JailConfig,
    vmm_binary: &Path,
    vm: &Vm,
    image: &Image,
    paths: &VmPaths,
    uid: u32,
    launch: &Launch,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&config.jailer_binary);
    command
        .env_clear()
        .arg("--id")
        .arg(&vm.id)
        .arg("--exec-file")
        .arg(vmm_binary)
        .arg("--uid")
        .arg(uid.to_string())
        .arg("--gid")
        .arg(uid.to_string())
        .arg("--chroot-base-dir")
        .arg(&config.jail_dir)
        .arg("--parent-cgroup")
        .arg(&config.parent_cgroup)
        .arg("--pid-file")
        .arg(paths.dir.join(PID_FILE))
        .arg("--device")
        .arg("/dev/kvm");
    if !vm.nics.is_empty() {
        command.arg("--device").arg("/dev/net/tun");
    }
    let mut mount = |host: &Path, inside: &str, read_only: bool| {
        let mut spec = host.as_os_str().to_os_string();
        spec.push(format!(":{inside}{}", if read_only { ":ro" } else { "" }));
        command.arg("--mount").arg(spec);
    };
    mount(&paths.dir, VM_DIR, false);
    mount(Path::new(&image.kernel), KERNEL, true);
    if let Some(initrd) = &image.initrd {
        mount(Path::new(initrd), INITRD, true);
    }
    if let Launch::Restore(snapshot) = launch {
        mount(snapshot, RESTORE, true);
    }
    for limit in cgroup_limits(vm, config.memory_overhead_mib)
        .into_iter()
        .chain(io_limits(&disk_devices(vm, paths)))
    {
        command.arg("--cgroup").arg(limit);
    }
    if matches!(launch, Launch::Receive { .. }) {
        command.arg("--env").arg("NUBIS_MIGRATION_TOKEN");
    }
    command
        .arg("--")
        .arg("--config")
        .arg(inside_paths().vmm_config);
    match launch {
        Launch::Boot => {}
        Launch::Restore(_) => {
            command.arg("--restore").arg(RESTORE);
        }
        Launch::Receive { listen, token } => {
            command
                .arg("--migrate-listen")
                .arg(listen)
                .env("NUBIS_MIGRATION_TOKEN", token);
        }
    }
    command
}

fn chown(path: &Path, uid: u32) -> Result<(), SupervisorError> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(|source| SupervisorError::Files {
        path: path.to_path_buf(),
        source,
    })
}

fn chmod(path: &Path, mode: u32) -> Result<(), SupervisorError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        SupervisorError::Files {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Hands the VM's directory and the files its VMM writes to its user:
/// the directory is reachable by that user only; the config stays root's.
pub fn own_files(paths: &VmPaths, vm: &Vm, uid: u32) -> Result<(), SupervisorError> {
    chown(&paths.dir, uid)?;
    chmod(&paths.dir, 0o700)?;
    let mut files = vec![
        paths.root_disk.clone(),
        paths.console.clone(),
        paths.control.clone(),
    ];
    files.extend((0..vm.disks.len()).map(|index| paths.data_disk(index)));
    for file in files {
        if file.exists() {
            chown(&file, uid)?;
        }
    }
    Ok(())
}

/// An empty directory for the VMM to write a snapshot into, in its VM
/// directory (the only place it can write).
pub fn snapshot_out(paths: &VmPaths, uid: u32) -> Result<PathBuf, SupervisorError> {
    let dir = paths.dir.join(SNAPSHOT_OUT);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| SupervisorError::Files {
            path: dir.clone(),
            source,
        })?;
    }
    std::fs::create_dir(&dir).map_err(|source| SupervisorError::Files {
        path: dir.clone(),
        source,
    })?;
    chown(&dir, uid)?;
    Ok(dir)
}

/// A snapshot's files once they left the VM's directory: root's, and
/// readable by whichever VM's user restores them (through its jail's
/// read-only mount; the snapshot store itself is root's only).
pub fn seal_snapshot(dir: &Path) -> Result<(), SupervisorError> {
    chown(dir, 0)?;
    chmod(dir, 0o755)?;
    let entries = std::fs::read_dir(dir).map_err(|source| SupervisorError::Files {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        chown(&entry.path(), 0)?;
        chmod(&entry.path(), 0o644)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::VmState;

    fn vm() -> Vm {
        Vm {
            id: "vm-1".into(),
            tenant_id: "t".into(),
            name: "a".into(),
            image_id: "i".into(),
            state: VmState::Stopped,
            vcpus: 2,
            memory_mib: 256,
            kernel_args: String::new(),
            root_rate_limit: Default::default(),
            disks: vec![],
            nics: vec![],
            pid: None,
            last_exit: None,
            restore_from: None,
            created_at: 0,
        }
    }

    fn args_of(command: &tokio::process::Command) -> Vec<String> {
        command
            .as_std()
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    fn config() -> JailConfig {
        JailConfig {
            jailer_binary: "/usr/bin/nubis-jailer".into(),
            jail_dir: "/var/lib/nubis/jails".into(),
            parent_cgroup: "nubis".into(),
            uid_first: 900_000,
            uid_count: 10,
            memory_overhead_mib: 96,
        }
    }

    #[test]
    fn limits_follow_the_vm_size() {
        let limits = cgroup_limits(&vm(), 96);
        assert_eq!(
            limits,
            vec![
                "cpu.max=200000 100000".to_string(),
                format!("memory.max={}", 352u64 << 20),
                "pids.max=34".to_string(),
            ]
        );
    }

    #[test]
    fn io_limits_add_up_per_device_and_need_every_disk_limited() {
        let limit = |bytes: Option<u64>, ops: Option<u64>| nubis_api::RateLimit {
            bytes_per_s: bytes,
            ops_per_s: ops,
        };
        let disks = vec![
            ("254:0".to_string(), limit(Some(1000), Some(10))),
            ("254:0".to_string(), limit(Some(500), None)),
            ("8:16".to_string(), limit(None, Some(7))),
            ("8:32".to_string(), limit(None, None)),
        ];
        assert_eq!(
            io_limits(&disks),
            vec![
                "io.max=254:0 rbps=1500 wbps=1500".to_string(),
                "io.max=8:16 riops=7 wiops=7".to_string(),
            ]
        );
        assert!(io_limits(&[]).is_empty());
        // A file on the root file system, and one on no block device.
        assert!(backing_device(Path::new("/proc/self/status")).is_none());
        assert!(backing_device(Path::new("/nonexistent")).is_none());
    }

    #[test]
    fn the_jailer_gets_the_vms_files_and_the_vmm_its_inside_paths() {
        let paths = VmPaths::under(PathBuf::from("/data/vms/vm-1"));
        let image = Image {
            id: "i".into(),
            tenant_id: "t".into(),
            name: "n".into(),
            kernel: "/images/vmlinux".into(),
            rootfs: "/images/rootfs.ext4".into(),
            initrd: Some("/images/initrd".into()),
            cmdline: String::new(),
            rootfs_bytes: 0,
            created_at: 0,
        };
        let restore = PathBuf::from("/data/snapshots/s1");
        let command = command(
            &config(),
            Path::new("/usr/bin/nubis-vmm"),
            &vm(),
            &image,
            &paths,
            900_003,
            &Launch::Restore(&restore),
        );
        let args = args_of(&command);
        let joined = args.join(" ");
        for expected in [
            "--id vm-1",
            "--uid 900003 --gid 900003",
            "--mount /data/vms/vm-1:/vm ",
            "--mount /images/vmlinux:/boot/kernel:ro",
            "--mount /images/initrd:/boot/initrd:ro",
            "--mount /data/snapshots/s1:/restore:ro",
            "--cgroup memory.max=",
            "--pid-file /data/vms/vm-1/vmm.pid",
            "-- --config /vm/vm.json --restore /restore",
        ] {
            assert!(joined.contains(expected), "{expected:?} not in {joined}");
        }
        let receive = super::command(
            &config(),
            Path::new("/usr/bin/nubis-vmm"),
            &vm(),
            &image,
            &paths,
            900_003,
            &Launch::Receive {
                listen: "10.0.0.1:4000",
                token: "secret",
            },
        );
        let receive_args = args_of(&receive);
        let separator = receive_args.iter().position(|arg| arg == "--").unwrap();
        let env = receive_args.iter().position(|arg| arg == "--env").unwrap();
        assert!(
            env < separator,
            "--env must reach the jailer: {receive_args:?}"
        );
        assert!(!receive_args.iter().any(|arg| arg.contains("secret")));
        assert_eq!(receive_args[separator + 3], "--migrate-listen");
        // No NICs: no tun device in the jail.
        assert!(!joined.contains("/dev/net/tun"), "{joined}");
        let inside = inside_image(&image);
        assert_eq!(inside.kernel, KERNEL);
        assert_eq!(inside.initrd.as_deref(), Some(INITRD));
        assert_eq!(cgroup_marker(&config(), "vm-1"), "/nubis/vm-1");
    }
}
