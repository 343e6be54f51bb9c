//! Moving frames between host buffers and guest descriptor chains.
//!
//! Every address and length here was written by the guest: chains are read
//! through `vm-memory` (an address outside guest RAM is an error, never an
//! access), lengths are summed with overflow checks against a fixed frame
//! size, and a chain whose buffers point the wrong way is refused whole.

use virtio_queue::desc::split::Descriptor;
use vm_memory::Bytes;

use super::tap::VNET_HDR_LEN;
use crate::memory::GuestMemoryMmap;

/// The largest frame with its header: a 64 KiB GSO packet, its Ethernet and
/// VLAN headers, and the virtio-net header.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 14 + 4 + 65535;

/// A RARP announcement from `mac` with a zeroed virtio-net header before
/// it: after a restore or a migration the NIC sends it so that bridges and
/// switches (and VXLAN peers) learn at once where the guest's MAC now is,
/// as a guest that moved cannot be expected to say so itself.
pub fn announcement(mac: [u8; 6]) -> Vec<u8> {
    const ETHERTYPE_RARP: [u8; 2] = [0x80, 0x35];
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETHERTYPE_RARP);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 3]); // Ethernet, IPv4, reverse request
    frame.extend_from_slice(&mac); // sender hardware address
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(&mac); // target hardware address
    frame.extend_from_slice(&[0; 4]);
    frame.resize(VNET_HDR_LEN + 60, 0); // the minimum Ethernet frame
    frame
}

