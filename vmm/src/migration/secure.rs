//! The migration stream's confidentiality and authenticity: every byte
//! between the two VMMs, both ways, travels in AEAD records.
//!
//! Why: a migration carries the guest's RAM, its device state and its
//! disks, between hosts on networks nobody here controls (on-premise to
//! cloud). Whoever can read the link would read the guest; whoever can
//! write to it could plant pages in it. The agents share a 32-byte key per
//! migration (made by the destination's agent with the token, handed to
//! the source's agent over the host-to-host API, to each VMM in its
//! `migrate` request or its environment, never on a command line), and
//! both VMMs derive from it one key per direction:
//!
//! * The source opens each connection with [`SALT_LEN`] random bytes in
//!   clear, the connection's salt, then the records. Per direction:
//!   `HKDF-SHA256(ikm = key, salt = the connection's salt, info =
//!   "nubis migration v1 source->destination")`, and the same with
//!   `"destination->source"`: a record reflected back to its sender does
//!   not open there, and a second connection with the same key (a source
//!   that tries again after a refusal) has keys of its own, so its
//!   counters starting at zero again never repeat a nonce under a key.
//! * A record is `u32 length (LE) || AES-256-GCM(plaintext)` (ring's,
//!   with AES-NI: ~1340 MB/s sealing here, where ChaCha20-Poly1305 sealed
//!   ~450 MB/s, too slow for a guest that writes its memory fast to
//!   converge), the
//!   length counting ciphertext and tag (at most [`MAX_RECORD`], at least
//!   the tag) and authenticated as associated data; it is checked before
//!   anything is allocated for the record.
//! * The nonce is the direction's record counter (its 64 bits little
//!   endian, then four zero bytes): each side counts the records it sent
//!   and opened, so a replayed, reordered, dropped or injected record does
//!   not open. A direction stops at 2^32 records (4 PiB at full records)
//!   rather than reuse a nonce.
//!
//! The first record from the source, right after the salt, holds its
//! `Hello` frame, whole (the destination judges it alone, see
//! `destination`); after that the records carry the protocol's frames as a
//! byte stream, cut anywhere.
//!
//! A direction that failed (a record that does not open, a length out of
//! bounds, the end of the stream inside a record) stays failed: nothing
//! after it is read. Writing the other way goes on, so that a side can
//! still tell the other why it gives up.

use std::io::{Read, Write};

use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Sha256;

/// Bytes in a migration key.
pub const KEY_LEN: usize = 32;
/// The characters of a migration key in hex.
pub const KEY_HEX_LEN: usize = 2 * KEY_LEN;
/// Bytes of a record's authentication tag.
pub const TAG_LEN: usize = 16;
/// The most plaintext in one record.
pub const MAX_PLAINTEXT: usize = 1 << 20;
/// The largest record (ciphertext and tag) a length may announce.
pub const MAX_RECORD: usize = MAX_PLAINTEXT + TAG_LEN;
/// Bytes of a record's length.
pub const LENGTH_LEN: usize = 4;
/// Records one direction may carry: its nonces are never reused.
pub const MAX_RECORDS: u64 = 1 << 32;

/// Bytes of a connection's salt, sent in clear before its first record.
pub const SALT_LEN: usize = 32;

const SOURCE_TO_DESTINATION: &[u8] = b"nubis migration v1 source->destination";
const DESTINATION_TO_SOURCE: &[u8] = b"nubis migration v1 destination->source";

