//! `nubis-vmm`: runs one microVM.
//!
//! Exit status: 0 when the VM stopped cleanly (guest reboot or power-off,
//! control-socket `stop`, SIGTERM), 1 for bad input or a VMM failure (one
//! line on stderr names the problem), 2 when the guest crashed the VM
//! (triple fault, KVM emulation failure; the message names the exit and RIP).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use vmm::builder::{build_for_boot, build_from_snapshot, RestoreAs, SnapshotDir};
use vmm::config::{ConfigOverrides, SerialConfig, VmConfig};
use vmm::logger;
use vmm::migration::destination::receive_vm;
use vmm::migration::secure::MigrationKey;
use vmm::runtime::{
    self,
    exit::{EXIT_NOT_RECEIVED, EXIT_VMM_ERROR},
};

#[derive(Debug, Parser)]
#[command(
    name = "nubis-vmm",
    version,
    about = "Run one KVM microVM",
    long_about = "Run one KVM microVM from a JSON config (--config) and/or flags; flags override the config.\n\
                  Exit status: 0 clean stop, 1 bad input or VMM error, 2 guest crash."
)]
struct Cli {
    /// VM configuration file (JSON, see the README).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "M")]
    memory_mib: Option<u64>,
    /// Console: stdout, off, file:PATH or unix:PATH.
    #[arg(long, value_name = "stdout|off|file:PATH|unix:PATH")]
    serial: Option<String>,
    /// A virtio-blk disk, repeatable (the first is /dev/vda). bw: bytes/s,
    /// iops: requests/s.
    #[arg(
        long,
        value_name = "path=FILE[,ro=on][,id=NAME][,bw=BYTES_PER_S][,iops=N]"
    )]
    disk: Vec<String>,
    /// A virtio-net NIC on a tap (by name, or an inherited open descriptor),
    /// repeatable (the first is eth0). bw: bytes/s, pps: frames/s, each
    /// direction.
    #[arg(
        long,
        value_name = "tap=NAME|fd=N[,mac=MAC][,id=NAME][,bw=BYTES_PER_S][,pps=N][,mtu=N]"
    )]
    net: Vec<String>,
    /// Add a virtio-rng entropy device (host getrandom).
    #[arg(long)]
    rng: bool,
    /// A virtio-console port, repeatable (the first is /dev/hvc0): an
    /// inherited descriptor (read and written) or a file (appended to).
    #[arg(long, value_name = "fd=N|file=PATH")]
    virtio_console: Vec<String>,
    /// A virtio-vsock device: the guest's context id, and the Unix socket
    /// host processes connect to (`CONNECT <port>`); guest connections to
    /// host port P go to `<socket>_P`.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<String>,
    /// Unix socket for the control protocol.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Resume the VM saved in this snapshot directory (see the control
    /// socket's `snapshot`) instead of booting the kernel; the config gives
    /// a machine of the same shape and its backends.
    #[arg(long, value_name = "DIR", conflicts_with = "migrate_listen")]
    restore: Option<PathBuf>,
    /// With --restore: `resume` goes on as the saved VM (its memory read
    /// into RAM of its own, its NICs' MACs kept); `clone` maps the memory
    /// file copy-on-write (clones of one snapshot share the pages they do
    /// not write) and gives the NICs the config's MACs.
    #[arg(long, value_enum, default_value = "resume", requires = "restore")]
    restore_as: RestoreAs,
    /// Receive a live migration on this address instead of booting; the
    /// token the source must present is NUBIS_MIGRATION_TOKEN, the key that
    /// encrypts and authenticates the stream NUBIS_MIGRATION_KEY (64 hex
    /// digits).
    #[arg(long, value_name = "ADDR:PORT")]
    migrate_listen: Option<String>,
    /// Run without the system-call filters (for debugging the VMM only:
    /// by default every thread runs under its seccomp filter).
    #[arg(long)]
    no_seccomp: bool,
}

fn set_parent_death_signal(signal: libc::c_int) {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number (or 0) and touches no
    // memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong);
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("nubis-vmm: error: {message}");
    ExitCode::from(EXIT_VMM_ERROR as u8)
}

