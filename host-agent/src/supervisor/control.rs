//! A client of a VMM's control socket (newline-delimited JSON, see
//! `vmm/src/control/protocol.rs`).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

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
    #[error("the VMM's answer is not JSON: {0}")]
    BadAnswer(String),
    #[error("the VMM refused '{command}': {message}")]
    Refused { command: String, message: String },
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request and returns the answer; an answer with `ok: false` is
/// an error carrying the VMM's message.
pub async fn request(
    socket: &Path,
    request: serde_json::Value,
) -> Result<serde_json::Value, ControlError> {
    let exchange = async {
        let mut stream = connect(socket).await?;
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes()).await?;
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).await?;
        let value: serde_json::Value = serde_json::from_str(&answer)
            .map_err(|_| ControlError::BadAnswer(answer.trim().to_string()))?;
        if value["ok"] == true {
            Ok(value)
        } else {
            Err(ControlError::Refused {
                command: request["command"].as_str().unwrap_or("?").to_string(),
                message: value["error"]["message"]
                    .as_str()
                    .unwrap_or("no message")
                    .to_string(),
            })
        }
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| ControlError::Timeout(TIMEOUT))?
}

/// Connects to the socket at `socket`, which is in a directory its jailed
/// VMM writes: the name is opened without following a link (`O_PATH`),
/// must be a socket, and is connected to through that descriptor, so that a
/// VMM cannot point the agent at another VM's socket.
async fn connect(socket: &Path) -> Result<UnixStream, ControlError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let failed = |source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    };
    let c_path = std::ffi::CString::new(socket.as_os_str().as_bytes())
        .map_err(|_| failed(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: open with a NUL-terminated path and flags; returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by open and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let stat = super::vmfs::fstat(&fd, socket)
        .map_err(|err| failed(std::io::Error::other(err.to_string())))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(failed(std::io::Error::other(
            "not a socket (a link or another kind of file): refused",
        )));
    }
    let through = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let stream = UnixStream::connect(&through).await.map_err(failed)?;
    drop(fd);
    Ok(stream)
}

/// Sends a command without arguments.
pub async fn command(socket: &Path, command: &str) -> Result<serde_json::Value, ControlError> {
    request(socket, serde_json::json!({ "command": command })).await
}
