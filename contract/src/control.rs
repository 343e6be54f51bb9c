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
//! `{"ok":false,"error":{"code":"bad_request"|"invalid_state"|"not_found"|"internal","message":"..."}}`.
//!
//! The VMM's server parses requests with [`parse_request`] and writes
//! answers with [`encode_response`]; the agent's client writes [`Request`]s
//! and reads [`Response`]s.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::migration::Progress;
use crate::RateLimit;

/// The longest request line accepted, in bytes.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// One request line.
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes_per_s: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ops_per_s: Option<u64>,
    },
    Snapshot {
        dir: PathBuf,
    },
    Migrate {
        to: String,
        token: String,
        /// The migration's key, 64 hex digits (see the VMM's `migration::secure`).
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_rounds: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_seconds: Option<u64>,
        #[serde(default)]
        disks: DiskMigration,
    },
    MigrationStatus,
    MigrateCancel,
}

impl Request {
    /// The request's `command`, as on the wire.
    pub fn command(&self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Shutdown => "shutdown",
            Self::Stop => "stop",
            Self::SetRateLimit { .. } => "set_rate_limit",
            Self::Snapshot { .. } => "snapshot",
            Self::Migrate { .. } => "migrate",
            Self::MigrationStatus => "migration_status",
            Self::MigrateCancel => "migrate_cancel",
        }
    }
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

/// The state of the VM's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    Stopping,
}

/// What `status` reports.
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

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    InvalidState,
    NotFound,
    Internal,
}

