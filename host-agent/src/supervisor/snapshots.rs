//! Snapshots of running or paused VMs: the VMM writes memory and state
//! while the VM is paused, the agent clones its disks before it runs again
//! (so that disks and memory agree), and a VM restored from the snapshot
//! starts its VMM with `--restore` on the snapshot's files.

use std::path::{Path, PathBuf};

use nubis_api::VmState;

use crate::store::VmRow;

use super::control::VmmClient;
use super::vmfs::Dir;
use super::{jail, Supervisor, SupervisorError, VmPaths, AGENT_PAUSED};
use crate::disks;

impl Supervisor {
    /// Where snapshot `id`'s files are.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("snapshots").join(id)
    }

    /// Takes snapshot `id` of `vm` (running or paused; a running VM is
    /// paused meanwhile and runs on after); returns the bytes its files
    /// take. A failed snapshot leaves no files and the VM as it was.
    pub async fn snapshot(&self, vm: &VmRow, id: &str) -> Result<u64, SupervisorError> {
        if !matches!(vm.state, VmState::Running | VmState::Paused) {
            return Err(SupervisorError::WrongState(vm.state.as_str()));
        }
        let dir = self.snapshot_dir(id);
        let vmm = self.vmm(&vm.id);
        let was_running = vm.state == VmState::Running;
        // Recorded before the pause: a restarted agent resumes the VM.
        let paused_mark = self.paths(&vm.id).dir.join(AGENT_PAUSED);
        if was_running {
            std::fs::write(&paused_mark, id).map_err(|source| SupervisorError::Files {
                path: paused_mark.clone(),
                source,
            })?;
            if let Err(err) = vmm.pause().await {
                let _ = std::fs::remove_file(&paused_mark);
                return Err(err.into());
            }
            crate::crash::point("snapshot_paused");
        }
        let taken = self.save(vm, &vmm, &dir).await;
        if was_running {
            match vmm.resume().await {
                Ok(_) => {
                    let _ = std::fs::remove_file(&paused_mark);
                }
                Err(err) => {
                    tracing::error!(vm = %vm.id, "cannot resume after the snapshot: {err}")
                }
            }
        }
        match taken {
            Ok(()) => {
                let size = disk_usage(&dir);
                self.event(&vm.id, "snapshot", &format!("snapshot {id}: {size} bytes"));
                Ok(size)
            }
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(err)
            }
        }
    }

    /// Memory and state through the VMM, then the disks, while paused.
    async fn save(&self, vm: &VmRow, vmm: &VmmClient, dir: &Path) -> Result<(), SupervisorError> {
        // The jailed VMM writes into its own VM directory (the only place it
        // can); the files then move to the snapshot store, where they are
        // checked (see `jail::seal_snapshot`).
        let paths = self.paths(&vm.id);
        let uid = self.jail_uid(&vm.id)?;
        let jail_dir = Dir::open(&paths.jail)?;
        jail::snapshot_out(&jail_dir, uid)?;
        let inside = Path::new(jail::VM_DIR).join(jail::SNAPSHOT_OUT);
        vmm.snapshot(&inside).await?;
        let store = self.config.data_dir.join("snapshots");
        std::fs::create_dir_all(&store)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| SupervisorError::Files {
                path: store.clone(),
                source,
            })?;
        let store_dir = Dir::open(&store)?;
        let name = dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        jail_dir.rename_to(jail::SNAPSHOT_OUT, &store_dir, &name, true)?;
        jail::seal_snapshot(dir, uid)?;
        let names = VmPaths::disk_names(vm);
        let snapshot = dir.to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<(), SupervisorError> {
            let target_dir = Dir::open(&snapshot)?;
            for name in names {
                // The VM's disk, only as a regular file of its user.
                let input = jail_dir.open_file(&name, libc::O_RDONLY, uid)?;
                let output = target_dir.create_new(&name, 0o644)?;
                disks::copy_file(
                    input,
                    &jail_dir.join(&name),
                    output,
                    &target_dir.join(&name),
                )?;
            }
            Ok(())
        })
        .await
        .map_err(|err| SupervisorError::Files {
            path: dir.to_path_buf(),
            source: std::io::Error::other(err.to_string()),
        })??;
        Ok(())
    }

    /// Removes the files of snapshots that have no record: an agent that
    /// stopped after writing them and before recording them (see
    /// `http/snapshots.rs`). Run at start, before any snapshot is taken.
    pub fn sweep_snapshots(&self) -> Result<(), SupervisorError> {
        let store = self.config.data_dir.join("snapshots");
        let Ok(entries) = std::fs::read_dir(&store) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if self.store.get_snapshot(None, &id)?.is_none() {
                tracing::warn!(snapshot = %id, "removing the files of an unrecorded snapshot");
                let path = entry.path();
                let removed = match entry.file_type() {
                    Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&path),
                    _ => std::fs::remove_file(&path),
                };
                removed.map_err(|source| SupervisorError::Files { path, source })?;
            }
        }
        Ok(())
    }

    /// Removes snapshot `id`'s files.
    pub fn remove_snapshot_files(&self, id: &str) -> Result<(), SupervisorError> {
        let dir = self.snapshot_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(SupervisorError::Files {
                path: dir,
                source: err,
            }),
            _ => Ok(()),
        }
    }
}

/// Bytes the files in `dir` take on disk (sparse files count what they hold).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.metadata().ok())
                .map(|metadata| metadata.blocks() * 512)
                .sum()
        })
        .unwrap_or_default()
}
