//! Every VMM the agent starts runs in a jail made by `nubis-jailer`: its
//! own mount, PID and IPC namespaces with a root that holds only this VM's
//! files, the VM's own unprivileged uid/gid, no capabilities, rlimits, and
//! a cgroup whose limits follow the VM's size.
//!
//! Inside the jail the VM's own directory is `/vm` (disks, control socket,
//! console; `DATA_DIR/vms/ID/vm` on the host), its config `/vm.json`
//! (read-only), the image's kernel and initrd are read-only under `/boot`,
//! and a snapshot being restored is read-only at `/restore`. The VMM's
//! config names those paths; the agent reaches the same files through the
//! VM's directories on the host, never following a link in the one the
//! VMM writes (see vmfs.rs).

use std::path::{Path, PathBuf};

use super::process::Launch;
use super::vmfs::{self, Dir};
use super::{
    data_disk_name, SupervisorError, VmPaths, CONFIG, CONSOLE, CONTROL, JAIL_SUBDIR, ROOT_DISK,
    VMM_LOG,
};
use crate::config::JailConfig;
use crate::store::{ImageRow, VmRow};

/// The VM's directory inside its jail.
pub const VM_DIR: &str = "/vm";
/// The VMM's config inside its jail (read-only: it stays root's).
pub const VM_CONFIG: &str = "/vm.json";
pub const KERNEL: &str = "/boot/kernel";
pub const INITRD: &str = "/boot/initrd";
pub const RESTORE: &str = "/restore";
/// The directory in a VM's directory that a snapshot is written to (then
/// moved to the snapshot store).
pub const SNAPSHOT_OUT: &str = "snapshot";
/// Where the jailer writes the VMM's pid, in the agent's VM directory.
pub const PID_FILE: &str = "vmm.pid";

/// The VM's paths as its jailed VMM sees them.
pub fn inside_paths() -> VmPaths {
    VmPaths::with(
        PathBuf::from(VM_DIR),
        PathBuf::from(VM_DIR),
        PathBuf::from(VM_CONFIG),
    )
}

/// The image as the jailed VMM sees it.
pub fn inside_image(image: &ImageRow) -> ImageRow {
    let mut inside = image.clone();
    inside.kernel = KERNEL.to_string();
    if inside.initrd.is_some() {
        inside.initrd = Some(INITRD.to_string());
    }
    inside
}

