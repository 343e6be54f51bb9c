//! `nubis run` end to end (#8): real guests booted (or restored) by the
//! `nubis` command and by the `nubis_run` library.
//!
//! Linux boots are what these cost, so the binary shares one warm cache:
//! the first warm run boots and saves the snapshot, the others restore it.
//! Four runs boot: the cold run as an unprivileged user, the first run of
//! a warm cache of its own (so that a warm build is always checked, whatever
//! the shared cache holds), the shared cache's first run (when an earlier
//! test run left none), and the cold run with a NIC.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nubis_run::{run, GuestStatus, RunConfig, RunOutput, Share, StartKind};
use nubis_tests::net::links_with_prefix;
use nubis_tests::{guest_images, require_kvm, workspace_binary, workspace_root, TestDir};

/// A shell script that writes to both streams, echoes its argument and
/// exits 42: what every "same results" comparison runs.
const SCRIPT: &str = "echo to-stdout; echo to-stderr >&2; echo \"arg:$1\"; exit 42";
const SCRIPT_STDOUT: &str = "to-stdout\narg:two words\n";
const SCRIPT_STDERR: &str = "to-stderr\n";
/// A loaded CI machine boots a guest in about two minutes.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// The unprivileged user the rootless run runs as.
const NOBODY: u32 = 65534;

fn images_dir() -> PathBuf {
    guest_images()
        .vmlinux
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("guest-images/out"))
}

/// The warm cache every warm run of this binary shares. Kept between test
/// runs: its entries are keyed by the files they came from (a rebuilt VMM
/// or image is a new entry).
fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("nubis-test-run-cache")
}

/// Warm runs one at a time: the first one saves the cache's entry.
fn warm_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| Mutex::new(()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn config(warm: bool) -> RunConfig {
    config_with_cache(warm, cache_dir())
}

fn config_with_cache(warm: bool, cache: PathBuf) -> RunConfig {
    RunConfig {
        images_dir: Some(images_dir()),
        cache_dir: Some(cache),
        vmm_binary: Some(workspace_binary("nubis-vmm")),
        boot_timeout: BOOT_TIMEOUT,
        warm,
        ..RunConfig::default()
    }
}

fn run_in_guest(config: &RunConfig, command: &[&str]) -> RunOutput {
    let _serial = warm_lock();
    let output = run(config, command).unwrap_or_else(|err| panic!("{command:?}: {err}"));
    eprintln!(
        "{command:?}: {:?}, {:?}, started after {:?}, ran {:?}, {:?} in all",
        output.report.status,
        output.report.start,
        output.report.startup,
        output.report.command_time,
        output.report.total
    );
    output
}

/// `nubis run ARGS` with the shared cache, as root.
fn nubis_run(args: &[&str]) -> Output {
    let _serial = warm_lock();
    Command::new(workspace_binary("nubis"))
        .arg("run")
        .args(args)
        .env("NUBIS_RUN_CACHE", cache_dir())
        .env("NUBIS_GUEST_IMAGES", images_dir())
        .output()
        .expect("run nubis")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The run directory a failed run kept, from `nubis run`'s
/// "(console log: DIR/console.log)".
fn kept_run_dir(stderr: &str) -> PathBuf {
    let log = stderr
        .split("console log: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no console log named in {stderr:?}"));
    Path::new(log)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("no directory in {log}"))
}

/// Lets `uid` open /dev/kvm (group `gid`, mode 0660) until dropped, then
/// puts its owner and mode back.
struct KvmAccess {
    gid: u32,
    mode: u32,
}

impl KvmAccess {
    fn grant(gid: u32) -> Self {
        let meta = std::fs::metadata("/dev/kvm").expect("stat /dev/kvm");
        let saved = Self {
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
        };
        std::os::unix::fs::chown("/dev/kvm", None, Some(gid)).expect("chgrp /dev/kvm");
        std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o660))
            .expect("chmod /dev/kvm");
        saved
    }
}

