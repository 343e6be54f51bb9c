//! Helpers for Nubis's end-to-end tests: finding the binaries and guest
//! images, running a VMM and watching its console, and building the tiny
//! test guests (a few dozen bytes of x86-64 code in an ELF file) that check
//! one VMM feature in milliseconds instead of a 30-second Linux boot.
//!
//! Every KVM test calls [`require_kvm`] first: without `/dev/kvm` or root the
//! test fails with a message saying so. It never skips silently.

pub mod agent;
pub mod cluster;
pub mod etcd;
pub mod guest;
pub mod net;
pub mod netns;
pub mod vm;
pub mod vsock;

use std::path::{Path, PathBuf};

/// Fails the test unless this process can use KVM as the tests need it.
pub fn require_kvm() {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        panic!("KVM tests need /dev/kvm, which does not exist on this machine");
    }
    if let Err(err) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        panic!("KVM tests need read/write access to /dev/kvm: {err}");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("KVM tests need root (tap devices, bridges, namespaces): run them as root");
    }
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A program built from this workspace, next to the running test binary.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary under target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so that it is built",
        path.display()
    );
    path
}

/// The `nubis-vmm` binary under test.
pub fn vmm_binary() -> PathBuf {
    workspace_binary("nubis-vmm")
}

/// The guest images built by `guest-images/build.sh`.
pub struct GuestImages {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub initramfs_gz: PathBuf,
    pub rootfs: PathBuf,
    /// The kernel arguments the images need.
    pub cmdline: String,
}

/// Locates the guest images (`NUBIS_IMAGES` or `guest-images/out`).
pub fn guest_images() -> GuestImages {
    let dir = std::env::var_os("NUBIS_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("guest-images/out"));
    let file = |name: &str| {
        let path = dir.join(name);
        assert!(
            path.exists(),
            "guest image {} is missing: build the images with guest-images/build.sh",
            path.display()
        );
        path
    };
    let cmdline = std::fs::read_to_string(file("cmdline"))
        .expect("readable guest-images cmdline")
        .trim()
        .to_string();
    GuestImages {
        vmlinux: file("vmlinux"),
        bzimage: file("bzImage"),
        initramfs: file("initramfs.cpio"),
        initramfs_gz: file("initramfs.cpio.gz"),
        rootfs: file("rootfs.ext4"),
        cmdline,
    }
}

/// A fresh directory for one test's files, removed when dropped.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("nubis-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the test directory");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("NUBIS_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
