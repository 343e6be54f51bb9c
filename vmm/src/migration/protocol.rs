//! The live-migration wire protocol, over one TCP connection from the
//! source VMM to the destination VMM.
//!
//! Every message is a frame: a one-byte kind, a little-endian u64 payload
//! length, the payload. JSON payloads are UTF-8 JSON objects. The frames
//! travel inside the encrypted and authenticated records of [`super::secure`]
//! (both ways; only the connection's salt, the source's first 32 bytes, is
//! in clear): the source's first record is its `Hello` frame, whole; a
//! frame is flushed into records as it is sent.
//!
//! | step | direction | kind | payload |
//! |---|---|---|---|
//! | 1 | source → dest | `Hello` | JSON [`Hello`]: protocol magic and version, the token, the machine's shape |
//! | 2 | dest → source | `Accept` or `Refuse` | empty, or JSON [`Refusal`] (bad token, other version, other shape) |
//! | 3a | source → dest | `Disk`, repeated | (u32 disk index, u64 offset, up to 64 KiB): a local disk being copied (only when `Hello` offers disks) |
//! | 3 | source → dest | `Pages`, repeated | batches of (u64 guest address, 4096 bytes) |
//! | 4 | source → dest | `State` | JSON `VmSnapshot` (sent once the vCPUs are paused and the last dirty pages went) |
//! | 5 | dest → source | `Ready` or `Refuse` | the destination built the VM and waits, not running |
//! | 6 | source → dest | `Commit` | the hand-over: from now on only the destination may run the guest |
//! | 7 | dest → source | `Running` | the destination runs the guest; the source exits |
//!
//! Either side may send `Abort` (JSON [`Refusal`]) before step 6; the
//! source then resumes its guest. A destination runs the guest only after
//! `Commit`; a source stops only after `Running`. If the connection drops
//! between `Commit` and `Running`, the source stays paused and reports
//! that the hand-over is unconfirmed: whoever drives the migration (the
//! agent) asks the destination and either stops or resumes the source.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::snapshot::state::MachineShape;

/// The first field of every `Hello`.
pub const MAGIC: &str = "nubis-migration";
/// The protocol version this VMM speaks (2: the VM state's components
/// carry their own versions).
pub const VERSION: u32 = 2;
/// Guest pages travel whole.
pub const PAGE_SIZE: usize = 4096;
/// Pages per `Pages` frame.
pub const PAGES_PER_FRAME: usize = 256;
/// The largest `State` payload: the same bound as a snapshot's state file.
pub const MAX_STATE_PAYLOAD: u64 = 64 << 20;
/// The largest `Hello`, `Refuse` or `Abort` payload (a JSON object of a
/// few hundred bytes).
pub const MAX_JSON_MESSAGE: u64 = 64 << 10;
/// The largest piece of disk in a `Disk` message.
pub const MAX_DISK_CHUNK: u64 = crate::devices::virtio::block::tracker::CHUNK;
/// Bytes allocated for a payload before they have arrived: a longer one
/// grows as it comes, so a length alone cannot make the receiver allocate.
const FIRST_ALLOCATION: u64 = 1 << 20;

/// The largest payload a message of `kind` may have; a longer one is
/// refused before any of it is read.
pub fn max_payload(kind: Kind) -> u64 {
    match kind {
        Kind::Accept | Kind::Ready | Kind::Commit | Kind::Running => 0,
        Kind::Hello | Kind::Refuse | Kind::Abort => MAX_JSON_MESSAGE,
        Kind::Pages => (PAGES_PER_FRAME * (8 + PAGE_SIZE)) as u64,
        Kind::Disk => 12 + MAX_DISK_CHUNK,
        Kind::State => MAX_STATE_PAYLOAD,
    }
}

/// Errors of the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("a {kind:?} message of {len} bytes is larger than any message")]
    TooLarge { kind: Kind, len: u64 },
    #[error("expected {expected}, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
    #[error("undecodable {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    #[error("a Pages message of {0} bytes is not whole pages")]
    RaggedPages(usize),
}

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Accept = 2,
    Refuse = 3,
    Pages = 4,
    State = 5,
    Ready = 6,
    Commit = 7,
    Running = 8,
    Abort = 9,
    Disk = 10,
}

impl TryFrom<u8> for Kind {
    type Error = ProtocolError;

