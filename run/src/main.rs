//! `nubis`: user tools. `nubis run` boots a microVM, runs one command in
//! it and exits with the command's exit code (see the `nubis_run` library).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use nubis_run::{
    run_streaming, ConsoleOutput, Root, RunConfig, Share, StartKind, DEFAULT_BOOT_TIMEOUT,
    EXIT_RUN_ERROR,
};

#[derive(Debug, Parser)]
#[command(name = "nubis", version, about = "Nubis user tools")]
struct Cli {
    #[command(subcommand)]
    command: Tool,
}

#[derive(Debug, Subcommand)]
enum Tool {
    /// Run one command in a fresh microVM and exit with its exit code.
    #[command(
        long_about = "Run one command in a fresh microVM and exit with its exit code.\n\n\
        The command's stdout and stderr come out apart; the kernel console goes to a file\n\
        (--console shows it on stderr). Exit codes besides the command's own: 121 the guest\n\
        kernel panicked or the VM crashed, 122 the guest never started the command, 124 the\n\
        command timed out, 125 nubis run itself failed, 126/127 the command could not be\n\
        executed / was not found, 128+N the command was killed by signal N."
    )]
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Guest kernel (ELF vmlinux or bzImage); the Nubis guest kernel by default.
    #[arg(long, value_name = "K")]
    kernel: Option<PathBuf>,
    /// The run initramfs; the Nubis one by default.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// An ext4 root disk image to run the command in (read-only, with a
    /// throw-away overlay).
    #[arg(long, value_name = "R", conflicts_with = "image")]
    rootfs: Option<PathBuf>,
    /// A directory tree to run the command in (made into a root disk, cached).
    #[arg(long, value_name = "DIR")]
    image: Option<PathBuf>,
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    #[arg(long, value_name = "M", default_value_t = 256)]
    memory_mib: u64,
    /// Stop the command after S seconds (exit code 124).
    #[arg(long, value_name = "S")]
    timeout: Option<f64>,
    /// Give up when the guest has not started the command after S seconds
    /// (exit code 122).
    #[arg(long, value_name = "S", default_value_t = DEFAULT_BOOT_TIMEOUT.as_secs_f64())]
    boot_timeout: f64,
    /// A host directory at /share in the guest (the command's working
    /// directory): read-only by default; with :rw what the command writes
    /// there is copied back afterwards.
    #[arg(long, value_name = "HOST_DIR[:ro|:rw]")]
    share: Option<String>,
    /// A NIC on a tap of its own with an address (needs CAP_NET_ADMIN).
    #[arg(long)]
    net: bool,
    /// Show the kernel console on stderr as it comes.
    #[arg(long)]
    console: bool,
    /// Restore a snapshot of the booted guest instead of booting (made by
    /// the first warm run, kept per image, kernel and VM size).
    #[arg(long)]
    warm: bool,
    /// An environment variable for the command, repeatable.
    #[arg(long, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Extra kernel command-line arguments.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    append: Option<String>,
    /// Print how the guest came up and the times taken, on stderr.
    #[arg(long, short)]
    verbose: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<std::ffi::OsString>,
}

fn seconds(flag: &str, value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| format!("--{flag} must be a positive number of seconds, got {value}"))
}

fn config(args: &RunArgs) -> Result<RunConfig, String> {
    let root = match (&args.rootfs, &args.image) {
        (Some(disk), _) => Root::Disk(disk.clone()),
        (None, Some(tree)) => Root::Tree(tree.clone()),
        (None, None) => Root::Default,
    };
    let share = args
        .share
        .as_deref()
        .map(str::parse::<Share>)
        .transpose()
        .map_err(|err| err.to_string())?;
    let env = args
        .env
        .iter()
        .map(|entry| {
            entry
                .split_once('=')
                .filter(|(key, _)| !key.is_empty())
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .ok_or_else(|| format!("--env '{entry}' is not KEY=VALUE"))
        })
        .collect::<Result<_, _>>()?;
    Ok(RunConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        root,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        timeout: args
            .timeout
            .map(|value| seconds("timeout", value))
            .transpose()?,
        boot_timeout: seconds("boot-timeout", args.boot_timeout)?,
        share,
        net: args.net,
        console: if args.console {
            ConsoleOutput::Stderr
        } else {
            ConsoleOutput::Log
        },
        warm: args.warm,
        env,
        kernel_args: args.append.clone(),
        ..RunConfig::default()
    })
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("nubis run: error: {message}");
    ExitCode::from(EXIT_RUN_ERROR as u8)
}

extern "C" fn on_interrupt(_signal: libc::c_int) {
    nubis_run::interrupt();
}

/// Ctrl-C, SIGTERM and SIGHUP stop the VM and clean up (its run
/// directory, its tap) before `nubis run` exits 130.
fn stop_on_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the sigaction struct lives for the call.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match config(&args) {
        Ok(config) => config,
        Err(message) => return fail(message),
    };
    stop_on_signals();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let report = match run_streaming(&config, &args.command, &mut stdout, &mut stderr) {
        Ok(report) => report,
        Err(err) => return fail(err),
    };
    for warning in &report.warnings {
        eprintln!("nubis run: warning: {warning}");
    }
    if let Some(reason) = report.status.describe() {
        let kept = report
            .kept_dir
            .as_ref()
            .map(|dir| format!(" (console log: {}/console.log)", dir.display()))
            .unwrap_or_default();
        eprintln!("nubis run: {reason}{kept}");
    }
    if args.verbose {
        let start = match report.start {
            StartKind::Cold => "cold boot",
            StartKind::WarmBuilt => "cold boot, warm snapshot saved",
            StartKind::WarmRestored => "warm restore",
        };
        let ms = |duration: Option<Duration>| {
            duration
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        eprintln!(
            "nubis run: {start}; command started after {}, ran {}; {} in all",
            ms(report.startup),
            ms(report.command_time),
            ms(Some(report.total))
        );
        if let Some(copied) = report.copied_back {
            eprintln!(
                "nubis run: copied back {} file(s), {} bytes; {} entries skipped",
                copied.files, copied.bytes, copied.skipped
            );
        }
    }
    ExitCode::from(report.status.exit_code().clamp(0, 255) as u8)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                err.exit();
            }
            let text = err.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(first.trim_start_matches("error: "));
        }
    };
    match cli.command {
        Tool::Run(args) => run(args),
    }
}