/// Parses every occurrence of a repeatable `key=value,...` flag.
fn parse_all<T>(values: &[String]) -> Result<Vec<T>, String>
where
    T: std::str::FromStr<Err = vmm::config::ConfigError>,
{
    values
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|e: vmm::config::ConfigError| e.to_string())
        })
        .collect()
}

fn assemble(cli: Cli) -> Result<VmConfig, String> {
    let base = match &cli.config {
        Some(path) => Some(VmConfig::from_file(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let serial = match &cli.serial {
        Some(text) => Some(text.parse::<SerialConfig>().map_err(|e| e.to_string())?),
        None => None,
    };
    let flags = ConfigOverrides {
        disks: parse_all(&cli.disk)?,
        nets: parse_all(&cli.net)?,
        rng: cli.rng,
        consoles: parse_all(&cli.virtio_console)?,
        vsock: parse_all(cli.vsock.as_slice())?.pop(),
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        vcpus: cli.vcpus,
        memory_mib: cli.memory_mib,
        serial,
        control_socket: cli.control_socket,
    };
    VmConfig::assemble(base, flags).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    logger::mark_process_start();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                err.exit();
            }
            // One line: clap's first line, without its own "error: " prefix.
            let text = err.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(first.trim_start_matches("error: "));
        }
    };
    vmm::startup::mark("arguments");
    logger::init();
    if cli.no_seccomp {
        log::warn!("--no-seccomp: the VMM runs without system-call filters");
    } else {
        vmm::seccomp::enable();
    }

    let restore = cli.restore.clone();
    let restore_as = cli.restore_as;
    let migrate_listen = cli.migrate_listen.clone();
    let config = match assemble(cli) {
        Ok(config) => config,
        Err(message) => return fail(message),
    };
    let built = match (restore, migrate_listen) {
        (Some(dir), _) => {
            let mut source = SnapshotDir {
                dir: &dir,
                restore_as,
            };
            build_from_snapshot(config, &mut source, restore_as).map_err(|err| err.to_string())
        }
        (None, Some(listen)) => {
            let token = match std::env::var("NUBIS_MIGRATION_TOKEN") {
                Ok(token) if token.len() >= 16 => token,
                _ => {
                    return fail(
                        "--migrate-listen needs NUBIS_MIGRATION_TOKEN (at least 16 characters)",
                    )
                }
            };
            // The key that encrypts and authenticates the stream: from the
            // environment like the token, never from the command line.
            let key = match std::env::var("NUBIS_MIGRATION_KEY") {
                Ok(hex) => match MigrationKey::from_hex(&hex) {
                    Ok(key) => key,
                    Err(err) => return fail(format!("NUBIS_MIGRATION_KEY: {err}")),
                },
                Err(_) => {
                    return fail("--migrate-listen needs NUBIS_MIGRATION_KEY (64 hex digits)")
                }
            };
            // While it receives, this VMM dies with whoever started it (an
            // agent killed mid-migration must not leave a guest half
            // received, nor one the source still runs); once the VM is
            // handed over it outlives its agent like any VMM.
            set_parent_death_signal(libc::SIGKILL);
            let received = receive_vm(config, &listen, &token, &key);
            set_parent_death_signal(0);
            match received {
                Ok(built) => Ok(built),
                Err(err) => {
                    eprintln!("nubis-vmm: error: the migration was not received: {err}");
                    return ExitCode::from(EXIT_NOT_RECEIVED as u8);
                }
            }
        }
        (None, None) => build_for_boot(config).map_err(|err| err.to_string()),
    };
    let built = match built {
        Ok(built) => built,
        Err(err) => return fail(err),
    };
    match runtime::run(built) {
        Ok(reason) => {
            let code = reason.exit_code();
            if code == 0 {
                log::info!("VM stopped: {}", reason.describe());
            } else {
                eprintln!("nubis-vmm: {}", reason.describe());
            }
            ExitCode::from(code as u8)
        }
        Err(err) => fail(err),
    }
}