impl Drop for KvmAccess {
    fn drop(&mut self) {
        let _ = std::os::unix::fs::chown("/dev/kvm", None, Some(self.gid));
        let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(self.mode));
    }
}

/// Every path component from `/` to `path` can be traversed by others
/// (the rootless run reads the images and programs there).
fn assert_traversable(path: &Path) {
    for dir in path.ancestors().skip(1) {
        let mode = std::fs::metadata(dir).map(|m| m.mode()).unwrap_or(0);
        assert!(
            mode & 0o001 != 0,
            "{} is not traversable by other users (mode {mode:o}): the rootless run cannot reach {}",
            dir.display(),
            path.display()
        );
    }
}

#[test]
fn cold_rootless_and_warm_runs_give_the_same_results() {
    require_kvm();
    let home = TestDir::new("run-rootless");
    std::os::unix::fs::chown(home.path(), Some(NOBODY), Some(NOBODY)).expect("chown home");
    let nubis = workspace_binary("nubis");
    assert_traversable(&nubis);
    assert_traversable(&images_dir().join("vmlinux"));

    // Cold, through the command, as an unprivileged user who may open
    // /dev/kvm and nothing else: no root, no tap.
    let kvm_before = std::fs::metadata("/dev/kvm").expect("stat /dev/kvm");
    let cold = {
        let _kvm = KvmAccess::grant(NOBODY);
        let _serial = warm_lock();
        Command::new(&nubis)
            .args(["run", "--", "sh", "-c", SCRIPT, "sh", "two words"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", home.path())
            .env("TMPDIR", home.path())
            .env("NUBIS_GUEST_IMAGES", images_dir())
            // std drops the supplementary groups when it changes the uid.
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("run nubis as nobody")
    };
    assert_eq!(
        cold.status.code(),
        Some(42),
        "cold run: stderr {}",
        text(&cold.stderr)
    );
    assert_eq!(text(&cold.stdout), SCRIPT_STDOUT, "cold stdout");
    assert_eq!(
        text(&cold.stderr),
        SCRIPT_STDERR,
        "cold stderr: only the command's, no kernel console, no warning"
    );
    let kvm_after = std::fs::metadata("/dev/kvm").expect("stat /dev/kvm");
    assert_eq!(
        (kvm_after.mode(), kvm_after.gid()),
        (kvm_before.mode(), kvm_before.gid()),
        "the test put /dev/kvm's mode and group back"
    );

    // Warm, through the library, with a cache of this test's own: the
    // first run boots and saves the snapshot (always: the shared cache
    // would have it from an earlier test or test run, and the build would
    // go unchecked), the next restores it.
    let cache = TestDir::new("run-warm-cache");
    let command = ["sh", "-c", SCRIPT, "sh", "two words"];
    let first = run_in_guest(&config_with_cache(true, cache.join("cache")), &command);
    let second = run_in_guest(&config_with_cache(true, cache.join("cache")), &command);
    assert_eq!(
        first.report.start,
        StartKind::WarmBuilt,
        "{:?}",
        first.report
    );
    assert_eq!(
        second.report.start,
        StartKind::WarmRestored,
        "{:?}",
        second.report
    );
    for (name, output) in [("warm-built", &first), ("restored", &second)] {
        assert_eq!(output.report.status, GuestStatus::Exited(42), "{name}");
        assert_eq!(output.report.status.exit_code(), 42, "{name}");
        assert_eq!(output.stdout_text(), SCRIPT_STDOUT, "{name} stdout");
        assert_eq!(output.stderr_text(), SCRIPT_STDERR, "{name} stderr");
        assert!(
            output.report.warnings.is_empty(),
            "{name}: {:?}",
            output.report.warnings
        );
        assert!(
            output.report.startup.is_some() && output.report.command_time.is_some(),
            "{name}: {:?}",
            output.report
        );
        if std::env::var_os("NUBIS_RUN_KEEP").is_none() {
            assert_eq!(
                output.report.kept_dir, None,
                "{name}: a run that went well keeps nothing"
            );
        }
        assert_eq!(
            output.report.copied_back, None,
            "{name}: no share, nothing copied back"
        );
    }

    // Exit codes 0 and 1 come through as they are.
    for (program, code) in [("true", 0), ("false", 1)] {
        let output = run_in_guest(&config(true), &[program]);
        assert_eq!(output.report.start, StartKind::WarmRestored);
        assert_eq!(output.report.status, GuestStatus::Exited(code), "{program}");
        assert!(output.stdout.is_empty() && output.stderr.is_empty());
    }
}

#[test]
fn a_hanging_command_is_stopped_at_its_timeout() {
    require_kvm();
    let output = nubis_run(&[
        "--warm",
        "--timeout",
        "5",
        "--",
        "sh",
        "-c",
        "echo before; sleep 600; echo after",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(124), "stderr: {stderr}");
    // Whether `before` made it depends on how fast the guest's shell
    // started; `after` never can.
    let stdout = text(&output.stdout);
    assert!(stdout == "before\n" || stdout.is_empty(), "{stdout:?}");
    assert!(
        stderr.contains("the command timed out after 5 s and was stopped"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(kept_run_dir(&stderr));
}

#[test]
fn an_interrupted_run_stops_its_vm_and_cleans_up() {
    require_kvm();
    let scratch = TestDir::new("run-interrupt");
    let _serial = warm_lock();
    let child = Command::new(workspace_binary("nubis"))
        .args(["run", "--warm", "--", "sleep", "600"])
        .env("NUBIS_RUN_CACHE", cache_dir())
        .env("NUBIS_GUEST_IMAGES", images_dir())
        .env("TMPDIR", scratch.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start nubis run");
    // Wait for its VMM (its run directory's log), then Ctrl-C it.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let has_vmm_log = || {
        std::fs::read_dir(scratch.path())
            .map(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.path().join("vmm.log").exists())
            })
            .unwrap_or(false)
    };
    while !has_vmm_log() {
        assert!(
            std::time::Instant::now() < deadline,
            "no run directory appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let output = child.wait_with_output().expect("wait for nubis run");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: the VM was stopped"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .expect("read the scratch directory")
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_kernel_panic_is_reported_as_such() {
    require_kvm();
    let output = nubis_run(&[
        "--warm",
        "--console",
        "--",
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger; sleep 600",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(121), "stderr: {stderr}");
    // --console: the kernel's own messages came on stderr as they came.
    assert!(stderr.contains("sysrq: Trigger a crash"), "{stderr}");
    assert!(
        stderr.contains(
            "the guest kernel panicked: Kernel panic - not syncing: sysrq triggered crash"
        ),
        "{stderr}"
    );
    // The console log is kept and named.
    let dir = kept_run_dir(&stderr);
    let console = std::fs::read_to_string(dir.join("console.log")).expect("the kept console log");
    assert!(console.contains("sysrq: Trigger a crash"), "{console}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_command_that_is_not_there_or_never_starts_has_its_own_exit_code() {
    require_kvm();
    let missing = run_in_guest(&config(true), &["no-such-program", "x"]);
    assert!(
        matches!(&missing.report.status, GuestStatus::ExecFailed { errno, message }
            if *errno == libc::ENOENT && message.contains("no-such-program")),
        "{:?}",
        missing.report.status
    );
    assert_eq!(missing.report.status.exit_code(), 127);

    // A guest that cannot get to the command in time is reported as never
    // having started it. This one never can, on any machine: its kernel is
    // told to run an init that is not there (the last rdinit= wins), finds
    // no root to fall back on, panics and, with panic=0, waits there for
    // good instead of rebooting; the VMM runs on until the boot timeout.
    let too_slow = run_in_guest(
        &RunConfig {
            boot_timeout: Duration::from_secs(5),
            kernel_args: Some("rdinit=/nubis-no-such-init panic=0".into()),
            ..config(false)
        },
        &["true"],
    );
    assert!(
        matches!(&too_slow.report.status, GuestStatus::NeverStarted { reason }
            if reason.contains("no command started within 5 s")),
        "{:?}",
        too_slow.report.status
    );
    assert_eq!(too_slow.report.status.exit_code(), 122);
    let dir = too_slow
        .report
        .kept_dir
        .as_ref()
        .expect("a run whose command never started keeps its directory");
    assert!(dir.join("console.log").exists(), "the console log is kept");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn long_arguments_arrive_whole() {
    require_kvm();
    // 300 KB of arguments: more than a socket buffer holds, so the request
    // goes while the guest reads it. Each stays under Linux's 128 KiB
    // limit for one argument.
    let args: Vec<String> = (b'a'..=b'c')
        .map(|letter| String::from(letter as char).repeat(100_000))
        .collect();
    let mut command = vec!["sh", "-c", "echo $# ${#1} ${#2} ${#3} ${3%%c*}end", "sh"];
    command.extend(args.iter().map(String::as_str));
    let output = run_in_guest(&config(true), &command);
    assert_eq!(
        output.report.status,
        GuestStatus::Exited(0),
        "{}",
        output.stderr_text()
    );
    assert_eq!(output.stdout_text(), "3 100000 100000 100000 end\n");
}

#[test]
fn a_shared_directory_goes_in_and_what_the_command_writes_comes_back() {
    require_kvm();
    let dir = TestDir::new("run-share");
    let host = dir.join("project");
    std::fs::create_dir_all(host.join("src")).expect("create the shared directory");
    std::fs::write(host.join("src/input.txt"), "from the host\n").expect("write the input");

    // Read-only: the command sees the files, in its working directory,
    // and cannot change them.
    let share_ro = Share {
        host_dir: host.clone(),
        writable: false,
    };
    let read_only = run_in_guest(
        &RunConfig {
            share: Some(share_ro),
            ..config(true)
        },
        &["sh", "-c", "pwd; cat src/input.txt; echo x > src/input.txt"],
    );
    assert_eq!(read_only.stdout_text(), "/share\nfrom the host\n");
    assert_eq!(read_only.report.status, GuestStatus::Exited(1));
    assert!(read_only.stderr_text().contains("Read-only file system"));
    assert_eq!(
        std::fs::read_to_string(host.join("src/input.txt")).expect("read the input"),
        "from the host\n"
    );

    // Read-write: what the command writes comes back.
    let share_rw: Share = format!("{}:rw", host.display())
        .parse()
        .expect("a share argument");
    let read_write = run_in_guest(
        &RunConfig {
            share: Some(share_rw),
            ..config(true)
        },
        &[
            "sh",
            "-c",
            "cat src/input.txt > copy.txt; mkdir -p out/deep; echo built > out/deep/result; \
             echo changed > src/input.txt",
        ],
    );
    assert_eq!(
        read_write.report.status,
        GuestStatus::Exited(0),
        "{}",
        read_write.stderr_text()
    );
    let read = |path: &str| std::fs::read_to_string(host.join(path)).unwrap_or_default();
    assert_eq!(read("copy.txt"), "from the host\n");
    assert_eq!(read("out/deep/result"), "built\n");
    assert_eq!(read("src/input.txt"), "changed\n");
    assert_eq!(
        read_write.report.copied_back.map(|stats| stats.files),
        Some(3)
    );
    assert!(!host.join("lost+found").exists());
}

#[test]
fn rootfs_and_image_flags_give_the_command_another_root() {
    require_kvm();
    // --rootfs: the benchmark rootfs, which has fio where the default
    // root has none; the image file is never written.
    let bench_rootfs = images_dir().join("rootfs-bench.ext4");
    let before = std::fs::read(&bench_rootfs).expect("read rootfs-bench.ext4");
    let output = nubis_run(&[
        "--rootfs",
        bench_rootfs.to_str().expect("a UTF-8 path"),
        "--",
        "sh",
        "-c",
        "test -x /usr/bin/fio && echo has-fio; echo scribble > /etc/hostname && cat /etc/hostname",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        "has-fio\nscribble\n",
        "writes go to the overlay"
    );
    assert!(
        std::fs::read(&bench_rootfs).expect("read it again") == before,
        "the --rootfs image was changed"
    );

    // --image: a directory tree (the busybox tree, unpacked from the
    // initramfs, and a file of our own) made into the root disk.
    let dir = TestDir::new("run-image");
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).expect("create the tree");
    let cpio =
        std::fs::File::open(images_dir().join("initramfs.cpio")).expect("open the initramfs");
    let unpacked = Command::new("cpio")
        .args(["--extract", "--make-directories", "--quiet"])
        .current_dir(&tree)
        .stdin(cpio)
        .status()
        .expect("run cpio");
    assert!(unpacked.success(), "cpio failed");
    std::fs::write(tree.join("marker"), "from the tree\n").expect("write the marker");
    let output = Command::new(workspace_binary("nubis"))
        .args(["run", "--image"])
        .arg(&tree)
        .args(["--", "cat", "/marker"])
        .env("NUBIS_RUN_CACHE", dir.join("cache"))
        .env("NUBIS_GUEST_IMAGES", images_dir())
        .output()
        .expect("run nubis");
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "from the tree\n");
}

#[test]
fn with_net_the_guest_reaches_the_host() {
    require_kvm();
    // Cold (a NIC is another machine shape than the warm cache's), with a
    // read-only share on the way.
    let dir = TestDir::new("run-net");
    std::fs::write(dir.join("greeting"), "hello\n").expect("write the greeting");
    // Taps of other runs on this host (not ours to judge), and the run's
    // own, seen while it runs: `nrun<slot>`, the first free slot from the
    // pid on, so not necessarily `nrun<pid % 16384>`.
    let taps_before = links_with_prefix("nrun");
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let watching = watching.clone();
        let taps_before = taps_before.clone();
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while watching.load(Ordering::SeqCst) {
                seen.extend(
                    links_with_prefix("nrun")
                        .into_iter()
                        .filter(|tap| !taps_before.contains(tap)),
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        })
    };
    let output = run_in_guest(
        &RunConfig {
            net: true,
            share: Some(Share {
                host_dir: dir.path().to_path_buf(),
                writable: false,
            }),
            ..config(false)
        },
        &[
            "sh",
            "-c",
            "cat greeting; gw=$(ip route | awk '/default/ {print $3}'); ping -c 1 -W 10 $gw >/dev/null && echo reached $gw",
        ],
    );
    assert_eq!(
        output.report.status,
        GuestStatus::Exited(0),
        "{}",
        output.stderr_text()
    );
    assert_eq!(output.report.start, StartKind::Cold);
    let stdout = output.stdout_text();
    assert!(stdout.starts_with("hello\nreached 172.30."), "{stdout}");
    watching.store(false, Ordering::SeqCst);
    let ours = watcher.join().expect("the tap watcher");
    assert!(!ours.is_empty(), "no tap of the run's was ever seen");
    eprintln!("the run's tap while it ran: {ours:?}");
    let left: Vec<String> = links_with_prefix("nrun")
        .into_iter()
        .filter(|tap| !taps_before.contains(tap))
        .collect();
    assert!(
        left.is_empty(),
        "the run's tap remains: {left:?} (seen while it ran: {ours:?})"
    );
    if !taps_before.is_empty() {
        // Another run's (a concurrent test binary's) or left behind: not
        // this run's to remove, and not counted against it.
        eprintln!("nrun taps were there before the run: {taps_before:?}");
    }
}
