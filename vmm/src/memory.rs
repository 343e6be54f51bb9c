//! Guest RAM, backed by one memfd, or by a snapshot's memory file mapped
//! privately.
//!
//! Shared memory rather than anonymous memory, so that a snapshot can write
//! the file, a migration can stream it, and another process (a device
//! backend, the agent) can be handed the fd and map the very same pages.
//! Each guest RAM region maps its own slice of the memfd.
//!
//! A clone restored from a snapshot maps the snapshot's memory file
//! `MAP_PRIVATE` instead: the pages it only reads stay the file's, in the
//! host's page cache and shared by every clone of that snapshot; a page it
//! writes is copied for it alone. The file is opened read-only and never
//! changes.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress};

/// Guest memory with a dirty-page bitmap per region: pages the VMM itself
/// writes (device emulation) are not in KVM's dirty log, and a live
/// migration needs both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Errors in creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create for guest RAM failed: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest RAM memfd to {size} bytes: {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error(
        "guest RAM region at {addr:#x} of {size} bytes does not fit this host's address space"
    )]
    RegionTooLarge { addr: u64, size: u64 },
    #[error("the memory file holds {found} bytes, the VM's RAM {expected}")]
    FileSize { found: u64, expected: u64 },
    #[error("cannot map {size} bytes of guest RAM from the memory file: {reason}")]
    PrivateMap { size: u64, reason: String },
}

/// What backs guest RAM, and so which of its pages exist.
pub enum RamBacking {
    /// A memfd: its data extents are the pages that exist.
    Memfd(File),
    /// A memory file mapped privately: any page may hold data (the file's
    /// or the guest's own copy), so every page counts.
    PrivateFile(File),
}

impl RamBacking {
    /// The guest address ranges whose pages may hold data: everything else
    /// has never been touched and reads as zero. Reading RAM through its
    /// mapping would allocate those pages; this does not.
    pub fn populated(&self, memory: &GuestMemoryMmap) -> std::io::Result<Vec<(GuestAddress, u64)>> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        match self {
            Self::Memfd(memfd) => populated_ranges(memfd, memory),
            Self::PrivateFile(_) => Ok(memory
                .iter()
                .map(|region| (region.start_addr(), region.len()))
                .collect()),
        }
    }
}

/// Guest RAM and what backs it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub backing: RamBacking,
}

fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let name = c"nubis-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is
    // checked before use and owned by the File below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created, valid descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Resize { size, source })?;
    Ok(file)
}

/// Creates memfd-backed guest RAM for the given `(guest address, size)`
/// ranges, laid out back to back in one memfd.
pub fn create_guest_ram(ranges: &[(GuestAddress, u64)]) -> Result<GuestRam, MemoryError> {
    let total: u64 = ranges.iter().map(|(_, size)| *size).sum();
    let memfd = create_memfd(total)?;
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for (addr, size) in ranges {
        let len = usize::try_from(*size).map_err(|_| MemoryError::RegionTooLarge {
            addr: addr.0,
            size: *size,
        })?;
        let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
        regions.push((*addr, len, Some(FileOffset::new(file, offset))));
        offset += size;
    }
    let memory =
        GuestMemoryMmap::from_ranges_with_files(regions).map_err(|source| MemoryError::Map {
            size: total,
            source,
        })?;
    Ok(GuestRam {
        memory,
        backing: RamBacking::Memfd(memfd),
    })
}

/// Guest RAM for the given ranges mapped privately (copy-on-write) from
/// `file`, which holds them back to back and must be exactly their size.
pub fn map_guest_ram_privately(
    ranges: &[(GuestAddress, u64)],
    file: File,
) -> Result<GuestRam, MemoryError> {
    use vm_memory::bitmap::NewBitmap;
    use vm_memory::mmap::MmapRegionBuilder;
    let total: u64 = ranges.iter().map(|(_, size)| *size).sum();
    let found = file.metadata().map_err(MemoryError::Memfd)?.len();
    if found != total {
        return Err(MemoryError::FileSize {
            found,
            expected: total,
        });
    }
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for (addr, size) in ranges {
        let too_large = || MemoryError::RegionTooLarge {
            addr: addr.0,
            size: *size,
        };
        let len = usize::try_from(*size).map_err(|_| too_large())?;
        let slice = file.try_clone().map_err(MemoryError::Memfd)?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::new(slice, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|err| MemoryError::PrivateMap {
                size: *size,
                reason: err.to_string(),
            })?;
        regions.push(vm_memory::GuestRegionMmap::new(mapping, *addr).ok_or_else(too_large)?);
        offset += size;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(|err| MemoryError::PrivateMap {
        size: total,
        reason: err.to_string(),
    })?;
    Ok(GuestRam {
        memory,
        backing: RamBacking::PrivateFile(file),
    })
}

/// The next data extent of `file` at or after `from`, clipped to `limit`
/// (`SEEK_DATA`/`SEEK_HOLE`): where a sparse file, or a memfd, holds pages.
pub fn next_extent(file: &File, from: u64, limit: u64) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |offset: u64, whence| {
        // SAFETY: lseek only moves the descriptor's offset, which nothing
        // here relies on (reads and writes use explicit offsets or maps).
        let ret = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret as u64)
        }
    };
    let data = match seek(from, libc::SEEK_DATA) {
        Ok(data) => data,
        // ENXIO: no data after `from`.
        Err(err) if err.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(err) => return Err(err),
    };
    if data >= limit {
        return Ok(None);
    }
    let end = seek(data, libc::SEEK_HOLE)?.min(limit);
    Ok(Some((data, end)))
}

