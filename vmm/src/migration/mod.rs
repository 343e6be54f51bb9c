//! Live migration: the running guest moves to another VMM process,
//! normally on another host, with a pause of a fraction of a second.
//!
//! Pre-copy: the source sends all of guest RAM while the guest runs, then
//! in rounds the pages written meanwhile (KVM's dirty log plus the pages
//! device emulation wrote), until what is left would go within the
//! downtime budget, or a round or time limit is reached. Then it pauses
//! the vCPUs, holds every device, sends the last pages and the whole
//! device and vCPU state (as a snapshot has it), and hands over. The wire
//! protocol, with its version check, token and hand-over rules, is in
//! [`protocol`]; every byte of it, both ways, is encrypted and
//! authenticated with the migration's key ([`secure`]). Until the
//! hand-over the source VM keeps running, whatever fails; see `protocol`
//! for what happens after it.

pub mod destination;
pub mod dirty;
pub mod protocol;
pub mod secure;
pub mod source;

use std::time::Duration;

use crate::snapshot::SnapshotError;
use crate::vstate::vm::VmError;
use protocol::ProtocolError;
use secure::{MigrationKey, SecureError};

/// What `migration_status` reports: part of the agent's contract.
pub use nubis_contract::migration::{Phase, Progress};

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the migration thread cannot start: {0}")]
    Seccomp(String),
    #[error("cannot connect to the destination {to}: {source}")]
    Connect { to: String, source: std::io::Error },
    #[error("cannot listen for the migration on {listen}: {source}")]
    Listen {
        listen: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error(
        "the destination closed the connection without a word (another migration key, or not a migration listener?): {0}"
    )]
    Unanswered(ProtocolError),
    #[error("the source gave up: {0}")]
    Aborted(String),
    #[error("the migration was cancelled")]
    Cancelled,
    #[error("cannot make the connection's salt: {0}")]
    Random(std::io::Error),
    #[error("cannot make the connection's keys: {0}")]
    Keys(SecureError),
    #[error("{0}")]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("disk {index} ({path}): {source}")]
    Disk {
        index: usize,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot list guest RAM's pages: {0}")]
    Memory(std::io::Error),
    #[error("the source sent a page at {0:#x}, outside guest RAM")]
    PageOutsideRam(u64),
    #[error("{0}")]
    Vcpus(String),
}

/// How a migration is run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The destination VMM's migration address, "HOST:PORT".
    pub to: String,
    pub token: String,
    /// The key both VMMs encrypt and authenticate the stream with.
    pub key: MigrationKey,
    /// The pause the guest may see at the hand-over; zero means "copy
    /// until a limit", never by the estimate.
    pub downtime_budget: Duration,
    /// Copy rounds after the first full one, at most.
    pub max_rounds: u32,
    /// Time for the copy rounds, at most; then the hand-over happens
    /// whatever the estimate.
    pub max_copy_time: Duration,
    /// Copy the disks too (they are local to this host); without it both
    /// hosts see the same disk files (shared storage).
    pub copy_disks: bool,
}

/// The default downtime budget.
pub const DEFAULT_DOWNTIME_MS: u64 = 100;
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
pub const DEFAULT_MAX_COPY_SECONDS: u64 = 300;

/// The downtime budgets accepted, in ms: 0 is "never by the estimate, copy
/// until a limit"; a pause of more than a minute is no live migration.
pub const DOWNTIME_MS_RANGE: std::ops::RangeInclusive<u64> = 0..=60_000;
/// The round limits accepted: 0 hands over right after the full copy. The
/// copy's time is bounded by `max_seconds`, so a high count only means
/// "until the time is up" (an idle guest's round takes ~10 ms: a day is
/// ~9 million rounds); beyond 100 million it is a mistake.
pub const MAX_ROUNDS_RANGE: std::ops::RangeInclusive<u32> = 0..=100_000_000;
/// The copy time limits accepted, in seconds: at least one (0 would end
/// the copy before it began), at most a day.
pub const MAX_SECONDS_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400;
/// The token lengths accepted, in bytes: the destination takes at least
/// 16, and its `Hello` is bounded.
pub const TOKEN_LEN_RANGE: std::ops::RangeInclusive<usize> = 16..=4096;

/// A `migrate` request's limit outside its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name} {value} is outside {min}..={max}")]
pub struct LimitError {
    pub name: &'static str,
    pub value: u64,
    pub min: u64,
    pub max: u64,
}

/// A `migrate` request refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Key(#[from] SecureError),
}

fn in_range<T: Copy + PartialOrd + Into<u64>>(
    name: &'static str,
    value: T,
    range: &std::ops::RangeInclusive<T>,
) -> Result<T, LimitError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(LimitError {
            name,
            value: value.into(),
            min: (*range.start()).into(),
            max: (*range.end()).into(),
        })
    }
}

