//! VMM processes: started in their jails by `nubis-jailer` (see jail.rs),
//! which exits once the VMM runs and leaves it to the agent (a child
//! subreaper, so the VMM becomes its child); watched through a pidfd,
//! with the exit status when the VMM is the agent's child (not after an
//! agent restart, when the log tells); and explained.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::{control, SupervisorError, VmPaths};
use nubis_api::VmState;

/// A spawned VMM.
pub struct Spawned {
    pub pid: u32,
    pub watch: ExitWatch,
}

/// How the agent learns that a VMM exited: a pidfd, readable once it has.
pub struct ExitWatch(AsyncFd<OwnedFd>);

/// How a VMM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExit {
    Code(i32),
    Signal(i32),
    /// Not our child: the status is not known; the log tells.
    Unknown,
}

impl ExitWatch {
    pub async fn wait(self) -> VmmExit {
        // A pidfd becomes readable when the process exits.
        let _ = self.0.readable().await;
        reap(self.0.get_ref())
    }
}

/// The exit status of the exited process behind `pidfd` if it is our
/// child (it is then reaped), Unknown otherwise.
fn reap(pidfd: &OwnedFd) -> VmmExit {
    // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into `info` only; the pidfd is open for the call.
    let ret = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if ret != 0 {
        return VmmExit::Unknown;
    }
    // SAFETY: waitid succeeded for an exited child, so the status field of
    // the union is the one set.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => VmmExit::Code(status),
        libc::CLD_KILLED | libc::CLD_DUMPED => VmmExit::Signal(status),
        _ => VmmExit::Unknown,
    }
}

// The VMM's exit codes; `EXIT_NOT_RECEIVED`: a VMM started to receive a
// live migration when none was handed over to it (the guest never ran there).
use nubis_contract::exit::{EXIT_GUEST_CRASH, EXIT_NOT_RECEIVED, EXIT_OK};

impl VmmExit {
    /// Whether this is a receiving VMM's exit without a hand-over.
    pub fn is_not_received(self) -> bool {
        self == Self::Code(EXIT_NOT_RECEIVED)
    }

    /// The VM's state after this exit, and the reason to record, from the
    /// exit and the VMM log's last line.
    pub fn describe(self, log_tail: &str) -> (VmState, String) {
        let clean_in_log = log_tail.contains("VM stopped");
        match self {
            Self::Code(EXIT_OK) => (VmState::Stopped, format!("stopped: {log_tail}")),
            Self::Code(EXIT_GUEST_CRASH) => {
                (VmState::Failed, format!("the guest crashed: {log_tail}"))
            }
            Self::Code(EXIT_NOT_RECEIVED) => (
                VmState::Failed,
                format!("the migration in was not received: {log_tail}"),
            ),
            Self::Code(code) => (
                VmState::Failed,
                format!("the VMM failed (exit {code}): {log_tail}"),
            ),
            Self::Signal(signal) => (
                VmState::Failed,
                format!("the VMM was killed by signal {signal}"),
            ),
            Self::Unknown if clean_in_log => (VmState::Stopped, format!("stopped: {log_tail}")),
            Self::Unknown => (VmState::Failed, format!("the VMM ended: {log_tail}")),
        }
    }
}

/// How a VMM starts its VM.
pub enum Launch<'a> {
    /// Boots the kernel.
    Boot,
    /// Resumes a snapshot (`--restore`); a clone maps its memory file
    /// privately and takes its own MACs (`--restore-as clone`).
    Restore { dir: &'a Path, clone: bool },
    /// Receives a live migration (`--migrate-listen`, its token and key in
    /// the environment, never on the command line).
    Receive {
        listen: &'a str,
        token: &'a str,
        key: &'a str,
    },
}