/// The cgroup limits of `vm`: its vCPUs' worth of CPU time, its RAM plus
/// the VMM's bounded overhead, and room for its threads.
pub fn cgroup_limits(vm: &VmRow, overhead_mib: u64) -> Vec<String> {
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
pub fn disk_devices(vm: &VmRow, paths: &VmPaths) -> Vec<(String, nubis_api::RateLimit)> {
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

/// Room a VMM's files get beyond the largest one it must write.
const FILE_SIZE_SLACK: u64 = 64 << 20;

/// The jail's RLIMIT_FSIZE: no file a VMM writes (a disk, a snapshot's
/// memory, a disk received in a migration, its console and its log)
/// grows beyond the largest of its disks and its RAM, plus some room; a
/// guest cannot fill the host's disk through one of its VMM's files.
pub fn file_size_limit(vm: &VmRow, image: &ImageRow, paths: &VmPaths) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::symlink_metadata(&paths.root_disk)
        .map(|meta| meta.size())
        .unwrap_or(0)
        .max(image.rootfs_bytes);
    let data = vm
        .disks
        .iter()
        .map(|disk| disk.size_mib << 20)
        .max()
        .unwrap_or(0);
    root.max(data).max(vm.memory_mib << 20) + FILE_SIZE_SLACK
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
    vm: &VmRow,
    image: &ImageRow,
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
    mount(&paths.jail, VM_DIR, false);
    mount(&paths.vmm_config, VM_CONFIG, true);
    mount(Path::new(&image.kernel), KERNEL, true);
    if let Some(initrd) = &image.initrd {
        mount(Path::new(initrd), INITRD, true);
    }
    if let Launch::Restore { dir, .. } = launch {
        mount(dir, RESTORE, true);
    }
    for limit in cgroup_limits(vm, config.memory_overhead_mib)
        .into_iter()
        .chain(io_limits(&disk_devices(vm, paths)))
    {
        command.arg("--cgroup").arg(limit);
    }
    command
        .arg("--resource-limit")
        .arg(format!("fsize={}", file_size_limit(vm, image, paths)));
    if matches!(launch, Launch::Receive { .. }) {
        command.arg("--env").arg("NUBIS_MIGRATION_TOKEN");
        command.arg("--env").arg("NUBIS_MIGRATION_KEY");
    }
    command
        .arg("--")
        .arg("--config")
        .arg(inside_paths().vmm_config);
    match launch {
        Launch::Boot => {}
        Launch::Restore { clone, .. } => {
            command.arg("--restore").arg(RESTORE);
            if *clone {
                command.arg("--restore-as").arg("clone");
            }
        }
        Launch::Receive { listen, token, key } => {
            command
                .arg("--migrate-listen")
                .arg(listen)
                .env("NUBIS_MIGRATION_TOKEN", token)
                .env("NUBIS_MIGRATION_KEY", key);
        }
    }
    command
}

/// Opens VM `paths`' directories, made if missing: the agent's (root's,
/// 0700: the VMM config, its log, the pid file) and the jailed VMM's in
/// it (the VM user's, 0700). A directory laid out by an older agent (one
/// directory, the VM user's) is taken back: its disks and console move to
/// the jailed VMM's directory, the rest, which that VMM could have
/// replaced, goes.
pub fn vm_dirs(paths: &VmPaths, uid: u32) -> Result<(Dir, Dir), SupervisorError> {
    let (Some(parent), Some(name)) = (paths.dir.parent(), paths.dir.file_name()) else {
        return Err(SupervisorError::Files {
            path: paths.dir.clone(),
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    };
    std::fs::create_dir_all(parent).map_err(|source| SupervisorError::Files {
        path: parent.to_path_buf(),
        source,
    })?;
    let dir = Dir::open(parent)?.make_dir(&name.to_string_lossy(), 0o700)?;
    let legacy = dir.stat()?.st_uid != 0;
    dir.set_owner_mode(0, 0o700)?;
    let fresh = dir.stat_at(JAIL_SUBDIR)?.is_none();
    let jail = dir.make_dir(JAIL_SUBDIR, 0o700)?;
    jail.set_owner_mode(uid, 0o700)?;
    if legacy && fresh {
        for name in [ROOT_DISK.to_string(), CONSOLE.to_string()]
            .into_iter()
            .chain((0..64).map(data_disk_name))
        {
            if dir.stat_at(&name)?.is_some() {
                dir.rename_to(&name, &jail, &name, true)?;
            }
        }
        for name in [CONFIG, VMM_LOG, PID_FILE, CONTROL, SNAPSHOT_OUT] {
            dir.remove(name)?;
        }
    }
    Ok((dir, jail))
}

/// Clears what a VMM that no longer runs left in its directory and the
/// next one would trip over: its control socket, a snapshot's output, and
/// a console log that is not a plain file of its own.
pub fn clear_leftovers(jail: &Dir, uid: u32) -> Result<(), SupervisorError> {
    jail.remove(CONTROL)?;
    jail.remove(SNAPSHOT_OUT)?;
    for name in [CONSOLE.to_string(), format!("{CONSOLE}.1")] {
        if let Some(stat) = jail.stat_at(&name)? {
            if vmfs::check_regular(&stat, uid, &jail.join(&name)).is_err() {
                tracing::warn!("removing {}: not a plain file", jail.join(&name).display());
                jail.remove(&name)?;
            }
        }
    }
    Ok(())
}

/// What a new disk is made from.
pub enum DiskSource {
    /// A copy (a reflink where possible) of a file that no VMM can write
    /// (an image's, a snapshot's).
    Copy(PathBuf),
    /// A sparse file of this many MiB.
    Empty(u64),
}

/// Checks disk `name` of the jailed VMM's directory if it is there (a
/// regular file of the VM's user, one link), or makes it from `source`:
/// written in the agent's directory, given to the VM's user, then moved
/// into place (never over an entry that appeared meanwhile). Returns
/// whether it was made.
pub fn prepare_disk(
    dir: &Dir,
    jail: &Dir,
    name: &str,
    uid: u32,
    source: DiskSource,
) -> Result<bool, SupervisorError> {
    if jail.stat_at(name)?.is_some() {
        jail.open_file(name, libc::O_RDONLY, uid)?;
        return Ok(false);
    }
    let partial = format!(".{name}.partial");
    dir.remove(&partial)?;
    let shown = dir.join(&partial);
    let made = (|| -> Result<(), SupervisorError> {
        let output = dir.create_new(&partial, 0o600)?;
        vmfs::set_owner_mode(&output, &shown, uid, 0o600)?;
        match &source {
            DiskSource::Copy(path) => {
                let input = std::fs::File::open(path).map_err(|source| {
                    crate::disks::DiskError::Source {
                        path: path.clone(),
                        source,
                    }
                })?;
                crate::disks::copy_file(input, path, output, &shown)?;
            }
            DiskSource::Empty(size_mib) => crate::disks::size_file(&output, &shown, *size_mib)?,
        }
        dir.rename_to(&partial, jail, name, true)?;
        Ok(())
    })();
    if made.is_err() {
        let _ = dir.remove(&partial);
    }
    made.map(|()| true)
}

/// An empty directory for the VMM to write a snapshot into, in its own
/// directory (the only place it can write); whatever was there goes.
pub fn snapshot_out(jail: &Dir, uid: u32) -> Result<(), SupervisorError> {
    jail.remove(SNAPSHOT_OUT)?;
    let out = jail.make_dir(SNAPSHOT_OUT, 0o700)?;
    out.set_owner_mode(uid, 0o700)?;
    Ok(())
}

/// A snapshot's directory once it left the VM's directory: it must be a
/// directory of the VM's user holding only regular files of its own with
/// one link each (what a VMM writes); it becomes root's (first, so that
/// the VMM can add nothing more), its files readable by whichever VM's user
/// restores them (through its jail's read-only mount; the snapshot store
/// itself is root's only).
pub fn seal_snapshot(path: &Path, uid: u32) -> Result<(), SupervisorError> {
    let dir = Dir::open(path)?;
    let owner = dir.stat()?.st_uid;
    if owner != uid {
        return Err(vmfs::VmFsError::Unsafe {
            path: path.to_path_buf(),
            found: format!("a directory owned by uid {owner}"),
            wanted: format!("the VM user's (uid {uid})"),
        }
        .into());
    }
    dir.set_owner_mode(0, 0o700)?;
    for name in dir.names()? {
        let file = dir.open_file(&name, libc::O_RDONLY, uid)?;
        vmfs::set_owner_mode(&file, &dir.join(&name), 0, 0o644)?;
    }
    dir.set_owner_mode(0, 0o755)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::VmState;

    fn vm() -> VmRow {
        VmRow {
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
            restore_as_clone: false,
            metadata: Default::default(),
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
        let image = ImageRow {
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
            &Launch::Restore {
                dir: &restore,
                clone: false,
            },
        );
        let args = args_of(&command);
        let joined = args.join(" ");
        for expected in [
            "--id vm-1",
            "--uid 900003 --gid 900003",
            "--mount /data/vms/vm-1/vm:/vm ",
            "--mount /data/vms/vm-1/vm.json:/vm.json:ro",
            "--mount /images/vmlinux:/boot/kernel:ro",
            "--mount /images/initrd:/boot/initrd:ro",
            "--mount /data/snapshots/s1:/restore:ro",
            "--cgroup memory.max=",
            "--pid-file /data/vms/vm-1/vmm.pid",
            // RAM (256 MiB) is the largest file here, plus the slack.
            "--resource-limit fsize=335544320",
            "-- --config /vm.json --restore /restore",
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
                key: "keyhex",
            },
        );
        let receive_args = args_of(&receive);
        let separator = receive_args.iter().position(|arg| arg == "--").unwrap();
        // Both secrets reach the jailer's environment, by name only on its
        // command line, and it passes them on.
        for name in ["NUBIS_MIGRATION_TOKEN", "NUBIS_MIGRATION_KEY"] {
            let at = receive_args
                .windows(2)
                .position(|pair| pair[0] == "--env" && pair[1] == name)
                .unwrap_or_else(|| panic!("no --env {name}: {receive_args:?}"));
            assert!(
                at < separator,
                "--env must reach the jailer: {receive_args:?}"
            );
        }
        let envs: Vec<(String, String)> = receive
            .as_std()
            .get_envs()
            .filter_map(|(name, value)| {
                Some((name.to_str()?.to_string(), value?.to_str()?.to_string()))
            })
            .collect();
        assert!(envs.contains(&("NUBIS_MIGRATION_TOKEN".into(), "secret".into())));
        assert!(envs.contains(&("NUBIS_MIGRATION_KEY".into(), "keyhex".into())));
        assert!(!receive_args
            .iter()
            .any(|arg| arg.contains("secret") || arg.contains("keyhex")));
        assert_eq!(receive_args[separator + 3], "--migrate-listen");
        // No NICs: no tun device in the jail.
        assert!(!joined.contains("/dev/net/tun"), "{joined}");
        let inside = inside_image(&image);
        assert_eq!(inside.kernel, KERNEL);
        assert_eq!(inside.initrd.as_deref(), Some(INITRD));
        assert_eq!(cgroup_marker(&config(), "vm-1"), "/nubis/vm-1");
    }
}
