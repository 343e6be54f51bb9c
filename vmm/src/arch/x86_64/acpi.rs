//! Minimal ACPI tables: RSDP, XSDT, FADT, DSDT and MADT.
//!
//! Why ACPI at all: without it a Linux guest cannot power off (it halts and
//! the VM hangs). The FADT points the PM1a event and control blocks and the
//! reset register at I/O ports of the VMM's (see `devices::legacy::acpi_pm`),
//! and the DSDT holds the `\_S5` object, so a guest `poweroff` becomes one
//! port write that ends the VM. With ACPI on, Linux takes its CPUs and IOAPIC
//! from the MADT, which therefore mirrors the MP table.
//!
//! The DSDT also describes the VM generation id device (`\_SB.VGEN`, the
//! `VM_GEN_COUNTER` that Hyper-V and QEMU provide, which Linux's `vmgenid`
//! driver binds): `ADDR` says where its 16 bytes are, and GPE 0 of the
//! FADT's GPE0 block runs `\_GPE._E00`, which notifies the device, so a
//! restored guest reads the new id and reseeds its RNG at once.
//!
//! Why not a hardware-reduced platform: Linux then drops the legacy PIC and
//! no longer preallocates ISA IRQs 0-15, and the UART's and the i8042's
//! interrupts stop working (measured: the i8042 probe fails with -EINVAL).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::aml;
use super::layout::{
    ACPI_GPE0_LEN, ACPI_GPE0_PORT, ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_PORT, ACPI_RESET_PORT,
    ACPI_SCI_IRQ, ACPI_TABLES_START, APIC_START, IOAPIC_START, VMGENID_START,
};
use super::mptable::ioapic_id;

const OEM_ID: &[u8; 6] = b"NUBIS ";
const OEM_TABLE_ID: &[u8; 8] = b"MICROVM ";
const CREATOR_ID: &[u8; 4] = b"NUBS";
const HEADER_SIZE: usize = 36;
const FADT_SIZE: usize = 276;
const FACS_SIZE: usize = 64;
/// PM1 event block: 2 bytes of status, 2 of enable. PM1 control: 2 bytes.
pub const PM1_EVT_LEN: u8 = 4;
pub const PM1_CNT_LEN: u8 = 2;

/// FADT flags: fixed buttons absent, reset register supported.
const FADT_POWER_BUTTON_ABSENT: u32 = 1 << 4;
const FADT_SLEEP_BUTTON_ABSENT: u32 = 1 << 5;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// IA-PC boot architecture flags: an 8042 is present, no VGA, no CMOS RTC.
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// `\_S5` sleep type, written into SLP_TYP of the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Value written to the reset register to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// The general-purpose event that tells the guest its generation id
/// changed (`\_GPE._E00`).
pub const VMGENID_GPE: u8 = 0;
/// The notification value `vmgenid` waits for.
const VMGENID_NOTIFY: u8 = 0x80;
/// MADT interrupt source override flags: active high, level triggered.
const ISO_ACTIVE_HIGH_LEVEL: u16 = 0b01 | (0b11 << 2);

/// Errors in building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({size} bytes) do not fit in {available} bytes")]
    TooLarge { size: usize, available: u64 },
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: the standard header, then `body`.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_SIZE + body.len();
    let mut table = Vec::with_capacity(len);
    table.extend_from_slice(signature);
    table.extend_from_slice(&(len as u32).to_le_bytes());
    table.push(revision);
    table.push(0); // checksum, below
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(OEM_TABLE_ID);
    table.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    table.extend_from_slice(CREATOR_ID);
    table.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    table.extend_from_slice(body);
    table[9] = checksum(&table);
    table
}

/// A Generic Address Structure for an I/O port register of `bits` bits.
fn io_port_gas(port: u16, bits: u8) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = 1; // system I/O space
    gas[1] = bits; // register bit width
    gas[2] = 0; // bit offset
    gas[3] = match bits {
        8 => 1,
        16 => 2,
        _ => 3,
    }; // access size: byte, word, dword
    gas[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    gas
}

/// The FACS: no waking vector, no global lock owner.
fn facs() -> Vec<u8> {
    let mut facs = vec![0u8; FACS_SIZE];
    facs[0..4].copy_from_slice(b"FACS");
    facs[4..8].copy_from_slice(&(FACS_SIZE as u32).to_le_bytes());
    facs[32] = 2; // version
    facs
}

