//! Running a built VM: one thread per vCPU and one event-loop thread (this
//! one) that waits in epoll for console input, control-socket requests,
//! signals and the VM's end. Nothing polls.

pub mod exit;
mod serial_input;
mod signals;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use std::path::Path;

use crate::builder::BuiltVm;
use crate::control::protocol::{
    DeviceStatus, DiskMigration, ErrorCode, Request, Response, VmState, VmStatus,
};
use crate::control::server::{ControlServer, VmControl};
use crate::device_manager::DeviceManager;
use crate::devices::bus::lock;
use crate::devices::legacy::boot_timer::NOT_BOOTED;
use crate::devices::legacy::i8042::I8042;
use crate::devices::virtio::RateLimited;
use crate::migration::source::Migration;
use crate::migration::Settings;
use crate::parts::VmParts;
use crate::rate_limiter::RateLimit;
use crate::snapshot::file::{write_memory, write_state};
use crate::snapshot::{MEMORY_FILE, STATE_FILE};
use crate::vstate::exit::{ExitNotifier, ExitReason};
use crate::vstate::vcpu::{install_kick_handler, RunControl, VcpusState};
use serial_input::SerialInputHandler;
use signals::{ExitWatcher, TerminationSignals};

/// How long vCPUs get to leave the guest when paused or stopped.
const VCPU_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors that keep a built VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create the event loop: {0:?}")]
    EventManager(event_manager::Error),
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    #[error("cannot create the exit notifier: {0}")]
    ExitNotifier(std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
}

/// The running VM as the control socket sees it.
pub struct VmHandle {
    control: Arc<RunControl>,
    exit: Arc<ExitNotifier>,
    i8042: Arc<Mutex<I8042>>,
    boot_time_us: Arc<AtomicU64>,
    started: Instant,
    vcpus: u32,
    memory_mib: u64,
    kernel: std::path::PathBuf,
    rate_limited: Vec<(String, Arc<Mutex<dyn RateLimited>>)>,
    parts: Arc<VmParts>,
    /// The last migration started, if any.
    migration: Mutex<Option<Arc<Migration>>>,
}

impl VmHandle {
    fn start_migration(&self, settings: Settings) -> Response {
        let mut current = lock(&self.migration);
        if current
            .as_ref()
            .is_some_and(|migration| !migration.progress().is_over())
        {
            return Response::error(ErrorCode::InvalidState, "a migration is already running");
        }
        if settings.token.len() < 16 {
            return Response::error(
                ErrorCode::BadRequest,
                "the migration token must be at least 16 characters",
            );
        }
        log::info!("migrating to {}", settings.to);
        match crate::migration::source::start(self.parts.clone(), settings) {
            Ok(migration) => {
                let progress = migration.progress();
                *current = Some(migration);
                Response::migration(progress)
            }
            Err(err) => Response::error(
                ErrorCode::Internal,
                format!("cannot start the migration thread: {err}"),
            ),
        }
    }

