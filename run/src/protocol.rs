//! The messages between `nubis run` and the guest's PID 1
//! (`guest-images/rootfs/nubis-run-init.c`) on the control console port.
//!
//! Host to guest: records `KEY LEN\n` and LEN bytes (binary-safe, so an
//! argument may hold newlines or any byte but NUL), ending with `run 0\n`.
//! Guest to host: one line per event.

use std::os::unix::ffi::OsStrExt;

/// What the guest reports, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// PID 1 is up and waits for its command (the warm snapshot point).
    Ready,
    /// The command was executed.
    Started,
    /// The command could not be executed: errno and the guest's message.
    ExecFailed {
        errno: i32,
        message: String,
    },
    /// The guest could not prepare the run (nothing ran).
    Error(String),
    /// A warning from the guest; the run goes on.
    Warning(String),
    Exited(i32),
    Signaled(i32),
}

/// Errors in building a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the command is empty")]
    NoCommand,
    #[error("argument {index} contains a NUL byte, which no program can receive")]
    NulInArgument { index: usize },
    #[error("environment entry '{0}' must be KEY=VALUE with a non-empty KEY and no NUL byte")]
    BadEnvironment(String),
    #[error("{what} is {len} bytes; the guest takes at most {MAX_RECORD} per record")]
    TooLong { what: &'static str, len: usize },
    #[error("{count} arguments; the guest takes at most {MAX_ARGS}")]
    TooManyArguments { count: usize },
    #[error("{count} environment entries; the guest takes at most {MAX_ENVS}")]
    TooManyEnvironmentEntries { count: usize },
}

/// Limits of the guest side (`nubis-run-init.c`).
pub const MAX_RECORD: usize = 1 << 20;
pub const MAX_ARGS: usize = 4096;
pub const MAX_ENVS: usize = 1024;

/// One run's request: the command, its environment and directory, the
/// shared directory's disk (`"/dev/vdb rw"`) and eth0's address
/// (`"172.30.0.2 30 172.30.0.1"`: address, prefix length, gateway).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub argv: Vec<std::ffi::OsString>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub share: Option<String>,
    pub net: Option<String>,
}

fn record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(format!("{key} {}\n", value.len()).as_bytes());
    out.extend_from_slice(value);
}

impl Request {
    /// The bytes to send, after checking every field.
    pub fn encode(&self) -> Result<Vec<u8>, RequestError> {
        if self.argv.is_empty() {
            return Err(RequestError::NoCommand);
        }
        if self.argv.len() > MAX_ARGS {
            return Err(RequestError::TooManyArguments {
                count: self.argv.len(),
            });
        }
        if self.env.len() > MAX_ENVS {
            return Err(RequestError::TooManyEnvironmentEntries {
                count: self.env.len(),
            });
        }
        let mut out = Vec::new();
        for (index, arg) in self.argv.iter().enumerate() {
            let bytes = arg.as_bytes();
            if bytes.contains(&0) {
                return Err(RequestError::NulInArgument { index });
            }
            if bytes.len() > MAX_RECORD {
                return Err(RequestError::TooLong {
                    what: "an argument",
                    len: bytes.len(),
                });
            }
            record(&mut out, "arg", bytes);
        }
        for (key, value) in &self.env {
            let entry = format!("{key}={value}");
            if key.is_empty() || key.contains('=') || entry.contains('\0') {
                return Err(RequestError::BadEnvironment(entry));
            }
            if entry.len() > MAX_RECORD {
                return Err(RequestError::TooLong {
                    what: "an environment entry",
                    len: entry.len(),
                });
            }
            record(&mut out, "env", entry.as_bytes());
        }
        if let Some(cwd) = &self.cwd {
            record(&mut out, "cwd", cwd.as_bytes());
        }
        if let Some(share) = &self.share {
            record(&mut out, "share", share.as_bytes());
        }
        if let Some(net) = &self.net {
            record(&mut out, "net", net.as_bytes());
        }
        record(&mut out, "run", b"");
        Ok(out)
    }
}

/// Parses one line from the guest; None for a line this host does not know
/// (a newer guest, or noise), which is ignored.
pub fn parse_event(line: &str) -> Option<GuestEvent> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    match word {
        "ready" => Some(GuestEvent::Ready),
        "started" => Some(GuestEvent::Started),
        "exit" => rest.trim().parse().ok().map(GuestEvent::Exited),
        "signal" => rest.trim().parse().ok().map(GuestEvent::Signaled),
        "error" => Some(GuestEvent::Error(rest.to_string())),
        "warning" => Some(GuestEvent::Warning(rest.to_string())),
        "exec-failed" => {
            let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
            Some(GuestEvent::ExecFailed {
                errno: errno.parse().ok()?,
                message: message.to_string(),
            })
        }
        _ => None,
    }
}

/// The longest event line taken from the guest, newline included: its
/// PID 1 writes lines of at most 512 bytes. A longer line is dropped whole
/// and counted, so that nothing in the guest can make the host's buffer
/// grow without bound.
pub const MAX_EVENT_LINE: usize = 4096;

/// Splits the guest's bytes into event lines, bounded by [`MAX_EVENT_LINE`].
#[derive(Debug, Default)]
pub struct EventLines {
    partial: Vec<u8>,
    /// In a line past the limit: its bytes go until its newline.
    discarding: bool,
    /// Lines dropped for their length.
    pub overlong: u64,
}

