//! The snapshot files on disk: the state file's framing (magic, version,
//! length, checksum) and guest RAM's file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use super::state::VmSnapshot;
use crate::memory::GuestMemoryMmap;

/// The state file starts with these bytes.
pub const MAGIC: &[u8; 8] = b"NUBISSNP";
/// The state format this VMM writes and reads; a snapshot of another
/// version is refused rather than misread. Version 2: every component's
/// state carries its own version (`persist::Versioned`).
pub const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// A state file larger than this is not one of ours.
const MAX_STATE_LEN: u64 = 64 << 20;
/// Pages of guest RAM that are all zero are left as holes.
const PAGE: usize = 4096;

/// Errors in writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a nubis snapshot state file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path} is snapshot format version {found}; this VMM reads version {supported}")]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path} is truncated or corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(serde_json::Error),
    #[error("the snapshot's memory file {path} holds {found} bytes, the VM has {expected}")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
    #[error("cannot save the {what} state: {detail}")]
    Save { what: String, detail: String },
    #[error("cannot restore the {what} state: {detail}")]
    Restore { what: String, detail: String },
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The framed bytes of a state file for `snapshot`.
pub fn encode_state(snapshot: &VmSnapshot) -> Result<Vec<u8>, SnapshotError> {
    let payload = serde_json::to_vec(snapshot).map_err(SnapshotError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks the framing of a state file's bytes and decodes its payload.
pub fn decode_state(bytes: &[u8], path: &Path) -> Result<VmSnapshot, SnapshotError> {
    let corrupt = |detail: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[8..12]);
    let found = u32::from_le_bytes(word);
    if found != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found,
            supported: FORMAT_VERSION,
        });
    }
    let mut length = [0u8; 8];
    length.copy_from_slice(&bytes[12..20]);
    let length = u64::from_le_bytes(length);
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != length {
        return Err(corrupt(format!(
            "the header announces {length} bytes of state, the file holds {}",
            payload.len()
        )));
    }
    if Sha256::digest(payload).as_slice() != &bytes[20..HEADER_LEN] {
        return Err(corrupt("the state's checksum does not match".into()));
    }
    serde_json::from_slice(payload).map_err(|err| corrupt(format!("undecodable state: {err}")))
}

/// Writes the state file atomically (a temporary file renamed over it).
pub fn write_state(path: &Path, snapshot: &VmSnapshot) -> Result<(), SnapshotError> {
    let bytes = encode_state(snapshot)?;
    let partial = path.with_extension("partial");
    let mut file = File::create(&partial).map_err(io("create", &partial))?;
    file.write_all(&bytes).map_err(io("write", &partial))?;
    file.sync_all().map_err(io("sync", &partial))?;
    std::fs::rename(&partial, path).map_err(io("rename into place", path))
}

/// Reads and checks a state file.
pub fn read_state(path: &Path) -> Result<VmSnapshot, SnapshotError> {
    let file = File::open(path).map_err(io("open", path))?;
    let len = file.metadata().map_err(io("stat", path))?.len();
    if len > MAX_STATE_LEN {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("{len} bytes is larger than any state file"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_STATE_LEN)
        .read_to_end(&mut bytes)
        .map_err(io("read", path))?;
    decode_state(&bytes, path)
}

/// Total bytes of guest RAM.
pub fn memory_len(memory: &GuestMemoryMmap) -> u64 {
    memory.iter().map(|region| region.len()).sum()
}

/// Writes guest RAM, region after region, leaving zero pages as holes;
/// pages the guest never touched (absent from `memfd`) are not even read.
pub fn write_memory(
    path: &Path,
    memory: &GuestMemoryMmap,
    backing: &crate::memory::RamBacking,
) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let file = File::create(path).map_err(io("create", path))?;
    file.set_len(memory_len(memory)).map_err(io("size", path))?;
    let ranges = backing
        .populated(memory)
        .map_err(io("map the RAM of", path))?;
    let mut page = vec![0u8; PAGE];
    for (start, len) in ranges {
        let offset_of = |address: u64| file_offset(memory, address);
        let mut address = start.0;
        while address < start.0 + len {
            let chunk = PAGE.min((start.0 + len - address) as usize);
            memory
                .read_slice(&mut page[..chunk], vm_memory::GuestAddress(address))
                .map_err(|err| SnapshotError::Save {
                    what: "memory".into(),
                    detail: format!("guest page {address:#x}: {err}"),
                })?;
            if page[..chunk].iter().any(|byte| *byte != 0) {
                let offset = offset_of(address).ok_or_else(|| SnapshotError::Save {
                    what: "memory".into(),
                    detail: format!("guest page {address:#x} is in no region"),
                })?;
                file.write_all_at(&page[..chunk], offset)
                    .map_err(io("write", path))?;
            }
            address += chunk as u64;
        }
    }
    file.sync_all().map_err(io("sync", path))
}

