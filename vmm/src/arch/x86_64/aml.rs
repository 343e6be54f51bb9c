//! The few AML (ACPI Machine Language) constructs the DSDT needs, encoded
//! by hand: names, strings, integers, packages, scopes, devices, methods
//! and `Notify`. A full AML compiler is not worth a dependency for a
//! handful of objects; each encoder follows ACPI 6.5 section 20.2.

/// A 4-character name segment (`_SB_`, `VGEN`): ACPI names are exactly
/// four characters, padded with `_`.
pub type NameSeg = [u8; 4];

const ROOT_CHAR: u8 = b'\\';
const DUAL_NAME_PREFIX: u8 = 0x2e;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const DWORD_PREFIX: u8 = 0x0c;
const STRING_PREFIX: u8 = 0x0d;
const SCOPE_OP: u8 = 0x10;
const PACKAGE_OP: u8 = 0x12;
const METHOD_OP: u8 = 0x14;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const NOTIFY_OP: u8 = 0x86;

/// `PkgLength` of a body of `body_len` bytes: the encoded length counts
/// its own bytes too (one byte up to 63, then a lead byte with the low
/// nibble and up to three more bytes).
fn pkg_length(body_len: usize) -> Vec<u8> {
    if body_len + 1 < 0x40 {
        return vec![(body_len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = body_len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            out.extend((0..extra).map(|index| (total >> (4 + 8 * index)) as u8));
            return out;
        }
    }
    // 2^28 bytes of AML: nothing here comes near.
    unreachable!("an AML package of {body_len} bytes")
}

/// `op PkgLength body`.
fn package_of(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(body.len()));
    out.extend_from_slice(body);
    out
}

/// A path from the root: `\SEG` or `\SEG.SEG`.
pub fn root_path(segments: &[NameSeg]) -> Vec<u8> {
    let mut out = vec![ROOT_CHAR];
    match segments {
        [one] => out.extend_from_slice(one),
        [first, second] => {
            out.push(DUAL_NAME_PREFIX);
            out.extend_from_slice(first);
            out.extend_from_slice(second);
        }
        _ => unreachable!("paths here have one or two segments"),
    }
    out
}

/// `Name (NAME, value)`.
pub fn name(name: NameSeg, value: &[u8]) -> Vec<u8> {
    let mut out = vec![NAME_OP];
    out.extend_from_slice(&name);
    out.extend_from_slice(value);
    out
}

/// A string constant (ASCII, NUL-terminated).
pub fn string(text: &str) -> Vec<u8> {
    let mut out = vec![STRING_PREFIX];
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    out
}

/// A 32-bit integer constant.
pub fn dword(value: u32) -> Vec<u8> {
    let mut out = vec![DWORD_PREFIX];
    out.extend_from_slice(&value.to_le_bytes());
    out
}

/// An 8-bit integer constant.
pub fn byte(value: u8) -> Vec<u8> {
    vec![BYTE_PREFIX, value]
}

/// `Package (N) { elements }`.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![elements.len() as u8];
    for element in elements {
        body.extend_from_slice(element);
    }
    package_of(&[PACKAGE_OP], &body)
}

/// `Scope (path) { terms }`.
pub fn scope(path: &[u8], terms: &[Vec<u8>]) -> Vec<u8> {
    let mut body = path.to_vec();
    body.extend(terms.concat());
    package_of(&[SCOPE_OP], &body)
}

/// `Device (NAME) { terms }`.
pub fn device(name: NameSeg, terms: &[Vec<u8>]) -> Vec<u8> {
    let mut body = name.to_vec();
    body.extend(terms.concat());
    package_of(&[EXT_OP_PREFIX, DEVICE_OP], &body)
}

/// `Method (NAME, 0, NotSerialized) { terms }`.
pub fn method(name: NameSeg, terms: &[Vec<u8>]) -> Vec<u8> {
    let mut body = name.to_vec();
    body.push(0); // no arguments, not serialized, sync level 0
    body.extend(terms.concat());
    package_of(&[METHOD_OP], &body)
}

/// `Notify (object, value)`.
pub fn notify(object: &[u8], value: u8) -> Vec<u8> {
    let mut out = vec![NOTIFY_OP];
    out.extend_from_slice(object);
    out.extend(byte(value));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_lengths_count_their_own_bytes() {
        assert_eq!(pkg_length(0), [1]);
        assert_eq!(pkg_length(62), [63]);
        // 63 + 2 = 65 = 0x41: lead 0x40 | 1, then 0x04.
        assert_eq!(pkg_length(63), [0x41, 0x04]);
        assert_eq!(pkg_length(4093), [0x4f, 0xff]);
        // 4094 + 2 = 4096 does not fit in 12 bits: 4094 + 3 = 0x1001.
        assert_eq!(pkg_length(4094), [0x81, 0x00, 0x01]);
    }

    /// The encodings of ACPI 6.5 section 20.2, byte for byte.
    #[test]
    fn objects_encode_as_the_specification_says() {
        // Name (_S5_, Package (4) { 5, 5, 0, 0 }) with BytePrefix items
        // (iasl would use the Zero/One opcodes; both are valid AML).
        assert_eq!(
            name(*b"_S5_", &package(&[byte(5), byte(5), vec![0], vec![0]])),
            [0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0]
        );
        assert_eq!(string("AB"), [0x0d, b'A', b'B', 0]);
        assert_eq!(dword(0xe_0000), [0x0c, 0x00, 0x00, 0x0e, 0x00]);
        // Notify (\_SB.VGEN, 0x80)
        assert_eq!(
            notify(&root_path(&[*b"_SB_", *b"VGEN"]), 0x80),
            [0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'V', b'G', b'E', b'N', 0x0a, 0x80]
        );
        // Method (_E00, 0, NotSerialized) { }
        assert_eq!(
            method(*b"_E00", &[]),
            [0x14, 0x06, b'_', b'E', b'0', b'0', 0]
        );
        // Device (VGEN) { }
        assert_eq!(
            device(*b"VGEN", &[]),
            [0x5b, 0x82, 0x05, b'V', b'G', b'E', b'N']
        );
        // Scope (\_SB) { }
        assert_eq!(
            scope(&root_path(&[*b"_SB_"]), &[]),
            [0x10, 0x06, b'\\', b'_', b'S', b'B', b'_']
        );
    }
}