/// A fresh connection salt from the kernel's random source; an error
/// rather than a weak one.
pub fn random_salt() -> std::io::Result<[u8; SALT_LEN]> {
    let mut salt = [0u8; SALT_LEN];
    let mut filled = 0;
    while filled < SALT_LEN {
        let rest = &mut salt[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // a live, writable buffer of that length.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got > 0 {
            filled += got as usize;
            continue;
        }
        if got == 0 {
            return Err(std::io::Error::other("getrandom gave no bytes"));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(salt)
}

/// Errors of the record layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecureError {
    #[error("the migration key is {0} characters long, not {KEY_HEX_LEN} hex digits")]
    KeyLength(usize),
    #[error("the migration key has a character that is not a hex digit at position {0}")]
    KeyDigit(usize),
    #[error("record {record} announces {len} bytes, outside {TAG_LEN}..={max}")]
    Length { record: u64, len: u64, max: usize },
    #[error(
        "record {record} does not authenticate: tampered with, replayed, out of order, or sealed with another migration key"
    )]
    Forged { record: u64 },
    #[error("the stream ended inside record {record}")]
    Truncated { record: u64 },
    #[error("{MAX_RECORDS} records went one way: a nonce would repeat")]
    Exhausted,
    #[error("the stream failed before (record {record}): nothing after it is read")]
    Failed { record: u64 },
    #[error("cannot seal record {record}")]
    Seal { record: u64 },
    #[error("ring refused a derived {KEY_LEN}-byte AES-256-GCM key")]
    Cipher,
}

impl From<SecureError> for std::io::Error {
    fn from(err: SecureError) -> Self {
        let kind = match err {
            SecureError::Truncated { .. } => std::io::ErrorKind::UnexpectedEof,
            _ => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, err)
    }
}

/// A migration's shared key. Never shown: its `Debug` hides it, and its
/// bytes are wiped when it is dropped.
#[derive(Clone)]
pub struct MigrationKey([u8; KEY_LEN]);

impl std::fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationKey(..)")
    }
}

impl Drop for MigrationKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl MigrationKey {
    /// The key from its 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Result<Self, SecureError> {
        let digits = hex.as_bytes();
        if digits.len() != KEY_HEX_LEN {
            return Err(SecureError::KeyLength(hex.chars().count()));
        }
        let value = |index: usize| -> Result<u8, SecureError> {
            match digits[index] {
                digit @ b'0'..=b'9' => Ok(digit - b'0'),
                digit @ b'a'..=b'f' => Ok(digit - b'a' + 10),
                digit @ b'A'..=b'F' => Ok(digit - b'A' + 10),
                _ => Err(SecureError::KeyDigit(index)),
            }
        };
        let mut key = MigrationKey([0u8; KEY_LEN]);
        for (index, byte) in key.0.iter_mut().enumerate() {
            *byte = value(2 * index)? << 4 | value(2 * index + 1)?;
        }
        Ok(key)
    }

    /// The key as 64 lower-case hex digits (for tests and tools that make
    /// one).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// A key of these bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        MigrationKey(bytes)
    }
}

/// Which end of the migration this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

/// One direction's cipher and record counter.
#[derive(Clone)]
struct Direction {
    cipher: LessSafeKey,
    /// Records sealed or opened so far: the next one's nonce.
    records: u64,
}

impl Direction {
    fn new(key: &MigrationKey, salt: &[u8; SALT_LEN], info: &[u8]) -> Result<Self, SecureError> {
        let mut derived = [0u8; KEY_LEN];
        // Expanding 32 bytes never fails (HKDF-SHA256 gives up to 8160).
        let expanded = Hkdf::<Sha256>::new(Some(salt), &key.0).expand(info, &mut derived);
        debug_assert!(expanded.is_ok());
        // A 32-byte key is what AES-256-GCM takes; ring refuses only
        // another length.
        let unbound = UnboundKey::new(&AES_256_GCM, &derived);
        zeroize::Zeroize::zeroize(&mut derived);
        let cipher = LessSafeKey::new(unbound.map_err(|_| SecureError::Cipher)?);
        Ok(Direction { cipher, records: 0 })
    }