    /// Writes a snapshot of the paused VM into `dir`: RAM first, the state
    /// file last (renamed into place), so that a directory with a state
    /// file holds a whole snapshot.
    fn take_snapshot(&self, dir: &Path) -> Result<(), String> {
        let started = Instant::now();
        std::fs::create_dir_all(dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        let held = self.parts.hold_devices();
        let state = self
            .parts
            .capture_state(&held)
            .map_err(|err| err.to_string())?;
        write_memory(
            &dir.join(MEMORY_FILE),
            &self.parts.memory,
            &self.parts.backing,
        )
        .map_err(|err| err.to_string())?;
        write_state(&dir.join(STATE_FILE), &state).map_err(|err| err.to_string())?;
        drop(held);
        log::info!(
            "snapshot written to {} in {} ms",
            dir.display(),
            started.elapsed().as_millis()
        );
        Ok(())
    }
}

impl VmHandle {
    fn status(&self) -> VmStatus {
        let state = match self.control.state() {
            VcpusState::Running | VcpusState::Pausing => VmState::Running,
            VcpusState::Paused => VmState::Paused,
            VcpusState::Stopping => VmState::Stopping,
        };
        let boot = self.boot_time_us.load(Ordering::SeqCst);
        VmStatus {
            state,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            boot_time_ms: (boot != NOT_BOOTED).then_some(boot / 1000),
            devices: self
                .rate_limited
                .iter()
                .map(|(id, device)| {
                    let device = lock(device);
                    DeviceStatus {
                        id: id.clone(),
                        rate_limit: device.rate_limit(),
                        counters: device
                            .counters()
                            .into_iter()
                            .map(|(name, value)| (name.to_string(), value))
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    fn set_rate_limit(&self, id: &str, limit: RateLimit) -> Response {
        if limit.has_zero_rate() {
            return Response::error(
                ErrorCode::BadRequest,
                "a rate of 0 would stop the device for good: leave the limit out instead",
            );
        }
        match self.rate_limited.iter().find(|(known, _)| known == id) {
            Some((_, device)) => {
                lock(device).set_rate_limit(limit);
                log::info!("device {id}: rate limit now {limit:?}");
                Response::ok()
            }
            None => {
                let known: Vec<&str> = self
                    .rate_limited
                    .iter()
                    .map(|(id, _)| id.as_str())
                    .collect();
                Response::error(
                    ErrorCode::NotFound,
                    format!("no device '{id}' (devices: {})", known.join(", ")),
                )
            }
        }
    }
}

impl VmControl for VmHandle {
    fn handle(&self, request: Request) -> Response {
        let state = self.control.state();
        if state == VcpusState::Stopping && request != Request::Status {
            return Response::error(ErrorCode::InvalidState, "the VM is stopping");
        }
        match request {
            Request::Status => Response::status(self.status()),
            Request::Pause => {
                if state == VcpusState::Paused {
                    return Response::error(ErrorCode::InvalidState, "the VM is already paused");
                }
                match self.control.pause_all(VCPU_TIMEOUT) {
                    Ok(()) => {
                        log::info!("VM paused");
                        Response::ok()
                    }
                    Err(err) => Response::error(ErrorCode::Internal, err.to_string()),
                }
            }
            Request::Resume => {
                if state != VcpusState::Paused {
                    return Response::error(ErrorCode::InvalidState, "the VM is not paused");
                }
                self.control.resume_all();
                log::info!("VM resumed");
                Response::ok()
            }
            Request::Shutdown => {
                if state == VcpusState::Paused {
                    return Response::error(
                        ErrorCode::InvalidState,
                        "the VM is paused: resume it before asking the guest to shut down",
                    );
                }
                match lock(&self.i8042).send_ctrl_alt_del() {
                    Ok(()) => {
                        log::info!("sent Ctrl-Alt-Del to the guest");
                        Response::ok()
                    }
                    Err(err) => Response::error(ErrorCode::Internal, err.to_string()),
                }
            }
            Request::SetRateLimit {
                device,
                bytes_per_s,
                ops_per_s,
            } => self.set_rate_limit(
                &device,
                RateLimit {
                    bytes_per_s,
                    ops_per_s,
                },
            ),
            Request::Stop => {
                self.exit
                    .notify(ExitReason::Stopped("a control-socket request".into()));
                Response::ok()
            }
            Request::Migrate {
                to,
                token,
                key,
                downtime_ms,
                max_rounds,
                max_seconds,
                disks,
            } => match Settings::new(
                to,
                token,
                &key,
                downtime_ms,
                max_rounds,
                max_seconds,
                disks == DiskMigration::Copy,
            ) {
                Ok(settings) => self.start_migration(settings),
                Err(err) => Response::error(ErrorCode::BadRequest, err.to_string()),
            },
            Request::MigrationStatus => match lock(&self.migration).as_ref() {
                Some(migration) => Response::migration(migration.progress()),
                None => Response::error(ErrorCode::NotFound, "no migration was started"),
            },
            Request::MigrateCancel => match lock(&self.migration).as_ref() {
                Some(migration) if !migration.progress().is_over() => {
                    migration.cancel();
                    Response::ok()
                }
                _ => Response::error(ErrorCode::InvalidState, "no migration is running"),
            },
            Request::Snapshot { dir } => {
                if state != VcpusState::Paused {
                    return Response::error(
                        ErrorCode::InvalidState,
                        "the VM is running: pause it before taking a snapshot",
                    );
                }
                match self.take_snapshot(&dir) {
                    Ok(()) => Response::ok(),
                    Err(message) => Response::error(ErrorCode::Internal, message),
                }
            }
        }
    }
}

fn add_subscriber<T: MutEventSubscriber + 'static>(
    manager: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber>>>,
    subscriber: T,
) {
    manager.add_subscriber(Arc::new(Mutex::new(subscriber)));
}

/// Runs `built` until the guest or the host ends it; returns why it ended.
pub fn run(built: BuiltVm) -> Result<ExitReason, RuntimeError> {
    // Block termination signals before any thread exists, so that every
    // thread inherits the mask and they arrive only through the signalfd.
    let signals = TerminationSignals::new().map_err(RuntimeError::Signals)?;
    install_kick_handler()?;
    let exit = Arc::new(ExitNotifier::new().map_err(RuntimeError::ExitNotifier)?);
    let vcpu_count = built.vcpus.len() as u32;
    // Shared with the control socket's snapshots; the VM lives as long as
    // this function runs.
    let vm = Arc::new(built.vm);
    let control = Arc::new(RunControl::new(vcpu_count));
    let DeviceManager {
        device_handlers,
        rate_limited,
        legacy,
        stateful,
        ..
    } = built.devices;

    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber>>> =
        EventManager::new().map_err(RuntimeError::EventManager)?;
    add_subscriber(
        &mut manager,
        ExitWatcher::new(
            exit.clone(),
            legacy.i8042_reset,
            legacy.acpi_poweroff,
            signals,
        ),
    );
    let serial_handler = SerialInputHandler::new(
        legacy.serial.clone(),
        legacy.serial_input,
        legacy.serial_input_ready,
    );
    let terminal_guard = serial_handler.terminal_guard();
    add_subscriber(&mut manager, serial_handler);
    for handler in device_handlers {
        manager.add_subscriber(handler);
    }
    if let Some((listener, path)) = built.control_listener {
        let handle = Arc::new(VmHandle {
            control: control.clone(),
            exit: exit.clone(),
            i8042: legacy.i8042.clone(),
            boot_time_us: legacy.boot_time_us.clone(),
            started: Instant::now(),
            vcpus: vcpu_count,
            memory_mib: built.config.machine.memory_mib,
            kernel: built.config.boot.kernel.clone(),
            rate_limited,
            parts: Arc::new(VmParts {
                vm: vm.clone(),
                memory: built.memory.clone(),
                backing: built.backing,
                devices: stateful,
                control: control.clone(),
                exit: exit.clone(),
                shape: built.shape,
            }),
            migration: Mutex::new(None),
        });
        add_subscriber(&mut manager, ControlServer::new(listener, path, handle));
    }

    crate::startup::mark("event loop");
    let mut threads = Vec::with_capacity(built.vcpus.len());
    for vcpu in built.vcpus {
        match vcpu.start(control.clone(), exit.clone()) {
            Ok(thread) => threads.push(thread),
            Err(err) => {
                exit.notify(ExitReason::VmmError(err.to_string()));
                break;
            }
        }
    }

    // Everything is set up: from here on the main thread is the event loop
    // and needs only what its filter allows.
    if let Err(err) = crate::seccomp::apply(crate::seccomp::ThreadClass::Vmm) {
        exit.notify(ExitReason::VmmError(err.to_string()));
    }
    while exit.reason().is_none() {
        if let Err(err) = manager.run() {
            exit.notify(ExitReason::VmmError(format!("event loop failed: {err:?}")));
        }
    }
    let reason = exit
        .reason()
        .unwrap_or_else(|| ExitReason::VmmError("no exit reason recorded".into()));

    if let Err(err) = control.stop_all(VCPU_TIMEOUT) {
        log::error!("{err}; exiting without waiting for them");
        drop(terminal_guard);
        return Ok(reason);
    }
    for thread in threads {
        if thread.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
    drop(terminal_guard);
    drop(manager);
    Ok(reason)
}
