//! `nubis-jailer`: starts one `nubis-vmm` in its sandbox (see
//! `nubis_jailer`), or with `--cleanup` removes what a finished jail left.
//!
//! Exit status: 0 once the VMM runs in its jail (its pid is in
//! `--pid-file`) or the cleanup is done; 1 with one line on stderr naming
//! what failed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use nubis_jailer::cgroup::{Setting, DEFAULT_PARENT};
use nubis_jailer::mounts::{BindMount, DeviceNode};
use nubis_jailer::privileges::ResourceLimit;
use nubis_jailer::{self as jailer, JailSpec, JailerError};

#[derive(Debug, Parser)]
#[command(
    name = "nubis-jailer",
    version,
    about = "Start nubis-vmm in a jail: own mount, PID and IPC namespaces, a minimal root, cgroups, an unprivileged user without capabilities",
    long_about = None
)]
struct Cli {
    /// The VM's id: names its cgroup and its root's mount point.
    #[arg(long)]
    id: String,
    /// The nubis-vmm binary (it runs as /nubis-vmm in the jail).
    #[arg(long, value_name = "PATH", required_unless_present = "cleanup")]
    exec_file: Option<PathBuf>,
    /// The VM's own user (never 0).
    #[arg(long, required_unless_present = "cleanup")]
    uid: Option<u32>,
    /// The VM's own group (never 0).
    #[arg(long, required_unless_present = "cleanup")]
    gid: Option<u32>,
    /// The jail's root is mounted at DIR/<id>/root.
    #[arg(long, value_name = "DIR")]
    chroot_base_dir: PathBuf,
    /// A host file or directory in the jail, repeatable.
    #[arg(long, value_name = "HOST_PATH:JAIL_PATH[:ro]")]
    mount: Vec<String>,
    /// A host device node recreated in the jail, owned by the VM's user
    /// (/dev/kvm, /dev/net/tun), repeatable.
    #[arg(long, value_name = "PATH")]
    device: Vec<PathBuf>,
    /// The cgroup under which the VM's own is made.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_PARENT)]
    parent_cgroup: String,
    /// A cgroup limit (cpu.max, memory.max, pids.max, io.max; v1
    /// equivalents on hosts without v2 controllers), repeatable.
    #[arg(long, value_name = "FILE=VALUE")]
    cgroup: Vec<String>,
    /// A resource limit, repeatable (defaults: core=0, no-file=2048).
    #[arg(long, value_name = "no-file=N|fsize=N|core=N")]
    resource_limit: Vec<String>,
    /// Where the VMM's pid (in this PID namespace) is written.
    #[arg(long, value_name = "PATH", required_unless_present = "cleanup")]
    pid_file: Option<PathBuf>,
    /// An environment variable handed to the VMM, repeatable (every other
    /// variable is dropped).
    #[arg(long, value_name = "NAME")]
    env: Vec<String>,
    /// Remove the cgroups and root mount point of VM <id>'s finished jail.
    #[arg(long)]
    cleanup: bool,
    /// nubis-vmm's arguments, after `--`.
    #[arg(last = true, value_name = "VMM_ARGS")]
    vmm_args: Vec<String>,
}

fn spec(cli: Cli) -> Result<JailSpec, String> {
    let missing = |flag: &str| format!("{flag} is required");
    let mounts = cli
        .mount
        .iter()
        .map(|text| BindMount::parse(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| err.to_string())?;
    let cgroups = cli
        .cgroup
        .iter()
        .map(|text| Setting::parse(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| err.to_string())?;
    let mut limits = ResourceLimit::defaults();
    for text in &cli.resource_limit {
        let limit = ResourceLimit::parse(text).map_err(|err| err.to_string())?;
        limits.retain(|known| known.resource != limit.resource);
        limits.push(limit);
    }
    Ok(JailSpec {
        id: cli.id,
        exec_file: cli.exec_file.ok_or_else(|| missing("--exec-file"))?,
        uid: cli.uid.ok_or_else(|| missing("--uid"))?,
        gid: cli.gid.ok_or_else(|| missing("--gid"))?,
        chroot_base: cli.chroot_base_dir,
        mounts,
        devices: cli
            .device
            .into_iter()
            .map(|host| DeviceNode { host })
            .collect(),
        parent_cgroup: cli.parent_cgroup,
        cgroups,
        limits,
        pid_file: cli.pid_file.ok_or_else(|| missing("--pid-file"))?,
        env: jailer::pass_env(&cli.env).map_err(|err| err.to_string())?,
        vmm_args: cli.vmm_args,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome: Result<(), String> = if cli.cleanup {
        jailer::cleanup(&cli.id, &cli.chroot_base_dir, &cli.parent_cgroup)
            .map_err(|err: JailerError| err.to_string())
    } else {
        spec(cli).and_then(|spec| {
            jailer::run(&spec)
                .map(|_| ())
                .map_err(|err| err.to_string())
        })
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nubis-jailer: {message}");
            ExitCode::FAILURE
        }
    }
}