impl Settings {
    /// Settings from a `migrate` request, its absent limits the defaults;
    /// a limit or token outside its range, or a key that is not 64 hex
    /// digits, is refused.
    pub fn new(
        to: String,
        token: String,
        key: &str,
        downtime_ms: Option<u64>,
        max_rounds: Option<u32>,
        max_seconds: Option<u64>,
        copy_disks: bool,
    ) -> Result<Self, SettingsError> {
        let downtime_ms = in_range(
            "downtime_ms",
            downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS),
            &DOWNTIME_MS_RANGE,
        )?;
        let max_rounds = in_range(
            "max_rounds",
            max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS),
            &MAX_ROUNDS_RANGE,
        )?;
        let max_seconds = in_range(
            "max_seconds",
            max_seconds.unwrap_or(DEFAULT_MAX_COPY_SECONDS),
            &MAX_SECONDS_RANGE,
        )?;
        if !TOKEN_LEN_RANGE.contains(&token.len()) {
            return Err(LimitError {
                name: "the token's length",
                value: token.len() as u64,
                min: *TOKEN_LEN_RANGE.start() as u64,
                max: *TOKEN_LEN_RANGE.end() as u64,
            }
            .into());
        }
        let key = MigrationKey::from_hex(key)?;
        Ok(Self {
            to,
            token,
            key,
            downtime_budget: Duration::from_millis(downtime_ms),
            max_rounds,
            max_copy_time: Duration::from_secs(max_seconds),
            copy_disks,
        })
    }
}

/// The time `pages` pages take at `bandwidth` bytes per second.
pub fn estimate_downtime(pages: u64, bandwidth_bytes_per_s: f64) -> Duration {
    if bandwidth_bytes_per_s <= 0.0 {
        return Duration::MAX;
    }
    let bytes = pages as f64 * (protocol::PAGE_SIZE + 8) as f64;
    Duration::from_secs_f64((bytes / bandwidth_bytes_per_s).min(1e9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_limits_are_bounded() {
        let token = || "a-token-of-16-chars".to_string();
        let key = "ab".repeat(32);
        let settings = |downtime, rounds, seconds| {
            Settings::new(
                "h:1".into(),
                token(),
                &key,
                downtime,
                rounds,
                seconds,
                false,
            )
        };
        let defaults = settings(None, None, None).unwrap();
        assert_eq!(defaults.downtime_budget, Duration::from_millis(100));
        assert_eq!(defaults.max_rounds, 30);
        assert_eq!(defaults.max_copy_time, Duration::from_secs(300));
        // The ends of each range pass.
        assert!(settings(Some(0), Some(0), Some(1)).is_ok());
        assert!(settings(Some(60_000), Some(100_000_000), Some(86_400)).is_ok());
        for (downtime, rounds, seconds, name) in [
            (Some(60_001), None, None, "downtime_ms"),
            (Some(u64::MAX), None, None, "downtime_ms"),
            (None, Some(100_000_001), None, "max_rounds"),
            (None, Some(u32::MAX), None, "max_rounds"),
            (None, None, Some(0), "max_seconds"),
            (None, None, Some(86_401), "max_seconds"),
            (None, None, Some(u64::MAX), "max_seconds"),
        ] {
            match settings(downtime, rounds, seconds) {
                Err(SettingsError::Limit(refused)) => assert_eq!(refused.name, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        for bad in ["short".to_string(), "t".repeat(4097)] {
            match Settings::new("h:1".into(), bad, &key, None, None, None, false) {
                Err(SettingsError::Limit(refused)) => {
                    assert_eq!(refused.name, "the token's length")
                }
                other => panic!("{other:?}"),
            }
        }
        // The key: 64 hex digits, and the refusal never shows it.
        for bad in ["", "ab", &"ab".repeat(33), &"zz".repeat(32)] {
            let refused = Settings::new("h:1".into(), token(), bad, None, None, None, false)
                .unwrap_err()
                .to_string();
            assert!(refused.contains("migration key"), "{refused}");
            assert!(bad.is_empty() || !refused.contains(bad), "{refused}");
        }
    }

    #[test]
    fn downtime_estimates_follow_the_bandwidth() {
        let pages = 1000;
        let at = |bandwidth| estimate_downtime(pages, bandwidth).as_millis();
        assert_eq!(at(4104.0 * 1000.0 * 10.0), 100);
        assert_eq!(at(4104.0 * 1000.0), 1000);
        assert_eq!(estimate_downtime(0, 1.0), Duration::ZERO);
        assert_eq!(estimate_downtime(1, 0.0), Duration::MAX);
        let mut progress = Progress::new("h:1");
        assert!(!progress.is_over());
        progress.phase = Phase::Unconfirmed;
        assert!(progress.is_over());
    }
}
