//! Where a VMM's start-up goes: named marks from process start to the first
//! guest entry, logged once with it (`bench/boot.py` prints the breakdown).
//! Cheap enough to leave on: a few pushes onto a short list.

use std::sync::Mutex;
use std::time::Duration;

use crate::logger::since_process_start;

/// The marks so far: what was done, and when it was (since process start).
static MARKS: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

/// Records that `done` just finished.
pub fn mark(done: &'static str) {
    let at = since_process_start();
    MARKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((done, at));
}

/// The marks as `done +N.NNN ms` steps (each the time since the previous
/// mark, the first since process start), in order.
pub fn report() -> String {
    let marks = MARKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    format_marks(&marks)
}

fn format_marks(marks: &[(&'static str, Duration)]) -> String {
    let mut previous = Duration::ZERO;
    let steps: Vec<String> = marks
        .iter()
        .map(|(done, at)| {
            let step = at.saturating_sub(previous);
            previous = *at;
            format!("{done} +{:.3} ms", step.as_secs_f64() * 1000.0)
        })
        .collect();
    steps.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_the_time_since_the_previous_mark() {
        let marks = [
            ("arguments", Duration::from_micros(100)),
            ("kvm", Duration::from_micros(350)),
            ("memory", Duration::from_micros(1350)),
        ];
        assert_eq!(
            format_marks(&marks),
            "arguments +0.100 ms, kvm +0.250 ms, memory +1.000 ms"
        );
        assert_eq!(format_marks(&[]), "");
    }
}
