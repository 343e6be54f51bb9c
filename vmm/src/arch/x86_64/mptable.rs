//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI finds its CPUs (one processor entry per vCPU, APIC id = vCPU index),
//! the IOAPIC, and the wiring of ISA IRQs 0-23 to IOAPIC pins.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_START, HIMEM_START, IOAPIC_START, LAST_DEVICE_IRQ, MPTABLE_START};

const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
#[cfg(test)]
const PROCESSOR_ENTRY_SIZE: usize = 20;
#[cfg(test)]
const SMALL_ENTRY_SIZE: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 in the CPU signature; FPU and APIC in the feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Errors in building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(u32),
    #[error("the MP table ({size} bytes) does not fit below {HIMEM_START:#x}")]
    TooLarge { size: usize },
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// The IOAPIC's id: the first one after the CPUs' APIC ids.
pub fn ioapic_id(num_cpus: u32) -> u8 {
    num_cpus as u8
}

/// Builds the floating pointer and the configuration table, to be placed at
/// `base` (the floating pointer first, the table right after it).
pub fn build(num_cpus: u32, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic = ioapic_id(num_cpus);
    let irq_count = LAST_DEVICE_IRQ + 1;

    let mut entries: Vec<u8> = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..num_cpus {
        let mut flags = CPU_ENABLED;
        if cpu == 0 {
            flags |= CPU_BOOTSTRAP;
        }
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    for irq in 0..irq_count {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INTERRUPT_INT, 0, 0, 0]);
        entries.extend_from_slice(&[irq as u8, ioapic, irq as u8]);
        entry_count += 1;
    }
    for (kind, lint) in [(INTERRUPT_EXTINT, 0u8), (INTERRUPT_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        entry_count += 1;
    }

    let table_len = HEADER_SIZE + entries.len();
    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"NUBIS   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_SIZE);

    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = base + FLOATING_POINTER_SIZE as u64;
    let mut floating = Vec::with_capacity(FLOATING_POINTER_SIZE);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0u8; 5]); // feature bytes: table present
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    let size = out.len();
    if base + size as u64 > HIMEM_START {
        return Err(MptableError::TooLarge { size });
    }
    Ok(out)
}

/// Writes the MP table for `num_cpus` at [`MPTABLE_START`].
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u32) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers() {
        for cpus in [1, 2, 8, 64, 254] {
            let bytes = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&bytes[0..4], b"_MP_");
            assert_eq!(sum(&bytes[..16]), 0);
            let table_addr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
            assert_eq!(table_addr, MPTABLE_START + 16);
            let table = &bytes[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
        }
    }

    #[test]
    fn one_processor_entry_per_cpu_and_only_cpu0_boots() {
        let cpus = 4;
        let bytes = build(cpus, MPTABLE_START).unwrap();
        let table = &bytes[16..];
        let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
        // CPUs + bus + IOAPIC + 24 IO interrupts + 2 local interrupts.
        assert_eq!(count as u32, cpus + 1 + 1 + 24 + 2);
        let mut offset = HEADER_SIZE;
        let mut seen = Vec::new();
        while offset < table.len() {
            match table[offset] {
                ENTRY_PROCESSOR => {
                    seen.push((table[offset + 1], table[offset + 3]));
                    offset += PROCESSOR_ENTRY_SIZE;
                }
                ENTRY_IOAPIC => {
                    assert_eq!(table[offset + 1], ioapic_id(cpus));
                    let addr =
                        u32::from_le_bytes(table[offset + 4..offset + 8].try_into().unwrap());
                    assert_eq!(u64::from(addr), IOAPIC_START);
                    offset += SMALL_ENTRY_SIZE;
                }
                _ => offset += SMALL_ENTRY_SIZE,
            }
        }
        assert_eq!(offset, table.len());
        assert_eq!(
            seen,
            vec![(0, CPU_ENABLED | CPU_BOOTSTRAP), (1, 1), (2, 1), (3, 1)]
        );
    }

    #[test]
    fn invalid_cpu_counts() {
        assert!(matches!(
            build(0, MPTABLE_START),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(matches!(
            build(255, MPTABLE_START),
            Err(MptableError::TooManyCpus(255))
        ));
        assert!(matches!(
            build(254, HIMEM_START - 64),
            Err(MptableError::TooLarge { .. })
        ));
    }
}