    fn nonce(&self) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.records.to_le_bytes());
        Nonce::assume_unique_for_key(nonce)
    }

    /// Seals `record[LENGTH_LEN..]` (the plaintext) in place, writes its
    /// length in front and its tag after it.
    fn seal(&mut self, record: &mut Vec<u8>) -> Result<(), SecureError> {
        if self.records >= MAX_RECORDS {
            return Err(SecureError::Exhausted);
        }
        let plaintext = record.len() - LENGTH_LEN;
        debug_assert!(plaintext <= MAX_PLAINTEXT);
        let length = ((plaintext + TAG_LEN) as u32).to_le_bytes();
        record[..LENGTH_LEN].copy_from_slice(&length);
        let nonce = self.nonce();
        let tag = self
            .cipher
            .seal_in_place_separate_tag(nonce, Aad::from(length), &mut record[LENGTH_LEN..])
            .map_err(|_| SecureError::Seal {
                record: self.records,
            })?;
        record.extend_from_slice(tag.as_ref());
        self.records += 1;
        Ok(())
    }

    /// Checks a record's length: Ok(bytes of ciphertext and tag to read).
    fn check_length(&self, length: [u8; LENGTH_LEN], max: usize) -> Result<usize, SecureError> {
        if self.records >= MAX_RECORDS {
            return Err(SecureError::Exhausted);
        }
        let len = u32::from_le_bytes(length) as usize;
        if !(TAG_LEN..=max).contains(&len) {
            return Err(SecureError::Length {
                record: self.records,
                len: len as u64,
                max,
            });
        }
        Ok(len)
    }

    /// Opens `body` (ciphertext and tag, as long as `length` says) in
    /// place; on success `body` is the plaintext.
    fn open(&mut self, length: [u8; LENGTH_LEN], body: &mut Vec<u8>) -> Result<(), SecureError> {
        let record = self.records;
        let Some(split) = body.len().checked_sub(TAG_LEN) else {
            return Err(SecureError::Forged { record });
        };
        let nonce = self.nonce();
        let opened = self
            .cipher
            .open_in_place(nonce, Aad::from(length), body)
            .map(|plaintext| plaintext.len())
            .map_err(|_| SecureError::Forged { record })?;
        debug_assert_eq!(opened, split);
        body.truncate(split);
        self.records += 1;
        Ok(())
    }
}

/// Both directions' keys for one side, derived once from the shared key.
#[derive(Clone)]
pub struct Keys {
    send: Direction,
    receive: Direction,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Keys {{ sent: {}, opened: {} }}",
            self.send.records, self.receive.records
        )
    }
}

impl Keys {
    /// The keys of `role`'s side of a connection with `salt` in a
    /// migration sharing `key`.
    pub fn derive(
        key: &MigrationKey,
        salt: &[u8; SALT_LEN],
        role: Role,
    ) -> Result<Self, SecureError> {
        let to_destination = Direction::new(key, salt, SOURCE_TO_DESTINATION)?;
        let to_source = Direction::new(key, salt, DESTINATION_TO_SOURCE)?;
        Ok(match role {
            Role::Source => Keys {
                send: to_destination,
                receive: to_source,
            },
            Role::Destination => Keys {
                send: to_source,
                receive: to_destination,
            },
        })
    }

    /// Opens the first record a peer sent, as read whole (`length ||
    /// ciphertext || tag`, of at most `max` after its length): its
    /// plaintext, and these keys with that record counted.
    pub fn open_first(&self, record: &[u8], max: usize) -> Result<(Vec<u8>, Keys), SecureError> {
        let mut keys = self.clone();
        let Some((length, body)) = record.split_first_chunk::<LENGTH_LEN>() else {
            return Err(SecureError::Truncated { record: 0 });
        };
        let len = keys.receive.check_length(*length, max)?;
        if body.len() != len {
            return Err(SecureError::Truncated { record: 0 });
        }
        let mut plaintext = body.to_vec();
        keys.receive.open(*length, &mut plaintext)?;
        Ok((plaintext, keys))
    }
}

/// A stream whose bytes travel in AEAD records (see the module docs):
/// `Write` buffers up to a record's plaintext and seals it when full or
/// on `flush`; `Read` opens one record at a time and hands out its
/// plaintext.
pub struct SecureStream<S> {
    inner: S,
    keys: Keys,
    /// `LENGTH_LEN` bytes of room, then the plaintext not yet sealed.
    outgoing: Vec<u8>,
    /// The last record opened, and how much of it was handed out.
    incoming: Vec<u8>,
    handed: usize,
    /// Why reading stopped for good.
    failed: Option<SecureError>,
}