/// A refused request's `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// One answer line: `ok`, and what the request asked for or why it was
/// refused.
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

    /// Every request, as the agent writes it, is the exact line the VMM
    /// has always accepted, and parses back to itself.
    #[test]
    fn requests_write_the_lines_the_vmm_accepts() {
        let cases = [
            (Request::Status, r#"{"command":"status"}"#),
            (Request::Pause, r#"{"command":"pause"}"#),
            (Request::Resume, r#"{"command":"resume"}"#),
            (Request::Shutdown, r#"{"command":"shutdown"}"#),
            (Request::Stop, r#"{"command":"stop"}"#),
            (
                Request::MigrationStatus,
                r#"{"command":"migration_status"}"#,
            ),
            (Request::MigrateCancel, r#"{"command":"migrate_cancel"}"#),
            (
                Request::Snapshot {
                    dir: "/vm/snapshot.out".into(),
                },
                r#"{"command":"snapshot","dir":"/vm/snapshot.out"}"#,
            ),
            (
                Request::SetRateLimit {
                    device: "root".into(),
                    bytes_per_s: Some(1000),
                    ops_per_s: None,
                },
                r#"{"command":"set_rate_limit","device":"root","bytes_per_s":1000}"#,
            ),
            (
                Request::SetRateLimit {
                    device: "net0".into(),
                    bytes_per_s: None,
                    ops_per_s: None,
                },
                r#"{"command":"set_rate_limit","device":"net0"}"#,
            ),
            (
                Request::Migrate {
                    to: "10.0.0.2:7100".into(),
                    token: "t".into(),
                    key: "k".into(),
                    downtime_ms: Some(100),
                    max_rounds: None,
                    max_seconds: Some(30),
                    disks: DiskMigration::Copy,
                },
                r#"{"command":"migrate","to":"10.0.0.2:7100","token":"t","key":"k","downtime_ms":100,"max_seconds":30,"disks":"copy"}"#,
            ),
            (
                Request::Migrate {
                    to: "h:1".into(),
                    token: "t".into(),
                    key: "k".into(),
                    downtime_ms: None,
                    max_rounds: Some(3),
                    max_seconds: None,
                    disks: DiskMigration::Shared,
                },
                r#"{"command":"migrate","to":"h:1","token":"t","key":"k","max_rounds":3,"disks":"shared"}"#,
            ),
        ];
        for (request, line) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), line);
            assert_eq!(parse_request(line.as_bytes()).unwrap(), request, "{line}");
            assert!(line.contains(&format!(r#""command":"{}""#, request.command())));
        }
        // What older clients write (explicit nulls, the default disks) still parses.
        assert_eq!(
            parse_request(
                br#"{"command":"set_rate_limit","device":"d","bytes_per_s":null,"ops_per_s":7}"#
            )
            .unwrap(),
            Request::SetRateLimit {
                device: "d".into(),
                bytes_per_s: None,
                ops_per_s: Some(7)
            }
        );
    }

    /// The answers the VMM's server writes (`encode_response`) read back
    /// as the same envelope, with its status, progress or error.
    #[test]
    fn answers_read_what_the_server_writes() {
        let ok: Response = serde_json::from_str(r#"{"ok":true}"#).unwrap();
        assert_eq!(ok, Response::ok());
        let status_line = concat!(
            r#"{"ok":true,"status":{"state":"running","vcpus":1,"memory_mib":128,"#,
            r#""kernel":"/vm/vmlinux","pid":42,"uptime_ms":1500,"boot_time_ms":120,"#,
            r#""devices":[{"id":"root","rate_limit":{"bytes_per_s":1000},"#,
            r#""counters":{"read_bytes":4096,"read_ops":1}},"#,
            r#"{"id":"net0","rate_limit":{},"counters":{}}]}}"#,
            "\n"
        );
        let answer: Response = serde_json::from_str(status_line).unwrap();
        let status = answer.status.clone().unwrap();
        assert_eq!(status.state, VmState::Running);
        assert_eq!(status.boot_time_ms, Some(120));
        assert_eq!(status.devices[0].counters["read_bytes"], 4096);
        assert_eq!(status.devices[0].rate_limit.bytes_per_s, Some(1000));
        assert!(status.devices[1].rate_limit.is_unlimited());
        assert_eq!(encode_response(&answer), status_line.as_bytes());
        let paused: Response = serde_json::from_str(
            r#"{"ok":true,"status":{"state":"paused","vcpus":2,"memory_mib":256,"kernel":"/k","pid":1,"uptime_ms":0}}"#,
        )
        .unwrap();
        let status = paused.status.unwrap();
        assert_eq!((status.state, status.boot_time_ms), (VmState::Paused, None));
        assert!(status.devices.is_empty());

        let mut progress = Progress::new("10.0.0.2:7100");
        progress.phase = crate::migration::Phase::Copying;
        progress.rounds = 2;
        let line = encode_response(&Response::migration(progress.clone()));
        let answer: Response = serde_json::from_slice(&line).unwrap();
        assert!(answer.ok);
        assert_eq!(answer.migration, Some(Box::new(progress)));
        assert!(String::from_utf8(line).unwrap().starts_with(
            r#"{"ok":true,"migration":{"phase":"copying","to":"10.0.0.2:7100","rounds":2,"#
        ));

        for (code, name) in [
            (ErrorCode::BadRequest, "bad_request"),
            (ErrorCode::InvalidState, "invalid_state"),
            (ErrorCode::NotFound, "not_found"),
            (ErrorCode::Internal, "internal"),
        ] {
            let line = format!(
                r#"{{"ok":false,"error":{{"code":"{name}","message":"the VM is stopping"}}}}"#
            );
            let answer: Response = serde_json::from_str(&line).unwrap();
            assert_eq!(answer, Response::error(code, "the VM is stopping"));
            assert_eq!(encode_response(&answer), format!("{line}\n").as_bytes());
        }
        // The server's fallback when an answer cannot be encoded.
        let fallback: Response = serde_json::from_str(
            r#"{"ok":false,"error":{"code":"internal","message":"cannot encode response"}}"#,
        )
        .unwrap();
        assert_eq!(fallback.error.unwrap().code, ErrorCode::Internal);
    }
}
