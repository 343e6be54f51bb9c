//! vCPUs: one thread each, running `KVM_RUN` in a loop and routing its exits
//! to the buses.
//!
//! The host controls the threads through [`RunControl`]: a requested state
//! (run, pause, stop) plus a signal (`SIGRTMIN`) that kicks a thread out of
//! `KVM_RUN` so it notices. A paused vCPU waits on a condition variable, not
//! in a busy loop.

use std::fmt::Write as _;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::vm::Vm;
use crate::arch::x86_64::cpuid::{filter_cpuid, VcpuTopology};
use crate::arch::x86_64::{interrupts, msr, paging, regs};
use crate::devices::bus::{lock, Bus};
use crate::logger::since_process_start;
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;
use crate::platform::KvmFlavor;
use crate::vstate::exit::{ExitNotifier, ExitReason};
use crate::vstate::persist::VcpuState;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_SIMUL_EX: u32 = 2;
const KVM_INTERNAL_ERROR_DELIVERY_EV: u32 = 3;
const X86_CR0_PG: u64 = 0x8000_0000;
const INSTRUCTION_BYTES: usize = 16;

/// Errors in creating, configuring or controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {index} failed: {source}")]
    Create {
        index: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_CPUID2 on vCPU {index} failed: {source}")]
    SetCpuid {
        index: u32,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {source}")]
    Msrs { index: u32, source: msr::MsrError },
    #[error("vCPU {index}: {source}")]
    Regs { index: u32, source: regs::RegsError },
    #[error("vCPU {index}: {source}")]
    Lapic {
        index: u32,
        source: interrupts::InterruptsError,
    },
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn { index: u32, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("the vCPUs are not all paused")]
    NotPaused,
    #[error("vCPU {index}: cannot save its state: {message}")]
    Save { index: u32, message: String },
    #[error("vCPU {index}: cannot save its KVM state: {source}")]
    SaveState {
        index: u32,
        source: crate::vstate::persist::KvmStateError,
    },
    #[error("vCPU {index}: cannot restore its state: {source}")]
    Restore {
        index: u32,
        source: crate::vstate::persist::KvmStateError,
    },
    #[error("{waiting} vCPU(s) did not {action} within {timeout_ms} ms")]
    Timeout {
        action: &'static str,
        waiting: u32,
        timeout_ms: u128,
    },
}

/// What the host asks of the vCPU threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunRequest {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    request: RunRequest,
    /// vCPU threads waiting because of a pause.
    parked: u32,
    /// vCPU threads that have returned.
    exited: u32,
    /// Threads still running, to be kicked.
    threads: Vec<libc::pthread_t>,
    /// Snapshot rounds: paused vCPUs save their state into `saved` when
    /// `save_round` passes the round each last served.
    save_round: u64,
    served_round: Vec<u64>,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// Shared between the vCPU threads and the host side that controls them.
pub struct RunControl {
    vcpu_count: u32,
    state: Mutex<ControlState>,
    changed: Condvar,
}

/// How the vCPUs are doing, as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpusState {
    Running,
    Pausing,
    Paused,
    Stopping,
}

/// The signal that interrupts `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for [`kick_signal`]: its only job is to make
/// `KVM_RUN` return `EINTR`.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
        .map_err(VcpuError::SignalHandler)
}

impl RunControl {
    pub fn new(vcpu_count: u32) -> Self {
        Self {
            vcpu_count,
            state: Mutex::new(ControlState {
                request: RunRequest::Run,
                parked: 0,
                exited: 0,
                threads: Vec::new(),
                save_round: 0,
                served_round: vec![0; vcpu_count as usize],
                saved: (0..vcpu_count).map(|_| None).collect(),
            }),
            changed: Condvar::new(),
        }
    }

    pub fn state(&self) -> VcpusState {
        let state = lock(&self.state);
        match state.request {
            RunRequest::Run => VcpusState::Running,
            RunRequest::Pause if state.parked + state.exited >= self.vcpu_count => {
                VcpusState::Paused
            }
            RunRequest::Pause => VcpusState::Pausing,
            RunRequest::Stop => VcpusState::Stopping,
        }
    }

    pub fn request(&self) -> RunRequest {
        lock(&self.state).request
    }

    fn kick_all(state: &ControlState) {
        for thread in &state.threads {
            // SAFETY: every id in `threads` belongs to a vCPU thread that has
            // not returned yet (it removes itself under the same lock before
            // returning), so the id is valid.
            unsafe {
                libc::pthread_kill(*thread, kick_signal());
            }
        }
    }

