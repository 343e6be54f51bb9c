//! The receiving side: `nubis-vmm --migrate-listen ADDR:PORT` waits for one
//! source, checks its token, version and machine, takes RAM and state, and
//! builds the VM; it runs it only after the source's `Commit`.
//!
//! The address may be reachable by others than the source: until a
//! connection has presented the right token (in a `Hello`, the plaintext
//! of its first record, sealed with the migration's key: see
//! [`super::secure`]; of bounded size, within [`HELLO_TIMEOUT`]) nothing
//! is allocated for it beyond that record, and a connection that fails is
//! closed while the destination waits on for its source. A stranger costs
//! one record's reading and one authentication check, at most
//! [`MAX_FIRST_RECORD`] bytes: one without the key (a port scanner,
//! garbage, another migration's source) is closed without a word, as it
//! could not read one; one with the key but a wrong token or a bad `Hello`
//! is told why, in a sealed `Refuse`.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::protocol::{
    self, decode, pages, receive, send, send_json, tokens_match, Hello, Kind, Refusal,
};
use super::secure::{self, Keys, MigrationKey, Role, SecureStream};
use super::MigrationError;
use crate::builder::{build_from_snapshot, BuildError, BuiltVm, RestoreSource};
use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::file::SnapshotError;
use crate::snapshot::state::VmSnapshot;

/// How long the source may send nothing before it counts as gone.
const SOURCE_SILENCE: Duration = Duration::from_secs(30);
/// How long a connection may take to present its `Hello`; then it is
/// closed (the source sends it at once).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections waiting to present their `Hello` at once, at most; a new
/// one closes the oldest.
pub const MAX_PENDING_CONNECTIONS: usize = 16;
/// Refused connections logged one by one; after that every 100th.
const LOGGED_REFUSALS: u64 = 20;
/// The largest first record (ciphertext and tag) a connection may
/// announce: a whole `Hello` frame of the largest size, sealed.
pub const MAX_FIRST_RECORD: usize =
    protocol::HEADER_LEN + protocol::MAX_JSON_MESSAGE as usize + secure::TAG_LEN;

/// The connection from the source, encrypted and authenticated.
pub type Channel = SecureStream<TcpStream>;

/// Errors of the receiving side.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// A migration stream as the builder's source of RAM and state.
struct Incoming<'a, S: Read> {
    stream: &'a mut S,
    /// The disks being copied here: (file, size), in config order.
    disks: Vec<(std::fs::File, u64)>,
}

/// What one connection's first message says.
#[derive(Debug)]
pub enum HelloVerdict {
    /// Not our source: close it and wait on (why, for the log).
    Stranger(String),
    /// The source, with the right token.
    Source(Hello),
}

/// What one connection's first record is.
pub enum FirstRecord {
    /// It does not open with the migration's key (or is no record): not
    /// our source, and it could not read an answer.
    Unopened(String),
    /// It opened: its plaintext judged as a `Hello`, and the keys to go on
    /// with (that record counted).
    Opened(HelloVerdict, Box<Keys>),
}

/// What comes before a connection's first record's body: its salt and
/// the record's length.
const PREFIX_LEN: usize = secure::SALT_LEN + secure::LENGTH_LEN;

/// Opens a connection's first bytes (its salt, then its first record:
/// length and all it announced) with the keys `key` gives with that salt,
/// and judges the plaintext as a whole `Hello` frame.
pub fn judge_first_record(first: &[u8], key: &MigrationKey, token: &str) -> FirstRecord {
    let Some((salt, record)) = first.split_first_chunk::<{ secure::SALT_LEN }>() else {
        return FirstRecord::Unopened(format!("{} bytes, shorter than a salt", first.len()));
    };
    let keys = match Keys::derive(key, salt, Role::Destination) {
        Ok(keys) => keys,
        Err(err) => return FirstRecord::Unopened(err.to_string()),
    };
    match keys.open_first(record, MAX_FIRST_RECORD) {
        Ok((frame, keys)) => FirstRecord::Opened(judge_hello(&frame, token), Box::new(keys)),
        Err(err) => FirstRecord::Unopened(err.to_string()),
    }
}

