//! The control protocol: newline-delimited JSON over a Unix stream socket.
//!
//! Each request is one JSON object on one line, answered by one JSON object
//! on one line. A connection may carry any number of requests.
//!
//! | request                      | effect                                             |
//! |------------------------------|----------------------------------------------------|
//! | `{"command":"status"}`       | the VM's state, size, uptime and boot time         |
//! | `{"command":"pause"}`        | every vCPU leaves the guest and waits              |
//! | `{"command":"resume"}`       | paused vCPUs run again                             |
//! | `{"command":"shutdown"}`     | Ctrl-Alt-Del to the guest; it decides what follows |
//! | `{"command":"stop"}`         | the VMM stops the VM now and exits 0               |
//! | `{"command":"set_rate_limit","device":ID,"bytes_per_s":N,"ops_per_s":N}` | replaces a disk's or NIC's limits; an absent rate is unlimited |
//! | `{"command":"snapshot","dir":PATH}` | a paused VM's state and RAM into directory PATH (`nubis-vmm --restore PATH` resumes it) |
//! | `{"command":"migrate","to":"HOST:PORT","token":T,"key":K,"disks":"shared"\|"copy","downtime_ms":N,"max_rounds":N,"max_seconds":N}` | starts a live migration to a `nubis-vmm --migrate-listen`; `key` is the migration's key (64 hex digits) that encrypts and authenticates the stream; `copy` sends local disks too (the rest is optional) |
//! | `{"command":"migration_status"}` | the last migration's progress, as `"migration":{...}` |
//! | `{"command":"migrate_cancel"}` | gives the running migration up; the VM runs on here |
//!
//! Answers: `{"ok":true}` (with `"status":{...}` for `status`), or
//! `{"ok":false,"error":{"code":"bad_request"|"invalid_state"|"internal","message":"..."}}`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::migration::Progress;
use crate::rate_limiter::RateLimit;

/// The longest request line accepted, in bytes.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Pause,
    Resume,
    Shutdown,
    Stop,
    SetRateLimit {
        device: String,
        #[serde(default)]
        bytes_per_s: Option<u64>,
        #[serde(default)]
        ops_per_s: Option<u64>,
    },
    Snapshot {
        dir: PathBuf,
    },
    Migrate {
        to: String,
        token: String,
        /// The migration's key, 64 hex digits (see `migration::secure`).
        key: String,
        #[serde(default)]
        downtime_ms: Option<u64>,
        #[serde(default)]
        max_rounds: Option<u32>,
        #[serde(default)]
        max_seconds: Option<u64>,
        #[serde(default)]
        disks: DiskMigration,
    },
    MigrationStatus,
    MigrateCancel,
}

/// What a migration does with the VM's disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskMigration {
    /// Both hosts see the same files: nothing to copy.
    #[default]
    Shared,
    /// The disks are local to this host: copied to the destination's disk
    /// files (its config's paths) while the guest runs.
    Copy,
}

/// The commands that take no argument.
const PLAIN_COMMANDS: [&str; 7] = [
    "status",
    "pause",
    "resume",
    "shutdown",
    "stop",
    "migration_status",
    "migrate_cancel",
];

/// A rate-limited device as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub id: String,
    pub rate_limit: RateLimit,
    /// I/O counters since the VMM started, by name.
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub pid: u32,
    pub uptime_ms: u64,
    /// Process start to the guest's boot-timer marker; absent until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_time_ms: Option<u64>,
    /// The disks and NICs, with their current rate limits.
    #[serde(default)]
    pub devices: Vec<DeviceStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    InvalidState,
    NotFound,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<VmStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Box<Progress>>,
}

impl Response {
    pub fn ok() -> Self {
        Self {
            ok: true,
            status: None,
            error: None,
            migration: None,
        }
    }

    pub fn migration(progress: Progress) -> Self {
        Self {
            migration: Some(Box::new(progress)),
            ..Self::ok()
        }
    }

