//! Running VMs: one `nubis-vmm` process per VM, in its own process group
//! with its files in `DATA_DIR/vms/ID/`, so that it outlives the agent: an
//! agent that restarts adopts the VMMs still running and records why the
//! others ended.
//!
//! `DATA_DIR/vms/ID/` is root's (0700): what the agent writes (the VMM
//! config, the VMM log, the jailer's pid file). What the jailed VMM writes
//! (disks, console log, control socket, snapshot output) is in its `vm/`
//! subdirectory, the VM user's and `/vm` in the jail; the agent reaches
//! files there only through `vmfs` (no link followed, see vmfs.rs).
//!
//! Operations on one VM are serialized by a per-VM lock; different VMs
//! proceed in parallel. A watcher task per VMM records its exit.

pub mod console;
pub mod control;
pub mod guest_agent;
pub mod jail;
pub mod migration;
mod process;
pub mod snapshots;
pub mod vmfs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a clone's guest agent has to take its new identity.
const IDENTITY_PATIENCE: Duration = Duration::from_secs(60);

use nubis_api::{RateLimit, VmState};
use nubis_contract::config::{
    BootConfig, DiskConfig, MacAddr, MachineConfig, NetConfig, SerialConfig, VmConfig, VsockConfig,
    CONFIG_VERSION,
};
use tokio::sync::{watch, OwnedMutexGuard};

use crate::config::AgentConfig;
use crate::disks::DiskError;
use crate::network::dhcp_server::DhcpServerError;
use crate::network::firewall::FirewallError;
use crate::network::host::{HostNetworkError, LinuxNetwork};
use crate::network::{self, NetworkError};
use crate::store::{ImageRow, NetworkRow, Store, StoreError, VmRow};
use control::{ControlError, VmmClient};
use process::{ExitWatch, VmmExit};

/// Errors of VM operations.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Dhcp(#[from] DhcpServerError),
    #[error("cannot prepare the VM's files in {path}: {source}")]
    Files {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    VmFiles(#[from] vmfs::VmFsError),
    #[error("cannot write VM {vm}'s VMM config: {reason}")]
    VmmConfig { vm: String, reason: String },
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM exited during start-up: {0}")]
    StartFailed(String),
    #[error("the VM is {0}, which does not allow this")]
    WrongState(&'static str),
    #[error(
        "the VM was being migrated to host '{0}' when this agent stopped: it may run there now, \
         so it is not started here; check that host, then delete the VM here or there (an \
         operator's DELETE of its migration clears this)"
    )]
    MigratedAway(String),
    #[error(
        "network {0} spans hosts, but this agent has no underlay address (--underlay-address)"
    )]
    NoUnderlay(String),
}

/// The host network's errors keep the variants (and so the answers) they
/// had when the supervisor shaped the network itself.
impl From<HostNetworkError> for SupervisorError {
    fn from(error: HostNetworkError) -> Self {
        match error {
            HostNetworkError::Store(err) => Self::Store(err),
            HostNetworkError::Network(err) => Self::Network(err),
            HostNetworkError::Firewall(err) => Self::Firewall(err),
            HostNetworkError::Dhcp(err) => Self::Dhcp(err),
            HostNetworkError::NoUnderlay(network) => Self::NoUnderlay(network),
            HostNetworkError::NetworkGone(network) => {
                Self::StartFailed(format!("the VM's network {network} is gone"))
            }
        }
    }
}

/// Where one VM's files live.
pub struct VmPaths {
    /// The agent's own (root's): config, VMM log, pid file.
    pub dir: PathBuf,
    /// The jailed VMM's (its user's, `/vm` in the jail): disks, console,
    /// control socket.
    pub jail: PathBuf,
    pub vmm_config: PathBuf,
    pub control: PathBuf,
    pub console: PathBuf,
    /// The vsock device's socket: the agent connects to guest ports here.
    pub vsock: PathBuf,
    pub vmm_log: PathBuf,
    pub root_disk: PathBuf,
}

/// The subdirectory of a VM's directory that its jailed VMM writes.
pub const JAIL_SUBDIR: &str = "vm";
pub const CONFIG: &str = "vm.json";
pub const CONTROL: &str = "control.sock";
pub const CONSOLE: &str = "console.log";
pub const VSOCK: &str = "vsock.sock";
/// Every VM's vsock context id: each VM has a device of its own, so the
/// ids need not differ between VMs (as with Firecracker).
pub const GUEST_CID: u32 = 3;
pub const VMM_LOG: &str = "vmm.log";

impl VmPaths {
    /// The files of a VM whose directory is `dir`.
    pub fn under(dir: PathBuf) -> Self {
        Self::with(dir.clone(), dir.join(JAIL_SUBDIR), dir.join(CONFIG))
    }