/// Judges a connection's first frame (header and payload): anything but a
/// decodable `Hello` with the right token is a stranger.
pub fn judge_hello(frame: &[u8], token: &str) -> HelloVerdict {
    let stranger = |why: String| HelloVerdict::Stranger(why);
    let Some((header, payload)) = frame.split_first_chunk::<{ protocol::HEADER_LEN }>() else {
        return stranger(format!("{} bytes, shorter than a header", frame.len()));
    };
    let (kind, len) = match protocol::parse_header(header) {
        Ok(header) => header,
        Err(err) => return stranger(err.to_string()),
    };
    if kind != Kind::Hello {
        return stranger(format!("{kind:?} instead of Hello"));
    }
    if payload.len() as u64 != len {
        return stranger(format!(
            "a Hello of {} bytes announced as {len}",
            payload.len()
        ));
    }
    let hello: Hello = match decode("hello", payload) {
        Ok(hello) => hello,
        Err(err) => return stranger(err.to_string()),
    };
    if hello.magic != protocol::MAGIC {
        return stranger(format!("protocol {:?}", hello.magic));
    }
    if !tokens_match(token, &hello.token) {
        return stranger("wrong migration token".into());
    }
    HelloVerdict::Source(hello)
}

/// A connection that has not yet presented its `Hello`.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    since: Instant,
    /// The connection's salt, its first record's length, then what it
    /// announced (bounded by [`MAX_FIRST_RECORD`] once the length is
    /// checked).
    frame: Vec<u8>,
}

impl Pending {
    /// The bytes this connection's first record still lacks, as far as is
    /// known (the salt's and length's, then the record's); Err when the
    /// length is out of bounds.
    fn missing(&self) -> Result<usize, String> {
        let Some(prefix) = self.frame.first_chunk::<PREFIX_LEN>() else {
            return Ok(PREFIX_LEN - self.frame.len());
        };
        let mut length = [0u8; secure::LENGTH_LEN];
        length.copy_from_slice(&prefix[secure::SALT_LEN..]);
        let len = u32::from_le_bytes(length) as usize;
        if !(secure::TAG_LEN..=MAX_FIRST_RECORD).contains(&len) {
            return Err(format!(
                "a first record of {len} bytes, outside {}..={MAX_FIRST_RECORD}",
                secure::TAG_LEN
            ));
        }
        Ok(PREFIX_LEN + len - self.frame.len())
    }

    /// Reads what is there (never past the first record). Ok(true) when
    /// the record is whole, Err when the connection is to be closed.
    fn read(&mut self) -> Result<bool, String> {
        loop {
            let missing = self.missing()?;
            if missing == 0 {
                return Ok(true);
            }
            let have = self.frame.len();
            self.frame.resize(have + missing, 0);
            let got = (&self.stream).read(&mut self.frame[have..]);
            match got {
                Ok(0) => {
                    self.frame.truncate(have);
                    return Err("closed before its Hello".into());
                }
                Ok(got) => self.frame.truncate(have + got),
                Err(err) => {
                    self.frame.truncate(have);
                    return match err.kind() {
                        std::io::ErrorKind::WouldBlock => Ok(false),
                        std::io::ErrorKind::Interrupted => continue,
                        _ => Err(err.to_string()),
                    };
                }
            }
        }
    }
}