    fn try_from(byte: u8) -> Result<Self, ProtocolError> {
        Ok(match byte {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::State,
            6 => Kind::Ready,
            7 => Kind::Commit,
            8 => Kind::Running,
            9 => Kind::Abort,
            10 => Kind::Disk,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

/// What the source says first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: String,
    pub version: u32,
    pub token: String,
    pub machine: MachineShape,
    /// The sizes of the disks the source copies, in config order; empty
    /// when the disks are on storage both hosts share.
    #[serde(default)]
    pub disks: Vec<u64>,
}

/// Why a side refused or gave up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub message: String,
}

/// Writes one frame, and flushes it (over a [`super::secure::SecureStream`],
/// into its records).
pub fn send(stream: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    let mut header = [0u8; 9];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)?;
    stream.flush()?;
    Ok(())
}

/// Writes one frame with a JSON payload.
pub fn send_json<T: Serialize>(
    stream: &mut impl Write,
    kind: Kind,
    value: &T,
) -> Result<(), ProtocolError> {
    let payload = serde_json::to_vec(value).map_err(|err| ProtocolError::Decode {
        what: "outgoing message",
        detail: err.to_string(),
    })?;
    send(stream, kind, &payload)
}

/// The size of a frame's header: kind and payload length.
pub const HEADER_LEN: usize = 9;

/// Checks a frame's header: its kind, and its length against the kind's
/// bound.
pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(Kind, u64), ProtocolError> {
    let kind = Kind::try_from(header[0])?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[1..]);
    let len = u64::from_le_bytes(len);
    if len > max_payload(kind) {
        return Err(ProtocolError::TooLarge { kind, len });
    }
    Ok((kind, len))
}

/// Reads one frame.
pub fn receive(stream: &mut impl Read) -> Result<(Kind, Vec<u8>), ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header)?;
    let (kind, len) = parse_header(&header)?;
    let mut payload = Vec::with_capacity(len.min(FIRST_ALLOCATION) as usize);
    stream.take(len).read_to_end(&mut payload)?;
    if (payload.len() as u64) < len {
        return Err(ProtocolError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "a {kind:?} message ended after {} of its {len} bytes",
                payload.len()
            ),
        )));
    }
    Ok((kind, payload))
}

/// Decodes a JSON payload.
pub fn decode<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|err| ProtocolError::Decode {
        what,
        detail: err.to_string(),
    })
}

/// Appends one page at `address` to a `Pages` payload.
pub fn push_page(payload: &mut Vec<u8>, address: u64, page: &[u8]) {
    payload.extend_from_slice(&address.to_le_bytes());
    payload.extend_from_slice(page);
}

/// The (address, page) entries of a `Pages` payload.
pub fn pages(payload: &[u8]) -> Result<impl Iterator<Item = (u64, &[u8])>, ProtocolError> {
    const ENTRY: usize = 8 + PAGE_SIZE;
    if !payload.len().is_multiple_of(ENTRY) {
        return Err(ProtocolError::RaggedPages(payload.len()));
    }
    Ok(payload.chunks(ENTRY).map(|entry| {
        let mut address = [0u8; 8];
        address.copy_from_slice(&entry[..8]);
        (u64::from_le_bytes(address), &entry[8..])
    }))
}

/// A `Disk` payload: a piece of disk `index` at `offset`.
pub fn disk_chunk(index: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(12 + data.len());
    payload.extend_from_slice(&index.to_le_bytes());
    payload.extend_from_slice(&offset.to_le_bytes());
    payload.extend_from_slice(data);
    payload
}

/// The (disk index, offset, data) of a `Disk` payload.
pub fn parse_disk_chunk(payload: &[u8]) -> Result<(u32, u64, &[u8]), ProtocolError> {
    if payload.len() < 12 {
        return Err(ProtocolError::Decode {
            what: "disk chunk",
            detail: format!("{} bytes, shorter than its header", payload.len()),
        });
    }
    let mut index = [0u8; 4];
    index.copy_from_slice(&payload[..4]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&payload[4..12]);
    Ok((
        u32::from_le_bytes(index),
        u64::from_le_bytes(offset),
        &payload[12..],
    ))
}