/// Where guest address `address` is in a memory file (regions back to back).
fn file_offset(memory: &GuestMemoryMmap, address: u64) -> Option<u64> {
    let mut offset = 0u64;
    for region in memory.iter() {
        let start = region.start_addr().0;
        if (start..start + region.len()).contains(&address) {
            return Some(offset + address - start);
        }
        offset += region.len();
    }
    None
}

/// Reads a memory file into guest RAM, which must be exactly its size.
/// Only the file's data extents are read (`SEEK_DATA`/`SEEK_HOLE`): fresh
/// guest RAM is zero already, and most of an idle guest's file is holes.
pub fn read_memory(path: &Path, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path).map_err(io("open", path))?;
    let found = file.metadata().map_err(io("stat", path))?.len();
    let expected = memory_len(memory);
    if found != expected {
        return Err(SnapshotError::MemorySize {
            path: path.to_path_buf(),
            found,
            expected,
        });
    }
    let mut region_start = 0u64;
    for region in memory.iter() {
        let len = region.len();
        let host = region.as_ptr();
        // SAFETY: `host` points at `len` bytes of a live, writable mapping
        // owned by `memory`; no vCPU runs yet.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
        let mut at = 0u64;
        while at < len {
            let Some((data, end)) =
                crate::memory::next_extent(&file, region_start + at, region_start + len)
                    .map_err(io("seek in", path))?
            else {
                break;
            };
            let (from, to) = (
                (data - region_start) as usize,
                (end - region_start) as usize,
            );
            file.read_exact_at(&mut bytes[from..to], data)
                .map_err(io("read", path))?;
            at = end - region_start;
        }
        region_start += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_ram;
    use vm_memory::GuestAddress;

    fn sample() -> VmSnapshot {
        VmSnapshot::sample_for_tests()
    }

    #[test]
    fn a_state_file_round_trips() {
        let bytes = encode_state(&sample()).unwrap();
        assert_eq!(&bytes[..8], MAGIC);
        let back = decode_state(&bytes, Path::new("s")).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(sample()).unwrap()
        );
    }

    #[test]
    fn corrupt_truncated_foreign_and_newer_files_are_refused() {
        let path = Path::new("state");
        let good = encode_state(&sample()).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x20;
        let err = decode_state(&flipped, path).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let err = decode_state(&good[..good.len() - 5], path).unwrap_err();
        assert!(matches!(err, SnapshotError::Corrupt { .. }), "{err}");
        let err = decode_state(&good[..30], path).unwrap_err();
        assert!(matches!(err, SnapshotError::Corrupt { .. }), "{err}");
        let err = decode_state(b"ELF\x7f not a snapshot at all", path).unwrap_err();
        assert!(matches!(err, SnapshotError::BadMagic { .. }), "{err}");
        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let err = decode_state(&newer, path).unwrap_err();
        assert!(
            err.to_string()
                .contains("version 3; this VMM reads version 2"),
            "{err}"
        );
        assert!(decode_state(&[], path).is_err());
    }

    #[test]
    fn memory_round_trips_sparsely_and_must_match_in_size() {
        let dir = std::env::temp_dir().join(format!("nubis-snap-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let ranges = [
            (GuestAddress(0), 0x10_0000u64),
            (GuestAddress(0x20_0000), 0x10_0000),
        ];
        let ram = create_guest_ram(&ranges).unwrap();
        ram.memory
            .write_obj(0x1122_3344_u32, GuestAddress(0x1000))
            .unwrap();
        ram.memory
            .write_obj(0x55_u8, GuestAddress(0x2f_ffff))
            .unwrap();
        write_memory(&path, &ram.memory, &ram.backing).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0x20_0000);
        let copy = create_guest_ram(&ranges).unwrap();
        read_memory(&path, &copy.memory).unwrap();
        assert_eq!(
            copy.memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            copy.memory.read_obj::<u8>(GuestAddress(0x2f_ffff)).unwrap(),
            0x55
        );
        let smaller = create_guest_ram(&ranges[..1]).unwrap();
        let err = read_memory(&path, &smaller.memory).unwrap_err();
        assert!(matches!(err, SnapshotError::MemorySize { .. }), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