/// Runs `jailer` (a `nubis-jailer` command, see jail.rs) with the VM's log
/// as its output and the VMM's; returns the VMM once it runs in its jail.
pub async fn spawn(
    mut jailer: tokio::process::Command,
    paths: &VmPaths,
) -> Result<Spawned, SupervisorError> {
    let files = |source| SupervisorError::Files {
        path: paths.vmm_log.clone(),
        source,
    };
    // In the agent's own directory (root's); still never through a link.
    let log = super::vmfs::Dir::open(&paths.dir)?.open_or_create(
        super::VMM_LOG,
        libc::O_WRONLY | libc::O_APPEND,
        0o640,
        0,
    )?;
    let log_err = log.try_clone().map_err(files)?;
    let pid_file = paths.dir.join(super::jail::PID_FILE);
    let _ = std::fs::remove_file(&pid_file);
    let program = std::path::PathBuf::from(jailer.as_std().get_program());
    let status = jailer
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group, inherited by the VMM: a signal to the
        // agent's group (Ctrl-C in a terminal, a service manager's stop)
        // does not reach the VMs.
        .process_group(0)
        .status()
        .await
        .map_err(|source| SupervisorError::Spawn {
            binary: program,
            source,
        })?;
    if !status.success() {
        return Err(SupervisorError::StartFailed(format!(
            "the jailer failed ({status}): {}",
            last_log_line(&paths.vmm_log)
        )));
    }
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| {
            SupervisorError::StartFailed(format!(
                "the jailer left no pid in {}",
                pid_file.display()
            ))
        })?;
    let watch = pidfd(pid).ok_or_else(|| {
        SupervisorError::StartFailed(format!("the VMM (pid {pid}) cannot be watched"))
    })?;
    Ok(Spawned { pid, watch })
}

fn pidfd(pid: u32) -> Option<ExitWatch> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `owned` is an open pidfd, moved into the AsyncFd, which keeps
    // it open and unchanged until it is dropped.
    unsafe { AsyncFd::register(owned) }.ok().map(ExitWatch)
}

/// Waits until the VMM answers `status` on its control socket, or exits.
pub async fn wait_for_control(
    socket: &Path,
    mut exit: watch::Receiver<Option<VmmExit>>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = *exit.borrow() {
            return Err(format!("{exit:?}"));
        }
        if control::VmmClient::new(socket).status().await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err("no answer on the control socket within 30 s".into());
        }
        tokio::select! {
            _ = exit.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// A pidfd watch on `pid` if it is still this VM's VMM: a process in the
/// VM's own cgroup (`marker`, see jail.rs), which nothing else joins.
pub fn adopt(pid: u32, marker: &str) -> Option<ExitWatch> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let is_ours = cgroups.lines().any(|line| line.ends_with(marker));
    if !is_ours {
        return None;
    }
    pidfd(pid)
}

/// The processes in the jails' cgroups under `parent` (see jail.rs): the
/// VM id (the cgroup's name) and pid of each, however the agent lost track
/// of them (a crash between the jailer's start and the pid's record).
pub fn jailed(parent: &str) -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        let vm = cgroups.lines().find_map(|line| {
            let path = line.splitn(3, ':').nth(2)?;
            let (above, id) = path.rsplit_once('/')?;
            (above.ends_with(&format!("/{parent}")) && !id.is_empty()).then(|| id.to_string())
        });
        if let Some(vm) = vm {
            found.push((vm, pid));
        }
    }
    found
}

/// The last non-empty line of a VMM log, without its timestamp prefix.
pub fn last_log_line(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(4096);
    let tail = String::from_utf8_lossy(&text[start..]);
    let line = tail
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("");
    // "[nubis-vmm 123.456 ms INFO ] message" -> "message"
    match line.split_once("] ") {
        Some((prefix, message)) if prefix.starts_with("[nubis-vmm") => message.to_string(),
        _ => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_explained() {
        let (state, reason) = VmmExit::Code(0).describe("VM stopped: the guest powered the VM off");
        assert_eq!(state, VmState::Stopped);
        assert!(reason.contains("powered"));
        assert_eq!(VmmExit::Code(2).describe("triple fault").0, VmState::Failed);
        let (state, reason) = VmmExit::Signal(9).describe("");
        assert_eq!(state, VmState::Failed);
        assert!(reason.contains("signal 9"));
        assert_eq!(
            VmmExit::Unknown.describe("VM stopped: SIGTERM").0,
            VmState::Stopped
        );
        assert_eq!(VmmExit::Unknown.describe("").0, VmState::Failed);
    }

    #[test]
    fn the_last_log_line_loses_its_stamp() {
        let dir = std::env::temp_dir().join(format!("nubis-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmm.log");
        std::fs::write(
            &path,
            "[nubis-vmm  1.0 ms INFO ] first\n[nubis-vmm  2.0 ms INFO ] VM stopped: ok\n\n",
        )
        .unwrap();
        assert_eq!(last_log_line(&path), "VM stopped: ok");
        assert_eq!(last_log_line(&dir.join("missing")), "");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_process_that_is_not_this_vms_vmm_is_not_adopted() {
        // Our own process is alive but its command line names no VM config.
        assert!(adopt(std::process::id(), "/nubis/vm-none").is_none());
        assert!(adopt(u32::MAX - 1, "/nubis/vm-none").is_none());
    }
}
