//! A typed client of a VMM's control socket: one request line, one answer
//! line per connection, in the types of `nubis_contract::control` (which
//! the VMM's server speaks), so that the agent cannot ask for what the VMM
//! does not understand nor misread what it answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nubis_contract::control::{DiskMigration, ErrorCode, Request, Response, VmStatus};
use nubis_contract::migration::Progress;
use nubis_contract::RateLimit;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub use nubis_contract::control::VmState;

/// Errors in talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the VMM's control socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot encode the request '{command}': {source}")]
    Encode {
        command: &'static str,
        source: serde_json::Error,
    },
    #[error("the VMM's answer to '{command}' is not one: {answer} ({reason})")]
    BadAnswer {
        command: &'static str,
        answer: String,
        reason: String,
    },
    #[error("the VMM refused '{command}': {message}")]
    Refused {
        command: &'static str,
        code: Option<ErrorCode>,
        message: String,
    },
}

/// How long one exchange (connect, request, answer) may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What a migration may take, beyond where it goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateOptions {
    pub disks: DiskMigration,
    pub downtime_ms: Option<u64>,
    pub max_rounds: Option<u32>,
    pub max_seconds: Option<u64>,
}

/// The control socket of one VM's VMM.
#[derive(Debug, Clone)]
pub struct VmmClient {
    socket: PathBuf,
}

impl VmmClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The VM's state, size, uptime and devices.
    pub async fn status(&self) -> Result<VmStatus, ControlError> {
        let answer = self.request(&Request::Status).await?;
        answer
            .status
            .map(|status| *status)
            .ok_or_else(|| missing(Request::Status.command(), "status"))
    }

    /// Every vCPU leaves the guest and waits.
    pub async fn pause(&self) -> Result<(), ControlError> {
        self.request(&Request::Pause).await.map(drop)
    }

    pub async fn resume(&self) -> Result<(), ControlError> {
        self.request(&Request::Resume).await.map(drop)
    }

    /// Ctrl-Alt-Del to the guest.
    pub async fn shutdown(&self) -> Result<(), ControlError> {
        self.request(&Request::Shutdown).await.map(drop)
    }

    /// The VMM stops the VM now and exits.
    pub async fn stop(&self) -> Result<(), ControlError> {
        self.request(&Request::Stop).await.map(drop)
    }

    /// A paused VM's state and RAM into `dir` (a path in the VMM's view).
    pub async fn snapshot(&self, dir: &Path) -> Result<(), ControlError> {
        let request = Request::Snapshot {
            dir: dir.to_path_buf(),
        };
        self.request(&request).await.map(drop)
    }

    /// Starts a live migration to the VMM listening at `to`.
    pub async fn migrate(
        &self,
        to: &str,
        token: &str,
        key: &str,
        options: MigrateOptions,
    ) -> Result<(), ControlError> {
        let request = Request::Migrate {
            to: to.to_string(),
            token: token.to_string(),
            key: key.to_string(),
            downtime_ms: options.downtime_ms,
            max_rounds: options.max_rounds,
            max_seconds: options.max_seconds,
            disks: options.disks,
        };
        self.request(&request).await.map(drop)
    }

    /// The last migration's progress.
    pub async fn migration_status(&self) -> Result<Progress, ControlError> {
        let answer = self.request(&Request::MigrationStatus).await?;
        answer
            .migration
            .map(|progress| *progress)
            .ok_or_else(|| missing(Request::MigrationStatus.command(), "migration"))
    }

    /// Gives the running migration up; the VM runs on here.
    pub async fn migrate_cancel(&self) -> Result<(), ControlError> {
        self.request(&Request::MigrateCancel).await.map(drop)
    }

    /// Replaces a disk's or NIC's limits (an absent rate is unlimited).
    pub async fn set_rate_limit(&self, device: &str, limit: RateLimit) -> Result<(), ControlError> {
        let request = Request::SetRateLimit {
            device: device.to_string(),
            bytes_per_s: limit.bytes_per_s,
            ops_per_s: limit.ops_per_s,
        };
        self.request(&request).await.map(drop)
    }

    /// Sends one request and returns the answer; an answer with `ok: false`
    /// is an error carrying the VMM's message.
    async fn request(&self, request: &Request) -> Result<Response, ControlError> {
        let command = request.command();
        let mut line = serde_json::to_string(request)
            .map_err(|source| ControlError::Encode { command, source })?;
        line.push('\n');
        let exchange = async {
            let mut stream = connect(&self.socket).await?;
            stream.write_all(line.as_bytes()).await?;
            // The VMM is the tenant's, and may be compromised: its answer
            // is read up to a bound, never as far as it likes.
            let mut reader = BufReader::new(stream.take(MAX_ANSWER + 1));
            let mut answer = String::new();
            reader.read_line(&mut answer).await?;
            if answer.len() as u64 > MAX_ANSWER {
                return Err(ControlError::BadAnswer {
                    command,
                    answer: String::new(),
                    reason: format!("longer than {MAX_ANSWER} bytes"),
                });
            }
            decode(command, &answer)
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| ControlError::Timeout(TIMEOUT))?
    }
}