/// Waits on `listener` for the connection whose first record opens with
/// `key` (and its salt) and holds a `Hello` with the right token, closing
/// any other; returns it (blocking again, its first record counted) with
/// its `Hello`.
fn wait_for_source(
    listener: &TcpListener,
    token: &str,
    key: &MigrationKey,
) -> Result<(Channel, SocketAddr, Hello), MigrationError> {
    let listen_error = |source| MigrationError::Listen {
        listen: listener
            .local_addr()
            .map(|addr| addr.to_string())
            .unwrap_or_default(),
        source,
    };
    listener.set_nonblocking(true).map_err(listen_error)?;
    let mut pending: Vec<Pending> = Vec::new();
    let mut refused = 0u64;
    let mut refuse = |peer: SocketAddr, why: &str| {
        refused += 1;
        if refused <= LOGGED_REFUSALS || refused.is_multiple_of(100) {
            log::warn!("migration: closed a connection from {peer} ({refused} so far): {why}");
        }
    };
    loop {
        let now = Instant::now();
        pending.retain(|connection| {
            let late = now.duration_since(connection.since) >= HELLO_TIMEOUT;
            if late {
                log::warn!(
                    "migration: closed a connection from {}: no Hello within {} s",
                    connection.peer,
                    HELLO_TIMEOUT.as_secs()
                );
            }
            !late
        });
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(
                pending
                    .iter()
                    .map(|connection| connection.stream.as_raw_fd()),
            )
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wait_ms = pending
            .iter()
            .map(|connection| HELLO_TIMEOUT.saturating_sub(now.duration_since(connection.since)))
            .min()
            .map_or(-1, |left| left.as_millis().clamp(1, 60_000) as libc::c_int);
        // SAFETY: poll reads and writes `fds.len()` pollfds in a vector
        // that lives for the whole call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(listen_error(err));
        }
        // The connections first (their indices are those of `fds` less
        // one), then new ones.
        let mut index = 0;
        let mut fd_index = 1;
        while index < pending.len() {
            let revents = fds.get(fd_index).map_or(0, |fd| fd.revents);
            fd_index += 1;
            if revents == 0 {
                index += 1;
                continue;
            }
            match pending[index].read() {
                Ok(false) => index += 1,
                Err(why) => {
                    let connection = pending.remove(index);
                    refuse(connection.peer, &why);
                }
                Ok(true) => {
                    let connection = pending.remove(index);
                    match judge_first_record(&connection.frame, key, token) {
                        FirstRecord::Opened(HelloVerdict::Source(hello), keys) => {
                            connection
                                .stream
                                .set_nonblocking(false)
                                .map_err(listen_error)?;
                            let channel = SecureStream::new(connection.stream, *keys);
                            return Ok((channel, connection.peer, hello));
                        }
                        FirstRecord::Opened(HelloVerdict::Stranger(why), keys) => {
                            // It holds the key: told why, as a source with
                            // the wrong token would want to know; the send
                            // cannot block for long (a small frame, a
                            // fresh socket).
                            let _ = connection
                                .stream
                                .set_write_timeout(Some(Duration::from_millis(100)));
                            let _ = connection.stream.set_nonblocking(false);
                            let _ = send_json(
                                &mut SecureStream::new(connection.stream, *keys),
                                Kind::Refuse,
                                &Refusal {
                                    message: why.clone(),
                                },
                            );
                            refuse(connection.peer, &why);
                        }
                        FirstRecord::Unopened(why) => refuse(connection.peer, &why),
                    }
                }
            }
        }
        if fds[0].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        stream.set_nodelay(true).ok();
                        if pending.len() >= MAX_PENDING_CONNECTIONS {
                            let oldest = pending.remove(0);
                            refuse(oldest.peer, "too many connections without a first record");
                        }
                        pending.push(Pending {
                            stream,
                            peer,
                            since: Instant::now(),
                            frame: Vec::new(),
                        });
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    // A connection that went before it was accepted, or
                    // no descriptor left for now: the listener goes on.
                    Err(err) => {
                        log::warn!("migration: accept failed: {err}");
                        break;
                    }
                }
            }
        }
    }
}

