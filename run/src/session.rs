//! One run: prepare the guest's files, start a `nubis-vmm`, hand the
//! command to the guest, follow it to its end, copy back and clean up.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::images::{self, identity};
use super::protocol::{parse_event, EventLines, GuestEvent, Request, MAX_EVENT_LINE};
use super::share::{self, Share, SHARE_DISK_BYTES};
use super::warm::{cache_dir, WarmCache, WarmInputs};
use super::{ConsoleOutput, GuestStatus, Root, RunConfig, RunError, RunReport, StartKind};
use nubis_contract::config::{
    BootConfig, ConsoleConfig, DiskConfig, MachineConfig, NetConfig, SerialConfig, VmConfig,
    CONFIG_VERSION,
};
use nubis_contract::exit::EXIT_GUEST_CRASH;

/// The kernel command line when the guest images give none.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";
/// Descriptor numbers of the console ports in the VMM (control, stdout,
/// stderr: /dev/hvc0..2 in the guest).
const PORT_FDS: [RawFd; 3] = [3, 4, 5];
/// How long a stopped VMM may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL_TICK_MS: i32 = 50;
/// `--net` taps `nrun0`..: one /30 of 172.30.0.0/16 each.
const TAP_SLOTS: u32 = 16384;
/// How long the guest may take to read its request.
const REQUEST_SEND_TIMEOUT: Duration = Duration::from_secs(120);
/// The MAC of a run's NIC (locally administered, "NR" for Nubis run).
const RUN_NIC_MAC: [u8; 6] = [0x02, 0x4e, 0x52, 0x00, 0x00, 0x02];

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

/// Set by [`super::interrupt`]: every run stops.
pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The run's scratch directory; removed at the end unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create() -> Result<Self, RunError> {
        let base = std::env::temp_dir();
        for attempt in 0..100u32 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|time| time.subsec_nanos())
                .unwrap_or_default();
            let path = base.join(format!(
                "nubis-run-{}-{:08x}",
                std::process::id(),
                nanos.wrapping_add(attempt)
            ));
            match fs::create_dir(&path) {
                Ok(()) => {
                    use std::os::unix::fs::PermissionsExt;
                    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o700));
                    // NUBIS_RUN_KEEP=1 keeps every run's directory (debugging).
                    let keep = std::env::var_os("NUBIS_RUN_KEEP").is_some_and(|v| v == "1");
                    return Ok(Self { path, keep });
                }
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(err) => {
                    return Err(io_error(format!(
                        "create a directory in {}",
                        base.display()
                    ))(err))
                }
            }
        }
        Err(RunError::Invalid(format!(
            "cannot find a free run directory name in {}",
            base.display()
        )))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The VMM program: `config`'s, `$NUBIS_VMM`, next to the running program
