//! Fuzzes virtio-net frame handling: the input becomes a chain of up to
//! eight descriptors (address, length, flags), the bytes of guest memory
//! they point into and a frame length; gathering a transmit chain and
//! scattering a received frame into the chain must never panic, and never
//! report more bytes than the frame or the chain holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::net::frame::{gather, scatter, MAX_FRAME_LEN};
use vmm::memory::GuestMemoryMmap;

const MEM_SIZE: usize = 0x1_0000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let count = (data[0] % 8) as usize + 1;
    let frame_len = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let rest = &data[3..];
    let (table, fill) = rest.split_at((count * 14).min(rest.len()));
    let descriptors: Vec<Descriptor> = table
        .chunks_exact(14)
        .map(|d| {
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let addr = if addr & 1 == 0 { addr % (MEM_SIZE as u64 * 2) } else { addr };
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let fill = &fill[..fill.len().min(MEM_SIZE)];
    mem.write_slice(fill, GuestAddress(0)).unwrap();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    if let Ok(len) = gather(&mem, &descriptors, &mut buf) {
        assert!(len <= MAX_FRAME_LEN);
    }
    let frame = vec![0xa5u8; frame_len];
    if let Ok(written) = scatter(&mem, &descriptors, &frame) {
        assert_eq!(written as usize, frame_len);
    }
});
