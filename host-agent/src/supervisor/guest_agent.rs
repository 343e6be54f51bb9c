//! A typed client of the guest agent (`nubis-guest-agent`, vsock port 52
//! in the Nubis images), reached through the VM's vsock device socket: the
//! host's way into a running guest without a network or credentials.
//!
//! The guest is untrusted: every record it sends is read up to a bound
//! (a header line of at most [`MAX_HEADER`] bytes, data of at most
//! [`MAX_RECORD`]), anything malformed ends the exchange, and each wait has
//! a deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 52;
/// The longest record header (`KEY LEN\n`).
const MAX_HEADER: usize = 40;
/// The most data in one record (either way).
pub const MAX_RECORD: usize = 64 * 1024;
/// How long the guest has to accept and answer a `ping`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum GuestAgentError {
    #[error("cannot reach the VM's vsock device {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the guest agent does not listen on vsock port {AGENT_PORT} (is it a Nubis image, and booted?)")]
    NotListening,
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("talking to the guest agent failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the guest agent sent a malformed record: {0}")]
    BadRecord(String),
    #[error("the guest agent refused: {0}")]
    Refused(String),
    #[error("the request is larger than {MAX_RECORD} bytes")]
    TooLarge,
}

/// What a command the guest ran sent back, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// It exited with this status: the last record.
    Exited(i32),
    /// A signal ended it: the last record.
    Signalled(i32),
}

/// `KEY LEN` (without its newline) as the key and the length.
pub fn parse_header(line: &[u8]) -> Result<(String, usize), String> {
    let text = std::str::from_utf8(line).map_err(|_| "a header that is not text".to_string())?;
    let (key, len) = text
        .split_once(' ')
        .ok_or_else(|| format!("'{text}' is not KEY LEN"))?;
    if key.is_empty() || key.len() > 15 || !key.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(format!("bad key '{key}'"));
    }
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad length '{len}'"));
    }
    let len: usize = len
        .parse()
        .ok()
        .filter(|len| *len <= MAX_RECORD)
        .ok_or_else(|| format!("length {len} over {MAX_RECORD}"))?;
    Ok((key.to_string(), len))
}

/// A record's header and data, as the guest agent writes and reads them.
pub fn encode_record(key: &str, data: &[u8]) -> Vec<u8> {
    let mut record = format!("{key} {}\n", data.len()).into_bytes();
    record.extend_from_slice(data);
    record
}

/// Reads one record; None at a clean end before its header.
async fn read_record(
    reader: &mut BufReader<UnixStream>,
) -> Result<Option<(String, Vec<u8>)>, GuestAgentError> {
    let mut line = Vec::new();
    let read = (&mut *reader)
        .take(MAX_HEADER as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(GuestAgentError::BadRecord(
            "a header without its end".into(),
        ));
    }
    let (key, len) = parse_header(&line).map_err(GuestAgentError::BadRecord)?;
    let mut data = vec![0u8; len];
    reader.read_exact(&mut data).await?;
    Ok(Some((key, data)))
}

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// A new identity for a guest restored as a clone: its hostname, its first
/// NIC's MAC, address and gateway, and a seed for its kernel's RNG (so that
/// clones of one snapshot do not draw the same random numbers).
#[derive(Clone, PartialEq, Eq)]
pub struct GuestIdentity {
    pub hostname: String,
    pub nic: Option<IdentityNic>,
    pub seed: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityNic {
    pub mac: crate::network::typed::MacAddr,
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
}

impl GuestIdentity {
    /// The `identity` request's data: `key=value` lines. Every value is
    /// typed (a hostname the agent checked as a VM name, a parsed MAC and
    /// addresses, hex), so a line cannot carry another.
    pub fn payload(&self) -> String {
        let mut lines = format!("hostname={}\n", self.hostname);
        if let Some(nic) = &self.nic {
            lines.push_str(&format!(
                "mac={}\naddress={}/{}\ngateway={}\n",
                nic.mac, nic.address, nic.prefix, nic.gateway
            ));
        }
        lines.push_str("seed=");
        for byte in self.seed {
            lines.push_str(&format!("{byte:02x}"));
        }
        lines.push('\n');
        lines
    }
}

/// The guest agent of one VM, through its vsock socket.
#[derive(Debug, Clone)]
pub struct GuestAgentClient {
    socket: PathBuf,
}

impl GuestAgentClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A connection to the agent's port, once the guest accepted it.
    async fn open(&self) -> Result<BufReader<UnixStream>, GuestAgentError> {
        let connect = async {
            let mut stream = super::vmfs::connect_socket(&self.socket)
                .await
                .map_err(|source| GuestAgentError::Connect {
                    path: self.socket.display().to_string(),
                    source,
                })?;
            stream
                .write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
                .await?;
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            (&mut reader)
                .take(MAX_HEADER as u64)
                .read_until(b'\n', &mut line)
                .await?;
            if !line.starts_with(b"OK ") || !line.ends_with(b"\n") {
                return Err(GuestAgentError::NotListening);
            }
            Ok(reader)
        };
        tokio::time::timeout(ANSWER_TIMEOUT, connect)
            .await
            .map_err(|_| GuestAgentError::Timeout(ANSWER_TIMEOUT))?
    }

