//! The warm-start cache: snapshots of guests booted up to the point where
//! they wait for their command, one per (kernel, initramfs, root image,
//! VMM, VM size, kernel command line), restored for each `--warm` run.
//!
//! An entry's key is a hash of the identity (path, size, mtime, inode) of
//! every file that went into the booted guest, so a rebuilt kernel or image
//! is a new key; the entry of the same files' older versions (same paths,
//! same VM size: the same "slot") is removed when the new one is made.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::images::hex;
use super::RunError;

/// Bumped when what a warm guest expects from its restore changes.
const WARM_FORMAT: u32 = 1;
const META_FILE: &str = "meta.json";

/// Everything that shapes a warm guest.
#[derive(Debug, Clone, Serialize)]
pub struct WarmInputs {
    pub vmm: String,
    pub kernel: String,
    pub initrd: String,
    pub root: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cmdline: String,
    pub net: bool,
    pub share_disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    format: u32,
    key: String,
    slot: String,
}

/// Where the cache is: `$NUBIS_RUN_CACHE`, else `$XDG_CACHE_HOME/nubis/run`,
/// else `~/.cache/nubis/run`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NUBIS_RUN_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir).join("nubis/run");
    }
    match std::env::var_os("HOME").filter(|home| !home.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/nubis/run"),
        None => std::env::temp_dir().join(format!(
            "nubis-run-cache-{}",
            // SAFETY: getuid has no preconditions and cannot fail.
            unsafe { libc::getuid() }
        )),
    }
}

fn digest(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes())[..16])
}

impl WarmInputs {
    /// The entry's key: every input, identities included.
    pub fn key(&self) -> String {
        digest(&format!(
            "{WARM_FORMAT}\n{}",
            serde_json::to_string(self).unwrap_or_default()
        ))
    }

    /// The slot: the same inputs without the files' versions (their paths
    /// only), so that a newer version of the same files replaces the entry.
    fn slot(&self) -> String {
        let path = |identity: &str| identity.split(" size=").next().unwrap_or("").to_string();
        digest(&format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            path(&self.vmm),
            path(&self.kernel),
            path(&self.initrd),
            path(&self.root),
            self.vcpus,
            self.memory_mib,
            self.net,
            self.share_disk_bytes
        ))
    }
}

/// The warm cache at `root`.
pub struct WarmCache {
    root: PathBuf,
}

impl WarmCache {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join(format!("warm-{key}"))
    }

    /// The snapshot directory of `inputs`, if one is cached and whole.
    pub fn lookup(&self, inputs: &WarmInputs) -> Option<PathBuf> {
        let key = inputs.key();
        let dir = self.entry_dir(&key);
        let meta: Meta = serde_json::from_slice(&fs::read(dir.join(META_FILE)).ok()?).ok()?;
        (meta.format == WARM_FORMAT
            && meta.key == key
            && dir.join(nubis_contract::snapshot::STATE_FILE).is_file()
            && dir.join(nubis_contract::snapshot::MEMORY_FILE).is_file())
        .then_some(dir)
    }

    /// A fresh directory for the VMM to write the snapshot of `inputs`
    /// into; [`WarmCache::commit`] makes it the entry.
    pub fn staging_dir(&self) -> Result<PathBuf, RunError> {
        fs::create_dir_all(&self.root).map_err(|source| RunError::Io {
            what: format!("create the warm cache {}", self.root.display()),
            source,
        })?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|time| time.subsec_nanos())
            .unwrap_or_default();
        Ok(self
            .root
            .join(format!(".staging-{}-{nanos}", std::process::id())))
    }

    /// Makes the snapshot in `staging` the entry of `inputs` and removes
    /// the entries it replaces. Another run that made the same entry first
    /// wins; this one's copy is dropped.
    pub fn commit(&self, staging: &Path, inputs: &WarmInputs) -> Result<PathBuf, RunError> {
        let key = inputs.key();
        let slot = inputs.slot();
        let meta = Meta {
            format: WARM_FORMAT,
            key: key.clone(),
            slot: slot.clone(),
        };
        let io = |what: String| move |source| RunError::Io { what, source };
        fs::write(
            staging.join(META_FILE),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )
        .map_err(io(format!("write {}", staging.display())))?;
        let dir = self.entry_dir(&key);
        if fs::rename(staging, &dir).is_err() {
            let _ = fs::remove_dir_all(staging);
        }
        for entry in fs::read_dir(&self.root)
            .map_err(io(format!("read {}", self.root.display())))?
            .flatten()
        {
            let path = entry.path();
            if path == dir {
                continue;
            }
            let stale = fs::read(path.join(META_FILE))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Meta>(&bytes).ok())
                .is_some_and(|other| other.slot == slot && other.key != key);
            if stale {
                let _ = fs::remove_dir_all(&path);
            }
        }
        Ok(dir)
    }

    /// Drops the entry of `inputs` (a snapshot that failed to restore).
    pub fn forget(&self, inputs: &WarmInputs) {
        let _ = fs::remove_dir_all(self.entry_dir(&inputs.key()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(kernel: &str) -> WarmInputs {
        WarmInputs {
            vmm: "/bin/nubis-vmm size=1".into(),
            kernel: kernel.into(),
            initrd: "/img/initramfs.cpio size=2".into(),
            root: "/img/rootfs.ext4 size=3".into(),
            vcpus: 1,
            memory_mib: 128,
            cmdline: "console=ttyS0".into(),
            net: false,
            share_disk_bytes: 1 << 30,
        }
    }

    #[test]
    fn keys_follow_every_input() {
        let base = inputs("/img/vmlinux size=10 mtime=1");
        let mut bigger = base.clone();
        bigger.memory_mib = 256;
        let mut rebuilt = base.clone();
        rebuilt.kernel = "/img/vmlinux size=10 mtime=2".into();
        assert_ne!(base.key(), bigger.key());
        assert_ne!(base.key(), rebuilt.key());
        assert_eq!(base.slot(), rebuilt.slot(), "same files, newer version");
        assert_ne!(base.slot(), bigger.slot());
    }

    #[test]
    fn an_entry_is_found_after_commit_and_replaced_by_a_newer_version() {
        let root = std::env::temp_dir().join(format!("nubis-warm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let cache = WarmCache::new(root.clone());
        let old = inputs("/img/vmlinux size=10 mtime=1");
        assert!(cache.lookup(&old).is_none());
        let make = |inputs: &WarmInputs| {
            let staging = cache.staging_dir().unwrap();
            fs::create_dir_all(&staging).unwrap();
            fs::write(staging.join(nubis_contract::snapshot::STATE_FILE), "s").unwrap();
            fs::write(staging.join(nubis_contract::snapshot::MEMORY_FILE), "m").unwrap();
            cache.commit(&staging, inputs).unwrap()
        };
        let old_dir = make(&old);
        assert_eq!(cache.lookup(&old), Some(old_dir.clone()));
        let new = inputs("/img/vmlinux size=10 mtime=2");
        let new_dir = make(&new);
        assert_eq!(cache.lookup(&new), Some(new_dir));
        assert!(!old_dir.exists(), "the older version's entry is gone");
        assert!(cache.lookup(&old).is_none());
        cache.forget(&new);
        assert!(cache.lookup(&new).is_none());
        fs::remove_dir_all(&root).unwrap();
    }
}