    /// The files of a VM whose agent directory is `dir`, jailed VMM's
    /// directory `jail` and VMM config `config`.
    pub fn with(dir: PathBuf, jail: PathBuf, config: PathBuf) -> Self {
        Self {
            vmm_config: config,
            control: jail.join(CONTROL),
            console: jail.join(CONSOLE),
            vsock: jail.join(VSOCK),
            vmm_log: dir.join(VMM_LOG),
            root_disk: jail.join(ROOT_DISK),
            jail,
            dir,
        }
    }

    pub fn data_disk(&self, index: usize) -> PathBuf {
        self.jail.join(data_disk_name(index))
    }

    /// The names of the VM's disk files in its jail directory.
    pub fn disk_names(vm: &VmRow) -> Vec<String> {
        std::iter::once(ROOT_DISK.to_string())
            .chain((0..vm.disks.len()).map(data_disk_name))
            .collect()
    }
}

/// In the agent's VM directory while a snapshot has the VM paused: a
/// restarted agent resumes the VM.
pub const AGENT_PAUSED: &str = "snapshot-paused";

/// The root disk's file name, in a VM's directory and in a snapshot's.
pub const ROOT_DISK: &str = "root.raw";

/// Data disk `index`'s file name, in a VM's directory and in a snapshot's.
pub fn data_disk_name(index: usize) -> String {
    format!("data{index}.raw")
}

fn source_name(saved: &Option<PathBuf>, image_rootfs: &str) -> String {
    match saved {
        Some(dir) => dir.join(ROOT_DISK).display().to_string(),
        None => image_rootfs.to_string(),
    }
}

pub struct Supervisor {
    store: Arc<Store>,
    config: AgentConfig,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Exit notifications of the VMMs being watched, by VM id.
    exits: Mutex<HashMap<String, watch::Receiver<Option<VmmExit>>>>,
    /// The host's network: the VMs' taps, and the rules after a change.
    network: Arc<LinuxNetwork>,
}

impl Supervisor {
    /// The VM runner; it plugs VMs' taps into `network`.
    pub fn new(store: Arc<Store>, config: AgentConfig, network: Arc<LinuxNetwork>) -> Arc<Self> {
        Arc::new(Self {
            config,
            locks: Mutex::new(HashMap::new()),
            exits: Mutex::new(HashMap::new()),
            network,
            store,
        })
    }

    /// The settings the agent runs with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// This host's end of the overlay's tunnels, when configured.
    pub fn underlay_address(&self) -> Option<std::net::Ipv4Addr> {
        self.config.underlay_address
    }

    /// Makes the host's bridges, packet filter and DHCP servers match the
    /// database (see `network::host`).
    pub async fn reconcile_network(&self) -> Result<(), SupervisorError> {
        Ok(self.network.reconcile().await?)
    }

    pub fn paths(&self, vm_id: &str) -> VmPaths {
        VmPaths::under(self.config.data_dir.join("vms").join(vm_id))
    }

    /// A client of VM `vm_id`'s VMM (its control socket).
    pub fn vmm(&self, vm_id: &str) -> VmmClient {
        VmmClient::new(self.paths(vm_id).control)
    }

    /// VM `vm_id`'s own user and group in its jail.
    fn jail_uid(&self, vm_id: &str) -> Result<u32, SupervisorError> {
        let jail = &self.config.jail;
        Ok(self.store.jail_uid(vm_id, jail.uid_first, jail.uid_count)?)
    }

    /// Starts `vm`'s VMM in its jail.
    async fn spawn_jailed(
        &self,
        vm: &VmRow,
        image: &ImageRow,
        paths: &VmPaths,
        uid: u32,
        launch: &process::Launch<'_>,
    ) -> Result<process::Spawned, SupervisorError> {
        let command = jail::command(
            &self.config.jail,
            &self.config.vmm_binary,
            vm,
            image,
            paths,
            uid,
            launch,
        );
        process::spawn(command, paths).await
    }