/// Compares tokens in time independent of where they differ.
pub fn tokens_match(expected: &str, given: &str) -> bool {
    use sha2::{Digest, Sha256};
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(given.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |diff, (x, y)| diff | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        send(&mut wire, Kind::Commit, &[]).unwrap();
        send_json(
            &mut wire,
            Kind::Refuse,
            &Refusal {
                message: "no".into(),
            },
        )
        .unwrap();
        let mut reader = wire.as_slice();
        assert_eq!(receive(&mut reader).unwrap(), (Kind::Commit, vec![]));
        let (kind, payload) = receive(&mut reader).unwrap();
        assert_eq!(kind, Kind::Refuse);
        let refusal: Refusal = decode("refusal", &payload).unwrap();
        assert_eq!(refusal.message, "no");
        assert!(matches!(receive(&mut reader), Err(ProtocolError::Io(_))));
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut reader: &[u8] = &[42, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            receive(&mut reader),
            Err(ProtocolError::UnknownKind(42))
        ));
        let mut huge = vec![Kind::Pages as u8];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            receive(&mut huge.as_slice()),
            Err(ProtocolError::TooLarge { .. })
        ));
        // Each kind has its own bound: a Hello of a state's size, a
        // Commit with a payload, a Pages frame of one page too many.
        for (kind, len) in [
            (Kind::Hello, MAX_JSON_MESSAGE + 1),
            (Kind::Commit, 1),
            (Kind::Running, 1),
            (Kind::Disk, 12 + MAX_DISK_CHUNK + 1),
            (
                Kind::Pages,
                ((PAGES_PER_FRAME + 1) * (8 + PAGE_SIZE)) as u64,
            ),
            (Kind::State, MAX_STATE_PAYLOAD + 1),
        ] {
            let mut frame = vec![kind as u8];
            frame.extend_from_slice(&len.to_le_bytes());
            frame.resize(frame.len() + 16, 0);
            assert!(
                matches!(
                    receive(&mut frame.as_slice()),
                    Err(ProtocolError::TooLarge { .. })
                ),
                "{kind:?} of {len} bytes"
            );
        }
        let mut short = vec![Kind::State as u8];
        short.extend_from_slice(&100u64.to_le_bytes());
        short.extend_from_slice(b"{}");
        assert!(matches!(
            receive(&mut short.as_slice()),
            Err(ProtocolError::Io(_))
        ));
        assert!(decode::<Refusal>("refusal", b"not json").is_err());
    }

    /// A reader that counts what it hands out and has only `left` bytes.
    struct Trickle {
        left: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.left).min(4096);
            buf[..n].fill(0);
            self.left -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_length_alone_does_not_allocate() {
        // A State frame announcing 64 MiB that brings 10 bytes: the reader
        // fails at the end of the stream, having allocated what came (and
        // at most its first allocation), not what was announced.
        let mut header = vec![Kind::State as u8];
        header.extend_from_slice(&MAX_STATE_PAYLOAD.to_le_bytes());
        let mut stream = header.as_slice().chain(Trickle { left: 10 });
        match receive(&mut stream) {
            Err(ProtocolError::Io(err)) => {
                assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
                assert!(err.to_string().contains("after 10 of its"), "{err}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pages_pack_and_unpack() {
        let mut payload = Vec::new();
        push_page(&mut payload, 0x1000, &[7u8; PAGE_SIZE]);
        push_page(&mut payload, 0x20_0000, &[9u8; PAGE_SIZE]);
        let entries: Vec<(u64, u8)> = pages(&payload).unwrap().map(|(a, p)| (a, p[0])).collect();
        assert_eq!(entries, [(0x1000, 7), (0x20_0000, 9)]);
        assert!(pages(&payload[..100]).is_err());
        assert_eq!(pages(&[]).unwrap().count(), 0);
    }

    #[test]
    fn disk_chunks_pack_and_unpack() {
        let payload = disk_chunk(2, 0x1_0000, b"data");
        assert_eq!(
            parse_disk_chunk(&payload).unwrap(),
            (2, 0x1_0000, &b"data"[..])
        );
        assert!(parse_disk_chunk(&payload[..11]).is_err());
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(tokens_match("secret-token", "secret-token"));
        assert!(!tokens_match("secret-token", "secret-tokem"));
        assert!(!tokens_match("secret-token", ""));
    }
}