/// The DSDT's AML:
///
/// ```text
/// Name (_S5_, Package (4) { 5, 5, 0, 0 })
/// Scope (\_SB) {
///     Device (VGEN) {
///         Name (_HID, "NUBS0001")
///         Name (_CID, "VM_GEN_COUNTER")
///         Name (_DDN, "VM_GEN_COUNTER")
///         Name (ADDR, Package (2) { VMGENID_START, 0 })
///     }
/// }
/// Scope (\_GPE) {
///     Method (_E00) { Notify (\_SB.VGEN, 0x80) }
/// }
/// ```
fn dsdt_aml() -> Vec<u8> {
    const ZERO_OP: u8 = 0x00;
    let s5 = aml::name(
        *b"_S5_",
        &aml::package(&[
            aml::byte(S5_SLEEP_TYPE), // SLP_TYPa
            aml::byte(S5_SLEEP_TYPE), // SLP_TYPb
            vec![ZERO_OP],            // reserved
            vec![ZERO_OP],
        ]),
    );
    // The id sits below 4 GiB: its high half is zero.
    let vmgenid = aml::scope(
        &aml::root_path(&[*b"_SB_"]),
        &[aml::device(
            *b"VGEN",
            &[
                aml::name(*b"_HID", &aml::string("NUBS0001")),
                aml::name(*b"_CID", &aml::string("VM_GEN_COUNTER")),
                aml::name(*b"_DDN", &aml::string("VM_GEN_COUNTER")),
                aml::name(
                    *b"ADDR",
                    &aml::package(&[aml::dword(VMGENID_START as u32), aml::dword(0)]),
                ),
            ],
        )],
    );
    let gpe_method = format!("_E{VMGENID_GPE:02X}");
    let mut method_name = [0u8; 4];
    method_name.copy_from_slice(gpe_method.as_bytes());
    let notify = aml::scope(
        &aml::root_path(&[*b"_GPE"]),
        &[aml::method(
            method_name,
            &[aml::notify(
                &aml::root_path(&[*b"_SB_", *b"VGEN"]),
                VMGENID_NOTIFY,
            )],
        )],
    );
    [s5, vmgenid, notify].concat()
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_SIZE - HEADER_SIZE];
    let at = |offset: usize| offset - HEADER_SIZE;
    body[at(36)..at(40)].copy_from_slice(&(facs_addr as u32).to_le_bytes());
    body[at(40)..at(44)].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    body[at(46)..at(48)].copy_from_slice(&(ACPI_SCI_IRQ as u16).to_le_bytes());
    // SMI_CMD stays 0: the platform is always in ACPI mode.
    body[at(56)..at(60)].copy_from_slice(&u32::from(ACPI_PM1_EVT_PORT).to_le_bytes());
    body[at(64)..at(68)].copy_from_slice(&u32::from(ACPI_PM1_CNT_PORT).to_le_bytes());
    body[at(80)..at(84)].copy_from_slice(&u32::from(ACPI_GPE0_PORT).to_le_bytes());
    body[at(88)] = PM1_EVT_LEN;
    body[at(89)] = PM1_CNT_LEN;
    body[at(92)] = ACPI_GPE0_LEN;
    body[at(109)..at(111)]
        .copy_from_slice(&(IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).to_le_bytes());
    let flags = FADT_POWER_BUTTON_ABSENT | FADT_SLEEP_BUTTON_ABSENT | FADT_RESET_REG_SUP;
    body[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    body[at(116)..at(128)].copy_from_slice(&io_port_gas(ACPI_RESET_PORT, 8));
    body[at(128)] = RESET_VALUE;
    body[at(131)] = 5; // FADT minor version (ACPI 6.5)
    body[at(132)..at(140)].copy_from_slice(&facs_addr.to_le_bytes());
    body[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes());
    body[at(148)..at(160)].copy_from_slice(&io_port_gas(ACPI_PM1_EVT_PORT, PM1_EVT_LEN * 8));
    body[at(172)..at(184)].copy_from_slice(&io_port_gas(ACPI_PM1_CNT_PORT, PM1_CNT_LEN * 8));
    // X_GPE0_BLK: ACPICA reads and writes its registers a byte at a time.
    let mut gpe0 = io_port_gas(ACPI_GPE0_PORT, ACPI_GPE0_LEN * 8);
    gpe0[3] = 1;
    body[at(220)..at(232)].copy_from_slice(&gpe0);
    body[at(268)..at(276)].copy_from_slice(b"NUBISVMM");
    sdt(b"FACP", 6, &body)
}

