//! Parsing and running one virtio-blk request.
//!
//! A request is a descriptor chain the guest wrote: a 16-byte header
//! (type, sector) the device reads, data buffers, and a one-byte status the
//! device writes. Everything in it is untrusted: the shape of the chain, the
//! directions of the buffers, their addresses and lengths and the sector.
//! A chain that is malformed is answered with an error status when it has a
//! status byte to write, and is otherwise returned with nothing written.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

pub const SECTOR_SIZE: u64 = 512;
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// DISCARD/WRITE_ZEROES segments: sector u64, num_sectors u32, flags u32.
pub const SEGMENT_LEN: u32 = 16;
/// Segments accepted in one DISCARD/WRITE_ZEROES request.
pub const MAX_SEGMENTS: u32 = 16;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
const HEADER_LEN: u32 = 16;

/// Why a chain is not a well-formed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("chain of {0} descriptor(s) is too short for a request")]
    TooShort(usize),
    #[error("the request header is device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("the status descriptor is not device-writable or is empty")]
    BadStatus,
    #[error("cannot read the request header at {0:#x}")]
    UnreadableHeader(u64),
    #[error("data buffer {index} has the wrong direction for request type {kind}")]
    WrongDirection { index: usize, kind: u32 },
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

impl Request {
    /// The bytes the request moves between guest and disk, as the rate
    /// limiter counts them: the data buffers of reads and writes.
    pub fn data_bytes(&self) -> u64 {
        match self.kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                self.data.iter().map(|(_, len)| u64::from(*len)).sum()
            }
            _ => 0,
        }
    }
}

/// What the device did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    /// Bytes written into guest buffers (data, not counting the status byte).
    pub written: u32,
}

/// The parts of the disk a request runs against.
pub struct Disk<'a> {
    pub file: &'a mut File,
    pub capacity_bytes: u64,
    pub read_only: bool,
    pub id: &'a [u8; VIRTIO_BLK_ID_BYTES],
    /// FLUSH was not negotiated: every write is made durable at once.
    pub write_through: bool,
    /// Marks what is written, while the disk is being copied elsewhere.
    pub tracker: Option<&'a super::tracker::WriteTracker>,
}

/// Checks a chain's shape and reads its header.
pub fn parse(descriptors: &[Descriptor], mem: &GuestMemoryMmap) -> Result<Request, ParseError> {
    if descriptors.len() < 2 {
        return Err(ParseError::TooShort(descriptors.len()));
    }
    let header = descriptors[0];
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(ParseError::BadHeader);
    }
    let status = descriptors[descriptors.len() - 1];
    if !status.is_write_only() || status.len() < 1 {
        return Err(ParseError::BadStatus);
    }
    let kind: u32 = mem
        .read_obj(header.addr())
        .map_err(|_| ParseError::UnreadableHeader(header.addr().0))?;
    let sector_addr = header
        .addr()
        .checked_add(8)
        .ok_or(ParseError::UnreadableHeader(header.addr().0))?;
    let sector: u64 = mem
        .read_obj(sector_addr)
        .map_err(|_| ParseError::UnreadableHeader(header.addr().0))?;
    let middle = &descriptors[1..descriptors.len() - 1];
    let device_writes = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let device_reads = matches!(
        kind,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
    );
    for (index, desc) in middle.iter().enumerate() {
        if (device_writes && !desc.is_write_only()) || (device_reads && desc.is_write_only()) {
            return Err(ParseError::WrongDirection { index, kind });
        }
    }
    Ok(Request {
        kind,
        sector,
        data: middle.iter().map(|d| (d.addr(), d.len())).collect(),
        status: status.addr(),
    })
}

/// Whether the sectors a request touches lie inside the disk.
fn in_range(sector: u64, len: u64, capacity_bytes: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= capacity_bytes).then_some(offset)
}

fn transfer(request: &Request, mem: &GuestMemoryMmap, disk: &mut Disk) -> Result<u32, u8> {
    let total: u64 = request.data.iter().map(|(_, len)| u64::from(*len)).sum();
    let offset = in_range(request.sector, total, disk.capacity_bytes).ok_or(VIRTIO_BLK_S_IOERR)?;
    disk.file
        .seek(SeekFrom::Start(offset))
        .map_err(|_| VIRTIO_BLK_S_IOERR)?;
    let mut written = 0u32;
    for (addr, len) in &request.data {
        let len = *len as usize;
        if request.kind == VIRTIO_BLK_T_IN {
            mem.read_exact_volatile_from(*addr, disk.file, len)
                .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            written = written.saturating_add(len as u32);
        } else {
            mem.write_all_volatile_to(*addr, disk.file, len)
                .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        }
    }
    if request.kind == VIRTIO_BLK_T_OUT {
        if let Some(tracker) = disk.tracker {
            tracker.mark(offset, total);
        }
    }
    if request.kind == VIRTIO_BLK_T_OUT && disk.write_through {
        disk.file.sync_data().map_err(|_| VIRTIO_BLK_S_IOERR)?;
    }
    Ok(written)
}