    /// Sends request `key` with `data` and reads the one record that
    /// answers it, which must be `answer` (or `error`).
    async fn request(
        &self,
        key: &str,
        data: &[u8],
        answer: &str,
    ) -> Result<String, GuestAgentError> {
        if data.len() > MAX_RECORD {
            return Err(GuestAgentError::TooLarge);
        }
        let exchange = async {
            let mut reader = self.open().await?;
            reader
                .get_mut()
                .write_all(&encode_record(key, data))
                .await?;
            match read_record(&mut reader).await? {
                Some((key, data)) if key == answer => Ok(text(&data)),
                Some((key, data)) if key == "error" => Err(GuestAgentError::Refused(text(&data))),
                Some((key, _)) => Err(GuestAgentError::BadRecord(format!(
                    "'{key}' where '{answer}' was expected"
                ))),
                None => Err(GuestAgentError::BadRecord("no answer".into())),
            }
        };
        tokio::time::timeout(ANSWER_TIMEOUT * 2, exchange)
            .await
            .map_err(|_| GuestAgentError::Timeout(ANSWER_TIMEOUT * 2))?
    }

    /// Whether the agent answers: its guest's hostname.
    pub async fn ping(&self) -> Result<String, GuestAgentError> {
        self.request("ping", b"", "pong").await
    }

    /// Gives the guest a new identity (see [`GuestIdentity`]): what it
    /// applied, in its words.
    pub async fn set_identity(&self, identity: &GuestIdentity) -> Result<String, GuestAgentError> {
        self.request("identity", identity.payload().as_bytes(), "ok")
            .await
    }

    /// Runs `command` with the guest's `/bin/sh -c`; its output comes from
    /// the returned stream as the guest sends it.
    pub async fn exec(&self, command: &str) -> Result<ExecStream, GuestAgentError> {
        if command.len() > MAX_RECORD {
            return Err(GuestAgentError::TooLarge);
        }
        let mut reader = self.open().await?;
        reader
            .get_mut()
            .write_all(&encode_record("exec", command.as_bytes()))
            .await?;
        Ok(ExecStream {
            reader,
            done: false,
        })
    }
}

/// The output of a command running in the guest.
pub struct ExecStream {
    reader: BufReader<UnixStream>,
    done: bool,
}

