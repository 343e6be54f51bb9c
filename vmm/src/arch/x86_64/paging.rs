//! The identity page tables the 64-bit boot protocol requires: the first
//! 4 GiB of guest-physical memory mapped 1:1 with 2 MiB pages. Linux needs
//! only the kernel, the zero page and the command line mapped (and builds
//! its own tables at once); the rest lets small test guests reach the MMIO
//! gap without building tables of their own.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{PDE_START, PDPTE_START, PML4_START};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_2M: u64 = 1 << 7;
const ENTRIES: usize = 512;

/// Errors in writing the page tables into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error("cannot write the page table at guest address {addr:#x}: {source}")]
    Write {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// GiBs identity-mapped, one page directory each.
pub const IDENTITY_MAPPED_GIB: usize = 4;
const TABLE_SIZE: u64 = 0x1000;

/// The tables (PML4, PDPT, one PD per GiB) as `(guest address, entries)`.
pub fn identity_tables() -> Vec<(u64, [u64; ENTRIES])> {
    let mut tables = Vec::with_capacity(2 + IDENTITY_MAPPED_GIB);
    let mut pml4 = [0u64; ENTRIES];
    pml4[0] = PDPTE_START | PRESENT | WRITABLE;
    tables.push((PML4_START, pml4));
    let mut pdpt = [0u64; ENTRIES];
    for (gib, entry) in pdpt.iter_mut().take(IDENTITY_MAPPED_GIB).enumerate() {
        *entry = (PDE_START + gib as u64 * TABLE_SIZE) | PRESENT | WRITABLE;
    }
    tables.push((PDPTE_START, pdpt));
    for gib in 0..IDENTITY_MAPPED_GIB {
        let mut pd = [0u64; ENTRIES];
        for (index, entry) in pd.iter_mut().enumerate() {
            let addr = ((gib * ENTRIES + index) as u64) << 21;
            *entry = addr | PRESENT | WRITABLE | PAGE_SIZE_2M;
        }
        tables.push((PDE_START + gib as u64 * TABLE_SIZE, pd));
    }
    tables
}

/// Writes the identity tables; returns the value for CR3.
pub fn setup_identity_mapping<M: GuestMemoryBackend>(mem: &M) -> Result<u64, PagingError> {
    for (addr, table) in identity_tables() {
        for (index, entry) in table.iter().enumerate() {
            let entry_addr = addr + (index as u64) * 8;
            mem.write_obj(*entry, GuestAddress(entry_addr))
                .map_err(|source| PagingError::Write {
                    addr: entry_addr,
                    source,
                })?;
        }
    }
    Ok(PML4_START)
}

/// Walks the guest's 4-level page tables (as the vCPU's CR3 sees them) to
/// turn a virtual address into a physical one. Used for diagnostics, e.g. to
/// print the instruction bytes at RIP when the guest fails. Returns `None`
/// when the address is not mapped or a table lies outside guest memory.
pub fn translate<M: GuestMemoryBackend>(mem: &M, cr3: u64, virt: u64) -> Option<u64> {
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (virt >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        let is_large = level > 0 && level < 3 && entry & PAGE_SIZE_2M != 0;
        if is_large || level == 0 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (virt & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    type Mem = vm_memory::GuestMemoryMmap<()>;

    fn memory() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn first_gib_is_identity_mapped() {
        let mem = memory();
        let cr3 = setup_identity_mapping(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        for addr in [
            0u64,
            0x7000,
            0x100_0000,
            0x3fff_ffff,
            0x1234_5678,
            0xc000_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, addr), Some(addr), "{addr:#x}");
        }
        assert_eq!(translate(&mem, cr3, 0x1_0000_0000), None);
        assert_eq!(translate(&mem, cr3, 0xffff_ffff_8100_0000), None);
    }

    #[test]
    fn tables_outside_memory_do_not_translate() {
        let mem = memory();
        assert_eq!(translate(&mem, 0x7fff_f000, 0x1000), None);
    }

    #[test]
    fn four_kib_pages_translate() {
        let mem = memory();
        let cr3 = 0x10_0000u64;
        // PML4 -> PDPT -> PD -> PT, virt 0x40_3000 -> phys 0x20_5000.
        mem.write_obj(0x10_1000u64 | 3, GuestAddress(cr3)).unwrap();
        mem.write_obj(0x10_2000u64 | 3, GuestAddress(0x10_1000))
            .unwrap();
        mem.write_obj(0x10_3000u64 | 3, GuestAddress(0x10_2000 + 2 * 8))
            .unwrap();
        mem.write_obj(0x20_5000u64 | 3, GuestAddress(0x10_3000 + 3 * 8))
            .unwrap();
        assert_eq!(translate(&mem, cr3, 0x40_3abc), Some(0x20_5abc));
        assert_eq!(translate(&mem, cr3, 0x40_4000), None);
    }
}
