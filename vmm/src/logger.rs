//! Minimal logging to stderr, stamped with the time since process start.
//!
//! The VMM's timing figures (boot time, start-up time) are read from these
//! lines by the benchmarks, so every line carries milliseconds since the
//! process started rather than wall-clock time.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records the process start. Call first thing in `main`; later calls are no-ops.
pub fn mark_process_start() {
    let _ = PROCESS_START.get_or_init(Instant::now);
}

/// Time elapsed since [`mark_process_start`] (or since the first call to this).
pub fn since_process_start() -> Duration {
    PROCESS_START.get_or_init(Instant::now).elapsed()
}

struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = since_process_start();
        let line = format!(
            "[nubis-vmm {:>6}.{:03} ms {:<5}] {}\n",
            elapsed.as_millis(),
            elapsed.subsec_micros() % 1000,
            record.level(),
            record.args()
        );
        // Logging must never take the VMM down; a closed stderr loses the line.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the stderr logger. `NUBIS_LOG` (error, warn, info, debug, trace)
/// overrides the default level `info`.
pub fn init() {
    let level = std::env::var("NUBIS_LOG")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let logger = Box::new(StderrLogger { level });
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
