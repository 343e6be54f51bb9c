//! The jailer: the wall between a compromised VMM and the host.
//!
//! `nubis-jailer` is started as root, once per VM (by the agent). It
//! makes the VM's cgroups, then forks a child into new PID, mount and IPC
//! namespaces. The child joins the cgroups, builds a root holding only
//! what the VM needs (the VMM binary and its libraries, the VM's kernel,
//! disks and directory, `/dev/kvm`, `/dev/net/tun`), pivots into it, sets
//! resource limits, becomes the VM's own unprivileged user with no
//! capabilities and `no_new_privs`, and execs `nubis-vmm`.
//!
//! The parent waits only until the jail is built (or reports why it could
//! not), writes the VMM's pid to `--pid-file` and exits; the child execs
//! once it has been reparented to the agent, a child subreaper, which
//! then sees the VMM's exit status as it would a child's. `--cleanup` removes what a jail leaves behind
//! (its cgroups and root mount point) once the VMM is gone.

pub mod cgroup;
pub mod mounts;
pub mod privileges;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use cgroup::{CgroupError, Hierarchies, Setting};
use mounts::{BindMount, DeviceNode, MountError};
use privileges::{PrivilegeError, ResourceLimit};

/// Where the VMM binary sits in every jail.
pub const JAIL_VMM: &str = "/nubis-vmm";

#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    #[error("VM id {0:?}: 1 to 64 letters, digits, '-' or '_'")]
    BadId(String),
    #[error("environment variable {0:?} to pass on is not set")]
    MissingEnv(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("exec {path}: {source}")]
    Exec {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write the pid file {path}: {source}")]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the jail did not start: {0}")]
    Child(String),
}

fn os_error(what: &'static str) -> JailerError {
    JailerError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// Everything one jail is made of.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The VM's id: names its cgroup and its root's mount point.
    pub id: String,
    /// The VMM binary on the host; it appears as [`JAIL_VMM`] in the jail.
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// The jail's root is mounted at `<chroot_base>/<id>/root`.
    pub chroot_base: PathBuf,
    pub mounts: Vec<BindMount>,
    pub devices: Vec<DeviceNode>,
    pub parent_cgroup: String,
    pub cgroups: Vec<Setting>,
    pub limits: Vec<ResourceLimit>,
    pub pid_file: PathBuf,
    /// Environment variables handed to the VMM (all others are dropped).
    pub env: Vec<(String, String)>,
    pub vmm_args: Vec<String>,
}

/// A VM id that can name a directory and a cgroup.
pub fn check_id(id: &str) -> Result<(), JailerError> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(JailerError::BadId(id.to_string()))
    }
}

/// Looks up each named variable in this process's environment.
pub fn pass_env(names: &[String]) -> Result<Vec<(String, String)>, JailerError> {
    names
        .iter()
        .map(|name| {
            std::env::var(name)
                .map(|value| (name.clone(), value))
                .map_err(|_| JailerError::MissingEnv(name.clone()))
        })
        .collect()
}

impl JailSpec {
    /// The mount point of the jail's root on the host.
    pub fn root(&self) -> PathBuf {
        self.chroot_base.join(&self.id).join("root")
    }

    fn controllers(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.cgroups.iter().map(Setting::controller).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// A pipe whose write end closes by itself when the child execs.
fn exec_pipe() -> Result<(OwnedFd, OwnedFd), JailerError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("pipe2"));
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Builds the jail and starts the VMM in it; returns the VMM's pid once it
/// runs (see the module docs). Call it in a single-threaded process.
pub fn run(spec: &JailSpec) -> Result<u32, JailerError> {
    check_id(&spec.id)?;
    cgroup::check_name(&spec.parent_cgroup)?;
    let libraries = mounts::library_closure(&spec.exec_file)?;
    let hierarchies = Hierarchies::detect(&spec.controllers())?;
    let procs = cgroup::create(&hierarchies, &spec.parent_cgroup, &spec.id, &spec.cgroups)?;
    let started = start_child(spec, &libraries, &procs);
    if started.is_err() {
        // Nothing runs in the cgroups: do not leave them behind.
        let _ = cgroup::remove(&hierarchies, &spec.parent_cgroup, &spec.id);
    }
    let pid = started?;
    write_pid_file(&spec.pid_file, pid).map_err(|source| JailerError::PidFile {
        path: spec.pid_file.clone(),
        source,
    })?;
    Ok(pid)
}

/// Writes `pid` to a new file at `path`: whatever was there (a link
/// included) is unlinked first and the file made with `O_EXCL` and
/// `O_NOFOLLOW`, so that root never writes through a link.
fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(format!("{pid}\n").as_bytes())
}