impl ExecStream {
    /// The next piece of output; None after the exit status.
    pub async fn next(&mut self) -> Result<Option<ExecOutput>, GuestAgentError> {
        if self.done {
            return Ok(None);
        }
        let record = read_record(&mut self.reader).await;
        let Some((key, data)) = record? else {
            self.done = true;
            return Err(GuestAgentError::BadRecord(
                "the connection ended before the command's status".into(),
            ));
        };
        let status = || {
            text(&data)
                .parse::<i32>()
                .map_err(|_| GuestAgentError::BadRecord(format!("'{key}' of '{}'", text(&data))))
        };
        let output = match key.as_str() {
            "stdout" => ExecOutput::Stdout(data),
            "stderr" => ExecOutput::Stderr(data),
            "exit" => ExecOutput::Exited(status()?),
            "signal" => ExecOutput::Signalled(status()?),
            "error" => {
                self.done = true;
                return Err(GuestAgentError::Refused(text(&data)));
            }
            other => {
                self.done = true;
                return Err(GuestAgentError::BadRecord(format!(
                    "unknown record '{other}'"
                )));
            }
        };
        if matches!(output, ExecOutput::Exited(_) | ExecOutput::Signalled(_)) {
            self.done = true;
        }
        Ok(Some(output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_key_value_lines_of_typed_values() {
        let identity = GuestIdentity {
            hostname: "web-3".into(),
            nic: Some(IdentityNic {
                mac: "02:4e:42:01:02:03".parse().unwrap(),
                address: std::net::Ipv4Addr::new(10, 88, 1, 5),
                prefix: 24,
                gateway: std::net::Ipv4Addr::new(10, 88, 1, 1),
            }),
            seed: [0xab; 32],
        };
        assert_eq!(
            identity.payload(),
            format!(
                "hostname=web-3\nmac=02:4e:42:01:02:03\naddress=10.88.1.5/24\ngateway=10.88.1.1\nseed={}\n",
                "ab".repeat(32)
            )
        );
        let bare = GuestIdentity {
            nic: None,
            ..identity
        };
        assert!(!bare.payload().contains("mac="));
    }

    #[test]
    fn headers_parse_strictly() {
        assert_eq!(parse_header(b"stdout 12"), Ok(("stdout".into(), 12)));
        assert_eq!(parse_header(b"exit 0"), Ok(("exit".into(), 0)));
        assert_eq!(parse_header(b"pong 65536"), Ok(("pong".into(), 65536)));
        for bad in [
            &b"stdout"[..],
            b"stdout 65537",
            b"stdout -1",
            b"stdout +1",
            b"stdout 1 2",
            b" 5",
            b"STDOUT 1",
            b"averyveryverylongkey 1",
            b"stdout 99999999999999999999999",
            b"\xff 1",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn records_encode_as_the_guest_reads_them() {
        assert_eq!(encode_record("exec", b"echo hi"), b"exec 7\necho hi");
        assert_eq!(encode_record("ping", b""), b"ping 0\n");
    }

    /// A vsock device stand-in: accepts `CONNECT 52`, answers `OK`, reads
    /// the request record and sends `answer`.
    async fn fake_guest(
        name: &str,
        answer: &'static [u8],
        accept: bool,
    ) -> (PathBuf, tokio::task::JoinHandle<Vec<u8>>) {
        let dir =
            std::env::temp_dir().join(format!("nubis-guest-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 52\n");
            if !accept {
                return Vec::new();
            }
            reader
                .get_mut()
                .write_all(b"OK 1073741824\n")
                .await
                .unwrap();
            let (key, data) = read_record(&mut reader).await.unwrap().unwrap();
            reader.get_mut().write_all(answer).await.unwrap();
            let mut request = key.into_bytes();
            request.push(b' ');
            request.extend(data);
            request
        });
        (path, task)
    }

    #[tokio::test]
    async fn ping_answers_the_hostname() {
        let (path, guest) = fake_guest("ping", b"pong 5\nnubis", true).await;
        let client = GuestAgentClient::new(&path);
        assert_eq!(client.ping().await.unwrap(), "nubis");
        assert_eq!(guest.await.unwrap(), b"ping ");
    }

    #[tokio::test]
    async fn exec_streams_output_then_the_status() {
        let (path, guest) =
            fake_guest("exec", b"stdout 3\nhi\nstderr 4\noopsexit 2\n42", true).await;
        let client = GuestAgentClient::new(&path);
        let mut stream = client.exec("echo hi; exit 42").await.unwrap();
        let mut outputs = Vec::new();
        while let Some(output) = stream.next().await.unwrap() {
            outputs.push(output);
        }
        assert_eq!(
            outputs,
            [
                ExecOutput::Stdout(b"hi\n".to_vec()),
                ExecOutput::Stderr(b"oops".to_vec()),
                ExecOutput::Exited(42)
            ]
        );
        assert_eq!(guest.await.unwrap(), b"exec echo hi; exit 42");
    }

    #[tokio::test]
    async fn a_guest_without_the_agent_or_with_a_bad_answer_is_an_error() {
        let (path, _guest) = fake_guest("absent", b"", false).await;
        assert!(matches!(
            GuestAgentClient::new(&path).ping().await,
            Err(GuestAgentError::NotListening)
        ));
        let (path, _guest) = fake_guest("bad", b"stdout 999999\n", true).await;
        let mut stream = GuestAgentClient::new(&path).exec("x").await.unwrap();
        assert!(matches!(
            stream.next().await,
            Err(GuestAgentError::BadRecord(_))
        ));
        let (path, _guest) = fake_guest("cut", b"stdout 2\nok", true).await;
        let mut stream = GuestAgentClient::new(&path).exec("x").await.unwrap();
        assert_eq!(
            stream.next().await.unwrap(),
            Some(ExecOutput::Stdout(b"ok".to_vec()))
        );
        assert!(stream.next().await.is_err(), "no status before the end");
        assert!(matches!(
            GuestAgentClient::new("/nonexistent/nubis/vsock.sock")
                .ping()
                .await,
            Err(GuestAgentError::Connect { .. })
        ));
    }
}
