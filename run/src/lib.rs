//! `nubis run`: one command in a fresh microVM, from image to exit code, as
//! a library for Rust test suites and as the `nubis run` command.
//!
//! The guest boots the Nubis kernel (or the caller's) with the Nubis run
//! initramfs, whose PID 1 (`guest-images/rootfs/nubis-run-init.c`) takes the
//! command over a virtio-console port and runs it, with its stdout and
//! stderr on two more ports: they reach the caller apart from each other
//! and from the kernel console, which goes to a file. The VMM is a
//! `nubis-vmm` child process, so a run needs nothing but `/dev/kvm` (no
//! root, no tap unless networking is asked for).
//!
//! A warm run (`warm: true`) restores a snapshot of the same guest taken at
//! the moment it waited for its command, instead of booting: see [`warm`].
//!
//! ```no_run
//! use nubis_run::{run, GuestStatus, RunConfig};
//!
//! let config = RunConfig { warm: true, ..RunConfig::default() };
//! let output = run(&config, &["sh", "-c", "echo hello; exit 3"]).unwrap();
//! assert_eq!(output.report.status, GuestStatus::Exited(3));
//! assert_eq!(output.stdout, b"hello\n");
//! ```

#[doc(hidden)]
pub mod fuzz_api;
pub mod images;
pub mod protocol;
mod session;
pub mod share;
pub mod warm;

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

pub use share::{CopyBack, Share};

use protocol::RequestError;
use share::ShareError;

/// Exit codes of `nubis run` that are not the command's own.
pub const EXIT_GUEST_CRASHED: i32 = 121;
pub const EXIT_NEVER_STARTED: i32 = 122;
pub const EXIT_TIMED_OUT: i32 = 124;
pub const EXIT_RUN_ERROR: i32 = 125;
/// The command could not be executed (as a shell reports it).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
pub const EXIT_NOT_FOUND: i32 = 127;

/// How long a guest may take to start the command, by default.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Errors that stop a run before it has an outcome: bad input, missing
/// files, a VMM that cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "no Nubis guest images found (build them with guest-images/build.sh, or set \
         NUBIS_GUEST_IMAGES to their directory); looked in {tried}"
    )]
    NoImages { tried: String },
    #[error("no nubis-vmm found (set NUBIS_VMM to its path); looked in {tried}")]
    NoVmm { tried: String },
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error("invalid command: {0}")]
    Request(#[from] RequestError),
    #[error("{what}: the VMM's control socket answered {answer}")]
    Control { what: String, answer: String },
}

/// The guest's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// The Nubis guest images' `rootfs.ext4` (busybox user space).
    Default,
    /// An ext4 disk image (`--rootfs`), attached read-only; the command
    /// runs in it under a tmpfs overlay (writes are thrown away).
    Disk(PathBuf),
    /// A directory tree (`--image`), made into such a disk (cached).
    Tree(PathBuf),
}

/// Where the guest's kernel console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// A file in the run's directory, kept when the run fails.
    Log,
    /// Also copied to this process's stderr as it comes (`--console`).
    Stderr,
}

/// One run's settings; `RunConfig::default()` is the Nubis guest image with
/// 1 vCPU and 256 MiB.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The kernel; the Nubis guest kernel when None.
    pub kernel: Option<PathBuf>,
    /// The run initramfs (its PID 1 takes the command); the Nubis one
    /// when None.
    pub initrd: Option<PathBuf>,
    /// Where the Nubis guest images are; found when None (see
    /// [`images::find_images_dir`]).
    pub images_dir: Option<PathBuf>,
    pub root: Root,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The command's time limit, from its start.
    pub timeout: Option<Duration>,
    /// The limit for the guest to start the command.
    pub boot_timeout: Duration,
    pub share: Option<Share>,
    /// A NIC on a tap of its own, with an address (needs CAP_NET_ADMIN).
    pub net: bool,
    pub console: ConsoleOutput,
    /// Restore a snapshot of the booted guest instead of booting.
    pub warm: bool,
    /// Environment of the command, on top of PATH and HOME.
    pub env: Vec<(String, String)>,
    /// Extra kernel command-line arguments.
    pub kernel_args: Option<String>,
    /// The VMM program; found when None (`$NUBIS_VMM`, next to this
    /// program, then PATH).
    pub vmm_binary: Option<PathBuf>,
    /// The warm cache and built images; [`warm::cache_dir`] when None.
    pub cache_dir: Option<PathBuf>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            kernel: None,
            initrd: None,
            images_dir: None,
            root: Root::Default,
            vcpus: 1,
            memory_mib: 256,
            timeout: None,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            share: None,
            net: false,
            console: ConsoleOutput::Log,
            warm: false,
            env: Vec::new(),
            kernel_args: None,
            vmm_binary: None,
            cache_dir: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestStatus {
    /// The command exited with this code.
    Exited(i32),
    /// The command was killed by this signal.
    Signaled(i32),
    /// The command could not be executed (not found, not executable).
    ExecFailed { errno: i32, message: String },
    /// The guest kernel panicked; the panic's line from the console.
    KernelPanic { message: String },
    /// The VM crashed (triple fault, emulation failure) or stopped while
    /// the command ran.
    Crashed { message: String },
    /// The command ran past its time limit and was stopped.
    TimedOut { limit: Duration },
    /// The guest never started the command.
    NeverStarted { reason: String },
    /// The run was interrupted ([`interrupt`]: Ctrl-C on `nubis run`).
    Interrupted,
}

