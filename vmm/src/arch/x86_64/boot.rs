//! Loading a Linux guest: the kernel (ELF vmlinux or bzImage), the initrd,
//! the command line, and the zero page (`boot_params`) that tells the kernel
//! where each of them is and what the memory map looks like.
//!
//! Both kernel formats are entered through the 64-bit boot protocol: at the
//! ELF entry point for vmlinux, at `startup_64` (load address + 0x200) for a
//! bzImage that advertises `XLF_KERNEL_64`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    e820_map, low_ram_end, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, ZERO_PAGE_START,
};

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const BZIMAGE_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const XLF_KERNEL_64: u16 = 1 << 0;
const STARTUP_64_OFFSET: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Highest address (inclusive) an initrd may end at unless the kernel says otherwise.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE_SIZE: u64 = 0x1000;
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// Errors in loading the guest's kernel, initrd and boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel image (neither ELF vmlinux nor bzImage)")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error(
        "bzImage {path} does not support the 64-bit boot protocol (xloadflags {xloadflags:#x})"
    )]
    No64BitEntry { path: PathBuf, xloadflags: u16 },
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} is empty")]
    EmptyInitrd { path: PathBuf },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel (end {kernel_end:#x}, limit {limit:#x})")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cannot write {what} into guest memory: {source}")]
    WriteGuest {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// The kernel image formats the VMM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Where a loaded kernel starts and ends.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// Guest-physical 64-bit entry point.
    pub entry: u64,
    /// First guest-physical address past the kernel image.
    pub end: u64,
    /// The bzImage's setup header (None for ELF).
    pub setup_header: Option<setup_header>,
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Tells the format of a kernel image from its magic numbers.
pub fn detect_format<R: Read + Seek>(image: &mut R) -> std::io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0))?;
    if image.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC {
        return Ok(Some(KernelFormat::Elf));
    }
    image.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
    if image.read_exact(&mut magic).is_ok() && u32::from_le_bytes(magic) == BZIMAGE_MAGIC {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<LoadedKernel, BootError> {
    let open_error = |source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_error)?;
    if file.metadata().map_err(open_error)?.is_dir() {
        return Err(BootError::NotAKernel {
            path: path.to_path_buf(),
        });
    }
    let format = detect_format(&mut file)
        .map_err(open_error)?
        .ok_or_else(|| BootError::NotAKernel {
            path: path.to_path_buf(),
        })?;
    let load_error = |source| BootError::LoadKernel {
        path: path.to_path_buf(),
        source,
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, highmem).map_err(load_error)?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load.0,
                end: result.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, highmem).map_err(load_error)?;
            let header = result.setup_header.ok_or_else(|| BootError::NotAKernel {
                path: path.to_path_buf(),
            })?;
            let xloadflags = header.xloadflags;
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path: path.to_path_buf(),
                    xloadflags,
                });
            }
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load.0 + STARTUP_64_OFFSET,
                end: result.kernel_end,
                setup_header: Some(header),
            })
        }
    }
}

/// Chooses where an initrd of `size` bytes goes: page-aligned, as high as
/// possible below both the end of low RAM and the kernel's limit, and above
/// the kernel.
pub fn initrd_address(size: u64, kernel_end: u64, ram_end: u64, addr_max: u64) -> Option<u64> {
    let limit = ram_end.min(addr_max.saturating_add(1));
    let start = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= kernel_end).then_some(start)
}