    /// Serializes operations on one VM.
    pub async fn lock(&self, vm_id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(vm_id.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    fn event(&self, vm_id: &str, kind: &str, message: &str) {
        if let Err(err) = self.store.add_event(vm_id, kind, message) {
            tracing::warn!(vm = vm_id, "cannot record event {kind}: {err}");
        }
    }

    /// Starts a stopped or failed VM: disks, VMM config, process, watcher.
    /// Returns once the VMM answers on its control socket.
    pub async fn start(
        self: &Arc<Self>,
        vm: &VmRow,
        image: &ImageRow,
    ) -> Result<(), SupervisorError> {
        if vm.state.has_process() {
            return Err(SupervisorError::WrongState(vm.state.as_str()));
        }
        let paths = self.paths(&vm.id);
        if let Some(host) = migration::handed_over_to(&paths) {
            return Err(SupervisorError::MigratedAway(host));
        }
        let began = std::time::Instant::now();
        let uid = self.jail_uid(&vm.id)?;
        // Taps and files do not depend on each other.
        let (plugged, prepared) = tokio::try_join!(
            async {
                self.network.plug_nics(vm, uid).await?;
                Ok::<_, SupervisorError>(began.elapsed())
            },
            async {
                self.prepare_files(vm, image, &paths, false).await?;
                Ok(began.elapsed())
            }
        )?;
        let restore = vm.restore_from.as_deref().map(|id| self.snapshot_dir(id));
        let launch = match &restore {
            Some(dir) => process::Launch::Restore {
                dir,
                clone: vm.restore_as_clone,
            },
            None => process::Launch::Boot,
        };
        // Recorded first: an agent that stops before the pid is recorded
        // finds the VMM in its cgroup when it restarts (see `adopt_all`).
        self.store
            .set_vm_state(&vm.id, VmState::Starting, None, None)?;
        let spawned = match self.spawn_jailed(vm, image, &paths, uid, &launch).await {
            Ok(spawned) => spawned,
            Err(err) => {
                self.store.set_vm_state(&vm.id, vm.state, None, None)?;
                return Err(err);
            }
        };
        crate::crash::point("vm_spawned");
        let spawned_after = began.elapsed();
        let pid = spawned.pid;
        self.store
            .set_vm_state(&vm.id, VmState::Starting, Some(pid), None)?;
        self.event(&vm.id, "starting", &format!("VMM pid {pid}"));
        let exit = self.watch(vm.id.clone(), spawned.watch);
        match process::wait_for_control(&paths.control, exit).await {
            Ok(()) => {
                tracing::debug!(
                    vm = %vm.id,
                    "VMM answering {} ms after the start began: taps {} ms, files {} ms, jailed VMM spawned {} ms",
                    began.elapsed().as_millis(),
                    plugged.as_millis(),
                    prepared.as_millis(),
                    spawned_after.as_millis()
                );
                self.store
                    .set_vm_state(&vm.id, VmState::Running, Some(pid), None)?;
                self.event(&vm.id, "running", "the VMM answers on its control socket");
                if let Some(snapshot) = &vm.restore_from {
                    // Resumed once; from now on the VM boots from its disk.
                    let mut resumed = vm.clone();
                    resumed.restore_from = None;
                    resumed.restore_as_clone = false;
                    self.store.set_vm_spec(&resumed)?;
                    self.event(
                        &vm.id,
                        "restored",
                        &format!("resumed from snapshot {snapshot}"),
                    );
                    if vm.restore_as_clone {
                        self.give_identity(vm)?;
                    }
                }
                Ok(())
            }
            Err(reason) => Err(SupervisorError::StartFailed(reason)),
        }
    }

    /// The VM's directories, disks and VMM config; a VM `receiving` a
    /// migration gets its disks from the source instead.
    async fn prepare_files(
        &self,
        vm: &VmRow,
        image: &ImageRow,
        paths: &VmPaths,
        receiving: bool,
    ) -> Result<(), SupervisorError> {
        let uid = self.jail_uid(&vm.id)?;
        let (dir, jail_dir) = jail::vm_dirs(paths, uid)?;
        jail::clear_leftovers(&jail_dir, uid)?;
        console::rotate(&paths.dir, &jail_dir, uid, console::CONSOLE_CAP)?;
        if !receiving {
            // A VM restored from a snapshot starts from the snapshot's disks.
            let saved = vm.restore_from.as_deref().map(|id| self.snapshot_dir(id));
            let mut sources = vec![jail::DiskSource::Copy(match &saved {
                Some(dir) => dir.join(ROOT_DISK),
                None => PathBuf::from(&image.rootfs),
            })];
            for (index, disk) in vm.disks.iter().enumerate() {
                sources.push(match &saved {
                    Some(dir) => jail::DiskSource::Copy(dir.join(data_disk_name(index))),
                    None => jail::DiskSource::Empty(disk.size_mib),
                });
            }
            let names = VmPaths::disk_names(vm);
            let made = tokio::task::spawn_blocking(move || {
                names
                    .iter()
                    .zip(sources)
                    .map(|(name, source)| jail::prepare_disk(&dir, &jail_dir, name, uid, source))
                    .collect::<Result<Vec<bool>, SupervisorError>>()
            })
            .await
            .map_err(|err| SupervisorError::Files {
                path: paths.jail.clone(),
                source: std::io::Error::other(err.to_string()),
            })??;
            if made.first() == Some(&true) {
                self.event(
                    &vm.id,
                    "root_disk",
                    &format!("cloned from {}", source_name(&saved, &image.rootfs)),
                );
            }
        }
        self.write_vmm_config(vm, image, paths)
    }

    fn write_vmm_config(
        &self,
        vm: &VmRow,
        image: &ImageRow,
        paths: &VmPaths,
    ) -> Result<(), SupervisorError> {
        let networks = vm
            .nics
            .iter()
            .map(|nic| match &nic.network {
                Some(id) => self.store.get_network(None, id),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The VMM reads it in its jail, where the paths are the jail's.
        let config = vmm_config(
            vm,
            &jail::inside_image(image),
            &jail::inside_paths(),
            &networks,
        )?;
        let text = serde_json::to_string(&config).map_err(|err| SupervisorError::VmmConfig {
            vm: vm.id.clone(),
            reason: err.to_string(),
        })?;
        // In the agent's own directory: written whole, then renamed over
        // the old one.
        let mut partial = paths.vmm_config.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &paths.vmm_config))
            .map_err(|source| SupervisorError::Files {
                path: paths.vmm_config.clone(),
                source,
            })
    }

    /// Records the VMM's exit when it comes.
    fn watch(self: &Arc<Self>, vm_id: String, exit: ExitWatch) -> watch::Receiver<Option<VmmExit>> {
        let (sender, receiver) = watch::channel(None);
        self.exits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm_id.clone(), receiver.clone());
        let supervisor = self.clone();
        tokio::spawn(async move {
            let exit = exit.wait().await;
            let log_tail = process::last_log_line(&supervisor.paths(&vm_id).vmm_log);
            let (state, reason) = exit.describe(&log_tail);
            tracing::info!(vm = %vm_id, "VMM exited: {reason}");
            if let Err(err) = supervisor
                .store
                .set_vm_state(&vm_id, state, None, Some(&reason))
            {
                tracing::error!(vm = %vm_id, "cannot record the VMM's exit: {err}");
            }
            if let Ok(Some(vm)) = supervisor.store.get_vm(None, &vm_id) {
                supervisor.network.unplug_nics(&vm_id, vm.nics.len()).await;
            }
            supervisor.clean_jail(&vm_id).await;
            supervisor.event(&vm_id, "exited", &reason);
            let _ = sender.send(Some(exit));
            if exit.is_not_received() {
                // After the exit is known: whoever waits for it (an abort
                // holding the VM's lock) goes first.
                if let Err(err) = supervisor.forget_unreceived(&vm_id).await {
                    tracing::error!(vm = %vm_id, "cannot drop the copy that was not received: {err}");
                }
                if let Err(err) = supervisor.reconcile_network().await {
                    tracing::error!(vm = %vm_id, "cannot update the network after dropping the copy: {err}");
                }
            }
        });
        receiver
    }

    /// Removes what VM `vm_id`'s finished jail left (its cgroups, its
    /// root's mount point).
    async fn clean_jail(&self, vm_id: &str) {
        let jail = &self.config.jail;
        let outcome = tokio::process::Command::new(&jail.jailer_binary)
            .env_clear()
            .args([
                "--cleanup",
                "--id",
                vm_id,
                "--parent-cgroup",
                &jail.parent_cgroup,
            ])
            .arg("--chroot-base-dir")
            .arg(&jail.jail_dir)
            .stdin(Stdio::null())
            .output()
            .await;
        match outcome {
            Ok(output) if output.status.success() => {}
            Ok(output) => tracing::warn!(
                vm = vm_id,
                "jail cleanup failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(err) => tracing::warn!(vm = vm_id, "cannot run the jail cleanup: {err}"),
        }
    }

    fn exit_receiver(&self, vm_id: &str) -> Option<watch::Receiver<Option<VmmExit>>> {
        self.exits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm_id)
            .cloned()
    }

    /// Waits up to `timeout` for the VM's VMM to exit.
    async fn wait_exit(&self, vm_id: &str, timeout: Duration) -> bool {
        let Some(mut receiver) = self.exit_receiver(vm_id) else {
            return true;
        };
        let exited = tokio::time::timeout(timeout, receiver.wait_for(|exit| exit.is_some()))
            .await
            .is_ok_and(|result| result.is_ok());
        exited
    }

    /// Stops a VM: Ctrl-Alt-Del and up to the stop timeout for the guest,
    /// then the VMM's `stop`, then SIGKILL. `force` skips the guest.
    pub async fn stop(&self, vm: &VmRow, force: bool) -> Result<(), SupervisorError> {
        if !vm.state.has_process() {
            return Err(SupervisorError::WrongState(vm.state.as_str()));
        }
        let vmm = self.vmm(&vm.id);
        self.store
            .set_vm_state(&vm.id, VmState::Stopping, vm.pid, None)?;
        if !force {
            if vm.state == VmState::Paused {
                let _ = vmm.resume().await;
            }
            match vmm.shutdown().await {
                Ok(_) => {
                    self.event(&vm.id, "stopping", "sent Ctrl-Alt-Del to the guest");
                    let timeout = Duration::from_secs(self.config.stop_timeout_s);
                    if self.wait_exit(&vm.id, timeout).await {
                        return Ok(());
                    }
                    self.event(
                        &vm.id,
                        "stopping",
                        "the guest did not stop in time: forcing",
                    );
                }
                Err(err) => self.event(&vm.id, "stopping", &format!("graceful stop failed: {err}")),
            }
        }
        if vmm.stop().await.is_ok() && self.wait_exit(&vm.id, Duration::from_secs(10)).await {
            self.event(&vm.id, "stopped", "forced stop through the control socket");
            return Ok(());
        }
        if let Some(pid) = vm.pid {
            // SAFETY: kill with a pid this agent started and a fixed signal.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            self.event(&vm.id, "stopped", "the VMM did not answer: SIGKILL");
        }
        self.wait_exit(&vm.id, Duration::from_secs(10)).await;
        Ok(())
    }

    /// Pauses or resumes a running VM.
    pub async fn pause(&self, vm: &VmRow, pause: bool) -> Result<(), SupervisorError> {
        let expected = if pause {
            VmState::Running
        } else {
            VmState::Paused
        };
        if vm.state != expected {
            return Err(SupervisorError::WrongState(vm.state.as_str()));
        }
        let vmm = self.vmm(&vm.id);
        let command = if pause {
            vmm.pause().await?;
            "pause"
        } else {
            vmm.resume().await?;
            "resume"
        };
        let state = if pause {
            VmState::Paused
        } else {
            VmState::Running
        };
        self.store.set_vm_state(&vm.id, state, vm.pid, None)?;
        self.event(&vm.id, command, &format!("VM {}", state.as_str()));
        Ok(())
    }

    /// Removes a stopped VM's files.
    pub fn remove_files(&self, vm: &VmRow) -> Result<(), SupervisorError> {
        let dir = self.paths(&vm.id).dir;
        match std::fs::remove_dir_all(&dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(SupervisorError::Files {
                path: dir,
                source: err,
            }),
            _ => Ok(()),
        }
    }

    /// At agent start: VMs recorded with a VMM are adopted if it still runs
    /// (found by its recorded pid, or in its cgroup when the agent stopped
    /// before recording it), otherwise marked with why it ended; a VMM in
    /// a jail's cgroup that no VM record claims is killed (nothing runs
    /// twice); a VM left paused by a snapshot the agent did not finish is
    /// resumed; snapshot files without a record are removed.
    pub async fn adopt_all(self: &Arc<Self>) -> Result<(), SupervisorError> {
        let jailed = process::jailed(&self.config.jail.parent_cgroup);
        let mut adopted: HashMap<String, u32> = HashMap::new();
        for vm in self.store.list_vms(None, None)? {
            if !vm.state.has_process() {
                // A tap left by a VM that stopped while no agent watched.
                self.network.unplug_nics(&vm.id, vm.nics.len()).await;
                continue;
            }
            let paths = self.paths(&vm.id);
            let marker = jail::cgroup_marker(&self.config.jail, &vm.id);
            let recorded = vm
                .pid
                .and_then(|pid| process::adopt(pid, &marker).map(|watch| (pid, watch)));
            let found = recorded.or_else(|| {
                jailed
                    .iter()
                    .filter(|(id, _)| *id == vm.id)
                    .find_map(|(_, pid)| process::adopt(*pid, &marker).map(|watch| (*pid, watch)))
            });
            match found {
                Some((pid, watch)) => {
                    tracing::info!(vm = %vm.id, "adopted the running VMM (pid {pid})");
                    self.event(&vm.id, "adopted", "the agent restarted; the VMM still runs");
                    adopted.insert(vm.id.clone(), pid);
                    self.watch(vm.id.clone(), watch);
                    let agent_paused = paths.dir.join(AGENT_PAUSED);
                    if agent_paused.exists() {
                        // A snapshot paused it and the agent stopped before
                        // resuming it.
                        match self.vmm(&vm.id).resume().await {
                            Ok(_) => {
                                self.event(
                                    &vm.id,
                                    "resume",
                                    "resumed after an unfinished snapshot",
                                );
                                let _ = std::fs::remove_file(&agent_paused);
                            }
                            Err(err) => tracing::error!(
                                vm = %vm.id,
                                "cannot resume after an unfinished snapshot: {err}"
                            ),
                        }
                    }
                    let state = match self.vmm(&vm.id).status().await {
                        Ok(status) if status.state == control::VmState::Paused => VmState::Paused,
                        _ => VmState::Running,
                    };
                    let state = match vm.state {
                        VmState::Starting | VmState::Stopping => state,
                        recorded => recorded,
                    };
                    if state != vm.state || vm.pid != Some(pid) {
                        self.store.set_vm_state(&vm.id, state, Some(pid), None)?;
                    }
                }
                None => {
                    let log_tail = process::last_log_line(&paths.vmm_log);
                    let (state, reason) = VmmExit::Unknown.describe(&log_tail);
                    let reason = format!("the VMM ended while the agent was down: {reason}");
                    self.store
                        .set_vm_state(&vm.id, state, None, Some(&reason))?;
                    self.event(&vm.id, "exited", &reason);
                    self.network.unplug_nics(&vm.id, vm.nics.len()).await;
                    let _ = std::fs::remove_file(paths.dir.join(AGENT_PAUSED));
                    self.clean_jail(&vm.id).await;
                    // A receiving VMM that died with the agent before the
                    // hand-over (it dies with whoever started it until
                    // then): the copy never ran here. (The network is
                    // reconciled after adoption.)
                    if !migration::log_shows_handover(&paths.vmm_log) {
                        self.forget_unreceived(&vm.id).await?;
                    }
                }
            }
        }
        // VMMs no record claims, or a second one of a VM.
        let orphans: Vec<&(String, u32)> = jailed
            .iter()
            .filter(|(id, pid)| adopted.get(id) != Some(pid))
            .collect();
        for (id, pid) in &orphans {
            tracing::warn!(vm = %id, "killing VMM pid {pid}: no VM record claims it");
            // SAFETY: kill with a pid found in a jail's cgroup and a fixed
            // signal.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        for (id, pid) in orphans {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists()
                && std::time::Instant::now() < deadline
            {
                // Reaped by whoever inherited it from the agent that died.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !adopted.contains_key(id) {
                self.clean_jail(id).await;
            }
        }
        self.sweep_snapshots()?;
        Ok(())
    }

    /// Keeps running VMs' console logs under their cap (see console.rs),
    /// for as long as the agent runs.
    pub fn spawn_console_rotation(self: &Arc<Self>) {
        let supervisor = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(console::ROTATE_EVERY).await;
                let Ok(vms) = supervisor.store.list_vms(None, None) else {
                    continue;
                };
                for vm in vms.into_iter().filter(|vm| vm.state.has_process()) {
                    let Ok(uid) = supervisor.jail_uid(&vm.id) else {
                        continue;
                    };
                    let paths = supervisor.paths(&vm.id);
                    let rotated = tokio::task::spawn_blocking(move || {
                        let jail = vmfs::Dir::open(&paths.jail)?;
                        console::rotate(&paths.dir, &jail, uid, console::CONSOLE_CAP)
                    })
                    .await;
                    match rotated {
                        Ok(Ok(true)) => tracing::info!(vm = %vm.id, "console log rotated"),
                        Ok(Ok(false)) => {}
                        Ok(Err(err)) => {
                            tracing::warn!(vm = %vm.id, "cannot rotate the console log: {err}")
                        }
                        Err(err) => tracing::warn!(vm = %vm.id, "console rotation failed: {err}"),
                    }
                }
            }
        });
    }

    pub fn console_path(&self, vm_id: &str) -> PathBuf {
        self.paths(vm_id).console
    }

    /// The guest agent of VM `vm_id`, through its vsock socket.
    pub fn guest_agent(&self, vm_id: &str) -> guest_agent::GuestAgentClient {
        guest_agent::GuestAgentClient::new(self.paths(vm_id).vsock)
    }

    /// Gives clone `vm`, just resumed, its own identity through its guest
    /// agent, in the background (the guest's vsock driver takes the
    /// transport reset of the restore first): its name as hostname, its
    /// first NIC's MAC and address, a fresh RNG seed. The VM's events say
    /// how it went.
    fn give_identity(self: &Arc<Self>, vm: &VmRow) -> Result<(), SupervisorError> {
        let nic = match vm.nics.first() {
            Some(nic) => {
                let mac = nic.mac.as_deref().and_then(|mac| mac.parse().ok());
                let cidr = nic.address.as_deref().and_then(network::nic_cidr);
                match (mac, cidr) {
                    (Some(mac), Some((address, prefix))) => Some(guest_agent::IdentityNic {
                        mac,
                        address,
                        prefix,
                        gateway: crate::ipv4::Cidr::of(address, prefix).gateway(),
                    }),
                    _ => {
                        return Err(SupervisorError::Store(StoreError::Corrupt(format!(
                            "VM {} NIC 0 has no MAC or address",
                            vm.id
                        ))))
                    }
                }
            }
            None => None,
        };
        let mut seed = [0u8; 32];
        crate::store::random_fill(&mut seed)?;
        let identity = guest_agent::GuestIdentity {
            hostname: vm.name.clone(),
            nic,
            seed,
        };
        let (supervisor, vm_id) = (self.clone(), vm.id.clone());
        tokio::spawn(async move {
            let agent = supervisor.guest_agent(&vm_id);
            let started = std::time::Instant::now();
            let mut last = String::new();
            while started.elapsed() < IDENTITY_PATIENCE {
                match agent.set_identity(&identity).await {
                    Ok(applied) => {
                        supervisor.event(
                            &vm_id,
                            "identity",
                            &format!("the guest took its identity: {applied}"),
                        );
                        return;
                    }
                    Err(guest_agent::GuestAgentError::Refused(why)) => {
                        supervisor.event(
                            &vm_id,
                            "identity_failed",
                            &format!("the guest refused its identity: {why}"),
                        );
                        return;
                    }
                    Err(err) => last = err.to_string(),
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            supervisor.event(
                &vm_id,
                "identity_failed",
                &format!("no guest agent took the identity within {IDENTITY_PATIENCE:?}: {last}"),
            );
        });
        Ok(())
    }
}

/// The VMM's config for `vm`; `networks` are its NICs' networks (None
/// for a NIC on the tenant's default bridge).
fn vmm_config(
    vm: &VmRow,
    image: &ImageRow,
    paths: &VmPaths,
    networks: &[Option<NetworkRow>],
) -> Result<VmConfig, SupervisorError> {
    let disk = |path: PathBuf, id: String, rate_limit: RateLimit| DiskConfig {
        path,
        read_only: false,
        id: Some(id),
        rate_limit,
    };
    let mut disks = vec![disk(
        paths.root_disk.clone(),
        "root".into(),
        vm.root_rate_limit,
    )];
    for (index, data) in vm.disks.iter().enumerate() {
        disks.push(disk(
            paths.data_disk(index),
            format!("data{index}"),
            data.rate_limit,
        ));
    }
    let nets = vm
        .nics
        .iter()
        .enumerate()
        .map(|(index, nic)| {
            let mac = nic
                .mac
                .as_deref()
                .map(|mac| {
                    mac.parse::<MacAddr>()
                        .map_err(|reason| SupervisorError::VmmConfig {
                            vm: vm.id.clone(),
                            reason,
                        })
                })
                .transpose()?;
            Ok(NetConfig {
                tap: Some(network::tap_name(&vm.id, index).as_str().to_string()),
                fd: None,
                mac,
                id: Some(format!("net{index}")),
                rate_limit: nic.rate_limit,
                mtu: match networks.get(index) {
                    Some(Some(network)) => Some(network.mtu),
                    _ => None,
                },
            })
        })
        .collect::<Result<Vec<_>, SupervisorError>>()?;
    // The kernel configures one interface from `ip=`: the first NIC's, by
    // DHCP where its network serves it, else with its address.
    let ip_arg = match (vm.nics.first(), networks.first()) {
        (Some(_), Some(Some(network))) if network.dhcp => network::kernel_dhcp_arg("eth0"),
        (Some(nic), _) => nic
            .address
            .as_deref()
            .and_then(|address| network::kernel_ip_arg(address, "eth0"))
            .unwrap_or_default(),
        (None, _) => String::new(),
    };
    let cmdline = [
        image.cmdline.as_str(),
        vm.kernel_args.as_str(),
        ip_arg.as_str(),
    ]
    .iter()
    .filter(|part| !part.is_empty())
    .copied()
    .collect::<Vec<_>>()
    .join(" ");
    Ok(VmConfig {
        version: CONFIG_VERSION,
        boot: BootConfig {
            kernel: image.kernel.clone().into(),
            initrd: image.initrd.clone().map(PathBuf::from),
            cmdline,
        },
        machine: MachineConfig {
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
        },
        serial: SerialConfig::File {
            path: paths.console.clone(),
        },
        disks,
        nets,
        rng: true,
        consoles: Vec::new(),
        vsock: Some(VsockConfig {
            cid: GUEST_CID,
            socket: paths.vsock.clone(),
        }),
        control_socket: Some(paths.control.clone()),
    })
}

/// Reads a VM's console from stream offset `offset`; at most `limit`
/// bytes, and the offset after them (see console.rs: the stream spans a
/// rotation). The log is in the jailed VMM's directory: it is read only as
/// a regular file of that directory's owner (never through a link, never a
/// FIFO).
pub fn read_console(path: &Path, offset: u64, limit: usize) -> std::io::Result<(Vec<u8>, u64)> {
    console::read(path, offset, limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::{RateLimit, VmDisk};

    #[test]
    fn the_vmm_config_has_the_root_clone_data_disks_and_limits() {
        let paths = VmPaths::with("/d".into(), "/d".into(), "/d/vm.json".into());
        let image = ImageRow {
            id: "img-1".into(),
            tenant_id: "t-1".into(),
            name: "debian".into(),
            kernel: "/images/vmlinux".into(),
            rootfs: "/images/rootfs.ext4".into(),
            initrd: None,
            cmdline: "console=ttyS0 root=/dev/vda".into(),
            rootfs_bytes: 1,
            created_at: 0,
        };
        let vm = VmRow {
            id: "vm-1".into(),
            tenant_id: "t-1".into(),
            name: "web".into(),
            image_id: "img-1".into(),
            state: VmState::Stopped,
            vcpus: 2,
            memory_mib: 256,
            kernel_args: "quiet".into(),
            root_rate_limit: RateLimit::default(),
            disks: vec![VmDisk {
                size_mib: 8,
                rate_limit: RateLimit {
                    bytes_per_s: Some(1000),
                    ops_per_s: None,
                },
            }],
            nics: vec![],
            pid: None,
            last_exit: None,
            restore_from: None,
            restore_as_clone: false,
            metadata: Default::default(),
            created_at: 0,
        };
        let config = vmm_config(&vm, &image, &paths, &[]).unwrap();
        assert_eq!(config.boot.cmdline, "console=ttyS0 root=/dev/vda quiet");
        assert_eq!(config.disks[0].path, Path::new("/d/root.raw"));
        assert_eq!(config.disks[0].id.as_deref(), Some("root"));
        assert_eq!(config.disks[1].path, Path::new("/d/data0.raw"));
        assert_eq!(config.disks[1].id.as_deref(), Some("data0"));
        assert_eq!(config.disks[1].rate_limit.bytes_per_s, Some(1000));
        assert_eq!(config.machine.vcpus, 2);
        assert_eq!(
            config.serial,
            SerialConfig::File {
                path: "/d/console.log".into()
            }
        );
        assert_eq!(config.boot.initrd, None);
        assert_eq!(config.control_socket, Some(paths.control.clone()));
        // The file the VMM reads, in the exact shape it has always had.
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            serde_json::json!({
                "version": 1,
                "boot": {"kernel": "/images/vmlinux", "cmdline": "console=ttyS0 root=/dev/vda quiet"},
                "machine": {"vcpus": 2, "memory_mib": 256},
                "serial": {"mode": "file", "path": "/d/console.log"},
                "disks": [
                    {"path": "/d/root.raw", "read_only": false, "id": "root"},
                    {"path": "/d/data0.raw", "read_only": false, "id": "data0",
                     "rate_limit": {"bytes_per_s": 1000}},
                ],
                "rng": true,
                "vsock": {"cid": 3, "socket": "/d/vsock.sock"},
                "control_socket": "/d/control.sock",
            })
        );

        // A NIC on a DHCP network: `ip=dhcp` and the network's MTU; one on
        // the default bridge: its address in `ip=`.
        let network = NetworkRow {
            id: "net-1".into(),
            tenant_id: "t-1".into(),
            name: "front".into(),
            cidr: "10.30.0.0/24".into(),
            gateway: "10.30.0.1".into(),
            nat: false,
            dhcp: true,
            dns: vec![],
            mtu: 1450,
            vni: 4096,
            bridge: "nbn4096".into(),
            overlay: None,
            created_at: 0,
        };
        let nic = |network: Option<&str>, address: &str| nubis_api::VmNic {
            network: network.map(str::to_string),
            mac: Some("02:4e:42:00:00:01".into()),
            address: Some(address.into()),
            ..Default::default()
        };
        let on_network = VmRow {
            nics: vec![nic(Some("net-1"), "10.30.0.2/24")],
            ..vm.clone()
        };
        let config = vmm_config(&on_network, &image, &paths, &[Some(network.clone())]).unwrap();
        assert_eq!(
            config.boot.cmdline,
            "console=ttyS0 root=/dev/vda quiet ip=:::::eth0:dhcp"
        );
        assert_eq!(config.nets[0].mtu, Some(1450));
        assert_eq!(
            config.nets[0].mac.map(|mac| mac.to_string()).as_deref(),
            Some("02:4e:42:00:00:01")
        );
        assert_eq!(config.nets[0].id.as_deref(), Some("net0"));
        assert_eq!(
            config.nets[0].tap.as_deref(),
            Some(network::tap_name("vm-1", 0).as_str())
        );
        let static_network = NetworkRow {
            dhcp: false,
            ..network
        };
        let config = vmm_config(&on_network, &image, &paths, &[Some(static_network)]).unwrap();
        assert_eq!(
            config.boot.cmdline,
            "console=ttyS0 root=/dev/vda quiet ip=10.30.0.2::10.30.0.1:255.255.255.0::eth0:off"
        );
        let default_bridge = VmRow {
            nics: vec![nic(None, "10.88.1.2/24")],
            ..vm
        };
        let config = vmm_config(&default_bridge, &image, &paths, &[None]).unwrap();
        assert_eq!(config.nets[0].mtu, None);
        assert!(config
            .boot
            .cmdline
            .ends_with("ip=10.88.1.2::10.88.1.1:255.255.255.0::eth0:off"));
        // A MAC that is not one is refused here, not by the VMM.
        let bad_mac = VmRow {
            nics: vec![nubis_api::VmNic {
                mac: Some("02:4e:42".into()),
                ..Default::default()
            }],
            ..default_bridge
        };
        assert!(matches!(
            vmm_config(&bad_mac, &image, &paths, &[None]),
            Err(SupervisorError::VmmConfig { .. })
        ));
    }

    #[test]
    fn console_reads_resume_at_an_offset() {
        let dir = std::env::temp_dir().join(format!("nubis-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        assert_eq!(read_console(&path, 0, 10).unwrap(), (vec![], 0));
        std::fs::write(&path, b"hello world").unwrap();
        assert_eq!(read_console(&path, 0, 5).unwrap(), (b"hello".to_vec(), 5));
        assert_eq!(
            read_console(&path, 6, 100).unwrap(),
            (b"world".to_vec(), 11)
        );
        assert_eq!(read_console(&path, 99, 100).unwrap(), (vec![], 11));
        std::fs::remove_dir_all(&dir).ok();
    }
}
