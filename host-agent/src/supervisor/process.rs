//! VMM processes: spawning them detached from the agent (own process group,
//! output to files, no pipes), watching their exit (as a child, or through
//! a pidfd once adopted by a restarted agent), and explaining it.

use std::os::fd::{FromRawFd, OwnedFd};
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

/// How the agent learns that a VMM exited.
pub enum ExitWatch {
    /// A child of this agent: its exit status is known.
    Child(tokio::process::Child),
    /// A VMM started by an earlier agent: only the fact that it ended.
    Adopted(AsyncFd<OwnedFd>),
}

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
        match self {
            Self::Child(mut child) => match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => VmmExit::Code(code),
                        (None, Some(signal)) => VmmExit::Signal(signal),
                        _ => VmmExit::Unknown,
                    }
                }
                Err(_) => VmmExit::Unknown,
            },
            Self::Adopted(pidfd) => {
                // A pidfd becomes readable when the process exits.
                let _ = pidfd.readable().await;
                VmmExit::Unknown
            }
        }
    }
}

impl VmmExit {
    /// The VM's state after this exit, and the reason to record, from the
    /// exit and the VMM log's last line.
    pub fn describe(self, log_tail: &str) -> (VmState, String) {
        let clean_in_log = log_tail.contains("VM stopped");
        match self {
            Self::Code(0) => (VmState::Stopped, format!("stopped: {log_tail}")),
            Self::Code(2) => (VmState::Failed, format!("the guest crashed: {log_tail}")),
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

/// Starts `nubis-vmm --config` for a VM, detached from the agent.
/// How a VMM starts its VM.
pub enum Launch<'a> {
    /// Boots the kernel.
    Boot,
    /// Resumes a snapshot (`--restore`).
    Restore(&'a Path),
    /// Receives a live migration (`--migrate-listen`, its token in the
    /// environment, never on the command line).
    Receive { listen: &'a str, token: &'a str },
}

pub fn spawn(binary: &Path, paths: &VmPaths, launch: &Launch) -> Result<Spawned, SupervisorError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.vmm_log)
        .map_err(|source| SupervisorError::Files {
            path: paths.vmm_log.clone(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| SupervisorError::Files {
        path: paths.vmm_log.clone(),
        source,
    })?;
    let mut command = tokio::process::Command::new(binary);
    command.arg("--config").arg(&paths.vmm_config);
    match launch {
        Launch::Boot => {}
        Launch::Restore(snapshot) => {
            command.arg("--restore").arg(snapshot);
        }
        Launch::Receive { listen, token } => {
            command
                .arg("--migrate-listen")
                .arg(listen)
                .env("NUBIS_MIGRATION_TOKEN", token);
        }
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a signal to the agent's group (Ctrl-C in
        // a terminal, a service manager's stop) does not reach the VMs.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| SupervisorError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    let pid = child
        .id()
        .ok_or_else(|| SupervisorError::StartFailed("the VMM exited before it had a pid".into()))?;
    Ok(Spawned {
        pid,
        watch: ExitWatch::Child(child),
    })
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
        if control::command(socket, "status").await.is_ok() {
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

/// A pidfd watch on `pid` if it is still the VMM of this VM (its command
/// line names this VM's config), None otherwise.
pub fn adopt(pid: u32, vmm_config: &Path) -> Option<ExitWatch> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let config = vmm_config.as_os_str().as_encoded_bytes();
    let is_ours = cmdline.split(|b| *b == 0).any(|arg| arg == config);
    if !is_ours {
        return None;
    }
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
    unsafe { AsyncFd::register(owned) }
        .ok()
        .map(ExitWatch::Adopted)
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
        assert!(adopt(std::process::id(), Path::new("/nonexistent/vm.json")).is_none());
        assert!(adopt(u32::MAX - 1, Path::new("/x")).is_none());
    }
}