/// (or one directory up, for test binaries in `target/*/deps`), or PATH.
fn find_vmm(config: &RunConfig) -> Result<PathBuf, RunError> {
    if let Some(path) = &config.vmm_binary {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os("NUBIS_VMM") {
        return Ok(PathBuf::from(path));
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("nubis-vmm");
            if candidate.is_file() {
                return Ok(candidate);
            }
            tried.push(candidate.display().to_string());
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("nubis-vmm");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    tried.push("$PATH".into());
    Err(RunError::NoVmm {
        tried: tried.join(", "),
    })
}

/// A tap of the run's own with a /30 on the host side (`--net`): the
/// guest gets the other address, in its request (a warm guest's NIC is
/// on a new tap each run).
struct RunTap {
    name: String,
    guest: String,
    gateway: String,
}

impl RunTap {
    fn create() -> Result<Self, RunError> {
        // A slot (a tap name and a /30) of our own: the first free one
        // from our pid on. A taken name is another run's tap, never ours
        // to remove.
        let first = std::process::id() % TAP_SLOTS;
        let mut chosen = None;
        for offset in 0..64 {
            let id = (first + offset) % TAP_SLOTS;
            let name = format!("nrun{id}");
            let added = Command::new("ip")
                .args(["tuntap", "add", "dev", &name, "mode", "tap"])
                .stderr(Stdio::null())
                .status()
                .map_err(io_error("run ip (iproute2) for --net"))?;
            if added.success() {
                chosen = Some((id, name));
                break;
            }
            if !Path::new("/sys/class/net").join(&name).exists() {
                // Not taken: the add itself failed (no CAP_NET_ADMIN).
                break;
            }
        }
        let Some((id, name)) = chosen else {
            return Err(RunError::Invalid(
                "--net: cannot create a tap (it needs CAP_NET_ADMIN, and a free nrunN name)".into(),
            ));
        };
        let (third, fourth) = ((id * 4) / 256, (id * 4) % 256);
        let host = format!("172.30.{third}.{}", fourth + 1);
        let guest = format!("172.30.{third}.{}", fourth + 2);
        let ip = |args: &[&str]| -> Result<(), RunError> {
            let output = Command::new("ip")
                .args(args)
                .output()
                .map_err(io_error("run ip (iproute2) for --net"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(RunError::Invalid(format!(
                    "--net: ip {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                )))
            }
        };
        let tap = Self {
            name: name.clone(),
            guest,
            gateway: host.clone(),
        };
        ip(&["addr", "add", &format!("{host}/30"), "dev", &name])?;
        ip(&["link", "set", &name, "up"])?;
        Ok(tap)
    }
}

impl Drop for RunTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Everything a run's VMM is started from.
struct Plan {
    vm: VmConfig,
    vmm: PathBuf,
    request: Request,
    share_image: Option<PathBuf>,
    console_log: PathBuf,
    vmm_log: PathBuf,
    control_socket: PathBuf,
    warm: Option<(WarmCache, WarmInputs)>,
}

fn read_cmdline(images_dir: Option<&Path>) -> String {
    images_dir
        .and_then(|dir| fs::read_to_string(dir.join(images::CMDLINE_FILE)).ok())
        .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string())
}

fn plan(
    config: &RunConfig,
    argv: Vec<OsString>,
    work: &WorkDir,
    tap: Option<&RunTap>,
) -> Result<Plan, RunError> {
    if config.vcpus == 0 {
        return Err(RunError::Invalid("--vcpus must be at least 1".into()));
    }
    let images_dir = match (&config.images_dir, &config.kernel, &config.initrd) {
        (Some(dir), _, _) => Some(dir.clone()),
        (None, Some(_), Some(_)) => images::find_images_dir().ok(),
        _ => Some(images::find_images_dir()?),
    };
    let from_images = |file: &str| images_dir.as_ref().map(|dir| dir.join(file));
    let kernel = config
        .kernel
        .clone()
        .or_else(|| from_images(images::KERNEL_FILE))
        .ok_or_else(|| RunError::Invalid("no kernel: give --kernel".into()))?;
    let initrd = config
        .initrd
        .clone()
        .or_else(|| from_images(images::INITRD_FILE))
        .ok_or_else(|| RunError::Invalid("no initramfs".into()))?;
    for (what, path) in [("kernel", &kernel), ("initramfs", &initrd)] {
        if !path.is_file() {
            return Err(RunError::Invalid(format!(
                "the {what} {} does not exist",
                path.display()
            )));
        }
    }
    let cache_root = config.cache_dir.clone().unwrap_or_else(cache_dir);
    let root_disk = match &config.root {
        Root::Default => from_images(images::ROOTFS_FILE)
            .ok_or_else(|| RunError::Invalid("no root disk: give --rootfs or --image".into()))?,
        Root::Disk(path) => path.clone(),
        Root::Tree(dir) => images::root_disk_from_tree(dir, &cache_root)?,
    };
    if !root_disk.is_file() {
        return Err(RunError::Invalid(format!(
            "the root disk {} does not exist",
            root_disk.display()
        )));
    }

    let mut cmdline = read_cmdline(images_dir.as_deref());
    cmdline.push_str(" rdinit=/sbin/nubis-run-init");
    // Every console byte is a VM exit: a quiet boot is a faster one.
    // Panics and warnings are printed all the same, and `--console` does
    // not change the command line (so it can use the same warm snapshot);
    // `loglevel=7` in the extra arguments shows the whole boot.
    cmdline.push_str(" quiet");
    cmdline.push_str(" nubis_root=/dev/vda");
    if let Some(extra) = &config.kernel_args {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }

    let mut disks = vec![DiskConfig {
        path: root_disk.clone(),
        read_only: true,
        id: Some("root".into()),
        rate_limit: Default::default(),
    }];
    let share_device = "/dev/vdb";
    let share_image = if config.share.is_some() || config.warm {
        let image = work.path.join("share.img");
        match &config.share {
            Some(share) => share::build_image(share, &image)?,
            // A warm guest was booted with a share disk: an empty one of
            // the same size stands in for it.
            None => share::create_sparse(&image, SHARE_DISK_BYTES)?,
        }
        disks.push(DiskConfig {
            path: image.clone(),
            read_only: false,
            id: Some("share".into()),
            rate_limit: Default::default(),
        });
        Some(image)
    } else {
        None
    };
    let nets = tap
        .map(|tap| {
            vec![NetConfig {
                tap: Some(tap.name.clone()),
                fd: None,
                // Fixed: a warm guest keeps the MAC it booted with.
                mac: Some(nubis_contract::config::MacAddr(RUN_NIC_MAC)),
                id: None,
                rate_limit: Default::default(),
                mtu: None,
            }]
        })
        .unwrap_or_default();

    let console_log = work.path.join("console.log");
    let control_socket = work.path.join("control.sock");
    let vm = VmConfig {
        version: CONFIG_VERSION,
        boot: BootConfig {
            kernel: kernel.clone(),
            initrd: Some(initrd.clone()),
            cmdline: cmdline.clone(),
        },
        machine: MachineConfig {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
        },
        serial: SerialConfig::File {
            path: console_log.clone(),
        },
        disks,
        nets,
        rng: true,
        consoles: PORT_FDS
            .iter()
            .map(|fd| ConsoleConfig {
                fd: Some(*fd),
                file: None,
            })
            .collect(),
        vsock: None,
        control_socket: Some(control_socket.clone()),
    };

    let request = Request {
        argv,
        env: config.env.clone(),
        cwd: config.share.as_ref().map(|_| "/share".to_string()),
        share: config.share.as_ref().map(|share: &Share| {
            format!(
                "{share_device} {}",
                if share.writable { "rw" } else { "ro" }
            )
        }),
        net: tap.map(|tap| format!("{} 30 {}", tap.guest, tap.gateway)),
    };
    // Refuse a bad command before anything boots.
    request.encode()?;

    let vmm = find_vmm(config)?;
    let warm = if config.warm {
        let inputs = WarmInputs {
            vmm: identity(&vmm)?,
            kernel: identity(&kernel)?,
            initrd: identity(&initrd)?,
            root: identity(&root_disk)?,
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            cmdline,
            net: tap.is_some(),
            share_disk_bytes: SHARE_DISK_BYTES,
        };
        Some((WarmCache::new(cache_root), inputs))
    } else {
        None
    };
    Ok(Plan {
        vm,
        vmm,
        request,
        share_image,
        console_log,
        vmm_log: work.path.join("vmm.log"),
        control_socket,
        warm,
    })
}

/// A socket pair's ends: ours, and the VMM's (moved to a high descriptor
/// number so that placing it at 3, 4 or 5 in the child clobbers nothing).
fn port_pair() -> Result<(UnixStream, OwnedFd), RunError> {
    let (ours, theirs) = UnixStream::pair().map_err(io_error("create a console socket pair"))?;
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own into a new
    // one (>= 64), which we then own; no memory is passed.
    let high = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    if high < 0 {
        return Err(io_error("duplicate a console socket")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `high` was just returned by fcntl and is owned by nobody else.
    Ok((ours, unsafe { OwnedFd::from_raw_fd(high) }))
}

/// The running VMM and our ends of its console ports.
struct Vmm {
    child: Child,
    control: UnixStream,
    stdout: UnixStream,
    stderr: UnixStream,
    started: Instant,
}

fn spawn_vmm(plan: &Plan, work: &WorkDir, restore: Option<&Path>) -> Result<Vmm, RunError> {
    let config_path = work.path.join("vm.json");
    let document = serde_json::to_vec_pretty(&plan.vm)
        .map_err(|err| RunError::Invalid(format!("cannot write the VM's config: {err}")))?;
    fs::write(&config_path, document)
        .map_err(io_error(format!("write {}", config_path.display())))?;
    let _ = fs::remove_file(&plan.control_socket);
    let (control, control_vmm) = port_pair()?;
    let (stdout, stdout_vmm) = port_pair()?;
    let (stderr, stderr_vmm) = port_pair()?;
    let vmm_ends = [
        control_vmm.as_raw_fd(),
        stdout_vmm.as_raw_fd(),
        stderr_vmm.as_raw_fd(),
    ];
    let log = fs::File::create(&plan.vmm_log)
        .map_err(io_error(format!("create {}", plan.vmm_log.display())))?;
    let mut command = Command::new(&plan.vmm);
    command
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(dir) = restore {
        command.arg("--restore").arg(dir);
    }
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only async-signal-safe functions (dup2, prctl) on descriptors
    // that exist in the child; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            for (source, target) in vmm_ends.iter().zip(PORT_FDS) {
                if libc::dup2(*source, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The VMM dies with its run (a killed `nubis run` leaves no VM).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(io_error(format!("start {}", plan.vmm.display())))?;
    // Our copies of the VMM's ends close here, so that its exit is our end
    // of file.
    drop((control_vmm, stdout_vmm, stderr_vmm));
    Ok(Vmm {
        child,
        control,
        stdout,
        stderr,
        started: Instant::now(),
    })
}

/// One request on the VMM's control socket; Ok when it answered ok.
fn control_request(socket: &Path, request: &str) -> Result<(), RunError> {
    let what = format!("{request} on {}", socket.display());
    let stream = UnixStream::connect(socket).map_err(io_error(format!("connect for {what}")))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io_error(format!("set a timeout for {what}")))?;
    (&stream)
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io_error(format!("send {what}")))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .take(MAX_CONTROL_ANSWER)
        .read_line(&mut answer)
        .map_err(io_error(format!("read the answer to {what}")))?;
    let ok = serde_json::from_str::<serde_json::Value>(&answer)
        .ok()
        .and_then(|value| value.get("ok").and_then(|ok| ok.as_bool()))
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(RunError::Control {
            what,
            answer: answer.trim().to_string(),
        })
    }
}

/// Pauses the guest, snapshots it into the warm cache and resumes it.
fn save_warm(plan: &Plan) -> Result<(), RunError> {
    let Some((cache, inputs)) = &plan.warm else {
        return Ok(());
    };
    let staging = cache.staging_dir()?;
    control_request(&plan.control_socket, r#"{"command":"pause"}"#)?;
    let snapshot = serde_json::json!({"command": "snapshot", "dir": staging}).to_string();
    let saved = control_request(&plan.control_socket, &snapshot)
        .and_then(|()| cache.commit(&staging, inputs).map(|_| ()));
    if saved.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    control_request(&plan.control_socket, r#"{"command":"resume"}"#)?;
    saved
}

/// Waits for the VMM to exit, asking it to stop first when `stop`.
fn finish_vmm(child: &mut Child, stop: bool) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if stop {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Bytes read from the end of a log the guest can make as large as it
/// likes.
const LOG_TAIL_BYTES: u64 = 1 << 20;
/// Warnings from the guest shown at most; the rest are counted.
const MAX_GUEST_WARNINGS: usize = 32;
/// The longest answer read from the VMM's control socket.
const MAX_CONTROL_ANSWER: u64 = 64 * 1024;

/// The last `max` bytes of a file.
fn read_tail(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::io::Seek;
    let mut file = fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(std::io::SeekFrom::Start(len.saturating_sub(max)))
        .ok()?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The kernel's panic line in the console log, if it panicked.
fn panic_line(console_log: &Path) -> Option<String> {
    // The guest writes this file: only its end is read (a panic is the
    // last thing a kernel prints).
    let text = read_tail(console_log, LOG_TAIL_BYTES)?;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .find(|line| line.contains("Kernel panic - not syncing"))
        .map(|line| {
            let line = line.trim();
            // Drop the printk timestamp.
            match line.split_once("] ") {
                Some((stamp, rest)) if stamp.starts_with('[') => rest.to_string(),
                _ => line.to_string(),
            }
        })
}

/// The VMM log's last error line.
fn vmm_error(vmm_log: &Path) -> String {
    read_tail(vmm_log, LOG_TAIL_BYTES)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|line| line.contains("nubis-vmm") || line.contains("ERROR"))
                .map(|line| line.trim().to_string())
        })
        .unwrap_or_else(|| "no message".into())
}

/// How one VMM's life ended, before interpretation.
struct Watch {
    status: Option<GuestStatus>,
    ready_at: Option<Instant>,
    started_at: Option<Instant>,
    ended_at: Option<Instant>,
    exit: Option<ExitStatus>,
    warnings: Vec<String>,
}

/// Follows the guest's control messages until the command ends, the VMM
/// exits or a deadline passes; `on_ready` runs at the guest's `ready`.
fn watch(
    vmm: &mut Vmm,
    config: &RunConfig,
    mut on_ready: impl FnMut() -> Result<(), RunError>,
    request: &[u8],
    send_at_once: bool,
) -> Watch {
    let mut watch = Watch {
        status: None,
        ready_at: None,
        started_at: None,
        ended_at: None,
        exit: None,
        warnings: Vec::new(),
    };
    let mut sent = false;
    // Blocking, with a limit: a request larger than the socket's buffer
    // goes as fast as the guest reads it.
    let send = |control: &UnixStream, warnings: &mut Vec<String>| {
        let sent = control
            .set_nonblocking(false)
            .and_then(|()| control.set_write_timeout(Some(REQUEST_SEND_TIMEOUT)))
            .and_then(|()| (&*control).write_all(request))
            .and_then(|()| control.set_nonblocking(true));
        if let Err(err) = sent {
            warnings.push(format!("cannot send the command to the guest: {err}"));
        }
    };
    let _ = vmm.control.set_nonblocking(true);
    if send_at_once {
        send(&vmm.control, &mut watch.warnings);
        sent = true;
    }
    let mut lines = EventLines::default();
    let mut guest_warnings = 0usize;
    let mut control_open = true;
    loop {
        let now = Instant::now();
        if INTERRUPTED.load(Ordering::SeqCst) {
            watch.status = Some(GuestStatus::Interrupted);
            break;
        }
        if let Some(started) = watch.started_at {
            if let Some(limit) = config.timeout.filter(|limit| now >= started + *limit) {
                watch.status = Some(GuestStatus::TimedOut { limit });
                break;
            }
        } else if now >= vmm.started + config.boot_timeout {
            watch.status = Some(GuestStatus::NeverStarted {
                reason: format!(
                    "no command started within {} s of the VM's start",
                    config.boot_timeout.as_secs()
                ),
            });
            break;
        }
        if let Ok(Some(status)) = vmm.child.try_wait() {
            watch.exit = Some(status);
        }
        let mut pollfd = libc::pollfd {
            fd: vmm.control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut chunk = [0u8; 4096];
        let mut got_bytes = 0;
        if control_open {
            // SAFETY: poll reads and writes one pollfd that lives on our
            // stack for the whole call.
            unsafe { libc::poll(&mut pollfd, 1, POLL_TICK_MS) };
            match (&vmm.control).read(&mut chunk) {
                Ok(0) => control_open = false,
                Ok(got) => got_bytes = got,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => control_open = false,
            }
        } else {
            std::thread::sleep(Duration::from_millis(POLL_TICK_MS as u64));
        }
        for line in lines.feed(&chunk[..got_bytes]) {
            match parse_event(&line) {
                Some(GuestEvent::Ready) => {
                    watch.ready_at = Some(Instant::now());
                    if let Err(err) = on_ready() {
                        watch
                            .warnings
                            .push(format!("the warm snapshot was not saved: {err}"));
                    }
                    if !sent {
                        send(&vmm.control, &mut watch.warnings);
                        sent = true;
                    }
                }
                Some(GuestEvent::Started) => watch.started_at = Some(Instant::now()),
                Some(GuestEvent::Warning(text)) => {
                    guest_warnings += 1;
                    if guest_warnings <= MAX_GUEST_WARNINGS {
                        watch.warnings.push(format!("guest: {text}"));
                    }
                }
                Some(GuestEvent::ExecFailed { errno, message }) => {
                    watch.status = Some(GuestStatus::ExecFailed { errno, message });
                }
                Some(GuestEvent::Error(reason)) => {
                    watch.status = Some(GuestStatus::NeverStarted { reason });
                }
                Some(GuestEvent::Exited(code)) => watch.status = Some(GuestStatus::Exited(code)),
                Some(GuestEvent::Signaled(signal)) => {
                    watch.status = Some(GuestStatus::Signaled(signal))
                }
                None => {}
            }
            if watch.status.is_some() {
                break;
            }
        }
        if watch.status.is_some() || (watch.exit.is_some() && !control_open) {
            break;
        }
    }
    if guest_warnings > MAX_GUEST_WARNINGS {
        watch.warnings.push(format!(
            "guest: {} more warnings not shown",
            guest_warnings - MAX_GUEST_WARNINGS
        ));
    }
    if lines.overlong > 0 {
        watch.warnings.push(format!(
            "the guest sent {} control line(s) longer than {MAX_EVENT_LINE} bytes, ignored",
            lines.overlong
        ));
    }
    watch.ended_at = Some(Instant::now());
    watch
}

/// Copies a console port to a sink until the VMM closes it.
fn pump(mut from: UnixStream, to: &mut (dyn Write + Send)) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(got) => {
                if to.write_all(&buf[..got]).and_then(|()| to.flush()).is_err() {
                    // The reader went away: drain so the guest is not held.
                    while from.read(&mut buf).is_ok_and(|got| got > 0) {}
                    break;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// Copies the console log to stderr as it grows, until `done`.
fn follow_console(path: &Path, done: &AtomicBool) {
    let mut offset = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let finished = done.load(Ordering::SeqCst);
        if let Ok(mut file) = fs::File::open(path) {
            use std::io::Seek;
            if file.seek(std::io::SeekFrom::Start(offset)).is_ok() {
                while let Ok(got) = file.read(&mut buf) {
                    if got == 0 {
                        break;
                    }
                    offset += got as u64;
                    let _ = std::io::stderr().write_all(&buf[..got]);
                }
            }
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the watch and the VMM's exit say about the run.
fn interpret(watch: &Watch, exit: Option<ExitStatus>, plan: &Plan) -> GuestStatus {
    if let Some(status) = &watch.status {
        return status.clone();
    }
    if let Some(message) = panic_line(&plan.console_log) {
        return GuestStatus::KernelPanic { message };
    }
    let code = exit.and_then(|status| status.code());
    let detail = match code {
        Some(code) => format!(
            "the VMM exited with status {code}: {}",
            vmm_error(&plan.vmm_log)
        ),
        None => "the VMM was killed".to_string(),
    };
    if code == Some(EXIT_GUEST_CRASH) {
        return GuestStatus::Crashed { message: detail };
    }
    if watch.started_at.is_some() {
        GuestStatus::Crashed {
            message: format!("the guest stopped while the command ran ({detail})"),
        }
    } else {
        GuestStatus::NeverStarted { reason: detail }
    }
}

enum Attempt {
    Done(GuestStatus, Watch),
    /// A warm snapshot failed to restore: boot instead.
    RestoreFailed(String),
}

pub(super) fn run(
    config: &RunConfig,
    argv: Vec<OsString>,
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
) -> Result<RunReport, RunError> {
    let begin = Instant::now();
    let mut work = WorkDir::create()?;
    let tap = if config.net {
        Some(RunTap::create()?)
    } else {
        None
    };
    let plan = plan(config, argv, &work, tap.as_ref())?;
    let request = plan.request.encode()?;
    let mut warnings = Vec::new();
    let mut restore = plan
        .warm
        .as_ref()
        .and_then(|(cache, inputs)| cache.lookup(inputs));
    let (status, watch, start) = loop {
        let start = match (&plan.warm, &restore) {
            (None, _) => StartKind::Cold,
            (Some(_), Some(_)) => StartKind::WarmRestored,
            (Some(_), None) => StartKind::WarmBuilt,
        };
        let mut vmm = spawn_vmm(&plan, &work, restore.as_deref())?;
        let done = AtomicBool::new(false);
        let attempt = std::thread::scope(|scope| {
            let out = vmm.stdout.try_clone();
            let err = vmm.stderr.try_clone();
            let (Ok(out), Ok(err)) = (out, err) else {
                return Err(RunError::Invalid("cannot clone a console socket".into()));
            };
            let out_sink: &mut (dyn Write + Send) = &mut *stdout;
            let err_sink: &mut (dyn Write + Send) = &mut *stderr;
            let out_thread = scope.spawn(move || pump(out, out_sink));
            let err_thread = scope.spawn(move || pump(err, err_sink));
            let console_thread = (config.console == ConsoleOutput::Stderr)
                .then(|| scope.spawn(|| follow_console(&plan.console_log, &done)));
            let restored = restore.is_some();
            let on_ready = || {
                if restored {
                    Ok(())
                } else {
                    save_warm(&plan)
                }
            };
            let watch = watch(&mut vmm, config, on_ready, &request, restored);
            let stop = watch.status.is_some() || watch.exit.is_none();
            let exit = finish_vmm(&mut vmm.child, stop);
            // The VMM is gone, and with it the other ends of the ports:
            // the pumps read to end of file.
            let _ = out_thread.join();
            let _ = err_thread.join();
            done.store(true, Ordering::SeqCst);
            if let Some(thread) = console_thread {
                let _ = thread.join();
            }
            let restore_failed = restored
                && watch.started_at.is_none()
                && watch.status.is_none()
                && exit.and_then(|status| status.code()) == Some(1);
            if restore_failed {
                return Ok(Attempt::RestoreFailed(vmm_error(&plan.vmm_log)));
            }
            let status = interpret(&watch, exit, &plan);
            Ok(Attempt::Done(status, watch))
        })?;
        match attempt {
            Attempt::Done(status, watch) => break (status, watch, start),
            Attempt::RestoreFailed(why) => {
                warnings.push(format!(
                    "the warm snapshot did not restore ({why}); booting instead"
                ));
                if let Some((cache, inputs)) = &plan.warm {
                    cache.forget(inputs);
                }
                restore = None;
            }
        }
    };
    warnings.extend(watch.warnings.iter().cloned());
    let mut copied_back = None;
    if let (Some(share), Some(image)) = (&config.share, &plan.share_image) {
        if share.writable {
            if matches!(status, GuestStatus::Exited(_) | GuestStatus::Signaled(_)) {
                match share::copy_back(image, share, &work.path) {
                    Ok((stats, notes)) => {
                        copied_back = Some(stats);
                        let explained = notes.0.len() as u64;
                        warnings.extend(notes.0.into_iter().map(|note| format!("share: {note}")));
                        if stats.skipped > explained {
                            warnings.push(format!(
                                "share: {} more entries were not copied back",
                                stats.skipped - explained
                            ));
                        }
                    }
                    // What the command wrote must not go with the run's
                    // directory: the disk stays, named.
                    Err(err) => {
                        work.keep = true;
                        warnings.push(format!(
                            "{err}; the share's disk is kept at {}",
                            image.display()
                        ));
                    }
                }
            } else {
                work.keep = true;
                warnings.push(format!(
                    "nothing was copied back to {}: the command did not finish; what it wrote \
                     is on the share's disk, kept at {}",
                    share.host_dir.display(),
                    image.display()
                ));
            }
        }
    }
    let failed = !matches!(
        status,
        GuestStatus::Exited(_)
            | GuestStatus::Signaled(_)
            | GuestStatus::ExecFailed { .. }
            | GuestStatus::Interrupted
    );
    let kept_dir = if failed || work.keep {
        work.keep = true;
        // A read-only share's disk holds nothing new: only a writable
        // one's is worth keeping.
        let writable = config.share.as_ref().is_some_and(|share| share.writable);
        if let Some(image) = plan.share_image.as_ref().filter(|_| !writable) {
            let _ = fs::remove_file(image);
        }
        Some(work.path.clone())
    } else {
        None
    };
    Ok(RunReport {
        startup: watch.started_at.map(|at| at.duration_since(begin)),
        command_time: watch
            .started_at
            .zip(watch.ended_at)
            .map(|(started, ended)| ended.duration_since(started)),
        total: begin.elapsed(),
        status,
        start,
        copied_back,
        kept_dir,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_end_of_a_guest_written_log_is_read() {
        let path = std::env::temp_dir().join(format!("nubis-run-tail-{}", std::process::id()));
        let mut log = vec![b'x'; 3 * LOG_TAIL_BYTES as usize];
        log.extend_from_slice(b"\n[    1.234] Kernel panic - not syncing: sysrq triggered crash\n");
        fs::write(&path, &log).unwrap();
        let tail = read_tail(&path, LOG_TAIL_BYTES).unwrap();
        assert_eq!(tail.len() as u64, LOG_TAIL_BYTES);
        assert_eq!(
            panic_line(&path).as_deref(),
            Some("Kernel panic - not syncing: sysrq triggered crash")
        );
        fs::write(&path, b"short").unwrap();
        assert_eq!(read_tail(&path, LOG_TAIL_BYTES).unwrap(), b"short");
        fs::remove_file(&path).unwrap();
    }
}
