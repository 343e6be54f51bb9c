//! Fuzzes virtio-blk request handling: the input becomes a chain of up to
//! eight descriptors (address, length, flags) plus the bytes of guest
//! memory they point into; parsing and executing must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::request::{execute, parse, Disk};
use vmm::memory::GuestMemoryMmap;

const MEM_SIZE: usize = 0x1_0000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let count = (data[0] % 8) as usize + 1;
    let (table, rest) = data[1..].split_at((count * 14).min(data.len() - 1));
    let descriptors: Vec<Descriptor> = table
        .chunks_exact(14)
        .map(|d| {
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap()) % (MEM_SIZE as u64 * 2);
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap()) % 0x4000;
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let fill = rest.len().min(MEM_SIZE);
    mem.write_slice(&rest[..fill], GuestAddress(0)).unwrap();
    let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    file.set_len(8 * 512).unwrap();
    let id = [0u8; 20];
    if let Ok(request) = parse(&descriptors, &mem) {
        let mut disk = Disk {
            file: &mut file,
            capacity_bytes: 8 * 512,
            read_only: data[0] & 0x80 != 0,
            id: &id,
            write_through: false,
            tracker: None,
        };
        let _ = execute(&request, &mem, &mut disk);
    }
    assert_eq!(file.metadata().unwrap().len(), 8 * 512);
});