fn start_child(
    spec: &JailSpec,
    libraries: &[PathBuf],
    procs: &[PathBuf],
) -> Result<u32, JailerError> {
    // SAFETY: unshare with a flag only; the new PID namespace applies to
    // the children forked from here on.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(os_error("unshare a PID namespace"));
    }
    // `report`: the child tells "ready" or what failed. The child execs
    // only once this parent is gone and the child has been handed to its
    // new parent (the agent, a subreaper): a receiving VMM ties its life to
    // its parent's with PR_SET_PDEATHSIG, which must not be this short-lived
    // process. A parent-death signal is what tells the child: the kernel
    // sends it after the reparenting (a pipe closing comes too early).
    let (report_read, report_write) = exec_pipe()?;
    // SAFETY: the jailer is single-threaded (see `run`), so the child may
    // go on running ordinary Rust code until it execs.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_error("fork"));
    }
    if pid == 0 {
        drop(report_read);
        let mut report = std::fs::File::from(report_write);
        let error = match build(spec, libraries, procs).and_then(|()| ParentGone::arm()) {
            Ok(parent_gone) => {
                let _ = report.write_all(READY);
                drop(report);
                match parent_gone.wait() {
                    Ok(()) => exec(spec),
                    Err(err) => err,
                }
            }
            Err(err) => {
                let _ = report.write_all(err.to_string().as_bytes());
                err
            }
        };
        // Only reached when something failed (after "ready", the parent has
        // gone: stderr, which is the VMM's log, is all that is left).
        eprintln!("nubis-jailer: {error}");
        // SAFETY: _exit ends the child without running the parent's
        // destructors or atexit handlers a second time.
        unsafe { libc::_exit(1) };
    }
    drop(report_write);
    let mut message = Vec::new();
    let _ = std::fs::File::from(report_read).read_to_end(&mut message);
    if message == READY {
        return Ok(pid as u32);
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child, writing its status into `status`.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let message = String::from_utf8_lossy(&message).into_owned();
    Err(JailerError::Child(if message.is_empty() {
        "the jail's first process ended without a word".to_string()
    } else {
        message
    }))
}

/// The jail's first process waiting for the jailer to exit: SIGUSR2 as
/// its parent-death signal, blocked and waited for.
struct ParentGone {
    set: libc::sigset_t,
    previous: libc::sigset_t,
}

impl ParentGone {
    /// Arms the signal; the parent must still be alive (it is: it waits
    /// for "ready").
    fn arm() -> Result<Self, JailerError> {
        // SAFETY: sigset_t is plain data; all-zero is a valid starting
        // value that sigemptyset then initializes.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: the sigset functions write into the sets on our stack;
        // prctl takes integers only.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) != 0 {
                return Err(os_error("block SIGUSR2"));
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGUSR2 as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(os_error("set the parent-death signal"));
            }
        }
        Ok(Self { set, previous })
    }

    /// Returns once the parent has exited; leaves no trace of the signal
    /// for the VMM (mask restored, parent-death signal cleared).
    fn wait(self) -> Result<(), JailerError> {
        let mut signal = 0;
        // SAFETY: sigwait reads the set and writes the signal number; the
        // prctl and sigmask calls take integers and sets on our stack.
        unsafe {
            if libc::sigwait(&self.set, &mut signal) != 0 {
                return Err(os_error("wait for the jailer to exit"));
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) != 0 {
                return Err(os_error("clear the parent-death signal"));
            }
            if libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) != 0 {
                return Err(os_error("restore the signal mask"));
            }
        }
        Ok(())
    }
}

/// What the child writes once the jail is built.
const READY: &[u8] = b"ready";

