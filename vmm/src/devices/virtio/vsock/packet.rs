//! The virtio-vsock packet: a 44-byte little-endian header, then, for
//! `RW` packets, `len` bytes of data.
//!
//! Every byte of a transmit chain and every buffer of a receive chain was
//! written by the guest: chains are read and written through `vm-memory`
//! (an address outside guest RAM is an error, never an access), lengths
//! are summed with overflow checks against a fixed bound, and a chain
//! whose buffers point the wrong way is refused whole.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes};

use crate::memory::GuestMemoryMmap;

/// The header's size on the wire.
pub const HEADER_LEN: usize = 44;
/// The most data one packet carries (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`):
/// a transmit chain declaring more is refused.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The host's context id: the address the guest connects to.
pub const HOST_CID: u64 = 2;
/// `type`: a stream socket, the only kind this device carries.
pub const TYPE_STREAM: u16 = 1;

/// `flags` of a `SHUTDOWN`: the sender will receive, or send, no more.
pub mod shutdown {
    pub const RCV: u32 = 1;
    pub const SEND: u32 = 2;
}

/// What a packet does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    pub fn code(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }

    pub fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Bytes of data after the header.
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer, in bytes (its credit).
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of that buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(field)
        };
        let u32_at = |at: usize| {
            let mut field = [0u8; 4];
            field.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(field)
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.kind.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }

    pub fn op(&self) -> Option<Op> {
        Op::from_code(self.op)
    }
}

/// A header and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub header: Header,
    pub payload: Vec<u8>,
}