    /// Sets `request`, then kicks the threads until `done` holds or `timeout` passes.
    fn drive(
        &self,
        request: RunRequest,
        action: &'static str,
        timeout: Duration,
        done: impl Fn(&ControlState) -> bool,
    ) -> Result<(), VcpuError> {
        let start = Instant::now();
        let mut state = lock(&self.state);
        if state.request != RunRequest::Stop {
            state.request = request;
        }
        self.changed.notify_all();
        while !done(&state) {
            if start.elapsed() > timeout {
                return Err(VcpuError::Timeout {
                    action,
                    waiting: self.vcpu_count - state.parked - state.exited,
                    timeout_ms: timeout.as_millis(),
                });
            }
            Self::kick_all(&state);
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(5))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        Ok(())
    }

    /// Pauses every vCPU; returns once all are out of the guest.
    pub fn pause_all(&self, timeout: Duration) -> Result<(), VcpuError> {
        let count = self.vcpu_count;
        self.drive(RunRequest::Pause, "pause", timeout, |s| {
            s.parked + s.exited >= count
        })
    }

    /// Lets paused vCPUs run again.
    pub fn resume_all(&self) {
        let mut state = lock(&self.state);
        if state.request == RunRequest::Pause {
            state.request = RunRequest::Run;
        }
        self.changed.notify_all();
    }

    /// Stops every vCPU thread; returns once all have returned.
    pub fn stop_all(&self, timeout: Duration) -> Result<(), VcpuError> {
        let count = self.vcpu_count;
        self.drive(RunRequest::Stop, "stop", timeout, |s| s.exited >= count)
    }

    fn register_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        lock(&self.state).threads.push(me);
    }

    fn thread_exited(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut state = lock(&self.state);
        state.threads.retain(|t| *t != me);
        state.exited += 1;
        self.changed.notify_all();
    }

    /// Saves every paused vCPU's state (each thread saves its own, out of
    /// the guest); the VM stays paused.
    pub fn save_all(&self, timeout: Duration) -> Result<Vec<VcpuState>, VcpuError> {
        let start = Instant::now();
        let mut state = lock(&self.state);
        if state.request != RunRequest::Pause || state.parked < self.vcpu_count {
            return Err(VcpuError::NotPaused);
        }
        state.save_round += 1;
        for slot in state.saved.iter_mut() {
            *slot = None;
        }
        self.changed.notify_all();
        while state.saved.iter().any(Option::is_none) {
            if start.elapsed() > timeout {
                return Err(VcpuError::Timeout {
                    action: "save their state",
                    waiting: state.saved.iter().filter(|slot| slot.is_none()).count() as u32,
                    timeout_ms: timeout.as_millis(),
                });
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(5))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        state
            .saved
            .iter_mut()
            .enumerate()
            .map(|(index, slot)| match slot.take() {
                Some(Ok(saved)) => Ok(saved),
                Some(Err(message)) => Err(VcpuError::Save {
                    index: index as u32,
                    message,
                }),
                None => Err(VcpuError::NotPaused),
            })
            .collect()
    }

    /// Blocks while paused, saving the vCPU's state with `save` when a
    /// snapshot asks. Returns false when the thread must stop.
    fn wait_until_runnable(
        &self,
        index: usize,
        save: &mut dyn FnMut() -> Result<VcpuState, String>,
    ) -> bool {
        let mut state = lock(&self.state);
        let mut parked = false;
        loop {
            match state.request {
                RunRequest::Run | RunRequest::Stop => {
                    if parked {
                        state.parked -= 1;
                    }
                    return state.request == RunRequest::Run;
                }
                RunRequest::Pause => {
                    if !parked {
                        parked = true;
                        state.parked += 1;
                        self.changed.notify_all();
                    }
                    let round = state.save_round;
                    if state
                        .served_round
                        .get(index)
                        .is_some_and(|served| *served < round)
                    {
                        state.served_round[index] = round;
                        drop(state);
                        let saved = save();
                        state = lock(&self.state);
                        if let Some(slot) = state.saved.get_mut(index) {
                            *slot = Some(saved);
                        }
                        self.changed.notify_all();
                        continue;
                    }
                    state = self
                        .changed
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            }
        }
    }
}

/// What one `KVM_RUN` exit means for the loop.
enum Outcome {
    Continue,
    Exit(ExitReason),
    /// A failure that needs the vCPU's registers to be described.
    Fail(String),
}

/// One vCPU and what its thread needs.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    memory: GuestMemoryMmap,
    /// The MSRs a snapshot saves.
    msr_indices: Arc<Vec<u32>>,
}

