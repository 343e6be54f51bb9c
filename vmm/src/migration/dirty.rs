//! Which guest pages changed since the last look: the union of KVM's dirty
//! log (pages the vCPUs wrote) and vm-memory's bitmap (pages the VMM wrote
//! through device emulation, which KVM does not see).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::PAGE_SIZE;
use crate::memory::GuestMemoryMmap;
use crate::vstate::vm::{Vm, VmError};

/// The guest addresses of the pages set in `bitmap` (64 pages per word,
/// lowest bit first), for a region starting at `base`.
pub fn pages_in_bitmap(bitmap: &[u64], base: u64) -> impl Iterator<Item = u64> + '_ {
    bitmap
        .iter()
        .enumerate()
        .flat_map(move |(word_index, word)| {
            let word = *word;
            (0..64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| base + ((word_index as u64 * 64 + bit) * PAGE_SIZE as u64))
        })
}

/// The guest addresses of the pages in `ranges` (whole pages: the ranges
/// are page aligned).
pub fn pages_of(ranges: &[(vm_memory::GuestAddress, u64)]) -> Vec<u64> {
    ranges
        .iter()
        .flat_map(|(start, len)| {
            let base = start.0;
            (0..len.div_ceil(PAGE_SIZE as u64)).map(move |page| base + page * PAGE_SIZE as u64)
        })
        .collect()
}

/// The pages written since the last call (or since logging began), from
/// both sources; reading clears both.
pub fn take_dirty_pages(vm: &Vm, memory: &GuestMemoryMmap) -> Result<Vec<u64>, VmError> {
    let mut pages = Vec::new();
    for (slot, region) in memory.iter().enumerate() {
        let len = region.len() as usize;
        let mut bitmap = vm.dirty_log(slot as u32, len)?;
        let ours = vmm_bitmap(region).get_and_reset();
        for (word, extra) in bitmap.iter_mut().zip(ours) {
            *word |= extra;
        }
        pages.extend(pages_in_bitmap(&bitmap, region.start_addr().0));
    }
    Ok(pages)
}

/// Forgets what the VMM itself wrote so far (logging starts clean).
pub fn reset_vmm_bitmaps(memory: &GuestMemoryMmap) {
    for region in memory.iter() {
        vmm_bitmap(region).reset();
    }
}

/// The VMM's own dirty bitmap of a region (the region's whole bitmap, not
/// a slice of it).
pub fn vmm_bitmap(region: &crate::memory::GuestRegionMmap) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

/// Whether a page is all zero (a fresh destination's RAM already is).
pub fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|byte| *byte == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_ram;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn bitmap_bits_are_pages_from_the_region_base() {
        let bitmap = [0b101u64, 1 << 63];
        let pages: Vec<u64> = pages_in_bitmap(&bitmap, 0x10_0000).collect();
        assert_eq!(pages, [0x10_0000, 0x10_2000, 0x10_0000 + 127 * 4096]);
        assert_eq!(pages_in_bitmap(&[0, 0], 0).count(), 0);
    }

    #[test]
    fn the_vmm_s_own_writes_are_tracked_and_reset() {
        let ram = create_guest_ram(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        reset_vmm_bitmaps(&ram.memory);
        ram.memory.write_obj(1u8, GuestAddress(0x3004)).unwrap();
        let region = ram.memory.iter().next().unwrap();
        let bits = vmm_bitmap(region).get_and_reset();
        let pages: Vec<u64> = pages_in_bitmap(&bits, 0).collect();
        assert_eq!(pages, [0x3000]);
        assert_eq!(
            pages_in_bitmap(&vmm_bitmap(region).get_and_reset(), 0).count(),
            0
        );
        let populated = ram.backing.populated(&ram.memory).unwrap();
        assert_eq!(pages_of(&populated), [0x3000]);
        assert!(is_zero(&[0; 16]) && !is_zero(&[0, 1]));
    }
}
