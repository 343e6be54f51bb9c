//! The host's end of a VM's vsock device in tests: connecting to a guest
//! port through the device's Unix socket (`CONNECT <port>`), serving guest
//! connections on `<socket>_<port>`, and checking that a stream comes back
//! exactly as it was sent (`nubis-guest-agent send`'s pattern on the guest's side).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The byte at `offset` of a checked stream (as in
/// guest-images/rootfs/nubis-guest-agent.c).
pub fn pattern(offset: usize) -> u8 {
    (offset % 251) as u8
}

/// How a `CONNECT` ended.
#[derive(Debug)]
pub enum Connect {
    /// The guest accepted; the host port it sees.
    Accepted(UnixStream, u32),
    /// The connection was closed without `OK` (nobody listens there, or the
    /// guest did not answer): what came instead.
    Refused(String),
}

/// Connects to guest `port` through the device socket `socket`.
pub fn connect(socket: &Path, port: u32) -> Connect {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|err| panic!("connect to {}: {err}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set a read timeout");
    writeln!(stream, "CONNECT {port}").expect("write CONNECT");
    // The answer a byte at a time: what follows it is the guest's data.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return Connect::Refused(String::from_utf8_lossy(&line).into_owned()),
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text
        .trim_end()
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
    {
        Some(local_port) => Connect::Accepted(stream, local_port),
        None => Connect::Refused(text.into_owned()),
    }
}

/// Connects to guest `port`, which must accept.
pub fn connect_accepted(socket: &Path, port: u32) -> UnixStream {
    match connect(socket, port) {
        Connect::Accepted(stream, _) => stream,
        Connect::Refused(answer) => panic!("guest port {port} refused: {answer:?}"),
    }
}

/// Sends `len` pattern bytes on `stream` while reading them back, then
/// half-closes; returns how many bytes came back in order before the end.
pub fn echo_round_trip(stream: UnixStream, len: usize) -> usize {
    let mut writer = stream.try_clone().expect("clone the stream");
    let sender = std::thread::spawn(move || {
        let chunk: Vec<u8> = (0..len).map(pattern).collect();
        for part in chunk.chunks(64 * 1024) {
            if writer.write_all(part).is_err() {
                return;
            }
        }
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut matched = 0usize;
    loop {
        let buf = match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(buf) => buf,
        };
        let n = buf.len();
        if buf
            .iter()
            .enumerate()
            .any(|(i, byte)| *byte != pattern(matched + i))
        {
            break;
        }
        matched += n;
        reader.consume(n);
    }
    let _ = sender.join();
    matched
}

/// A host listener for guest connections to host `port`: every
/// connection is echoed back (a thread each) until the guest is done.
pub struct EchoListener {
    pub path: PathBuf,
}

impl EchoListener {
    pub fn start(socket: &Path, port: u32) -> Self {
        let mut path = socket.as_os_str().to_owned();
        path.push(format!("_{port}"));
        let path = PathBuf::from(path);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .unwrap_or_else(|err| panic!("listen on {}: {err}", path.display()));
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut reader = stream.try_clone().expect("clone the stream");
                    let _ = std::io::copy(&mut reader, &mut stream);
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        Self { path }
    }
}

impl Drop for EchoListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