/// The guest address ranges whose pages exist in the memfd: everything
/// else has never been touched and reads as zero. Reading RAM through its
/// mapping would allocate those pages; this does not.
pub fn populated_ranges(
    memfd: &File,
    memory: &GuestMemoryMmap,
) -> std::io::Result<Vec<(GuestAddress, u64)>> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut ranges = Vec::new();
    let mut file_start = 0u64;
    for region in memory.iter() {
        let len = region.len();
        let mut at = file_start;
        while let Some((data, end)) = next_extent(memfd, at, file_start + len)? {
            ranges.push((
                GuestAddress(region.start_addr().0 + (data - file_start)),
                end - data,
            ));
            at = end;
        }
        file_start += len;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn regions_share_one_memfd() {
        let ranges = [
            (GuestAddress(0), 0x10_0000u64),
            (GuestAddress(0x1_0000_0000), 0x10_0000u64),
        ];
        let mut ram = create_guest_ram(&ranges).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1_0000_0010))
            .unwrap();
        ram.memory
            .write_obj(0x1234_u16, GuestAddress(0x20))
            .unwrap();
        let RamBacking::Memfd(memfd) = &mut ram.backing else {
            panic!("fresh RAM is a memfd's");
        };
        assert_eq!(memfd.metadata().unwrap().len(), 0x20_0000);
        let mut word = [0u8; 4];
        memfd.seek(SeekFrom::Start(0x10_0010)).unwrap();
        memfd.read_exact(&mut word).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xdead_beef);
        assert!(ram.memory.read_obj::<u8>(GuestAddress(0x20_0000)).is_err());
        // Only the two touched pages exist.
        let populated = ram.backing.populated(&ram.memory).unwrap();
        assert_eq!(
            populated,
            [
                (GuestAddress(0), 0x1000),
                (GuestAddress(0x1_0000_0000), 0x1000)
            ]
        );
    }

    #[test]
    fn a_private_map_reads_the_file_and_keeps_its_writes_to_itself() {
        let ranges = [
            (GuestAddress(0), 0x2000u64),
            (GuestAddress(0x1_0000_0000), 0x1000u64),
        ];
        let dir = std::env::temp_dir().join(format!("nubis-private-ram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let mut bytes = vec![0u8; 0x3000];
        bytes[0x10] = 7;
        bytes[0x2000] = 9;
        std::fs::write(&path, &bytes).unwrap();
        let open = || File::open(&path).unwrap();
        let first = map_guest_ram_privately(&ranges, open()).unwrap();
        let second = map_guest_ram_privately(&ranges, open()).unwrap();
        assert_eq!(first.memory.read_obj::<u8>(GuestAddress(0x10)).unwrap(), 7);
        assert_eq!(
            first
                .memory
                .read_obj::<u8>(GuestAddress(0x1_0000_0000))
                .unwrap(),
            9
        );
        first.memory.write_obj(42u8, GuestAddress(0x10)).unwrap();
        assert_eq!(first.memory.read_obj::<u8>(GuestAddress(0x10)).unwrap(), 42);
        assert_eq!(second.memory.read_obj::<u8>(GuestAddress(0x10)).unwrap(), 7);
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file changed");
        // Every page may hold data.
        assert_eq!(
            first.backing.populated(&first.memory).unwrap(),
            ranges.to_vec()
        );
        // A file of another size is refused.
        assert!(matches!(
            map_guest_ram_privately(&ranges[..1], open()),
            Err(MemoryError::FileSize { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
