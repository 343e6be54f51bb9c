//! The destination side of a live migration: a VMM that waits for the
//! source (`--migrate-listen` on this host's underlay address, with a
//! one-time token and the key that encrypts and authenticates the stream,
//! both in its environment), on the VM's taps and with its disk files to
//! receive.

use nubis_api::{Image, Vm, VmState};

use super::process::Launch;
use super::{Supervisor, SupervisorError, VmPaths};

/// In the source's agent VM directory from before its VMM is told to
/// migrate until the VM runs on here again (a failed or cancelled
/// migration) or is gone (a completed one): the destination host's name. A
/// VM with it is never started again here (two copies could run); an
/// agent that stopped mid-migration leaves it for the operator.
pub const MIGRATION_MARK: &str = "migrating-to";

/// Records that `paths`' VM is being handed over to `host`.
pub fn record_handover(paths: &VmPaths, host: &str) -> Result<(), SupervisorError> {
    let path = paths.dir.join(MIGRATION_MARK);
    let mut partial = path.clone().into_os_string();
    partial.push(".partial");
    std::fs::write(&partial, host)
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|source| SupervisorError::Files { path, source })
}

/// The host a hand-over of `paths`' VM was recorded to, if one was.
pub fn handed_over_to(paths: &VmPaths) -> Option<String> {
    std::fs::read_to_string(paths.dir.join(MIGRATION_MARK))
        .ok()
        .map(|host| host.trim().to_string())
}

/// The VM runs on here after all.
pub fn clear_handover(paths: &VmPaths) -> Result<(), SupervisorError> {
    let path = paths.dir.join(MIGRATION_MARK);
    match std::fs::remove_file(&path) {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
            Err(SupervisorError::Files { path, source })
        }
        _ => Ok(()),
    }
}

impl Supervisor {
    /// Starts the VMM that receives `vm` on `listen`; the VM is `starting`
    /// until the source reports the hand-over (see `incoming_done`).
    pub async fn receive(
        self: &std::sync::Arc<Self>,
        vm: &Vm,
        image: &Image,
        listen: &str,
        token: &str,
        key: &str,
    ) -> Result<u32, SupervisorError> {
        let paths = self.paths(&vm.id);
        let uid = self.jail_uid(&vm.id)?;
        self.plug_nics(vm, uid).await?;
        self.prepare_files(vm, image, &paths, true).await?;
        // Recorded first, as for a start (see `Supervisor::start`).
        self.store
            .set_vm_state(&vm.id, VmState::Starting, None, None)?;
        let spawned = self
            .spawn_jailed(
                vm,
                image,
                &paths,
                uid,
                &Launch::Receive { listen, token, key },
            )
            .await?;
        let pid = spawned.pid;
        self.store
            .set_vm_state(&vm.id, VmState::Starting, Some(pid), None)?;
        self.event(
            &vm.id,
            "migrating_in",
            &format!("VMM pid {pid} waits on {listen}"),
        );
        self.watch(vm.id.clone(), spawned.watch);
        Ok(pid)
    }

    /// The source has handed the VM over: it runs here now.
    pub fn incoming_done(&self, vm: &Vm, from: &str) -> Result<(), SupervisorError> {
        self.store
            .set_vm_state(&vm.id, VmState::Running, vm.pid, None)?;
        self.event(
            &vm.id,
            "migrated_in",
            &format!("running here, moved from {from}"),
        );
        Ok(())
    }

    /// The migration failed: the receiving VMM goes (if it still runs).
    pub async fn incoming_abort(&self, vm: &Vm) -> Result<(), SupervisorError> {
        if vm.state.has_process() {
            self.stop(vm, true).await?;
        }
        self.remove_files(vm)?;
        Ok(())
    }
}