/// Frees or zeroes a byte range of the image without writing data.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate only acts on the descriptor, which `file` keeps open
    // for the whole call; offsets and lengths are checked by the kernel.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// DISCARD and WRITE_ZEROES: punch holes (or zero ranges) in the image.
fn zero_ranges(request: &Request, mem: &GuestMemoryMmap, disk: &mut Disk) -> Result<u32, u8> {
    let mut segments = 0u32;
    for (addr, len) in &request.data {
        if len % SEGMENT_LEN != 0 {
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        for index in 0..len / SEGMENT_LEN {
            segments += 1;
            if segments > MAX_SEGMENTS {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
            let at = addr
                .checked_add(u64::from(index * SEGMENT_LEN))
                .ok_or(VIRTIO_BLK_S_IOERR)?;
            let field = |offset: u64| at.checked_add(offset).ok_or(VIRTIO_BLK_S_IOERR);
            let sector: u64 = mem.read_obj(at).map_err(|_| VIRTIO_BLK_S_IOERR)?;
            let num: u32 = mem.read_obj(field(8)?).map_err(|_| VIRTIO_BLK_S_IOERR)?;
            let flags: u32 = mem.read_obj(field(12)?).map_err(|_| VIRTIO_BLK_S_IOERR)?;
            let allowed = if request.kind == VIRTIO_BLK_T_WRITE_ZEROES {
                WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
            let len = u64::from(num) * SECTOR_SIZE;
            let offset = in_range(sector, len, disk.capacity_bytes).ok_or(VIRTIO_BLK_S_IOERR)?;
            if len == 0 {
                continue;
            }
            if let Some(tracker) = disk.tracker {
                tracker.mark(offset, len);
            }
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            let result = if request.kind == VIRTIO_BLK_T_WRITE_ZEROES
                && flags & WRITE_ZEROES_FLAG_UNMAP == 0
            {
                // Keep the blocks allocated; fall back to a hole (which
                // reads as zeroes too) where ZERO_RANGE is unsupported.
                fallocate(disk.file, zero, offset, len)
                    .or_else(|_| fallocate(disk.file, punch, offset, len))
            } else {
                fallocate(disk.file, punch, offset, len)
            };
            result.map_err(|_| VIRTIO_BLK_S_IOERR)?;
        }
    }
    Ok(0)
}

/// Runs a parsed request against the disk and writes its status byte.
pub fn execute(request: &Request, mem: &GuestMemoryMmap, disk: &mut Disk) -> Completion {
    let result = match request.kind {
        VIRTIO_BLK_T_IN => transfer(request, mem, disk),
        VIRTIO_BLK_T_OUT if disk.read_only => Err(VIRTIO_BLK_S_IOERR),
        VIRTIO_BLK_T_OUT => transfer(request, mem, disk),
        VIRTIO_BLK_T_FLUSH => disk
            .file
            .sync_data()
            .map(|_| 0)
            .map_err(|_| VIRTIO_BLK_S_IOERR),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if disk.read_only => {
            Err(VIRTIO_BLK_S_IOERR)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => zero_ranges(request, mem, disk),
        VIRTIO_BLK_T_GET_ID => match request.data.first() {
            Some((addr, len)) => {
                let count = (*len as usize).min(VIRTIO_BLK_ID_BYTES);
                mem.write_slice(&disk.id[..count], *addr)
                    .map(|_| count as u32)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)
            }
            None => Err(VIRTIO_BLK_S_IOERR),
        },
        _ => Err(VIRTIO_BLK_S_UNSUPP),
    };
    let (status, written) = match result {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(status) => (status, 0),
    };
    // A status address outside guest memory leaves nothing to write.
    let _ = mem.write_obj(status, request.status);
    Completion { status, written }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use virtio_queue::desc::split::Descriptor;

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) -> Descriptor {
        mem.write_obj(kind, GuestAddress(addr)).unwrap();
        mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
        Descriptor::new(addr, 16, 0, 0)
    }

    fn disk_file(len: usize) -> File {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(&(0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>())
            .unwrap();
        file
    }

    fn run(
        request: &Request,
        mem: &GuestMemoryMmap,
        file: &mut File,
        read_only: bool,
    ) -> Completion {
        let id = *b"nubis-test-disk\0\0\0\0\0";
        let mut disk = Disk {
            capacity_bytes: file.metadata().unwrap().len(),
            file,
            read_only,
            id: &id,
            write_through: false,
            tracker: None,
        };
        execute(request, mem, &mut disk)
    }

    #[test]
    fn read_request_copies_sectors_into_the_guest() {
        let mem = memory();
        let mut file = disk_file(4096);
        let chain = [
            header(&mem, 0x1000, VIRTIO_BLK_T_IN, 1),
            Descriptor::new(0x2000, 512, WRITE, 0),
            Descriptor::new(0x3000, 1, WRITE, 0),
        ];
        let request = parse(&chain, &mem).unwrap();
        let done = run(&request, &mem, &mut file, false);
        assert_eq!(
            done,
            Completion {
                status: VIRTIO_BLK_S_OK,
                written: 512
            }
        );
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(0x2000)).unwrap();
        assert_eq!(data[0], (512 % 251) as u8);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn write_request_reaches_the_file_and_read_only_refuses() {
        let mem = memory();
        let mut file = disk_file(4096);
        mem.write_slice(&[0xab; 512], GuestAddress(0x2000)).unwrap();
        let chain = [
            header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 2),
            Descriptor::new(0x2000, 512, 0, 0),
            Descriptor::new(0x3000, 1, WRITE, 0),
        ];
        let request = parse(&chain, &mem).unwrap();
        assert_eq!(
            run(&request, &mem, &mut file, true).status,
            VIRTIO_BLK_S_IOERR
        );
        let mut sector = [0u8; 512];
        file.seek(SeekFrom::Start(1024)).unwrap();
        file.read_exact(&mut sector).unwrap();
        assert_ne!(sector, [0xab; 512]);
        assert_eq!(
            run(&request, &mem, &mut file, false).status,
            VIRTIO_BLK_S_OK
        );
        file.seek(SeekFrom::Start(1024)).unwrap();
        file.read_exact(&mut sector).unwrap();
        assert_eq!(sector, [0xab; 512]);
    }

    #[test]
    fn out_of_range_sectors_are_io_errors() {
        let mem = memory();
        let mut file = disk_file(4096);
        for sector in [8u64, 7 + 1, u64::MAX / 512, u64::MAX] {
            let chain = [
                header(&mem, 0x1000, VIRTIO_BLK_T_IN, sector),
                Descriptor::new(0x2000, 512, WRITE, 0),
                Descriptor::new(0x3000, 1, WRITE, 0),
            ];
            let request = parse(&chain, &mem).unwrap();
            assert_eq!(
                run(&request, &mem, &mut file, false).status,
                VIRTIO_BLK_S_IOERR
            );
        }
    }

    #[test]
    fn buffers_outside_guest_memory_are_io_errors() {
        let mem = memory();
        let mut file = disk_file(4096);
        let chain = [
            header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0),
            Descriptor::new(0xf_ff00, 512, WRITE, 0),
            Descriptor::new(0x3000, 1, WRITE, 0),
        ];
        let request = parse(&chain, &mem).unwrap();
        assert_eq!(
            run(&request, &mem, &mut file, false).status,
            VIRTIO_BLK_S_IOERR
        );
        // A status byte outside memory: nothing is written, nothing panics.
        let chain = [
            header(&mem, 0x1000, VIRTIO_BLK_T_FLUSH, 0),
            Descriptor::new(u64::MAX - 1, 1, WRITE, 0),
        ];
        let request = parse(&chain, &mem).unwrap();
        assert_eq!(
            run(&request, &mem, &mut file, false).status,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn malformed_chains_are_refused() {
        let mem = memory();
        let status = Descriptor::new(0x3000, 1, WRITE, 0);
        assert_eq!(parse(&[status], &mem), Err(ParseError::TooShort(1)));
        let writable_header = Descriptor::new(0x1000, 16, WRITE, 0);
        assert_eq!(
            parse(&[writable_header, status], &mem),
            Err(ParseError::BadHeader)
        );
        let short_header = Descriptor::new(0x1000, 8, 0, 0);
        assert_eq!(
            parse(&[short_header, status], &mem),
            Err(ParseError::BadHeader)
        );
        let hdr = header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let readonly_status = Descriptor::new(0x3000, 1, 0, 0);
        assert_eq!(
            parse(&[hdr, readonly_status], &mem),
            Err(ParseError::BadStatus)
        );
        let wrong = Descriptor::new(0x2000, 512, 0, 0);
        assert!(matches!(
            parse(&[hdr, wrong, status], &mem),
            Err(ParseError::WrongDirection { index: 0, .. })
        ));
        let far_header = Descriptor::new(u64::MAX - 4, 16, 0, 0);
        assert!(matches!(
            parse(&[far_header, status], &mem),
            Err(ParseError::UnreadableHeader(_))
        ));
    }

    fn segment(mem: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) {
        mem.write_obj(sector, GuestAddress(at)).unwrap();
        mem.write_obj(num, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    }

    fn sector_bytes(file: &mut File, sector: u64) -> Vec<u8> {
        let mut data = vec![0u8; 512];
        file.seek(SeekFrom::Start(sector * 512)).unwrap();
        file.read_exact(&mut data).unwrap();
        data
    }

    #[test]
    fn discard_and_write_zeroes_clear_sectors() {
        let mem = memory();
        for (kind, flags) in [
            (VIRTIO_BLK_T_DISCARD, 0),
            (VIRTIO_BLK_T_WRITE_ZEROES, 0),
            (VIRTIO_BLK_T_WRITE_ZEROES, WRITE_ZEROES_FLAG_UNMAP),
        ] {
            let mut file = disk_file(8 * 4096);
            segment(&mem, 0x2000, 8, 8, flags); // the second 4 KiB block
            let chain = [
                header(&mem, 0x1000, kind, 0),
                Descriptor::new(0x2000, 16, 0, 0),
                Descriptor::new(0x3000, 1, WRITE, 0),
            ];
            let request = parse(&chain, &mem).unwrap();
            assert_eq!(
                run(&request, &mem, &mut file, false).status,
                VIRTIO_BLK_S_OK
            );
            assert_eq!(sector_bytes(&mut file, 8), vec![0u8; 512]);
            assert_eq!(sector_bytes(&mut file, 15), vec![0u8; 512]);
            assert_ne!(sector_bytes(&mut file, 7), vec![0u8; 512]);
            assert_ne!(sector_bytes(&mut file, 16), vec![0u8; 512]);
            assert_eq!(file.metadata().unwrap().len(), 8 * 4096);
            // Read-only disks refuse.
            assert_eq!(
                run(&request, &mem, &mut file, true).status,
                VIRTIO_BLK_S_IOERR
            );
        }
    }

    #[test]
    fn bad_discard_segments_are_refused() {
        let mem = memory();
        let mut file = disk_file(4096);
        let cases: [(u64, u32, u32, u32, u8); 4] = [
            (7, 2, 0, 16, VIRTIO_BLK_S_IOERR),        // past the end
            (u64::MAX, 1, 0, 16, VIRTIO_BLK_S_IOERR), // overflowing sector
            (0, 1, 0x80, 16, VIRTIO_BLK_S_UNSUPP),    // unknown flag
            (0, 1, 0, 12, VIRTIO_BLK_S_UNSUPP),       // not whole segments
        ];
        for (sector, num, flags, len, expected) in cases {
            segment(&mem, 0x2000, sector, num, flags);
            let chain = [
                header(&mem, 0x1000, VIRTIO_BLK_T_DISCARD, 0),
                Descriptor::new(0x2000, len, 0, 0),
                Descriptor::new(0x3000, 1, WRITE, 0),
            ];
            let request = parse(&chain, &mem).unwrap();
            let status = run(&request, &mem, &mut file, false).status;
            assert_eq!(status, expected, "{sector} {num} {flags} {len}");
        }
        // More segments than allowed.
        mem.write_slice(&[0u8; 16 * 17], GuestAddress(0x2000))
            .unwrap();
        let chain = [
            header(&mem, 0x1000, VIRTIO_BLK_T_DISCARD, 0),
            Descriptor::new(0x2000, SEGMENT_LEN * (MAX_SEGMENTS + 1), 0, 0),
            Descriptor::new(0x3000, 1, WRITE, 0),
        ];
        let request = parse(&chain, &mem).unwrap();
        assert_eq!(
            run(&request, &mem, &mut file, false).status,
            VIRTIO_BLK_S_UNSUPP
        );
    }

    #[test]
    fn get_id_and_unsupported_types() {
        let mem = memory();
        let mut file = disk_file(4096);
        let chain = [
            header(&mem, 0x1000, VIRTIO_BLK_T_GET_ID, 0),
            Descriptor::new(0x2000, 64, WRITE, 0),
            Descriptor::new(0x3000, 1, WRITE, 0),
        ];
        let done = run(&parse(&chain, &mem).unwrap(), &mem, &mut file, false);
        assert_eq!(
            done,
            Completion {
                status: VIRTIO_BLK_S_OK,
                written: 20
            }
        );
        let mut id = [0u8; 15];
        mem.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id, b"nubis-test-disk");
        let chain = [
            header(&mem, 0x1000, 99, 0),
            Descriptor::new(0x3000, 1, WRITE, 0),
        ];
        let done = run(&parse(&chain, &mem).unwrap(), &mem, &mut file, false);
        assert_eq!(done.status, VIRTIO_BLK_S_UNSUPP);
    }
}