/// An `ok` answer to `command` without the `field` it must carry.
fn missing(command: &'static str, field: &str) -> ControlError {
    ControlError::BadAnswer {
        command,
        answer: String::new(),
        reason: format!("no {field}"),
    }
}

/// The longest answer line the agent reads from a VMM (a status with all
/// its devices is a few KiB).
const MAX_ANSWER: u64 = 64 * 1024;

/// How much of a bad answer an error quotes.
const QUOTED_ANSWER: usize = 200;

/// Reads the answer line to `command`.
fn decode(command: &'static str, answer: &str) -> Result<Response, ControlError> {
    let response: Response =
        serde_json::from_str(answer).map_err(|err| ControlError::BadAnswer {
            command,
            answer: answer.trim().chars().take(QUOTED_ANSWER).collect(),
            reason: err.to_string(),
        })?;
    if response.ok {
        return Ok(response);
    }
    let (code, message) = match response.error {
        Some(error) => (Some(error.code), error.message),
        None => (None, "no message".to_string()),
    };
    Err(ControlError::Refused {
        command,
        code,
        message,
    })
}

/// Connects to the VMM's control socket (see [`super::vmfs::connect_socket`]).
async fn connect(socket: &Path) -> Result<UnixStream, ControlError> {
    super::vmfs::connect_socket(socket)
        .await
        .map_err(|source| ControlError::Connect {
            path: socket.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VMM stand-in on a socket: answers each connection's one line
    /// with `answer`, and returns the lines it was sent.
    async fn fake_vmm(
        name: &str,
        answers: Vec<&'static str>,
    ) -> (PathBuf, tokio::task::JoinHandle<Vec<String>>) {
        let dir =
            std::env::temp_dir().join(format!("nubis-vmmclient-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let mut lines = Vec::new();
            for answer in answers {
                let (stream, _) = listener.accept().await.unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                lines.push(line);
                reader.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
            lines
        });
        (path, task)
    }

    #[tokio::test]
    async fn requests_and_answers_are_typed() {
        let (path, vmm) = fake_vmm(
            "typed",
            vec![
                concat!(
                    r#"{"ok":true,"status":{"state":"paused","vcpus":1,"memory_mib":128,"#,
                    r#""kernel":"/k","pid":7,"uptime_ms":3,"devices":[{"id":"root","#,
                    r#""rate_limit":{},"counters":{"read_bytes":9}}]}}"#,
                    "\n"
                ),
                "{\"ok\":true}\n",
                concat!(
                    r#"{"ok":true,"migration":{"phase":"copying","to":"h:1","rounds":1,"#,
                    r#""bytes_sent":5,"pages_sent":1,"dirty_pages":2,"dirty_rate_pages_per_s":0.5,"#,
                    r#""bandwidth_bytes_per_s":10.0,"expected_downtime_ms":4,"elapsed_ms":9}}"#,
                    "\n"
                ),
                "{\"ok\":true}\n",
                "{\"ok\":true}\n",
            ],
        )
        .await;
        let client = VmmClient::new(&path);
        let status = client.status().await.unwrap();
        assert_eq!(status.state, VmState::Paused);
        assert_eq!(status.devices[0].counters["read_bytes"], 9);
        let options = MigrateOptions {
            disks: DiskMigration::Copy,
            downtime_ms: Some(100),
            ..Default::default()
        };
        client.migrate("h:1", "t", "k", options).await.unwrap();
        let progress = client.migration_status().await.unwrap();
        assert_eq!(progress.phase.as_str(), "copying");
        assert_eq!((progress.rounds, progress.downtime_ms), (1, None));
        client
            .snapshot(Path::new("/vm/snapshot.out"))
            .await
            .unwrap();
        let limit = RateLimit {
            bytes_per_s: None,
            ops_per_s: Some(5),
        };
        client.set_rate_limit("net0", limit).await.unwrap();
        assert_eq!(
            vmm.await.unwrap(),
            [
                "{\"command\":\"status\"}\n",
                "{\"command\":\"migrate\",\"to\":\"h:1\",\"token\":\"t\",\"key\":\"k\",\"downtime_ms\":100,\"disks\":\"copy\"}\n",
                "{\"command\":\"migration_status\"}\n",
                "{\"command\":\"snapshot\",\"dir\":\"/vm/snapshot.out\"}\n",
                "{\"command\":\"set_rate_limit\",\"device\":\"net0\",\"ops_per_s\":5}\n",
            ]
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn refusals_and_bad_answers_are_errors() {
        let (path, vmm) = fake_vmm(
            "refused",
            vec![
                "{\"ok\":false,\"error\":{\"code\":\"invalid_state\",\"message\":\"the VM is not paused\"}}\n",
                "not json\n",
                "{\"ok\":true}\n",
                "{\"ok\":false}\n",
            ],
        )
        .await;
        let client = VmmClient::new(&path);
        match client.resume().await {
            Err(ControlError::Refused {
                command: "resume",
                code: Some(ErrorCode::InvalidState),
                message,
            }) => assert_eq!(message, "the VM is not paused"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            client.stop().await,
            Err(ControlError::BadAnswer {
                command: "stop",
                ..
            })
        ));
        // An `ok` status answer without its status.
        assert!(matches!(
            client.status().await,
            Err(ControlError::BadAnswer {
                command: "status",
                ..
            })
        ));
        assert!(matches!(
            client.migrate_cancel().await,
            Err(ControlError::Refused { code: None, .. })
        ));
        vmm.await.unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error() {
        let client = VmmClient::new("/nonexistent/nubis/control.sock");
        assert!(matches!(
            client.pause().await,
            Err(ControlError::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn an_answer_is_read_only_up_to_its_bound() {
        // A compromised VMM's endless line: refused at the bound, quoted
        // nowhere.
        let huge: &'static str = Box::leak(format!("{}\n", "x".repeat(70_000)).into_boxed_str());
        // A malformed one: quoted in part only.
        let long_bad: &'static str =
            Box::leak(format!("{{\"ok\":{}\n", "1".repeat(1000)).into_boxed_str());
        let (path, vmm) = fake_vmm("bounded", vec![huge, long_bad]).await;
        let client = VmmClient::new(&path);
        match client.status().await {
            Err(ControlError::BadAnswer { reason, answer, .. }) => {
                assert!(reason.contains("longer than 65536 bytes"), "{reason}");
                assert!(answer.is_empty());
            }
            other => panic!("a 70 KB answer was taken: {other:?}"),
        }
        match client.status().await {
            Err(ControlError::BadAnswer { answer, .. }) => {
                assert_eq!(answer.chars().count(), QUOTED_ANSWER)
            }
            other => panic!("a malformed answer was taken: {other:?}"),
        }
        // (The stand-in's write of the endless line may have failed once
        // the client hung up: that is not this test's business.)
        let _ = vmm.await;
    }
}