/// The child's side, up to the exec.
fn build(spec: &JailSpec, libraries: &[PathBuf], procs: &[PathBuf]) -> Result<(), JailerError> {
    cgroup::join(procs)?;
    // SAFETY: unshare with flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC) } != 0 {
        return Err(os_error("unshare the mount and IPC namespaces"));
    }
    mounts::make_private()?;
    let root = spec.root();
    mounts::mount_root(&root)?;
    let vmm = BindMount {
        source: spec.exec_file.clone(),
        target: PathBuf::from(JAIL_VMM),
        read_only: true,
    };
    mounts::bind(&root, &vmm)?;
    for library in libraries {
        mounts::bind(
            &root,
            &BindMount {
                source: library.clone(),
                target: library.clone(),
                read_only: true,
            },
        )?;
    }
    for bind in &spec.mounts {
        mounts::bind(&root, bind)?;
    }
    for device in &spec.devices {
        mounts::device(&root, device, spec.uid, spec.gid)?;
    }
    // The VMM tells a nested kvm_pvm host by this directory.
    let pvm_marker = Path::new("/sys/module/kvm_pvm");
    if pvm_marker.exists() {
        mounts::directory(&root, pvm_marker)?;
    }
    mounts::proc(&root)?;
    mounts::pivot_into(&root)?;
    for limit in &spec.limits {
        limit.apply()?;
    }
    // A write past RLIMIT_FSIZE fails (EFBIG) instead of killing the VMM:
    // an ignored signal stays ignored across exec.
    // SAFETY: signal with a valid signal number and SIG_IGN.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(os_error("ignore SIGXFSZ"));
    }
    privileges::drop_to(spec.uid, spec.gid)?;
    Ok(())
}

/// Execs the VMM; returns only what failed.
fn exec(spec: &JailSpec) -> JailerError {
    match exec_vmm(spec) {
        Ok(never) => match never {},
        Err(err) => err,
    }
}

fn exec_vmm(spec: &JailSpec) -> Result<std::convert::Infallible, JailerError> {
    let bad = |_| JailerError::Exec {
        path: PathBuf::from(JAIL_VMM),
        source: std::io::ErrorKind::InvalidInput.into(),
    };
    let program = CString::new(JAIL_VMM).map_err(bad)?;
    let mut args = vec![program.clone()];
    for arg in &spec.vmm_args {
        args.push(CString::new(arg.as_bytes()).map_err(bad)?);
    }
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(name, value)| CString::new(format!("{name}={value}")).map_err(bad))
        .collect::<Result<_, _>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|arg| arg.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|var| var.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: program, argv and envp are NUL-terminated strings and
    // null-terminated arrays that outlive the call; execve returns only
    // on failure.
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(JailerError::Exec {
        path: PathBuf::from(JAIL_VMM),
        source: std::io::Error::last_os_error(),
    })
}

/// Removes what VM `id`'s jail left: its cgroups (once empty) and its
/// root's mount point on the host.
pub fn cleanup(id: &str, chroot_base: &Path, parent_cgroup: &str) -> Result<(), JailerError> {
    check_id(id)?;
    cgroup::remove_everywhere(parent_cgroup, id)?;
    let dir = chroot_base.join(id);
    for path in [dir.join("root"), dir.clone()] {
        match std::fs::remove_dir(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(JailerError::Os {
                    what: "remove the jail's root mount point",
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_one_directory() {
        assert!(check_id("0123abcd-ef").is_ok());
        for bad in ["", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_pid_file_replaces_a_link_instead_of_writing_through_it() {
        let dir = std::env::temp_dir().join(format!("nubis-jailer-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let canary = dir.join("canary");
        std::fs::write(&canary, b"keep").unwrap();
        let pid_file = dir.join("vmm.pid");
        std::os::unix::fs::symlink(&canary, &pid_file).unwrap();
        write_pid_file(&pid_file, 42).unwrap();
        assert_eq!(std::fs::read(&canary).unwrap(), b"keep");
        assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), "42\n");
        write_pid_file(&pid_file, 43).unwrap();
        assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), "43\n");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn only_named_variables_pass() {
        assert!(pass_env(&["PATH".to_string()]).unwrap()[0].1.contains('/'));
        let err = pass_env(&["NUBIS_SURELY_UNSET_VARIABLE".to_string()]).unwrap_err();
        assert!(err.to_string().contains("NUBIS_SURELY_UNSET_VARIABLE"));
    }
}