/// Opens the config's disk files to receive copies: emptied, then sized as
/// the source's (what is not sent is zero).
fn receive_disks(config: &VmConfig, sizes: &[u64]) -> Result<Vec<(std::fs::File, u64)>, String> {
    if sizes.len() != config.disks.len() {
        return Err(format!(
            "{} disk(s) offered, the VM has {}",
            sizes.len(),
            config.disks.len()
        ));
    }
    config
        .disks
        .iter()
        .zip(sizes)
        .map(|(disk, size)| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&disk.path)
                .and_then(|file| file.set_len(*size).map(|()| file))
                .map_err(|err| format!("cannot prepare disk {}: {err}", disk.path.display()))?;
            Ok((file, *size))
        })
        .collect()
}

impl<S: Read> RestoreSource for Incoming<'_, S> {
    fn load(&mut self, memory: &GuestMemoryMmap) -> Result<VmSnapshot, SnapshotError> {
        receive_ram_and_state(self.stream, memory, &self.disks)
    }

    /// The VM only moved: the source stops as this one starts, and no
    /// copy of its past runs.
    fn new_generation(&self) -> bool {
        false
    }
}

/// Takes RAM pages and disk pieces into `memory` and `disks` until the
/// state comes; what the source sends after its `Hello` and our `Accept`.
pub fn receive_ram_and_state(
    stream: &mut impl Read,
    memory: &GuestMemoryMmap,
    disks: &[(std::fs::File, u64)],
) -> Result<VmSnapshot, SnapshotError> {
    {
        let failed = |detail: String| SnapshotError::Restore {
            what: "migrated".into(),
            detail,
        };
        loop {
            let (kind, payload) = receive(stream).map_err(|err| failed(err.to_string()))?;
            match kind {
                Kind::Pages => {
                    for (address, page) in pages(&payload).map_err(|err| failed(err.to_string()))? {
                        memory
                            .write_slice(page, GuestAddress(address))
                            .map_err(|_| {
                                failed(MigrationError::PageOutsideRam(address).to_string())
                            })?;
                    }
                }
                Kind::Disk => {
                    use std::os::unix::fs::FileExt;
                    let (index, offset, data) = protocol::parse_disk_chunk(&payload)
                        .map_err(|err| failed(err.to_string()))?;
                    let (file, size) = disks.get(index as usize).ok_or_else(|| {
                        failed(format!("a chunk of disk {index}, which is not copied"))
                    })?;
                    let end = offset.checked_add(data.len() as u64);
                    if end.is_none_or(|end| end > *size) {
                        return Err(failed(format!(
                            "a chunk of disk {index} at {offset} (+{}) is past its end",
                            data.len()
                        )));
                    }
                    file.write_all_at(data, offset)
                        .map_err(|err| failed(format!("cannot write disk {index}: {err}")))?;
                }
                Kind::State => {
                    for (file, _) in disks {
                        file.sync_all()
                            .map_err(|err| failed(format!("cannot sync a copied disk: {err}")))?;
                    }
                    return decode("state", &payload).map_err(|err| failed(err.to_string()));
                }
                Kind::Abort => {
                    let refusal: Refusal = decode("abort", &payload).unwrap_or(Refusal {
                        message: "no reason given".into(),
                    });
                    return Err(failed(MigrationError::Aborted(refusal.message).to_string()));
                }
                other => return Err(failed(format!("unexpected {other:?} while receiving RAM"))),
            }
        }
    }
}

fn refuse(stream: &mut Channel, message: String) -> MigrationError {
    let _ = send_json(
        stream,
        Kind::Refuse,
        &Refusal {
            message: message.clone(),
        },
    );
    MigrationError::Refused(message)
}