impl Vcpu {
    pub fn new(
        vm: &Vm,
        index: u32,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        memory: GuestMemoryMmap,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self {
            index,
            fd,
            io_bus,
            mmio_bus,
            memory,
            msr_indices: Arc::new(Vec::new()),
        })
    }

    /// The vCPU's KVM descriptor (for probing what it can save).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets the MSRs that a snapshot of this vCPU saves.
    pub fn set_saved_msrs(&mut self, indices: Arc<Vec<u32>>) {
        self.msr_indices = indices;
    }

    /// Saves the vCPU's state; called on its own thread while paused. An
    /// I/O exit whose result KVM has not taken in yet (an `in` the guest is
    /// waiting for) is completed first: `KVM_RUN` with `immediate_exit`
    /// finishes it and returns without entering the guest.
    fn save_state(&mut self) -> Result<VcpuState, String> {
        self.fd.set_kvm_immediate_exit(1);
        let finished = match self.fd.run() {
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => Ok(()),
            Err(err) => Err(format!("cannot complete pending I/O: {err}")),
            Ok(exit) => Err(format!(
                "the vCPU left KVM_RUN with {exit:?} instead of stopping at once"
            )),
        };
        self.fd.set_kvm_immediate_exit(0);
        finished?;
        self.save().map_err(|err| err.to_string())
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// CPUID, MSRs, FPU and LAPIC for every vCPU; registers and the boot
    /// page tables for the boot vCPU, which starts at `entry`.
    pub fn configure(
        &self,
        kvm: &Kvm,
        base_cpuid: &CpuId,
        topology: VcpuTopology,
        flavor: KvmFlavor,
        entry: u64,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let mut cpuid = base_cpuid.clone();
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        filter_cpuid(&mut cpuid, topology, flavor, tsc_deadline);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::SetCpuid { index, source })?;
        msr::setup_msrs(&self.fd).map_err(|source| VcpuError::Msrs { index, source })?;
        if index == 0 {
            regs::setup_regs(&self.fd, entry)
                .map_err(|source| VcpuError::Regs { index, source })?;
            regs::setup_sregs(&self.memory, &self.fd)
                .map_err(|source| VcpuError::Regs { index, source })?;
        }
        regs::setup_fpu(&self.fd).map_err(|source| VcpuError::Regs { index, source })?;
        interrupts::set_lint(&self.fd).map_err(|source| VcpuError::Lapic { index, source })
    }

    /// Starts the vCPU's thread.
    pub fn start(
        self,
        control: Arc<RunControl>,
        exit: Arc<ExitNotifier>,
    ) -> Result<std::thread::JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(control, exit))
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(mut self, control: Arc<RunControl>, exit: Arc<ExitNotifier>) {
        control.register_thread();
        if let Err(err) = crate::seccomp::apply(crate::seccomp::ThreadClass::Vcpu) {
            exit.notify(ExitReason::VmmError(err.to_string()));
            return;
        }
        let mut first_entry = true;
        let index = self.index as usize;
        loop {
            if !control.wait_until_runnable(index, &mut || self.save_state()) {
                // Where the guest was when the host stopped it: what a hang
                // report needs.
                log::debug!("{}", self.describe_failure("stopped by the host"));
                break;
            }
            if first_entry {
                first_entry = false;
                let now = since_process_start();
                if self.index == 0 {
                    crate::startup::mark("vCPU 0 enters");
                    log::info!("start-up: {}", crate::startup::report());
                }
                log::info!(
                    "vCPU {} entering the guest ({} us after process start)",
                    self.index,
                    now.as_micros()
                );
            }
            match self.run_once() {
                Outcome::Continue => {}
                Outcome::Exit(reason) => {
                    exit.notify(reason);
                    break;
                }
                Outcome::Fail(what) => {
                    let message = self.describe_failure(&what);
                    log::error!("{message}");
                    exit.notify(ExitReason::GuestCrash(message));
                    break;
                }
            }
        }
        control.thread_exited();
    }

    fn run_once(&mut self) -> Outcome {
        let Self {
            fd,
            io_bus,
            mmio_bus,
            ..
        } = self;
        let outcome = match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                io_bus.read(u64::from(port), data);
                Outcome::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                io_bus.write(u64::from(port), data);
                Outcome::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio_bus.read(addr, data);
                Outcome::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio_bus.write(addr, data);
                Outcome::Continue
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {
                Outcome::Continue
            }
            Ok(VcpuExit::Shutdown) => Outcome::Fail("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::Exit(ExitReason::GuestShutdown),
                KVM_SYSTEM_EVENT_RESET => Outcome::Exit(ExitReason::GuestReset),
                KVM_SYSTEM_EVENT_CRASH => Outcome::Fail("guest crash system event".into()),
                other => Outcome::Fail(format!("unknown system event {other}")),
            },
            Ok(VcpuExit::InternalError) => Outcome::Fail(String::new()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Outcome::Fail(format!(
                "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
            )),
            Ok(other) => Outcome::Fail(format!("unexpected KVM exit {other:?}")),
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                Outcome::Continue
            }
            Err(err) => Outcome::Exit(ExitReason::VmmError(format!(
                "KVM_RUN on vCPU {} failed: {err}",
                self.index
            ))),
        };
        match outcome {
            Outcome::Fail(what) if what.is_empty() => Outcome::Fail(self.internal_error()),
            other => other,
        }
    }

    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the union member KVM filled in.
        let (suberror, ndata) = unsafe {
            let internal = run.__bindgen_anon_1.internal;
            (internal.suberror, internal.ndata)
        };
        let kind = match suberror {
            KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failure",
            _ => "internal error",
        };
        format!("KVM internal error: {kind} (suberror {suberror}, {ndata} data words)")
    }

    /// "what" plus the registers and the instruction bytes at RIP.
    fn describe_failure(&self, what: &str) -> String {
        let mut text = format!("vCPU {}: {what}", self.index);
        let (regs, sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => (regs, sregs),
            (Err(err), _) | (_, Err(err)) => {
                let _ = write!(text, "; registers unavailable: {err}");
                return text;
            }
        };
        let _ = write!(
            text,
            "; RIP {:#x} RSP {:#x} RFLAGS {:#x} CS {:#x} CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}",
            regs.rip,
            regs.rsp,
            regs.rflags,
            sregs.cs.selector,
            sregs.cr0,
            sregs.cr3,
            sregs.cr4,
            sregs.efer
        );
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let physical = if sregs.cr0 & X86_CR0_PG != 0 {
            paging::translate(&self.memory, sregs.cr3, linear)
        } else {
            Some(linear)
        };
        let mut bytes = [0u8; INSTRUCTION_BYTES];
        match physical.map(|addr| self.memory.read_slice(&mut bytes, GuestAddress(addr))) {
            Some(Ok(())) => {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let _ = write!(text, "; instruction bytes at RIP: {}", hex.join(" "));
            }
            _ => {
                let _ = write!(text, "; RIP is not readable guest memory");
            }
        }
        text
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Error = VcpuError;

    /// The vCPU's KVM state; the vCPU must be out of `KVM_RUN` with no I/O
    /// pending (its thread saves it while paused, see `save_state`).
    fn save(&self) -> Result<VcpuState, VcpuError> {
        VcpuState::save(&self.fd, &self.msr_indices).map_err(|source| VcpuError::SaveState {
            index: self.index,
            source,
        })
    }

    /// Puts a saved state into this vCPU, which has not run.
    fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        state
            .restore(&self.fd)
            .map_err(|source| VcpuError::Restore {
                index: self.index,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_resume_stop_without_threads_of_their_own() {
        // Two fake vCPU threads that follow the protocol.
        let control = Arc::new(RunControl::new(2));
        let mut handles = Vec::new();
        for index in 0..2 {
            let control = control.clone();
            handles.push(std::thread::spawn(move || {
                control.register_thread();
                let mut save = || {
                    Ok(VcpuState {
                        msrs: vec![kvm_bindings::kvm_msr_entry {
                            index: index as u32,
                            ..Default::default()
                        }],
                        ..Default::default()
                    })
                };
                while control.wait_until_runnable(index, &mut save) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                control.thread_exited();
            }));
        }
        install_kick_handler().unwrap();
        assert_eq!(control.state(), VcpusState::Running);
        assert!(matches!(
            control.save_all(Duration::from_secs(5)),
            Err(VcpuError::NotPaused)
        ));
        control.pause_all(Duration::from_secs(5)).unwrap();
        assert_eq!(control.state(), VcpusState::Paused);
        // Each paused thread saves its own state, once per round.
        for _ in 0..2 {
            let saved = control.save_all(Duration::from_secs(5)).unwrap();
            let owners: Vec<u32> = saved.iter().map(|state| state.msrs[0].index).collect();
            assert_eq!(owners, [0, 1]);
        }
        assert_eq!(control.state(), VcpusState::Paused);
        control.resume_all();
        assert_eq!(control.state(), VcpusState::Running);
        control.stop_all(Duration::from_secs(5)).unwrap();
        for handle in handles {
            handle.join().unwrap();
        }
        assert_eq!(control.state(), VcpusState::Stopping);
        // Resume after stop does not revive anything.
        control.resume_all();
        assert_eq!(control.request(), RunRequest::Stop);
    }

    #[test]
    fn pause_times_out_when_a_vcpu_never_parks() {
        let control = RunControl::new(1);
        let err = control.pause_all(Duration::from_millis(20)).unwrap_err();
        assert!(
            matches!(err, VcpuError::Timeout { waiting: 1, .. }),
            "{err}"
        );
    }
}