/// Why a chain could not be read or written; the chain is returned to the
/// guest unused and the packet is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("descriptor {0} of a {1} chain points the wrong way")]
    WrongDirection(usize, &'static str),
    #[error("transmit chain of {0} bytes is shorter than the packet header")]
    TooShort(usize),
    #[error("transmit chain holds more than a header and {MAX_PAYLOAD} bytes of data")]
    TooLarge,
    #[error("header declares {declared} bytes of data, the chain carries {carried}")]
    LengthMismatch { declared: u32, carried: usize },
    #[error("receive chain has room for {room} bytes, the packet needs {needed}")]
    NoRoom { room: usize, needed: usize },
    #[error("buffer at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

fn outside(desc: &Descriptor) -> PacketError {
    PacketError::OutsideMemory {
        addr: desc.addr().0,
        len: desc.len(),
    }
}

/// Reads the packet a transmit chain (device-readable buffers only)
/// carries. Bytes past the header's `len` are ignored.
pub fn read_tx(
    memory: &GuestMemoryMmap,
    descriptors: &[Descriptor],
) -> Result<Packet, PacketError> {
    const LIMIT: usize = HEADER_LEN + MAX_PAYLOAD;
    let mut total = 0usize;
    for (index, desc) in descriptors.iter().enumerate() {
        if desc.is_write_only() {
            return Err(PacketError::WrongDirection(index, "transmit"));
        }
        total = total
            .checked_add(desc.len() as usize)
            .filter(|total| *total <= LIMIT)
            .ok_or(PacketError::TooLarge)?;
    }
    if total < HEADER_LEN {
        return Err(PacketError::TooShort(total));
    }
    let mut bytes = vec![0u8; total];
    let mut at = 0usize;
    for desc in descriptors {
        let end = at + desc.len() as usize;
        memory
            .read_slice(&mut bytes[at..end], desc.addr())
            .map_err(|_| outside(desc))?;
        at = end;
    }
    let mut raw = [0u8; HEADER_LEN];
    raw.copy_from_slice(&bytes[..HEADER_LEN]);
    let header = Header::from_bytes(&raw);
    let carried = total - HEADER_LEN;
    let declared = header.len as usize;
    if declared > MAX_PAYLOAD {
        return Err(PacketError::TooLarge);
    }
    if declared > carried {
        return Err(PacketError::LengthMismatch {
            declared: header.len,
            carried,
        });
    }
    bytes.truncate(HEADER_LEN + declared);
    bytes.drain(..HEADER_LEN);
    Ok(Packet {
        header,
        payload: bytes,
    })
}

/// The bytes a receive chain (device-writable buffers only) has room for.
pub fn rx_room(descriptors: &[Descriptor]) -> Result<usize, PacketError> {
    let mut room = 0usize;
    for (index, desc) in descriptors.iter().enumerate() {
        if !desc.is_write_only() {
            return Err(PacketError::WrongDirection(index, "receive"));
        }
        room = room.saturating_add(desc.len() as usize);
    }
    Ok(room)
}

/// Writes `packet` (its header's `len` set to its data's) across a receive
/// chain; returns the bytes written.
pub fn write_rx(
    memory: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    packet: &Packet,
) -> Result<u32, PacketError> {
    let needed = HEADER_LEN + packet.payload.len();
    let room = rx_room(descriptors)?;
    if room < needed || packet.payload.len() > MAX_PAYLOAD {
        return Err(PacketError::NoRoom { room, needed });
    }
    let mut header = packet.header;
    header.len = packet.payload.len() as u32;
    let header = header.to_bytes();
    let mut sources = [&header[..], &packet.payload[..]];
    let mut written = 0usize;
    for desc in descriptors {
        let mut addr = desc.addr();
        let mut left = desc.len() as usize;
        for source in sources.iter_mut() {
            if left == 0 {
                break;
            }
            let part = source.len().min(left);
            if part == 0 {
                continue;
            }
            memory
                .write_slice(&source[..part], addr)
                .map_err(|_| outside(desc))?;
            *source = &source[part..];
            addr = addr.checked_add(part as u64).ok_or_else(|| outside(desc))?;
            left -= part;
            written += part;
        }
        if written == needed {
            break;
        }
    }
    Ok(written as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::VIRTQ_DESC_F_WRITE as WRITE;
    use vm_memory::GuestAddress;

    fn memory() -> GuestMemoryMmap {
        crate::devices::virtio::testing::memory(1 << 20)
    }

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn header(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 52,
            len,
            kind: TYPE_STREAM,
            op: Op::Rw.code(),
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn headers_round_trip_in_little_endian() {
        let header = header(5);
        let bytes = header.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[30..32], &5u16.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), header);
        for code in 0..10 {
            if let Some(op) = Op::from_code(code) {
                assert_eq!(op.code(), code);
            }
        }
        assert_eq!(Op::from_code(0), None);
        assert_eq!(Op::from_code(8), None);
    }

    #[test]
    fn a_packet_split_over_descriptors_is_read_whole() {
        let mem = memory();
        mem.write_slice(&header(5).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(b"hello, and more", GuestAddress(0x2000))
            .unwrap();
        let packet = read_tx(&mem, &[desc(0x1000, 44, 0), desc(0x2000, 15, 0)]).unwrap();
        assert_eq!(packet.header, header(5));
        assert_eq!(packet.payload, b"hello");
        // The header itself may be split.
        mem.write_slice(&header(0).to_bytes(), GuestAddress(0x3000))
            .unwrap();
        let packet = read_tx(&mem, &[desc(0x3000, 10, 0), desc(0x300a, 34, 0)]).unwrap();
        assert_eq!(packet.header, header(0));
    }

    #[test]
    fn bad_transmit_chains_are_refused() {
        let mem = memory();
        mem.write_slice(&header(100).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            read_tx(&mem, &[desc(0x1000, 44, 0), desc(0x2000, 10, 0)]),
            Err(PacketError::LengthMismatch {
                declared: 100,
                carried: 10
            })
        );
        assert_eq!(
            read_tx(&mem, &[desc(0x1000, 20, 0)]),
            Err(PacketError::TooShort(20))
        );
        assert_eq!(
            read_tx(&mem, &[desc(0x1000, 44, WRITE)]),
            Err(PacketError::WrongDirection(0, "transmit"))
        );
        assert_eq!(
            read_tx(&mem, &[desc(0x1000, u32::MAX, 0), desc(0, u32::MAX, 0)]),
            Err(PacketError::TooLarge)
        );
        assert!(matches!(
            read_tx(&mem, &[desc((1 << 20) - 8, 44, 0)]),
            Err(PacketError::OutsideMemory { .. })
        ));
        mem.write_slice(&header(u32::MAX).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            read_tx(&mem, &[desc(0x1000, 44, 0)]),
            Err(PacketError::TooLarge)
        );
    }

    #[test]
    fn a_packet_is_written_across_receive_buffers() {
        let mem = memory();
        let packet = Packet {
            header: header(0),
            payload: b"0123456789".to_vec(),
        };
        let chain = [desc(0x1000, 30, WRITE), desc(0x2000, 30, WRITE)];
        assert_eq!(rx_room(&chain), Ok(60));
        assert_eq!(write_rx(&mem, &chain, &packet), Ok(54));
        let mut bytes = [0u8; 54];
        mem.read_slice(&mut bytes[..30], GuestAddress(0x1000))
            .unwrap();
        mem.read_slice(&mut bytes[30..], GuestAddress(0x2000))
            .unwrap();
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&bytes[..HEADER_LEN]);
        assert_eq!(Header::from_bytes(&raw).len, 10, "len is the data's");
        assert_eq!(&bytes[HEADER_LEN..], b"0123456789");
    }

    #[test]
    fn receive_chains_too_small_or_read_only_are_refused() {
        let mem = memory();
        let packet = Packet {
            header: header(0),
            payload: vec![1; 10],
        };
        assert_eq!(
            write_rx(&mem, &[desc(0x1000, 50, WRITE)], &packet),
            Err(PacketError::NoRoom {
                room: 50,
                needed: 54
            })
        );
        assert_eq!(
            write_rx(
                &mem,
                &[desc(0x1000, 50, WRITE), desc(0x2000, 50, 0)],
                &packet
            ),
            Err(PacketError::WrongDirection(1, "receive"))
        );
        assert!(matches!(
            write_rx(&mem, &[desc((1 << 20) - 8, 64, WRITE)], &packet),
            Err(PacketError::OutsideMemory { .. })
        ));
    }
}