impl GuestStatus {
    /// The exit code `nubis run` exits with.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Exited(code) => *code,
            Self::Signaled(signal) => 128 + signal,
            Self::ExecFailed { errno, .. } if *errno == libc::ENOENT => EXIT_NOT_FOUND,
            Self::ExecFailed { .. } => EXIT_CANNOT_EXECUTE,
            Self::KernelPanic { .. } | Self::Crashed { .. } => EXIT_GUEST_CRASHED,
            Self::TimedOut { .. } => EXIT_TIMED_OUT,
            Self::NeverStarted { .. } => EXIT_NEVER_STARTED,
            Self::Interrupted => 128 + libc::SIGINT,
        }
    }

    /// One line for the user; None when the command simply exited.
    pub fn describe(&self) -> Option<String> {
        match self {
            Self::Exited(_) => None,
            Self::Signaled(signal) => Some(format!("the command was killed by signal {signal}")),
            Self::ExecFailed { message, .. } => Some(message.clone()),
            Self::KernelPanic { message } => Some(format!("the guest kernel panicked: {message}")),
            Self::Crashed { message } => Some(format!("the guest crashed: {message}")),
            Self::TimedOut { limit } => Some(format!(
                "the command timed out after {} s and was stopped",
                limit.as_secs_f64()
            )),
            Self::NeverStarted { reason } => {
                Some(format!("the guest never started the command: {reason}"))
            }
            Self::Interrupted => Some("interrupted: the VM was stopped".into()),
        }
    }
}

/// How the guest came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// Booted; no snapshot asked for.
    Cold,
    /// Booted, and its snapshot is now in the warm cache.
    WarmBuilt,
    /// Restored from the warm cache.
    WarmRestored,
}

/// What a run did, besides its output.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub status: GuestStatus,
    pub start: StartKind,
    /// From starting the VMM to the command's start.
    pub startup: Option<Duration>,
    /// The command's own run time.
    pub command_time: Option<Duration>,
    /// The whole run, image preparation and copy-back included.
    pub total: Duration,
    /// Files copied back from a `:rw` share.
    pub copied_back: Option<CopyBack>,
    /// The run's directory (console log, VMM log), kept when the run
    /// failed for a reason other than the command's exit code.
    pub kept_dir: Option<PathBuf>,
    /// Things that went wrong without failing the run (a warm snapshot
    /// that could not be saved).
    pub warnings: Vec<String>,
}

/// A run's report and the command's whole output.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub report: RunReport,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl RunOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Stops every run in this process as soon as it can (its VM stopped, its
/// files and tap removed; it reports [`GuestStatus::Interrupted`]). Only
/// stores a flag: it may be called from a signal handler.
pub fn interrupt() {
    session::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Runs `command` in a guest and collects its output.
pub fn run<S: AsRef<OsStr>>(config: &RunConfig, command: &[S]) -> Result<RunOutput, RunError> {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let report = run_streaming(config, command, &mut stdout, &mut stderr)?;
    Ok(RunOutput {
        report,
        stdout,
        stderr,
    })
}

/// Runs `command` in a guest, writing its stdout and stderr to the given
/// sinks as they come.
pub fn run_streaming<S: AsRef<OsStr>>(
    config: &RunConfig,
    command: &[S],
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
) -> Result<RunReport, RunError> {
    let argv = command
        .iter()
        .map(|arg| arg.as_ref().to_os_string())
        .collect();
    session::run(config, argv, stdout, stderr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_conventional() {
        assert_eq!(GuestStatus::Exited(42).exit_code(), 42);
        assert_eq!(GuestStatus::Signaled(9).exit_code(), 137);
        let not_found = GuestStatus::ExecFailed {
            errno: libc::ENOENT,
            message: String::new(),
        };
        assert_eq!(not_found.exit_code(), 127);
        let denied = GuestStatus::ExecFailed {
            errno: libc::EACCES,
            message: String::new(),
        };
        assert_eq!(denied.exit_code(), 126);
        let failures = [
            GuestStatus::KernelPanic {
                message: String::new(),
            }
            .exit_code(),
            GuestStatus::NeverStarted {
                reason: String::new(),
            }
            .exit_code(),
            GuestStatus::TimedOut {
                limit: Duration::from_secs(1),
            }
            .exit_code(),
            EXIT_RUN_ERROR,
        ];
        let unique: std::collections::HashSet<_> = failures.iter().collect();
        assert_eq!(unique.len(), failures.len());
        assert!(GuestStatus::Exited(0).describe().is_none());
        assert!(GuestStatus::TimedOut {
            limit: Duration::from_secs(2)
        }
        .describe()
        .unwrap()
        .contains("timed out after 2 s"));
    }
}