/// Waits on `listen` for the source (the connection that holds `key` and
/// `token`), receives the VM of `config`, and returns it once handed over
/// (the source has committed; `Running` has gone back to it).
pub fn receive_vm(
    config: VmConfig,
    listen: &str,
    token: &str,
    key: &MigrationKey,
) -> Result<BuiltVm, ReceiveError> {
    let listener = TcpListener::bind(listen).map_err(|source| MigrationError::Listen {
        listen: listen.to_string(),
        source,
    })?;
    log::info!("waiting for a migration on {listen}");
    let (mut stream, peer, hello) = wait_for_source(&listener, token, key)?;
    drop(listener);
    // A source that goes silent (dead, or its link cut) ends the wait: this
    // VMM exits instead of holding the VM's place forever.
    stream.get_ref().set_read_timeout(Some(SOURCE_SILENCE)).ok();
    log::info!("migration from {peer}");
    if hello.version != protocol::VERSION {
        return Err(refuse(
            &mut stream,
            format!(
                "protocol {} version {}; this VMM speaks {} version {}",
                hello.magic,
                hello.version,
                protocol::MAGIC,
                protocol::VERSION
            ),
        )
        .into());
    }
    let mut config = config;
    crate::builder::fit_to_saved(&mut config, &hello.machine);
    let shape = crate::builder::machine_shape(&config);
    if let Err(err) = hello.machine.check(&shape) {
        return Err(refuse(&mut stream, err.to_string()).into());
    }
    let disks = if hello.disks.is_empty() {
        Vec::new()
    } else {
        match receive_disks(&config, &hello.disks) {
            Ok(disks) => disks,
            Err(message) => return Err(refuse(&mut stream, message).into()),
        }
    };
    send(&mut stream, Kind::Accept, &[]).map_err(MigrationError::from)?;
    let mut incoming = Incoming {
        stream: &mut stream,
        disks,
    };
    let built = build_from_snapshot(config, &mut incoming, crate::builder::RestoreAs::Resume);
    drop(incoming);
    let built = match built {
        Ok(built) => built,
        Err(err) => {
            let _ = send_json(
                &mut stream,
                Kind::Refuse,
                &Refusal {
                    message: err.to_string(),
                },
            );
            return Err(err.into());
        }
    };
    send(&mut stream, Kind::Ready, &[]).map_err(MigrationError::from)?;
    match receive(&mut stream).map_err(MigrationError::from)? {
        (Kind::Commit, _) => {}
        (Kind::Abort, payload) => {
            let refusal: Refusal = decode("abort", &payload).unwrap_or(Refusal {
                message: "no reason given".into(),
            });
            return Err(MigrationError::Aborted(refusal.message).into());
        }
        (other, _) => {
            return Err(MigrationError::Aborted(format!("{other:?} instead of Commit")).into())
        }
    }
    send(&mut stream, Kind::Running, &[]).map_err(MigrationError::from)?;
    log::info!("migration from {peer} handed over");
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const TOKEN: &str = "the-right-token-0123";

    fn hello_frame(token: &str) -> Vec<u8> {
        let hello = Hello {
            magic: protocol::MAGIC.into(),
            version: protocol::VERSION,
            token: token.into(),
            machine: crate::snapshot::state::MachineShape {
                vcpus: 1,
                memory_bytes: 1 << 20,
                devices: Vec::new(),
            },
            disks: Vec::new(),
        };
        let mut frame = Vec::new();
        send_json(&mut frame, Kind::Hello, &hello).unwrap();
        frame
    }

    #[test]
    fn only_a_hello_with_the_right_token_is_the_source() {
        assert!(matches!(
            judge_hello(&hello_frame(TOKEN), TOKEN),
            HelloVerdict::Source(_)
        ));
        let mut other_magic = hello_frame(TOKEN);
        let at = other_magic
            .windows(protocol::MAGIC.len())
            .position(|window| window == protocol::MAGIC.as_bytes())
            .unwrap();
        other_magic[at] = b'N';
        let mut truncated = hello_frame(TOKEN);
        truncated.pop();
        let mut commit = Vec::new();
        send(&mut commit, Kind::Commit, &[]).unwrap();
        let mut not_json = Vec::new();
        send(&mut not_json, Kind::Hello, b"{not json").unwrap();
        for (what, frame) in [
            ("wrong token", hello_frame("another-token-0123")),
            ("other magic", other_magic),
            ("truncated", truncated),
            ("commit", commit),
            ("not json", not_json),
            ("empty", Vec::new()),
            ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ] {
            assert!(
                matches!(judge_hello(&frame, TOKEN), HelloVerdict::Stranger(_)),
                "{what}"
            );
        }
    }

    fn key(byte: u8) -> MigrationKey {
        MigrationKey::from_bytes([byte; secure::KEY_LEN])
    }

    const SALT: [u8; secure::SALT_LEN] = [5; secure::SALT_LEN];

    /// A connection's first bytes: `SALT`, then `frame` sealed as the
    /// first record of a source holding `key`.
    fn sealed_hello(key: &MigrationKey, frame: &[u8]) -> Vec<u8> {
        let mut stream = SecureStream::new(
            SALT.to_vec(),
            Keys::derive(key, &SALT, Role::Source).unwrap(),
        );
        stream.write_all(frame).unwrap();
        stream.flush().unwrap();
        stream.get_ref().clone()
    }

    #[test]
    fn only_a_first_record_sealed_with_the_key_is_opened() {
        let record = sealed_hello(&key(1), &hello_frame(TOKEN));
        assert!(matches!(
            judge_first_record(&record, &key(1), TOKEN),
            FirstRecord::Opened(HelloVerdict::Source(_), _)
        ));
        // The right key, a wrong token: opened, and a stranger (told so).
        assert!(matches!(
            judge_first_record(
                &sealed_hello(&key(1), &hello_frame("another-token-0123")),
                &key(1),
                TOKEN
            ),
            FirstRecord::Opened(HelloVerdict::Stranger(_), _)
        ));
        // The Hello in clear, another key, the destination's own direction,
        // a flipped byte, a cut record: not opened.
        let mut flipped = record.clone();
        flipped[20] ^= 1;
        let own_direction = {
            let keys = Keys::derive(&key(1), &SALT, Role::Destination).unwrap();
            let mut stream = SecureStream::new(SALT.to_vec(), keys);
            stream.write_all(&hello_frame(TOKEN)).unwrap();
            stream.flush().unwrap();
            stream.get_ref().clone()
        };
        for (what, first) in [
            ("clear", hello_frame(TOKEN)),
            ("another key", sealed_hello(&key(2), &hello_frame(TOKEN))),
            ("reflected", own_direction),
            ("flipped", flipped),
            ("cut", record[..record.len() - 1].to_vec()),
            ("empty", Vec::new()),
        ] {
            assert!(
                matches!(
                    judge_first_record(&first, &key(1), TOKEN),
                    FirstRecord::Unopened(_)
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn strangers_do_not_stop_the_wait_for_the_source() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let peers = std::thread::spawn(move || {
            // A port scanner: connects and closes.
            drop(TcpStream::connect(address).unwrap());
            // Silent ones, more than may wait at once.
            let silent: Vec<TcpStream> = (0..MAX_PENDING_CONNECTIONS + 4)
                .map(|_| TcpStream::connect(address).unwrap())
                .collect();
            // Garbage, and a record of 4 GiB announced first thing.
            let mut garbage = TcpStream::connect(address).unwrap();
            garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let mut huge = TcpStream::connect(address).unwrap();
            huge.write_all(&u32::MAX.to_le_bytes()).unwrap();
            // A Hello in clear, and one sealed with another key: closed
            // without a word.
            let mut clear = TcpStream::connect(address).unwrap();
            clear.write_all(&hello_frame(TOKEN)).unwrap();
            let mut other_key = TcpStream::connect(address).unwrap();
            other_key
                .write_all(&sealed_hello(&key(2), &hello_frame(TOKEN)))
                .unwrap();
            let mut answer = Vec::new();
            other_key.read_to_end(&mut answer).unwrap();
            assert!(answer.is_empty(), "{answer:?}");
            // The key with a wrong token is told so, sealed.
            let wrong = TcpStream::connect(address).unwrap();
            let mut wrong =
                SecureStream::new(wrong, Keys::derive(&key(1), &SALT, Role::Source).unwrap());
            wrong.get_mut().write_all(&SALT).unwrap();
            wrong.write_all(&hello_frame("another-token-0123")).unwrap();
            wrong.flush().unwrap();
            let (kind, payload) = receive(&mut wrong).unwrap();
            assert_eq!(kind, Kind::Refuse);
            let refusal: Refusal = decode("refusal", &payload).unwrap();
            assert!(refusal.message.contains("token"), "{}", refusal.message);
            // The source, its first record in two pieces.
            let mut source = TcpStream::connect(address).unwrap();
            let record = sealed_hello(&key(1), &hello_frame(TOKEN));
            source.write_all(&record[..5]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            source.write_all(&record[5..]).unwrap();
            let source =
                SecureStream::new(source, Keys::derive(&key(1), &SALT, Role::Source).unwrap());
            (source, silent, garbage, huge, clear)
        });
        let started = Instant::now();
        let (mut stream, _, hello) = wait_for_source(&listener, TOKEN, &key(1)).unwrap();
        assert!(started.elapsed() < HELLO_TIMEOUT);
        assert_eq!(hello.token, TOKEN);
        let (mut source, _silent, _garbage, _huge, _clear) = peers.join().unwrap();
        // The stream is the source's, blocking again, and sealed both ways
        // (the source's first record counted).
        send(&mut stream, Kind::Accept, &[]).unwrap();
        assert_eq!(receive(&mut source).unwrap(), (Kind::Accept, Vec::new()));
    }

    #[test]
    fn a_pending_connection_reads_its_length_and_refuses_a_bad_one() {
        // A connection that has sent its salt and part of a length waits
        // for the rest; a length too large for a first record is refused
        // before it.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut pending = Pending {
            stream,
            peer,
            since: Instant::now(),
            frame: Vec::new(),
        };
        assert_eq!(pending.read(), Ok(false));
        client.write_all(&SALT).unwrap();
        client.write_all(&[0xff]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pending.read(), Ok(false));
        assert_eq!(pending.missing(), Ok(3));
        client.write_all(&[0xff; 3]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(pending.read().unwrap_err().contains("outside"));
        assert!(pending.frame.capacity() <= 64);
    }

    #[test]
    fn a_stream_of_pages_disk_pieces_and_state_is_taken() {
        use crate::memory::GuestMemoryMmap;
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut stream = Vec::new();
        let mut pages_payload = Vec::new();
        protocol::push_page(&mut pages_payload, 0x2000, &[7u8; protocol::PAGE_SIZE]);
        send(&mut stream, Kind::Pages, &pages_payload).unwrap();
        let mut outside = Vec::new();
        protocol::push_page(&mut outside, 0x10000, &[1u8; protocol::PAGE_SIZE]);
        let mut bad = stream.clone();
        send(&mut bad, Kind::Pages, &outside).unwrap();
        let failed = receive_ram_and_state(&mut bad.as_slice(), &memory, &[]).unwrap_err();
        assert!(failed.to_string().contains("outside guest RAM"), "{failed}");
        let mut chunk = stream.clone();
        send(&mut chunk, Kind::Disk, &protocol::disk_chunk(0, 0, b"x")).unwrap();
        let failed = receive_ram_and_state(&mut chunk.as_slice(), &memory, &[]).unwrap_err();
        assert!(failed.to_string().contains("not copied"), "{failed}");
        send(&mut stream, Kind::State, b"{}").unwrap();
        let failed = receive_ram_and_state(&mut stream.as_slice(), &memory, &[]).unwrap_err();
        assert!(failed.to_string().contains("state"), "{failed}");
        let mut page = [0u8; 4];
        memory.read_slice(&mut page, GuestAddress(0x2000)).unwrap();
        assert_eq!(page, [7; 4]);
    }
}