/// Loads the initrd at `path` high in low RAM.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<InitrdPlacement, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    let read_error = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let metadata = file.metadata().map_err(read_error)?;
    if metadata.is_dir() {
        return Err(read_error(std::io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let size = metadata.len();
    if size == 0 {
        return Err(BootError::EmptyInitrd {
            path: path.to_path_buf(),
        });
    }
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|max| *max != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let ram_end = low_ram_end(mem_size);
    let addr = initrd_address(size, kernel.end, ram_end, addr_max).ok_or_else(|| {
        BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            kernel_end: kernel.end,
            limit: ram_end.min(addr_max),
        }
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| match source {
            vm_memory::GuestMemoryError::IOError(io) => read_error(io),
            other => BootError::WriteGuest {
                what: "the initrd",
                source: other,
            },
        })?;
    Ok(InitrdPlacement { addr, size })
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`]. Returns
/// its length without the NUL.
pub fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<usize, BootError> {
    let len = cmdline.len();
    if len + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len,
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::WriteGuest {
            what: "the command line",
            source,
        })?;
    Ok(len)
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BootParamsPage(boot_params);

// SAFETY: boot_params is a plain-old-data C struct made of integers and
// arrays of integers; every bit pattern is a valid value.
unsafe impl ByteValued for BootParamsPage {}

/// The zero page for a kernel, a command line of `cmdline_len` bytes, an
/// optional initrd and `mem_size` bytes of RAM.
pub fn build_boot_params(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    mem_size: u64,
    acpi_rsdp: Option<u64>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(rsdp) = acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    } else {
        params.hdr.header = BZIMAGE_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(mem_size);
    for (slot, entry) in params
        .e820_table
        .iter_mut()
        .zip(map.iter().take(E820_MAX_ENTRIES_ZEROPAGE))
    {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    params
}

/// Writes the zero page at [`ZERO_PAGE_START`].
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    params: &boot_params,
) -> Result<(), BootError> {
    mem.write_obj(BootParamsPage(*params), GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::WriteGuest {
            what: "the zero page",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn formats_are_told_apart() {
        let mut elf = Cursor::new(b"\x7fELF\x02\x01\x01".to_vec());
        assert_eq!(detect_format(&mut elf).unwrap(), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_format(&mut Cursor::new(bz)).unwrap(),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(
            detect_format(&mut Cursor::new(vec![0u8; 0x400])).unwrap(),
            None
        );
        assert_eq!(detect_format(&mut Cursor::new(Vec::new())).unwrap(), None);
        assert_eq!(
            detect_format(&mut Cursor::new(b"#!/bin/sh\n".to_vec())).unwrap(),
            None
        );
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let addr = initrd_address(0x1234, 0x200_0000, 0x800_0000, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 0x1234 <= 0x800_0000);
        assert!(addr >= 0x800_0000 - 0x1234 - PAGE_SIZE);
        // Limited by the kernel's initrd_addr_max, not by RAM.
        let addr = initrd_address(0x1000, 0x200_0000, 0xc000_0000, 0x7fff_ffff).unwrap();
        assert_eq!(addr, 0x8000_0000 - 0x1000);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        assert_eq!(
            initrd_address(0x700_0000, 0x200_0000, 0x800_0000, u64::MAX),
            None
        );
        assert_eq!(initrd_address(u64::MAX, 0, 0x800_0000, u64::MAX), None);
    }

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        }
    }

    #[test]
    fn boot_params_for_elf() {
        let initrd = InitrdPlacement {
            addr: 0x700_0000,
            size: 0x1000,
        };
        let params = build_boot_params(&elf_kernel(), 42, Some(initrd), 128 << 20, Some(0xe0000));
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, BZIMAGE_MAGIC);
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1000);
        assert_eq!(params.e820_entries as usize, e820_map(128 << 20).len());
        let first = params.e820_table[0];
        assert_eq!(({ first.addr }, { first.r#type }), (0, 1));
    }

    #[test]
    fn boot_params_keep_the_bzimage_header() {
        let header = setup_header {
            header: BZIMAGE_MAGIC,
            version: 0x20f,
            xloadflags: 0x1,
            init_size: 0x0123_4000,
            ..Default::default()
        };
        let kernel = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: 0x10_0200,
            end: 0x30_0000,
            setup_header: Some(header),
        };
        let params = build_boot_params(&kernel, 0, None, 1 << 30, None);
        assert_eq!({ params.hdr.version }, 0x20f);
        assert_eq!({ params.hdr.init_size }, 0x0123_4000);
        assert_eq!({ params.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ params.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn cmdline_limit() {
        type Mem = vm_memory::GuestMemoryMmap<()>;
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_cmdline(&mem, "console=ttyS0").unwrap(), 13);
        let mut read = [0u8; 14];
        mem.read_slice(&mut read, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&read, b"console=ttyS0\0");
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&mem, &long),
            Err(BootError::CmdlineTooLong { .. })
        ));
        write_cmdline(&mem, &long[..CMDLINE_MAX_SIZE - 1]).unwrap();
    }
}