impl<S> SecureStream<S> {
    /// `inner` with `keys` (fresh, or as `Keys::open_first` left them).
    pub fn new(inner: S, keys: Keys) -> Self {
        SecureStream {
            inner,
            keys,
            outgoing: vec![0u8; LENGTH_LEN],
            incoming: Vec::new(),
            handed: 0,
            failed: None,
        }
    }

    /// The stream beneath (for its socket options).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Records sent and opened so far.
    pub fn records(&self) -> (u64, u64) {
        (self.keys.send.records, self.keys.receive.records)
    }
}

impl<S: Write> SecureStream<S> {
    /// Seals what is buffered (if anything) and writes it out.
    fn seal_buffered(&mut self) -> std::io::Result<()> {
        if self.outgoing.len() == LENGTH_LEN {
            return Ok(());
        }
        let sealed = self.keys.send.seal(&mut self.outgoing);
        let written = match sealed {
            Ok(()) => self.inner.write_all(&self.outgoing),
            Err(err) => Err(err.into()),
        };
        // Sealed or not, the plaintext goes: it is never sent twice under
        // two nonces, nor kept in memory longer than needed.
        self.outgoing.clear();
        self.outgoing.resize(LENGTH_LEN, 0);
        written
    }
}

impl<S: Write> Write for SecureStream<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = LENGTH_LEN + MAX_PLAINTEXT - self.outgoing.len();
        let taken = buf.len().min(room);
        self.outgoing.extend_from_slice(&buf[..taken]);
        if self.outgoing.len() == LENGTH_LEN + MAX_PLAINTEXT {
            self.seal_buffered()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.seal_buffered()?;
        self.inner.flush()
    }
}

