//! A debug-build-only crash hook for the crash-consistency tests: with
//! `NUBIS_AGENT_CRASH_AT=STEP` in its environment, the agent kills itself
//! with SIGKILL when it reaches step STEP of a multi-step change (as a
//! power cut or the OOM killer would), so that a test can restart it and
//! check what it finds. Release builds compile it to nothing.
//!
//! Steps: `vm_spawned` (the jailer started the VMM, its pid not yet
//! recorded), `snapshot_paused` (the VM paused for a snapshot),
//! `snapshot_written` (a snapshot's files written, not yet recorded),
//! `migration_handed_over` (the VMM handed the VM over, the destination
//! not yet told).

/// Dies here if `NUBIS_AGENT_CRASH_AT` names `step` (debug builds only).
#[cfg(debug_assertions)]
pub fn point(step: &str) {
    if std::env::var("NUBIS_AGENT_CRASH_AT").is_ok_and(|wanted| wanted == step) {
        tracing::error!("NUBIS_AGENT_CRASH_AT={step}: crashing here");
        // SAFETY: kill with our own pid and a fixed signal.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Release builds: nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_step: &str) {}