fn madt(num_cpus: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: dual 8259s present
    for cpu in 0..num_cpus {
        // Processor local APIC: UID, APIC id, enabled.
        body.extend_from_slice(&[0, 8, cpu as u8, cpu as u8]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: id, address, GSI base 0.
    body.extend_from_slice(&[1, 12, ioapic_id(num_cpus), 0]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: the SCI is level triggered and active
    // high (the VMM raises the line to signal it), on ISA bus 0.
    body.extend_from_slice(&[2, 10, 0, ACPI_SCI_IRQ as u8]);
    body.extend_from_slice(&ACPI_SCI_IRQ.to_le_bytes());
    body.extend_from_slice(&ISO_ACTIVE_HIGH_LEVEL.to_le_bytes());
    // Local APIC NMI on LINT1 of every processor.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &body)
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.push(0); // extended checksum, below
    rsdp.extend_from_slice(&[0u8; 3]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    rsdp
}

fn align8(value: u64) -> u64 {
    (value + 7) & !7
}

/// Builds all tables to be placed at `base` (RSDP first). Returns the bytes.
pub fn build(num_cpus: u32, base: u64) -> Result<Vec<u8>, AcpiError> {
    let rsdp_len = 36u64;
    // The FACS must be 64-byte aligned.
    let facs_addr = (base + rsdp_len + 63) & !63;
    let facs = facs();
    let dsdt_addr = align8(facs_addr + facs.len() as u64);
    let dsdt = sdt(b"DSDT", 2, &dsdt_aml());
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr, facs_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(num_cpus);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let mut entries = Vec::new();
    entries.extend_from_slice(&fadt_addr.to_le_bytes());
    entries.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &entries);
    let end = xsdt_addr + xsdt.len() as u64;

    let mut image = vec![0u8; (end - base) as usize];
    let mut place = |addr: u64, bytes: &[u8]| {
        let offset = (addr - base) as usize;
        image[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    place(base, &rsdp(xsdt_addr));
    place(facs_addr, &facs);
    place(dsdt_addr, &dsdt);
    place(fadt_addr, &fadt);
    place(madt_addr, &madt);
    place(xsdt_addr, &xsdt);
    Ok(image)
}

/// Writes the tables at [`ACPI_TABLES_START`]; returns the RSDP's address.
pub fn setup_acpi<M: GuestMemoryBackend>(mem: &M, num_cpus: u32) -> Result<u64, AcpiError> {
    let image = build(num_cpus, ACPI_TABLES_START)?;
    let available = VMGENID_START - ACPI_TABLES_START;
    if image.len() as u64 > available {
        return Err(AcpiError::TooLarge {
            size: image.len(),
            available,
        });
    }
    mem.write_slice(&image, GuestAddress(ACPI_TABLES_START))
        .map_err(AcpiError::Write)?;
    Ok(ACPI_TABLES_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Follows RSDP -> XSDT -> tables like a guest does, checking checksums.
    fn tables(image: &[u8], base: u64) -> Vec<(String, Vec<u8>)> {
        assert_eq!(&image[..8], b"RSD PTR ");
        assert_eq!(sum(&image[..20]), 0);
        assert_eq!(sum(&image[..36]), 0);
        let table_at = |addr: u64| {
            let offset = (addr - base) as usize;
            let len = u32_at(image, offset + 4) as usize;
            let table = image[offset..offset + len].to_vec();
            assert_eq!(sum(&table), 0, "checksum of {:?}", &table[..4]);
            table
        };
        let xsdt = table_at(u64_at(image, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut out = vec![];
        for entry in xsdt[HEADER_SIZE..].chunks(8) {
            let table = table_at(u64::from_le_bytes(entry.try_into().unwrap()));
            out.push((String::from_utf8_lossy(&table[..4]).into_owned(), table));
        }
        out
    }

    #[test]
    fn tables_link_up_with_valid_checksums() {
        let base = ACPI_TABLES_START;
        let image = build(2, base).unwrap();
        let found = tables(&image, base);
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["FACP", "APIC"]);
        let fadt = &found[0].1;
        assert_eq!(fadt.len(), FADT_SIZE);
        let dsdt_addr = u64_at(fadt, 140);
        assert_eq!(u64::from(u32_at(fadt, 40)), dsdt_addr);
        let offset = (dsdt_addr - base) as usize;
        let dsdt = &image[offset..offset + u32_at(&image, offset + 4) as usize];
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        for needle in [&b"VM_GEN_COUNTER\0"[..], b"_E00", b"VGEN", b"ADDR"] {
            assert!(
                dsdt.windows(needle.len()).any(|w| w == needle),
                "{needle:?}"
            );
        }
        // ADDR's package: the id's address, then a zero high half.
        let addr = dsdt.windows(4).position(|w| w == b"ADDR").unwrap() + 4;
        assert_eq!(&dsdt[addr..addr + 3], [0x12, 0x0c, 0x02]);
        assert_eq!(dsdt[addr + 3], 0x0c);
        assert_eq!(u32_at(dsdt, addr + 4), VMGENID_START as u32);
    }

    #[test]
    fn fadt_declares_the_gpe0_block() {
        let image = build(1, ACPI_TABLES_START).unwrap();
        let fadt = tables(&image, ACPI_TABLES_START).remove(0).1;
        assert_eq!(u32_at(&fadt, 80), u32::from(ACPI_GPE0_PORT));
        assert_eq!(fadt[92], ACPI_GPE0_LEN);
        assert_eq!(fadt[220], 1, "I/O space");
        assert_eq!(fadt[221], ACPI_GPE0_LEN * 8);
        assert_eq!(u64_at(&fadt, 224), u64::from(ACPI_GPE0_PORT));
    }

    #[test]
    fn fadt_points_pm1_and_reset_at_the_vmm_ports() {
        let base = ACPI_TABLES_START;
        let image = build(1, base).unwrap();
        let fadt = tables(&image, base).remove(0).1;
        // Legacy (not hardware-reduced), always in ACPI mode.
        assert_eq!(u32_at(&fadt, 112) & (1 << 20), 0);
        assert_eq!(u32_at(&fadt, 48), 0, "SMI_CMD");
        assert_eq!(u32_at(&fadt, 56), u32::from(ACPI_PM1_EVT_PORT));
        assert_eq!(u32_at(&fadt, 64), u32::from(ACPI_PM1_CNT_PORT));
        assert_eq!((fadt[88], fadt[89]), (PM1_EVT_LEN, PM1_CNT_LEN));
        for (gas_offset, port, bits) in [
            (116usize, ACPI_RESET_PORT, 8u8),
            (148, ACPI_PM1_EVT_PORT, 32),
            (172, ACPI_PM1_CNT_PORT, 16),
        ] {
            assert_eq!(fadt[gas_offset], 1, "I/O space");
            assert_eq!(fadt[gas_offset + 1], bits);
            assert_eq!(u64_at(&fadt, gas_offset + 4), u64::from(port));
        }
        assert_eq!(fadt[128], RESET_VALUE);
        // The FACS is 64-byte aligned and named by both pointers.
        let facs = u64_at(&fadt, 132);
        assert_eq!(u64::from(u32_at(&fadt, 36)), facs);
        assert_eq!(facs % 64, 0);
        let offset = (facs - base) as usize;
        assert_eq!(&image[offset..offset + 4], b"FACS");
        assert_eq!(u32_at(&image, offset + 4) as usize, FACS_SIZE);
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let image = build(4, ACPI_TABLES_START).unwrap();
        let madt = tables(&image, ACPI_TABLES_START).remove(1).1;
        let mut offset = HEADER_SIZE + 8;
        let mut apic_ids = vec![];
        let mut ioapic = None;
        let mut overrides = vec![];
        while offset < madt.len() {
            let (kind, len) = (madt[offset], madt[offset + 1] as usize);
            match kind {
                0 => apic_ids.push(madt[offset + 3]),
                1 => ioapic = Some((madt[offset + 2], u32_at(&madt, offset + 4))),
                2 => overrides.push((
                    madt[offset + 3],
                    u32_at(&madt, offset + 4),
                    u16::from_le_bytes([madt[offset + 8], madt[offset + 9]]),
                )),
                _ => {}
            }
            offset += len;
        }
        assert_eq!(offset, madt.len());
        assert_eq!(apic_ids, [0, 1, 2, 3]);
        assert_eq!(ioapic, Some((4, IOAPIC_START as u32)));
        // The SCI: IRQ 9 on GSI 9, active high, level triggered.
        assert_eq!(overrides, [(9, 9, 0b1101)]);
    }

    #[test]
    fn all_cpus_fit() {
        let image = build(254, ACPI_TABLES_START).unwrap();
        assert!((image.len() as u64) <= VMGENID_START - ACPI_TABLES_START);
    }
}
