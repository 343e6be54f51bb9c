//! Minimal logging to stderr, stamped with the time since process start.
//!
//! The VMM's timing figures (boot time, start-up time) are read from these
//! lines by the benchmarks, so every line carries milliseconds since the
//! process started rather than wall-clock time.
//!
//! A guest can make the VMM log (one warning per malformed request, say)
//! as fast as it likes, into a file on the host: a message repeated word
//! for word is written once, then counted ("the last message was repeated
//! N times", at the next other message or every [`REPEAT_REPORT`]).

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often a message that keeps repeating has its count written.
pub const REPEAT_REPORT: Duration = Duration::from_secs(10);

/// The last message written and how often it came again since.
#[derive(Debug, Default)]
pub struct Repeats {
    last: String,
    count: u64,
    reported: Option<Instant>,
}

impl Repeats {
    /// For `message` at `now`: the repeat count to write first (if any),
    /// and whether to write `message` itself.
    pub fn admit(&mut self, message: &str, now: Instant) -> (Option<u64>, bool) {
        if message == self.last {
            self.count += 1;
            let due = self
                .reported
                .is_none_or(|at| now.duration_since(at) >= REPEAT_REPORT);
            if due {
                self.reported = Some(now);
                let count = std::mem::take(&mut self.count);
                return (Some(count), false);
            }
            return (None, false);
        }
        let pending = std::mem::take(&mut self.count);
        self.last = message.to_string();
        self.reported = Some(now);
        ((pending > 0).then_some(pending), true)
    }
}

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
    repeats: Mutex<Repeats>,
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
        let message = format!("{:<5}] {}", record.level(), record.args());
        let (repeated, write) = self
            .repeats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .admit(&message, Instant::now());
        let stamp = format!(
            "[nubis-vmm {:>6}.{:03} ms ",
            elapsed.as_millis(),
            elapsed.subsec_micros() % 1000,
        );
        let mut text = String::new();
        if let Some(count) = repeated {
            text.push_str(&format!(
                "{stamp}{:<5}] the last message was repeated {count} times\n",
                "WARN"
            ));
        }
        if write {
            text.push_str(&format!("{stamp}{message}\n"));
        }
        // Logging must never take the VMM down; a closed stderr loses the line.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
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
    let logger = Box::new(StderrLogger {
        level,
        repeats: Mutex::default(),
    });
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_messages_are_written_once_then_counted() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        assert_eq!(repeats.admit("bad request", start), (None, true));
        for _ in 0..999 {
            assert_eq!(repeats.admit("bad request", start), (None, false));
        }
        // Another message first reports the count.
        assert_eq!(repeats.admit("other", start), (Some(999), true));
        assert_eq!(repeats.admit("bad request", start), (None, true));
        // A message that keeps coming is counted every REPEAT_REPORT.
        assert_eq!(repeats.admit("bad request", start), (None, false));
        let later = start + REPEAT_REPORT;
        assert_eq!(repeats.admit("bad request", later), (Some(2), false));
        assert_eq!(repeats.admit("bad request", later), (None, false));
        assert_eq!(repeats.admit("done", later), (Some(1), true));
        assert_eq!(repeats.admit("done again", later), (None, true));
    }
}