impl EventLines {
    /// Takes the bytes read; returns the lines they complete (with their
    /// newline). The incomplete rest is kept for the next call.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for piece in bytes.split_inclusive(|byte| *byte == b'\n') {
            let complete = piece.last() == Some(&b'\n');
            if self.discarding {
                self.discarding = !complete;
                continue;
            }
            if self.partial.len() + piece.len() > MAX_EVENT_LINE {
                self.partial.clear();
                self.overlong += 1;
                self.discarding = !complete;
                continue;
            }
            self.partial.extend_from_slice(piece);
            if complete {
                let line = std::mem::take(&mut self.partial);
                lines.push(String::from_utf8_lossy(&line).into_owned());
            }
        }
        lines
    }

    /// Bytes held for an incomplete line.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_length_prefixed_and_binary_safe() {
        let request = Request {
            argv: vec!["sh".into(), "-c".into(), "echo 'a\nb'; exit 42".into()],
            env: vec![("GREETING".into(), "hi there".into())],
            cwd: Some("/share".into()),
            share: Some("/dev/vdb rw".into()),
            net: Some("172.30.0.2 30 172.30.0.1".into()),
        };
        let bytes = request.encode().unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "arg 2\nsharg 2\n-carg 19\necho 'a\nb'; exit 42env 17\nGREETING=hi there\
             cwd 6\n/shareshare 11\n/dev/vdb rwnet 24\n172.30.0.2 30 172.30.0.1run 0\n"
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let empty = Request::default();
        assert_eq!(empty.encode(), Err(RequestError::NoCommand));
        let nul = Request {
            argv: vec!["true".into(), "a\0b".into()],
            ..Default::default()
        };
        assert_eq!(nul.encode(), Err(RequestError::NulInArgument { index: 1 }));
        for (key, value) in [("", "x"), ("A=B", "x"), ("A", "x\0")] {
            let env = Request {
                argv: vec!["true".into()],
                env: vec![(key.into(), value.into())],
                ..Default::default()
            };
            assert!(matches!(env.encode(), Err(RequestError::BadEnvironment(_))));
        }
        let long = Request {
            argv: vec!["x".repeat(MAX_RECORD + 1).into()],
            ..Default::default()
        };
        assert!(matches!(long.encode(), Err(RequestError::TooLong { .. })));
        let many = Request {
            argv: vec!["x".into(); MAX_ARGS + 1],
            ..Default::default()
        };
        assert!(matches!(
            many.encode(),
            Err(RequestError::TooManyArguments { .. })
        ));
        let crowded = Request {
            argv: vec!["true".into()],
            env: vec![("A".into(), "1".into()); MAX_ENVS + 1],
            ..Default::default()
        };
        assert!(matches!(
            crowded.encode(),
            Err(RequestError::TooManyEnvironmentEntries { .. })
        ));
    }

    #[test]
    fn guest_events_parse() {
        assert_eq!(parse_event("ready\n"), Some(GuestEvent::Ready));
        assert_eq!(parse_event("started"), Some(GuestEvent::Started));
        assert_eq!(parse_event("exit 42\n"), Some(GuestEvent::Exited(42)));
        assert_eq!(parse_event("signal 9"), Some(GuestEvent::Signaled(9)));
        assert_eq!(
            parse_event("exec-failed 2 cannot execute 'nope': No such file or directory"),
            Some(GuestEvent::ExecFailed {
                errno: 2,
                message: "cannot execute 'nope': No such file or directory".into()
            })
        );
        assert_eq!(
            parse_event("error cannot mount the share"),
            Some(GuestEvent::Error("cannot mount the share".into()))
        );
        for noise in ["", "exit", "exit x", "signal", "exec-failed x y", "hello"] {
            assert_eq!(parse_event(noise), None, "{noise:?}");
        }
    }

    #[test]
    fn lines_are_split_and_the_rest_is_kept() {
        let mut lines = EventLines::default();
        assert_eq!(lines.feed(b"ready\nstar"), vec!["ready\n".to_string()]);
        assert_eq!(lines.pending(), 4);
        assert_eq!(lines.feed(b"ted\nexit 0\n"), vec!["started\n", "exit 0\n"]);
        assert_eq!(lines.pending(), 0);
        assert_eq!(lines.overlong, 0);
    }

    #[test]
    fn an_endless_line_is_dropped_and_memory_stays_bounded() {
        let mut lines = EventLines::default();
        let chunk = [b'x'; 4096];
        for _ in 0..1024 {
            assert!(lines.feed(&chunk).is_empty());
            assert!(lines.pending() <= MAX_EVENT_LINE);
        }
        // The long line ends; the next one comes through whole.
        assert_eq!(lines.feed(b"xxx\nexit 3\n"), vec!["exit 3\n"]);
        assert_eq!(lines.overlong, 1);
        // A line just at the limit passes, one byte more does not.
        let mut exact = vec![b'w'; MAX_EVENT_LINE - 1];
        exact.push(b'\n');
        assert_eq!(lines.feed(&exact).len(), 1);
        let mut over = vec![b'w'; MAX_EVENT_LINE];
        over.push(b'\n');
        assert!(lines.feed(&over).is_empty());
        assert_eq!(lines.overlong, 2);
        assert_eq!(lines.feed(b"ready\n"), vec!["ready\n"]);
    }
}
