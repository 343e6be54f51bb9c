//! The destination side of a live migration: a VMM that waits for the
//! source (`--migrate-listen` on this host's underlay address, with a
//! one-time token), on the VM's taps and with its disk files to receive.

use nubis_api::{Image, Vm, VmState};

use super::process::Launch;
use super::{Supervisor, SupervisorError};

impl Supervisor {
    /// Starts the VMM that receives `vm` on `listen`; the VM is `starting`
    /// until the source reports the hand-over (see `incoming_done`).
    pub async fn receive(
        self: &std::sync::Arc<Self>,
        vm: &Vm,
        image: &Image,
        listen: &str,
        token: &str,
    ) -> Result<u32, SupervisorError> {
        let paths = self.paths(&vm.id);
        let uid = self.jail_uid(&vm.id)?;
        self.plug_nics(vm, uid).await?;
        self.prepare_files(vm, image, &paths, true).await?;
        let spawned = self
            .spawn_jailed(vm, image, &paths, uid, &Launch::Receive { listen, token })
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
