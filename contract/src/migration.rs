//! A live migration's progress as the source VMM reports it
//! (`migration_status`), which the agent follows to its end.

use serde::{Deserialize, Serialize};

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Connecting,
    Copying,
    HandingOver,
    /// The destination runs the guest; the source is stopping.
    Completed,
    /// The source runs on.
    Failed,
    Cancelled,
    /// `Commit` went out but the destination never said `Running`: the
    /// source stays paused until whoever drives the migration decides.
    Unconfirmed,
}

impl Phase {
    /// Its name on the wire (and in the agent's REST API).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Copying => "copying",
            Self::HandingOver => "handing_over",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Unconfirmed => "unconfirmed",
        }
    }

    /// Whether a migration in this phase has ended, one way or the other.
    pub fn is_over(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::Unconfirmed
        )
    }
}

/// What `migration_status` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub to: String,
    /// Copy rounds done; round 0 is the full copy.
    pub rounds: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Pages found dirty at the start of the last round.
    pub dirty_pages: u64,
    /// Pages the guest dirtied per second, in the last round.
    pub dirty_rate_pages_per_s: f64,
    /// Bytes per second the last round reached.
    pub bandwidth_bytes_per_s: f64,
    /// What the hand-over would cost now, at that bandwidth.
    pub expected_downtime_ms: u64,
    /// The pause the guest saw, once handed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    pub elapsed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Progress {
    pub fn new(to: &str) -> Self {
        Self {
            phase: Phase::Connecting,
            to: to.to_string(),
            rounds: 0,
            bytes_sent: 0,
            pages_sent: 0,
            dirty_pages: 0,
            dirty_rate_pages_per_s: 0.0,
            bandwidth_bytes_per_s: 0.0,
            expected_downtime_ms: 0,
            downtime_ms: None,
            elapsed_ms: 0,
            error: None,
        }
    }

    /// Whether the migration has ended, one way or the other.
    pub fn is_over(&self) -> bool {
        self.phase.is_over()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHASES: [Phase; 7] = [
        Phase::Connecting,
        Phase::Copying,
        Phase::HandingOver,
        Phase::Completed,
        Phase::Failed,
        Phase::Cancelled,
        Phase::Unconfirmed,
    ];

    #[test]
    fn phases_are_named_as_on_the_wire() {
        for phase in PHASES {
            assert_eq!(
                serde_json::to_string(&phase).unwrap(),
                format!("\"{}\"", phase.as_str())
            );
        }
        let over: Vec<&str> = PHASES
            .into_iter()
            .filter(|phase| phase.is_over())
            .map(Phase::as_str)
            .collect();
        assert_eq!(over, ["completed", "failed", "cancelled", "unconfirmed"]);
        assert!(serde_json::from_str::<Phase>(r#""paused""#).is_err());
    }

    #[test]
    fn progress_reads_what_the_vmm_writes() {
        let mut progress = Progress::new("10.0.0.2:7100");
        assert_eq!(
            serde_json::to_string(&progress).unwrap(),
            r#"{"phase":"connecting","to":"10.0.0.2:7100","rounds":0,"bytes_sent":0,"pages_sent":0,"dirty_pages":0,"dirty_rate_pages_per_s":0.0,"bandwidth_bytes_per_s":0.0,"expected_downtime_ms":0,"elapsed_ms":0}"#
        );
        progress.phase = Phase::HandingOver;
        progress.downtime_ms = Some(37);
        progress.error = Some("x".into());
        let text = serde_json::to_string(&progress).unwrap();
        assert!(text.contains(r#""phase":"handing_over""#), "{text}");
        assert!(text.contains(r#""downtime_ms":37"#), "{text}");
        assert_eq!(serde_json::from_str::<Progress>(&text).unwrap(), progress);
        assert!(!progress.is_over());
    }
}
