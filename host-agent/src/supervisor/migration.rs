//! The destination side of a live migration: a VMM that waits for the
//! source (`--migrate-listen` on this host's underlay address, with a
//! one-time token and the key that encrypts and authenticates the stream,
//! both in its environment), on the VM's taps and with its disk files to
//! receive.

use nubis_api::VmState;

use crate::store::VmRow;

use super::process::Launch;
use super::{Supervisor, SupervisorError, VmPaths};
use crate::store::ImageRow;

/// In the source's agent VM directory from before its VMM is told to
/// migrate until the VM runs on here again (a failed or cancelled
/// migration) or is gone (a completed one): the destination host's name. A
/// VM with it is never started again here (two copies could run); an
/// agent that stopped mid-migration leaves it for the operator.
pub const MIGRATION_MARK: &str = "migrating-to";

/// How the `created` event of a VM received from another host begins
/// (followed by the source's address).
pub const RECEIVED_FROM: &str = "migrating in from ";

/// Whether a receiving VMM's log shows the hand-over (its first lines: the
/// VMM logs "handed over" before the guest runs, so a VMM that ran the
/// guest says so near the top, however long it ran).
pub fn log_shows_handover(vmm_log: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = Vec::new();
    let read =
        std::fs::File::open(vmm_log).and_then(|file| file.take(64 * 1024).read_to_end(&mut head));
    // An unreadable log proves nothing: take the VM as handed over (kept).
    read.is_err() || String::from_utf8_lossy(&head).contains(HANDED_OVER_IN_LOG)
}

/// What a receiving VMM logs once the VM is handed over to it
/// (vmm/src/migration/destination.rs).
const HANDED_OVER_IN_LOG: &str = "handed over";

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
        vm: &VmRow,
        image: &ImageRow,
        listen: &str,
        token: &str,
        key: &str,
    ) -> Result<u32, SupervisorError> {
        let paths = self.paths(&vm.id);
        let uid = self.jail_uid(&vm.id)?;
        self.network.plug_nics(vm, uid).await?;
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
    pub fn incoming_done(&self, vm: &VmRow, from: &str) -> Result<(), SupervisorError> {
        self.store
            .set_vm_state(&vm.id, VmState::Running, vm.pid, None)?;
        self.event(
            &vm.id,
            "migrated_in",
            &format!("running here, moved from {from}"),
        );
        Ok(())
    }

    /// Whether VM `vm_id` is a copy received from another host that never
    /// ran here: no hand-over was recorded and it was never started.
    pub fn never_ran_here(&self, vm_id: &str) -> Result<bool, SupervisorError> {
        let events = self.store.events(vm_id)?;
        let received = events
            .iter()
            .any(|event| event.kind == "created" && event.message.starts_with(RECEIVED_FROM));
        Ok(received
            && events
                .iter()
                .all(|event| event.kind != "migrated_in" && event.kind != "running"))
    }

    /// Drops the record and files of VM `vm_id` when it is a copy whose
    /// receiving VMM ended without a hand-over (it never ran here, and its
    /// source runs it): nothing of a failed migration stays on the
    /// destination to count against the tenant's quota, whether the
    /// source could tell it to drop its copy or not. Anything else is left
    /// as it is.
    pub async fn forget_unreceived(&self, vm_id: &str) -> Result<(), SupervisorError> {
        let _guard = self.lock(vm_id).await;
        let Some(vm) = self.store.get_vm(None, vm_id)? else {
            return Ok(());
        };
        if vm.state.has_process() || !self.never_ran_here(vm_id)? {
            return Ok(());
        }
        self.remove_files(&vm)?;
        self.store.delete_vm(vm_id)?;
        tracing::info!(vm = %vm_id, "dropped a migrated-in copy that was never handed over");
        Ok(())
    }

    /// The migration failed: the receiving VMM goes (if it still runs).
    pub async fn incoming_abort(&self, vm: &VmRow) -> Result<(), SupervisorError> {
        if vm.state.has_process() {
            self.stop(vm, true).await?;
        }
        self.remove_files(vm)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_shows_the_handover_only_when_the_vmm_logged_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(
            &log,
            "[nubis-vmm 1.0 ms INFO ] waiting for a migration on 10.0.0.1:40000\n\
             [nubis-vmm 9.0 ms INFO ] migration from 10.0.0.2:51234\n",
        )
        .unwrap();
        assert!(!log_shows_handover(&log));
        let mut text = std::fs::read_to_string(&log).unwrap();
        text.push_str("[nubis-vmm 20.0 ms INFO ] migration from 10.0.0.2:51234 handed over\n");
        // However long the guest then ran.
        text.push_str(&"[nubis-vmm 30.0 ms INFO ] later\n".repeat(10_000));
        std::fs::write(&log, text).unwrap();
        assert!(log_shows_handover(&log));
        // An unreadable log proves nothing: the copy is kept.
        assert!(log_shows_handover(&dir.path().join("missing.log")));
    }

    #[test]
    fn only_the_not_received_exit_drops_a_copy() {
        use super::super::process::VmmExit;
        use nubis_contract::exit::EXIT_NOT_RECEIVED;
        assert!(VmmExit::Code(EXIT_NOT_RECEIVED).is_not_received());
        for other in [
            VmmExit::Code(0),
            VmmExit::Code(1),
            VmmExit::Code(2),
            VmmExit::Signal(9),
            VmmExit::Unknown,
        ] {
            assert!(!other.is_not_received(), "{other:?}");
        }
        let (state, reason) = VmmExit::Code(EXIT_NOT_RECEIVED).describe("the source went silent");
        assert_eq!(state, VmState::Failed);
        assert!(
            reason.contains("not received: the source went silent"),
            "{reason}"
        );
    }
}