    pub fn status(status: VmStatus) -> Self {
        Self {
            ok: true,
            status: Some(Box::new(status)),
            error: None,
            migration: None,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            status: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
            migration: None,
        }
    }
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, Response> {
    if line.len() > MAX_REQUEST_LEN {
        return Err(Response::error(
            ErrorCode::BadRequest,
            format!("request of {} bytes exceeds {MAX_REQUEST_LEN}", line.len()),
        ));
    }
    let bad = |message: String| Response::error(ErrorCode::BadRequest, message);
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|err| bad(format!("invalid request: {err}")))?;
    // serde ignores deny_unknown_fields on unit variants of tagged enums, so
    // extra fields of argument-less commands are refused here: a misspelt
    // option must not be ignored.
    if let Some(object) = value.as_object() {
        let command = object.get("command").and_then(|command| command.as_str());
        if command.is_some_and(|command| PLAIN_COMMANDS.contains(&command)) {
            if let Some(extra) = object.keys().find(|key| key.as_str() != "command") {
                return Err(bad(format!("invalid request: unknown field `{extra}`")));
            }
        }
    }
    serde_json::from_value(value).map_err(|err| bad(format!("invalid request: {err}")))
}

/// Serializes a response as one line.
pub fn encode_response(response: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(response).unwrap_or_else(|_| {
        br#"{"ok":false,"error":{"code":"internal","message":"cannot encode response"}}"#.to_vec()
    });
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_request(br#"{"command":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            parse_request(br#"{"command":"pause"}"#).unwrap(),
            Request::Pause
        );
        assert_eq!(
            parse_request(br#"{"command":"resume"}"#).unwrap(),
            Request::Resume
        );
        assert_eq!(
            parse_request(br#"{"command":"shutdown"}"#).unwrap(),
            Request::Shutdown
        );
        assert_eq!(
            parse_request(br#"{"command":"stop"}"#).unwrap(),
            Request::Stop
        );
        assert_eq!(
            parse_request(
                br#"{"command":"migrate","to":"h:1","token":"t","key":"k","downtime_ms":50}"#
            )
            .unwrap(),
            Request::Migrate {
                to: "h:1".into(),
                token: "t".into(),
                key: "k".into(),
                downtime_ms: Some(50),
                max_rounds: None,
                max_seconds: None,
                disks: DiskMigration::Shared,
            }
        );
        assert_eq!(
            parse_request(br#"{"command":"migration_status"}"#).unwrap(),
            Request::MigrationStatus
        );
        assert_eq!(
            parse_request(br#"{"command":"set_rate_limit","device":"d","bytes_per_s":5}"#).unwrap(),
            Request::SetRateLimit {
                device: "d".into(),
                bytes_per_s: Some(5),
                ops_per_s: None
            }
        );
    }

    #[test]
    fn bad_requests_are_explained() {
        for line in [
            &b"{"[..],
            br#"{"command":"reboot"}"#,
            br#"{"command":"stop","force":true}"#,
            br#"{"command":"migrate_cancel","now":true}"#,
            br#"{"command":"migrate","to":"h:1"}"#,
            br#"{"command":"snapshot"}"#,
            br#"{"command":"set_rate_limit","device":"d","bw":5}"#,
            br#"{"command":"set_rate_limit","bytes_per_s":5}"#,
            br#"{"command":"set_rate_limit","device":"d","ops_per_s":-1}"#,
            br#"{}"#,
            b"\xff\xfe",
        ] {
            let err = parse_request(line).unwrap_err();
            assert!(!err.ok);
            assert_eq!(err.error.unwrap().code, ErrorCode::BadRequest);
        }
        let huge = vec![b' '; MAX_REQUEST_LEN + 1];
        assert!(parse_request(&huge)
            .unwrap_err()
            .error
            .unwrap()
            .message
            .contains("exceeds"));
    }

    #[test]
    fn responses_are_single_lines() {
        let status = VmStatus {
            state: VmState::Paused,
            vcpus: 2,
            memory_mib: 128,
            kernel: "/k".into(),
            pid: 1,
            uptime_ms: 5,
            boot_time_ms: None,
            devices: vec![DeviceStatus {
                counters: [("read_bytes".to_string(), 512)].into(),
                id: "nubis-disk0".into(),
                rate_limit: RateLimit {
                    bytes_per_s: Some(1),
                    ops_per_s: None,
                },
            }],
        };
        let line = encode_response(&Response::status(status.clone()));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back: Response = serde_json::from_slice(&line).unwrap();
        assert_eq!(back.status, Some(Box::new(status)));
        let text = String::from_utf8(encode_response(&Response::ok())).unwrap();
        assert_eq!(text, "{\"ok\":true}\n");
        let text = String::from_utf8(encode_response(&Response::error(
            ErrorCode::InvalidState,
            "not paused",
        )))
        .unwrap();
        assert!(text.contains("\"invalid_state\""));
    }
}