impl<S: Read> SecureStream<S> {
    /// Reads and opens the next record into `incoming`. Ok(false) at the
    /// end of the stream on a record boundary.
    fn next_record(&mut self) -> std::io::Result<bool> {
        let record = self.keys.receive.records;
        let mut length = [0u8; LENGTH_LEN];
        let mut got = 0;
        while got < LENGTH_LEN {
            match self.inner.read(&mut length[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(SecureError::Truncated { record }.into()),
                Ok(n) => got += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        let len = self.keys.receive.check_length(length, MAX_RECORD)?;
        // The length is bounded: at most one record's room, reused.
        self.incoming.clear();
        self.incoming.resize(len, 0);
        self.handed = 0;
        let mut filled = 0;
        while filled < len {
            match self.inner.read(&mut self.incoming[filled..]) {
                Ok(0) => return Err(SecureError::Truncated { record }.into()),
                Ok(n) => filled += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        self.keys.receive.open(length, &mut self.incoming)?;
        Ok(true)
    }
}

impl<S: Read> Read for SecureStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(err) = &self.failed {
            return Err(err.clone().into());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        while self.handed == self.incoming.len() {
            match self.next_record() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(err) => {
                    // Reading cannot resume inside a record, nor after one
                    // that did not open: this direction is done.
                    self.incoming.clear();
                    self.handed = 0;
                    self.failed = Some(SecureError::Failed {
                        record: self.keys.receive.records,
                    });
                    return Err(err);
                }
            }
        }
        let given = buf.len().min(self.incoming.len() - self.handed);
        buf[..given].copy_from_slice(&self.incoming[self.handed..self.handed + given]);
        self.handed += given;
        Ok(given)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> MigrationKey {
        MigrationKey::from_bytes([byte; KEY_LEN])
    }

    const SALT: [u8; SALT_LEN] = [9; SALT_LEN];

    fn pair(key: &MigrationKey) -> (Keys, Keys) {
        (
            Keys::derive(key, &SALT, Role::Source).unwrap(),
            Keys::derive(key, &SALT, Role::Destination).unwrap(),
        )
    }

    #[test]
    fn each_connection_has_keys_of_its_own() {
        let key = key(7);
        let salt = random_salt().unwrap();
        assert_ne!(salt, random_salt().unwrap());
        let first = Keys::derive(&key, &salt, Role::Source).unwrap();
        let again = Keys::derive(&key, &random_salt().unwrap(), Role::Source).unwrap();
        // The same plaintext as record 0 of two connections: nothing alike.
        let a = sealed(&first, &[b"Hello"]);
        let b = sealed(&again, &[b"Hello"]);
        assert_ne!(a[4..], b[4..]);
        // A record of one connection does not open in the other.
        let other = Keys::derive(&key, &random_salt().unwrap(), Role::Destination).unwrap();
        assert!(read_all(&other, &a).is_err());
        assert_eq!(
            read_all(&Keys::derive(&key, &salt, Role::Destination).unwrap(), &a).unwrap(),
            b"Hello"
        );
    }

    /// What `keys` sends when `messages` are written, each flushed.
    fn sealed(keys: &Keys, messages: &[&[u8]]) -> Vec<u8> {
        let mut stream = SecureStream::new(Vec::new(), keys.clone());
        for message in messages {
            stream.write_all(message).unwrap();
            stream.flush().unwrap();
        }
        stream.inner
    }

    fn read_all(keys: &Keys, wire: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut stream = SecureStream::new(wire, keys.clone());
        let mut out = Vec::new();
        stream.read_to_end(&mut out)?;
        Ok(out)
    }

    /// The records of a wire: (offset, whole record).
    fn records(wire: &[u8]) -> Vec<(usize, &[u8])> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let len = u32::from_le_bytes(wire[at..at + 4].try_into().unwrap()) as usize;
            out.push((at, &wire[at..at + 4 + len]));
            at += 4 + len;
        }
        out
    }

    #[test]
    fn keys_parse_from_hex_only() {
        let hex = "00112233445566778899aabbccddeeffFFEEDDCCBBAA99887766554433221100";
        let parsed = MigrationKey::from_hex(hex).unwrap();
        assert_eq!(parsed.to_hex(), hex.to_lowercase());
        assert_eq!(format!("{parsed:?}"), "MigrationKey(..)");
        assert_eq!(
            MigrationKey::from_hex(&hex[..63]).unwrap_err(),
            SecureError::KeyLength(63)
        );
        assert_eq!(
            MigrationKey::from_hex("").unwrap_err(),
            SecureError::KeyLength(0)
        );
        let mut bad = hex.to_string();
        bad.replace_range(10..11, "g");
        assert_eq!(
            MigrationKey::from_hex(&bad).unwrap_err(),
            SecureError::KeyDigit(10)
        );
        // Multi-byte characters are not digits, and never split a byte.
        let wide = format!("é{}", &hex[2..]);
        assert!(MigrationKey::from_hex(&wide).is_err());
        // The error never shows the key.
        let message = MigrationKey::from_hex(&bad).unwrap_err().to_string();
        assert!(!message.contains(&hex[..16]), "{message}");
    }

    #[test]
    fn bytes_round_trip_in_records_of_any_size() {
        let (source, destination) = pair(&key(7));
        let big: Vec<u8> = (0..3 * MAX_PLAINTEXT + 123).map(|i| i as u8).collect();
        let wire = sealed(&source, &[b"hello", b"", &big, b"end"]);
        // Full records, then the rest at the flush; the empty flush sends
        // nothing.
        let lens: Vec<usize> = records(&wire).iter().map(|(_, r)| r.len()).collect();
        assert_eq!(
            lens,
            [
                4 + 5 + TAG_LEN,
                4 + MAX_RECORD,
                4 + MAX_RECORD,
                4 + MAX_RECORD,
                4 + 123 + TAG_LEN,
                4 + 3 + TAG_LEN
            ]
        );
        let mut expected = b"hello".to_vec();
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b"end");
        assert_eq!(read_all(&destination, &wire).unwrap(), expected);
        // And the other way.
        let back = sealed(&destination, &[b"Accept"]);
        assert_eq!(read_all(&source, &back).unwrap(), b"Accept");
    }

    #[test]
    fn the_plaintext_is_not_on_the_wire() {
        let (source, _) = pair(&key(7));
        let marker = b"NUBIS-MARKER-0123456789".repeat(100);
        let wire = sealed(&source, &[&marker]);
        assert!(!wire.windows(23).any(|w| w == &marker[..23]));
    }

    #[test]
    fn a_changed_byte_anywhere_is_refused() {
        let (source, destination) = pair(&key(7));
        let wire = sealed(&source, &[b"first record", b"second record"]);
        for at in 0..wire.len() {
            let mut tampered = wire.clone();
            tampered[at] ^= 0x01;
            let read = read_all(&destination, &tampered);
            assert!(read.is_err(), "a flip at {at} went unnoticed: {read:?}");
        }
        // Ciphertext, tag and length (one shorter) of the first record,
        // each: the record does not open.
        let first = records(&wire)[0].1.len();
        for (what, at) in [("length", 0), ("ciphertext", 4), ("tag", first - 1)] {
            let mut tampered = wire.clone();
            tampered[at] ^= 0x01;
            let err = read_all(&destination, &tampered).unwrap_err();
            assert!(
                err.to_string().contains("record 0 does not authenticate"),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn replayed_reordered_and_dropped_records_are_refused() {
        let (source, destination) = pair(&key(7));
        let wire = sealed(&source, &[b"one", b"two", b"three"]);
        let all = records(&wire);
        let join = |order: &[usize]| -> Vec<u8> {
            order.iter().flat_map(|i| all[*i].1.to_vec()).collect()
        };
        assert_eq!(
            read_all(&destination, &join(&[0, 1, 2])).unwrap(),
            b"onetwothree"
        );
        for order in [[0, 0, 1], [0, 2, 1], [1, 0, 2], [0, 2, 2]] {
            let joined = join(&order);
            let mut stream = SecureStream::new(&joined[..], destination.clone());
            let mut out = Vec::new();
            let err = stream.read_to_end(&mut out).unwrap_err();
            assert!(
                err.to_string().contains("does not authenticate"),
                "{order:?}: {err}"
            );
            // What came before the bad record came; nothing after it.
            assert!(b"onetwothree".starts_with(&out), "{order:?}");
            assert!(stream.read(&mut [0u8; 8]).is_err());
        }
    }

    #[test]
    fn another_key_is_refused() {
        let (source, _) = pair(&key(7));
        let (_, other) = pair(&key(8));
        let wire = sealed(&source, &[b"secret"]);
        let err = read_all(&other, &wire).unwrap_err();
        assert!(err.to_string().contains("another migration key"), "{err}");
        let first = &records(&wire)[0].1;
        assert!(matches!(
            other.open_first(first, MAX_RECORD),
            Err(SecureError::Forged { record: 0 })
        ));
    }

    #[test]
    fn directions_have_their_own_keys() {
        let (source, destination) = pair(&key(7));
        // A record reflected back to the side that sent it.
        let wire = sealed(&source, &[b"Hello"]);
        assert!(read_all(&source, &wire).is_err());
        let wire = sealed(&destination, &[b"Accept"]);
        assert!(read_all(&destination, &wire).is_err());
        assert_ne!(
            sealed(&source, &[b"same"]),
            sealed(&destination, &[b"same"])
        );
    }

    /// A reader that counts what it hands out.
    struct Counting<'a> {
        data: &'a [u8],
        read: usize,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.data.read(buf)?;
            self.read += n;
            Ok(n)
        }
    }

    #[test]
    fn lengths_out_of_bounds_are_refused_before_reading_or_allocating() {
        let (_, destination) = pair(&key(7));
        for len in [MAX_RECORD as u32 + 1, u32::MAX, 0, TAG_LEN as u32 - 1] {
            let mut wire = len.to_le_bytes().to_vec();
            wire.extend_from_slice(&[0u8; 64]);
            let mut inner = Counting {
                data: &wire,
                read: 0,
            };
            let mut stream = SecureStream::new(&mut inner, destination.clone());
            let err = stream.read(&mut [0u8; 16]).unwrap_err();
            assert!(err.to_string().contains("outside"), "{len}: {err}");
            assert_eq!(stream.incoming.capacity(), 0, "{len}");
            drop(stream);
            assert_eq!(inner.read, LENGTH_LEN, "{len}");
        }
        // A first record is held to the bound given for it.
        let (source, destination) = pair(&key(7));
        let wire = sealed(&source, &[&[0u8; 100]]);
        assert!(matches!(
            destination.open_first(&wire, 50),
            Err(SecureError::Length { len: 116, .. })
        ));
        assert!(destination.open_first(&wire, 116).is_ok());
        assert!(destination
            .open_first(&wire[..wire.len() - 1], 116)
            .is_err());
        assert!(destination.open_first(&wire[..2], 116).is_err());
    }

    #[test]
    fn a_stream_cut_inside_a_record_is_an_error_and_on_a_boundary_the_end() {
        let (source, destination) = pair(&key(7));
        let wire = sealed(&source, &[b"one", b"two"]);
        let first = records(&wire)[0].1.len();
        assert_eq!(read_all(&destination, &wire[..first]).unwrap(), b"one");
        for cut in [first + 2, wire.len() - 1] {
            let err = read_all(&destination, &wire[..cut]).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{cut}");
        }
    }

    #[test]
    fn the_first_record_continues_into_the_stream() {
        let (source, destination) = pair(&key(7));
        let wire = sealed(&source, &[b"Hello", b"Pages"]);
        let first = records(&wire)[0].1.len();
        let (plaintext, keys) = destination.open_first(&wire[..first], 100).unwrap();
        assert_eq!(plaintext, b"Hello");
        assert_eq!(read_all(&keys, &wire[first..]).unwrap(), b"Pages");
        // Fresh keys expect record 0 there instead.
        assert!(read_all(&destination, &wire[first..]).is_err());
    }

    #[test]
    fn a_direction_stops_before_its_nonces_repeat() {
        let (mut source, _) = pair(&key(7));
        source.send.records = MAX_RECORDS - 1;
        let mut stream = SecureStream::new(Vec::new(), source);
        stream.write_all(b"last").unwrap();
        stream.flush().unwrap();
        stream.write_all(b"one too many").unwrap();
        let err = stream.flush().unwrap_err();
        assert!(err.to_string().contains("nonce would repeat"), "{err}");
        assert_eq!(records(&stream.inner).len(), 1);
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Sealing and opening speed (run with --release --ignored).
    #[test]
    #[ignore]
    fn throughput() {
        let key = MigrationKey::from_bytes([3; KEY_LEN]);
        let data = vec![0x5au8; 256 << 20];
        let start = std::time::Instant::now();
        let salt = [1; SALT_LEN];
        let mut writer = SecureStream::new(
            Vec::with_capacity(260 << 20),
            Keys::derive(&key, &salt, Role::Source).unwrap(),
        );
        writer.write_all(&data).unwrap();
        writer.flush().unwrap();
        let sealed = start.elapsed();
        let wire = writer.inner;
        let start = std::time::Instant::now();
        let mut reader = SecureStream::new(
            &wire[..],
            Keys::derive(&key, &salt, Role::Destination).unwrap(),
        );
        let mut out = vec![0u8; 1 << 20];
        while reader.read(&mut out).unwrap() > 0 {}
        let opened = start.elapsed();
        eprintln!(
            "seal {:.0} MB/s, open {:.0} MB/s",
            256.0 * 1.048576 / sealed.as_secs_f64(),
            256.0 * 1.048576 / opened.as_secs_f64()
        );
    }
}
