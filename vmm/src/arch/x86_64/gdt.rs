//! The boot GDT and the conversion of its descriptors into the segment
//! registers KVM is given, so that the vCPU starts in 64-bit mode with the
//! same segments the descriptors describe.

use kvm_bindings::kvm_segment;

/// Packs a segment descriptor. `flags` holds the access byte in bits 0-7 and
/// the granularity/size nibble in bits 12-15 (the usual 0xa09b style).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // With 4 KiB granularity the limit counts pages.
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The segment register that loading selector `table_index * 8` from a GDT
/// holding `entry` would produce.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_SEGMENT_INDEX: u8 = 1;
pub const DATA_SEGMENT_INDEX: u8 = 2;
pub const TSS_SEGMENT_INDEX: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[1], CODE_SEGMENT_INDEX);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.s, 1);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn data_segment_is_writable_32_bit() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[2], DATA_SEGMENT_INDEX);
        assert_eq!(seg.selector, 16);
        assert_eq!(seg.type_, 0x3);
        assert_eq!(seg.db, 1);
        assert_eq!(seg.l, 0);
    }

    #[test]
    fn base_and_limit_round_trip() {
        for (base_in, limit_in) in [(0u32, 0u32), (0x1234_5678, 0xabcde), (0xff00_00ff, 0xfffff)] {
            let entry = gdt_entry(0x0093, base_in, limit_in);
            let seg = kvm_segment_from_gdt(entry, 0);
            assert_eq!(seg.base, u64::from(base_in));
            assert_eq!(seg.limit, limit_in);
        }
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(BOOT_GDT[0], 0).unusable, 1);
    }
}
