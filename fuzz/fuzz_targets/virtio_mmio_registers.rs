//! Fuzzes the virtio-mmio transport with a virtio-blk device behind it:
//! the input is a sequence of register accesses (offset, size, value,
//! read or write) from the untrusted guest driver; nothing may panic.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm::devices::bus::BusDevice;
use vmm::devices::legacy::IrqLine;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::mmio::MmioTransport;
use vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};
use vmm::memory::GuestMemoryMmap;
use vmm::rate_limiter::RateLimit;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().set_len(8 * 512).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
    let block = Block::new(
        image.as_path(),
        false,
        "fuzz",
        RateLimit::default(),
        interrupt.clone(),
    )
    .unwrap();
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(block));
    let mut transport = MmioTransport::new(device, interrupt, mem);
    for op in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]]) & 0x1ff);
        let size = (op[2] % 8) as usize + 1;
        let mut bytes = [op[3], op[4], op[5], op[6], 0, 0, 0, 0];
        if op[7] & 1 == 1 {
            transport.write(offset, &bytes[..size]);
        } else {
            transport.read(offset, &mut bytes[..size]);
        }
    }
});