/// Why a frame could not be moved; the chain is returned to the guest
/// unused and the frame is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("descriptor {0} of a {1} chain points the wrong way")]
    WrongDirection(usize, &'static str),
    #[error("transmit chain holds more than {MAX_FRAME_LEN} bytes")]
    TooLarge,
    #[error("transmit chain of {0} bytes is shorter than the virtio-net header")]
    TooShort(usize),
    #[error("receive chain has room for {room} bytes, the frame needs {needed}")]
    NoRoom { room: usize, needed: usize },
    #[error("buffer at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

/// Copies a transmit chain (device-readable buffers only) into `buf`;
/// returns the frame's length, header included.
pub fn gather(
    memory: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    buf: &mut [u8],
) -> Result<usize, FrameError> {
    let mut len = 0usize;
    for (index, desc) in descriptors.iter().enumerate() {
        if desc.is_write_only() {
            return Err(FrameError::WrongDirection(index, "transmit"));
        }
        let part = desc.len() as usize;
        let end = len
            .checked_add(part)
            .filter(|end| *end <= buf.len().min(MAX_FRAME_LEN))
            .ok_or(FrameError::TooLarge)?;
        memory
            .read_slice(&mut buf[len..end], desc.addr())
            .map_err(|_| FrameError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
        len = end;
    }
    if len < VNET_HDR_LEN {
        return Err(FrameError::TooShort(len));
    }
    Ok(len)
}

/// The bytes a receive chain can take; an error if any of its buffers is
/// device-readable.
pub fn writable_room(descriptors: &[Descriptor]) -> Result<usize, FrameError> {
    descriptors
        .iter()
        .enumerate()
        .try_fold(0usize, |room, (index, desc)| {
            if desc.is_write_only() {
                Ok(room.saturating_add(desc.len() as usize))
            } else {
                Err(FrameError::WrongDirection(index, "receive"))
            }
        })
}

/// Copies `frame` into a receive chain (device-writable buffers only);
/// returns the bytes written, which is the whole frame.
pub fn scatter(
    memory: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    frame: &[u8],
) -> Result<u32, FrameError> {
    // Check the whole chain before writing anything, so that a refused chain
    // leaves guest memory as it was.
    let room = writable_room(descriptors)?;
    if room < frame.len() {
        return Err(FrameError::NoRoom {
            room,
            needed: frame.len(),
        });
    }
    let mut done = 0usize;
    for desc in descriptors {
        if done == frame.len() {
            break;
        }
        let part = (desc.len() as usize).min(frame.len() - done);
        memory
            .write_slice(&frame[done..done + part], desc.addr())
            .map_err(|_| FrameError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
        done += part;
    }
    u32::try_from(done).map_err(|_| FrameError::TooLarge)
}

/// Sets the header's `num_buffers`: how many chains the frame fills (1
/// unless VIRTIO_NET_F_MRG_RXBUF was negotiated).
pub fn set_num_buffers(frame: &mut [u8], count: u16) {
    if let Some(field) = frame.get_mut(10..VNET_HDR_LEN) {
        field.copy_from_slice(&count.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_rarp_from_the_mac() {
        let mac = [0x02, 0x4e, 0x42, 1, 2, 3];
        let frame = announcement(mac);
        assert_eq!(frame.len(), VNET_HDR_LEN + 60);
        let ethernet = &frame[VNET_HDR_LEN..];
        assert_eq!(&ethernet[..6], &[0xff; 6]);
        assert_eq!(&ethernet[6..12], &mac);
        assert_eq!(&ethernet[12..14], &[0x80, 0x35]);
        assert_eq!(&ethernet[20..22], &[0, 3]);
        assert_eq!(&ethernet[22..28], &mac);
        assert_eq!(&ethernet[32..38], &mac);
    }
    use crate::devices::virtio::testing::{memory, VIRTQ_DESC_F_WRITE};
    use proptest::prelude::*;
    use vm_memory::GuestAddress;

    fn desc(addr: u64, len: u32, write: bool) -> Descriptor {
        Descriptor::new(addr, len, if write { VIRTQ_DESC_F_WRITE } else { 0 }, 0)
    }

    #[test]
    fn a_frame_round_trips_through_scattered_buffers() {
        let mem = memory(0x10000);
        let frame: Vec<u8> = (0..100u8).collect();
        let rx = [
            desc(0x1000, 12, true),
            desc(0x2000, 50, true),
            desc(0x3000, 100, true),
        ];
        assert_eq!(scatter(&mem, &rx, &frame), Ok(100));
        let tx = [
            desc(0x1000, 12, false),
            desc(0x2000, 50, false),
            desc(0x3000, 38, false),
        ];
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        assert_eq!(gather(&mem, &tx, &mut buf), Ok(100));
        assert_eq!(&buf[..100], &frame[..]);
    }

    #[test]
    fn bad_chains_are_refused() {
        let mem = memory(0x10000);
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        assert_eq!(
            gather(&mem, &[desc(0x1000, 64, true)], &mut buf),
            Err(FrameError::WrongDirection(0, "transmit"))
        );
        assert_eq!(
            gather(&mem, &[desc(0x1000, 4, false)], &mut buf),
            Err(FrameError::TooShort(4))
        );
        assert_eq!(
            gather(&mem, &[desc(0, u32::MAX, false)], &mut buf),
            Err(FrameError::TooLarge)
        );
        assert!(matches!(
            gather(&mem, &[desc(0xfff0, 64, false)], &mut buf),
            Err(FrameError::OutsideMemory { .. })
        ));
        let frame = [7u8; 64];
        assert_eq!(
            scatter(&mem, &[desc(0x1000, 32, true)], &frame),
            Err(FrameError::NoRoom {
                room: 32,
                needed: 64
            })
        );
        assert_eq!(
            scatter(&mem, &[desc(0x1000, 64, false)], &frame),
            Err(FrameError::WrongDirection(0, "receive"))
        );
        assert!(matches!(
            scatter(&mem, &[desc(u64::MAX - 8, 64, true)], &frame),
            Err(FrameError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn a_refused_receive_chain_is_left_untouched() {
        let mem = memory(0x10000);
        let frame = [7u8; 64];
        let chain = [desc(0x1000, 32, true), desc(0x2000, 16, false)];
        assert!(scatter(&mem, &chain, &frame).is_err());
        let mut data = [0u8; 32];
        mem.read_slice(&mut data, GuestAddress(0x1000)).unwrap();
        assert_eq!(data, [0u8; 32]);
    }

    #[test]
    fn num_buffers_is_set() {
        let mut frame = [0xffu8; 20];
        set_num_buffers(&mut frame, 1);
        assert_eq!(&frame[10..12], &[1, 0]);
        assert_eq!(frame[12], 0xff);
        set_num_buffers(&mut frame, 0x0203);
        assert_eq!(&frame[10..12], &[3, 2]);
        set_num_buffers(&mut [0u8; 4], 1);
    }

    proptest! {
        /// Random chains (any address, length, direction) never panic and
        /// never report more bytes than a frame can hold.
        #[test]
        fn random_chains_never_panic(
            chain in proptest::collection::vec(
                (prop_oneof![0u64..0x2_0000, any::<u64>()], prop_oneof![0u32..0x2_0000, any::<u32>()], any::<bool>()),
                0..20,
            ),
            frame_len in 0usize..MAX_FRAME_LEN,
        ) {
            let mem = memory(0x10000);
            let chain: Vec<Descriptor> =
                chain.iter().map(|(addr, len, write)| desc(*addr, *len, *write)).collect();
            let mut buf = vec![0u8; MAX_FRAME_LEN];
            if let Ok(len) = gather(&mem, &chain, &mut buf) {
                prop_assert!((VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len));
            }
            let frame = vec![0x5au8; frame_len];
            if let Ok(written) = scatter(&mem, &chain, &frame) {
                prop_assert_eq!(written as usize, frame_len);
            }
        }
    }
}
