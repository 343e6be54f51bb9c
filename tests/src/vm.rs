//! Running `nubis-vmm` as a child process: its console (stdout) and log
//! (stderr) are collected as they arrive, so a test can wait for a line,
//! talk to the control socket, send signals, and finally collect the exit
//! status. A VMM still running when its handle is dropped is killed.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a finished VMM ended.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code; None if killed by a signal (including at a timeout).
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Fails unless the VMM ended by itself with exit status 0.
    pub fn assert_clean_stop(&self) {
        assert!(!self.timed_out, "hung:\n{}\n{}", self.stdout, self.stderr);
        assert_eq!(self.code, Some(0), "{}\n{}", self.stdout, self.stderr);
    }

    /// The lines of stderr that are errors meant for the user (not log lines).
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|line| !line.starts_with("[nubis-vmm"))
            .collect()
    }
}

type Buffer = Arc<Mutex<Vec<u8>>>;

fn collect<R: Read + Send + 'static>(mut source: R, into: Buffer) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = source.read(&mut chunk) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&chunk[..n]);
        }
    })
}

fn text(buffer: &Buffer) -> String {
    String::from_utf8_lossy(&buffer.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// A running VMM.
pub struct VmProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Buffer,
    stderr: Buffer,
    readers: Vec<JoinHandle<()>>,
}

impl VmProcess {
    /// Starts `nubis-vmm` with `args`.
    pub fn spawn<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(crate::vmm_binary());
        command.args(args);
        Self::spawn_command(command)
    }

    /// Starts `command` (a `nubis-vmm` with its arguments and environment)
    /// with its standard streams captured.
    pub fn spawn_command(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nubis-vmm");
        let stdout = Buffer::default();
        let stderr = Buffer::default();
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), stdout.clone()),
            collect(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        text(&self.stdout)
    }

    pub fn stderr(&self) -> String {
        text(&self.stderr)
    }

    fn wait_for(&mut self, buffer: &Buffer, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if text(buffer).contains(needle) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                // Exited: the readers finish soon; check once more after them.
                std::thread::sleep(Duration::from_millis(50));
                return text(buffer).contains(needle);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits until the console shows `needle`; false at the timeout or exit.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> bool {
        let buffer = self.stdout.clone();
        self.wait_for(&buffer, needle, timeout)
    }

    /// Waits until the log shows `needle`; false at the timeout or exit.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let buffer = self.stderr.clone();
        self.wait_for(&buffer, needle, timeout)
    }

    /// Types into the guest's console.
    pub fn type_input(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(bytes).expect("write to the VMM's stdin");
        stdin.flush().expect("flush the VMM's stdin");
    }

    /// Sends a signal to the VMM.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// Waits for the VMM to exit, killing it at `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if start.elapsed() >= timeout => {
                    timed_out = true;
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break None,
            }
        };
        drop(self.stdin.take());
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Outcome {
            code: status.and_then(|s| if s.signal().is_some() { None } else { s.code() }),
            signal: status.and_then(|s| s.signal()),
            timed_out,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `nubis-vmm` with `args` to completion (killed at `timeout`).
pub fn run_vmm<I, S>(args: I, timeout: Duration) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    VmProcess::spawn(args).wait(timeout)
}

/// Sends one control-protocol request and returns the parsed answer. Waits
/// up to 10 s for the socket to appear.
pub fn control_request(socket: &Path, request: &str) -> serde_json::Value {
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(err) if start.elapsed() > Duration::from_secs(10) => {
                panic!("cannot connect to {}: {err}", socket.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    let mut writer = stream.try_clone().expect("clone the control stream");
    writer
        .write_all(format!("{request}\n").as_bytes())
        .expect("send the control request");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read the control answer");
    serde_json::from_str(&line).unwrap_or_else(|err| panic!("bad answer {line:?}: {err}"))
}

/// Fails unless the console has a `KEY=expected` line (the first `KEY=`).
pub fn assert_console_value(console: &str, key: &str, expected: &str) {
    assert_eq!(
        console_value(console, key).as_deref(),
        Some(expected),
        "{key} in the console:\n{console}"
    );
}

/// The value of the first `KEY=value` line in a guest's console output.
pub fn console_value(console: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    console.lines().find_map(|line| {
        line.trim_end_matches('\r')
            .strip_prefix(&prefix)
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_values() {
        let console = "boot\r\nMEM=1234 kB\r\nNUBIS_EXIT_CODE=42\r\n";
        assert_eq!(
            console_value(console, "NUBIS_EXIT_CODE").as_deref(),
            Some("42")
        );
        assert_eq!(console_value(console, "MEM").as_deref(), Some("1234 kB"));
        assert_eq!(console_value(console, "NOPE"), None);
    }
}
