//! Snapshots of running or paused VMs: the VMM writes memory and state
//! while the VM is paused, the agent clones its disks before it runs again
//! (so that disks and memory agree), and a VM restored from the snapshot
//! starts its VMM with `--restore` on the snapshot's files.

use std::path::{Path, PathBuf};

use nubis_api::{Vm, VmState};

use super::{control, data_disk_name, jail, Supervisor, SupervisorError, ROOT_DISK};
use crate::disks;

impl Supervisor {
    /// Where snapshot `id`'s files are.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("snapshots").join(id)
    }

    /// Takes snapshot `id` of `vm` (running or paused; a running VM is
    /// paused meanwhile and runs on after); returns the bytes its files
    /// take. A failed snapshot leaves no files and the VM as it was.
    pub async fn snapshot(&self, vm: &Vm, id: &str) -> Result<u64, SupervisorError> {
        if !matches!(vm.state, VmState::Running | VmState::Paused) {
            return Err(SupervisorError::WrongState(vm.state.as_str()));
        }
        let dir = self.snapshot_dir(id);
        let socket = self.paths(&vm.id).control;
        let was_running = vm.state == VmState::Running;
        if was_running {
            control::command(&socket, "pause").await?;
        }
        let taken = self.save(vm, &socket, &dir).await;
        if was_running {
            if let Err(err) = control::command(&socket, "resume").await {
                tracing::error!(vm = %vm.id, "cannot resume after the snapshot: {err}");
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
    async fn save(&self, vm: &Vm, socket: &Path, dir: &Path) -> Result<(), SupervisorError> {
        // The jailed VMM writes into its own VM directory (the only place it
        // can); the files then move to the snapshot store.
        let paths = self.paths(&vm.id);
        let out = jail::snapshot_out(&paths, self.jail_uid(&vm.id)?)?;
        let inside = Path::new(jail::VM_DIR).join(jail::SNAPSHOT_OUT);
        control::request(
            socket,
            serde_json::json!({"command": "snapshot", "dir": inside}),
        )
        .await?;
        let store = self.config.data_dir.join("snapshots");
        let moved = std::fs::create_dir_all(&store)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700))
            })
            .and_then(|()| std::fs::rename(&out, dir));
        moved.map_err(|source| SupervisorError::Files {
            path: dir.to_path_buf(),
            source,
        })?;
        jail::seal_snapshot(dir)?;
        let mut copies = vec![(paths.root_disk.clone(), dir.join(ROOT_DISK))];
        for index in 0..vm.disks.len() {
            copies.push((paths.data_disk(index), dir.join(data_disk_name(index))));
        }
        for (source, target) in copies {
            let shown = target.clone();
            tokio::task::spawn_blocking(move || disks::clone_disk(&source, &target))
                .await
                .map_err(|err| SupervisorError::Files {
                    path: shown,
                    source: std::io::Error::other(err.to_string()),
                })??;
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
