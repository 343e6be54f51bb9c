//! The guest-physical address map and the e820 table that tells the guest
//! about it.
//!
//! ```text
//! 0x0000_0500  boot GDT            0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top      0x0000_9000  PML4, PDPT, PD (identity map)
//! 0x0002_0000  kernel command line 0x0009_fc00  MP table (to 0x10_0000: not RAM in e820)
//! 0x000e_0000  ACPI tables (RSDP, XSDT, FADT, DSDT, MADT)
//! 0x000f_f000  VM generation id (16 bytes; the DSDT's VGEN device says where)
//! 0x0010_0000  high memory: kernel, initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO gap (1 GiB): boot timer, virtio-mmio, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above the gap, when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's COMMAND_LINE_SIZE on x86, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA, where the MP table goes (the last KiB of base memory).
pub const MPTABLE_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) in the BIOS area, where Linux also looks for them.
pub const ACPI_TABLES_START: u64 = 0xe_0000;
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// The VM generation id's 16 bytes, in the last page of the ACPI area
/// (reserved in e820: the guest maps it, never allocates it).
pub const VMGENID_START: u64 = ACPI_TABLES_END - 0x1000;
pub const VMGENID_SIZE: usize = 16;
/// Start of high memory; the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap: guest RAM skips it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;

/// The boot-timer page: the guest's init writes it when user space starts.
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// First virtio-mmio device window; each device takes [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map on VMX.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// ACPI fixed hardware: the PM1a event block (status, enable), the PM1a
/// control block, the reset register and the GPE0 block (one status byte,
/// one enable byte), as I/O ports.
pub const ACPI_PM1_EVT_PORT: u16 = 0x3c0;
pub const ACPI_PM1_CNT_PORT: u16 = 0x3c4;
pub const ACPI_RESET_PORT: u16 = 0x3c6;
pub const ACPI_GPE0_PORT: u16 = 0x3c8;
pub const ACPI_GPE0_LEN: u8 = 2;
pub const ACPI_PM_PORTS_LEN: u64 =
    (ACPI_GPE0_PORT - ACPI_PM1_EVT_PORT) as u64 + ACPI_GPE0_LEN as u64;
/// The ACPI SCI line named in the FADT; Linux claims it (level, active low),
/// so devices must not use it.
pub const ACPI_SCI_IRQ: u32 = 9;
/// Legacy IRQs: the UART and the i8042 keyboard line.
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_KBD_IRQ: u32 = 1;
/// First IRQ free for virtio-mmio devices; IOAPIC pins end at 23.
pub const FIRST_DEVICE_IRQ: u32 = 5;
pub const LAST_DEVICE_IRQ: u32 = 23;

// The boot structures must not overlap: checked when compiling.
const _: () = assert!(BOOT_TIMER_START + BOOT_TIMER_SIZE <= VIRTIO_MMIO_START);
const _: () = assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () =
    assert!(PDE_START + 0x1000 * super::paging::IDENTITY_MAPPED_GIB as u64 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
const _: () = assert!(MPTABLE_START < ACPI_TABLES_START && ACPI_TABLES_END <= HIMEM_START);
const _: () = assert!(ACPI_TABLES_START < VMGENID_START);

/// Where the `index`-th virtio-mmio device lives: its MMIO window base and
/// its IRQ (5, 6, 7, 8, 10, ... 23: the ACPI SCI is skipped). None when the
/// IRQs are used up.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    let irq = (FIRST_DEVICE_IRQ..=LAST_DEVICE_IRQ)
        .filter(|irq| *irq != ACPI_SCI_IRQ)
        .nth(index)?;
    Some((VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE, irq))
}

/// The kernel argument that declares a virtio-mmio device to Linux.
pub fn virtio_mmio_cmdline(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// e820 entry types (Linux's `E820_TYPE_*`).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the guest's e820 memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest RAM regions for `mem_size` bytes: below the MMIO gap, and the
/// rest above 4 GiB.
pub fn guest_ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

/// The highest guest-physical address of RAM below the MMIO gap, plus one.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// The e820 map the guest sees: base memory up to the EBDA, a reserved hole
/// for the EBDA/BIOS area (MP table), high memory below the gap, the gap
/// itself reserved, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: MPTABLE_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MPTABLE_START,
            size: HIMEM_START - MPTABLE_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = low_ram_end(mem_size);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    map.push(E820Entry {
        addr: MMIO_GAP_START,
        size: MMIO_GAP_SIZE,
        kind: E820_RESERVED,
    });
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(
            guest_ram_ranges(128 * MIB),
            vec![(GuestAddress(0), 128 * MIB)]
        );
        assert_eq!(
            guest_ram_ranges(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
    }

    #[test]
    fn large_guest_skips_the_gap() {
        let ranges = guest_ram_ranges(8 * GIB);
        assert_eq!(
            ranges,
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 5 * GIB)]
        );
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, 8 * GIB);
    }

    #[test]
    fn e820_covers_ram_minus_the_bios_hole() {
        for mem in [32 * MIB, 128 * MIB, GIB, 3 * GIB, 3 * GIB + MIB, 40 * GIB] {
            let map = e820_map(mem);
            let hole = HIMEM_START - MPTABLE_START;
            assert_eq!(ram_total(&map), mem - hole, "mem {mem:#x}");
            // Sorted and non-overlapping.
            for pair in map.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{map:?}");
            }
            // No RAM inside the MMIO gap.
            for entry in map.iter().filter(|e| e.kind == E820_RAM) {
                let end = entry.addr + entry.size;
                assert!(
                    end <= MMIO_GAP_START || entry.addr >= MMIO_GAP_END,
                    "{entry:?}"
                );
            }
        }
    }

    #[test]
    fn virtio_slots_skip_the_sci_and_run_out() {
        assert_eq!(virtio_mmio_slot(0), Some((VIRTIO_MMIO_START, 5)));
        assert_eq!(virtio_mmio_slot(3), Some((VIRTIO_MMIO_START + 0x3000, 8)));
        assert_eq!(virtio_mmio_slot(4), Some((VIRTIO_MMIO_START + 0x4000, 10)));
        assert_eq!(virtio_mmio_slot(17).map(|s| s.1), Some(23));
        assert_eq!(virtio_mmio_slot(18), None);
        assert_eq!(crate::config::MAX_VIRTIO_DEVICES, 18);
        assert_eq!(
            virtio_mmio_cmdline(0xc000_1000, 5),
            "virtio_mmio.device=4K@0xc0001000:5"
        );
    }

    #[test]
    fn devices_live_in_the_gap() {
        for addr in [
            BOOT_TIMER_START,
            VIRTIO_MMIO_START,
            IOAPIC_START,
            APIC_START,
        ] {
            assert!((MMIO_GAP_START..MMIO_GAP_END).contains(&addr));
        }
    }
}
