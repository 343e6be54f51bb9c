//! Tiny test guests: x86-64 machine code entered in long mode by the VMM's
//! 64-bit boot path (the VMM's identity map covers the first 4 GiB), wrapped
//! in a minimal ELF so that `nubis-vmm --kernel` loads it like a vmlinux.

/// Where the code is loaded (the VMM requires kernels at or above 1 MiB).
pub const LOAD_ADDRESS: u64 = 0x10_0000;
const ELF_HEADER_SIZE: usize = 64;
const PROGRAM_HEADER_SIZE: usize = 56;
const SERIAL_DATA: u16 = 0x3f8;
const SERIAL_LSR: u16 = 0x3fd;
const BOOT_TIMER: u64 = 0xc000_0000;
/// Where [`Program::count`] keeps its counter (2 MiB, above the code).
pub const COUNTER_ADDRESS: u64 = 0x20_0000;

/// A straight-line program, assembled by hand.
#[derive(Default, Clone)]
pub struct Program {
    code: Vec<u8>,
}

impl Program {
    pub fn new() -> Self {
        Self::default()
    }

    fn mov_dx(&mut self, port: u16) {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
    }

    /// Writes `text` to the UART.
    pub fn print(mut self, text: &str) -> Self {
        self.mov_dx(SERIAL_DATA);
        for byte in text.bytes() {
            self.code.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, b; out dx, al
        }
        self
    }

    /// Writes the boot-timer marker, as the guest images' init does.
    pub fn boot_marker(mut self) -> Self {
        self.code.extend_from_slice(&[0x48, 0xb8]); // mov rax, imm64
        self.code.extend_from_slice(&BOOT_TIMER.to_le_bytes());
        self.code.extend_from_slice(&[0xc6, 0x00, 123]); // mov byte [rax], 123
        self
    }

    /// Resets the machine through the i8042 (what `reboot` does with reboot=k).
    pub fn reset(mut self) -> Self {
        self.code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
        self
    }

    /// `ud2` with the VMM's empty boot IDT: #UD, #GP, #DF, then a triple fault.
    pub fn triple_fault(mut self) -> Self {
        self.code.extend_from_slice(&[0x0f, 0x0b]);
        self
    }

    /// `xsave` in ring 0 with CR4.OSXSAVE clear: #UD and a triple fault on
    /// VMX/SVM hosts, an emulation failure on kvm_pvm hosts. Either way the
    /// guest cannot go on.
    pub fn xsave(mut self) -> Self {
        self.code.extend_from_slice(&[0x48, 0xb8]); // mov rax, 0x20_0000
        self.code.extend_from_slice(&0x20_0000u64.to_le_bytes());
        self.code.extend_from_slice(&[0x0f, 0xae, 0x20]); // xsave [rax]
        self
    }

    /// Writes one byte in every 4 KiB page from `start` up to `end`: the
    /// guest makes the host back all of that RAM.
    pub fn touch_memory(mut self, start: u64, end: u64) -> Self {
        self.code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, imm64
        self.code.extend_from_slice(&start.to_le_bytes());
        self.code.extend_from_slice(&[0x48, 0xb9]); // mov rcx, imm64
        self.code.extend_from_slice(&end.to_le_bytes());
        let top = self.code.len();
        self.code.extend_from_slice(&[0xc6, 0x03, 0x01]); // mov byte [rbx], 1
        self.code
            .extend_from_slice(&[0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00]); // add rbx, 4096
        self.code.extend_from_slice(&[0x48, 0x39, 0xcb]); // cmp rbx, rcx
        let rel = top as i64 - (self.code.len() as i64 + 2);
        self.code.extend_from_slice(&[0x72, rel as i8 as u8]); // jb top
        self
    }

    /// Loops forever without touching any device.
    pub fn spin(mut self) -> Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
        self
    }

    /// Prints `byte` forever, with a delay loop of `delay` iterations between.
    pub fn heartbeat(mut self, byte: u8, delay: u32) -> Self {
        self.mov_dx(SERIAL_DATA);
        let top = self.code.len();
        self.code.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, b; out dx, al
        self.code.push(0xb9); // mov ecx, imm32
        self.code.extend_from_slice(&delay.to_le_bytes());
        self.code.extend_from_slice(&[0xe2, 0xfe]); // loop $
        let rel = top as i64 - (self.code.len() as i64 + 2);
        self.code.extend_from_slice(&[0xeb, rel as i8 as u8]); // jmp top
        self
    }

    /// Counts forever in a byte of RAM at [`COUNTER_ADDRESS`], printing each
    /// new value (a raw byte) to the UART, with a delay loop of `delay`
    /// iterations between: a snapshot's restore must continue the sequence
    /// from where it stopped, from RAM and registers alike.
    pub fn count(mut self, delay: u32) -> Self {
        self.mov_dx(SERIAL_DATA);
        self.code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, imm64
        self.code.extend_from_slice(&COUNTER_ADDRESS.to_le_bytes());
        let top = self.code.len();
        self.code.extend_from_slice(&[0x8a, 0x03]); // mov al, [rbx]
        self.code.extend_from_slice(&[0xfe, 0xc0]); // inc al
        self.code.extend_from_slice(&[0x88, 0x03]); // mov [rbx], al
        self.code.push(0xee); // out dx, al
        self.code.push(0xb9); // mov ecx, imm32
        self.code.extend_from_slice(&delay.to_le_bytes());
        self.code.extend_from_slice(&[0xe2, 0xfe]); // loop $
        let rel = top as i64 - (self.code.len() as i64 + 2);
        self.code.extend_from_slice(&[0xeb, rel as i8 as u8]); // jmp top
        self
    }

    /// Echoes every byte received on the UART back to it, forever.
    pub fn echo(mut self) -> Self {
        let top = self.code.len();
        self.mov_dx(SERIAL_LSR);
        self.code.extend_from_slice(&[0xec, 0xa8, 0x01]); // in al, dx; test al, 1
        let rel = top as i64 - (self.code.len() as i64 + 2);
        self.code.extend_from_slice(&[0x74, rel as i8 as u8]); // jz top
        self.mov_dx(SERIAL_DATA);
        self.code.extend_from_slice(&[0xec, 0xee]); // in al, dx; out dx, al
        let rel = top as i64 - (self.code.len() as i64 + 2);
        self.code.extend_from_slice(&[0xeb, rel as i8 as u8]); // jmp top
        self
    }

    /// The program as an ELF64 executable with one loadable segment.
    pub fn elf(&self) -> Vec<u8> {
        let code_offset = ELF_HEADER_SIZE + PROGRAM_HEADER_SIZE;
        let entry = LOAD_ADDRESS + code_offset as u64;
        let total = (code_offset + self.code.len()) as u64;
        let mut elf = Vec::with_capacity(total as usize);
        elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        elf.extend_from_slice(&[0u8; 8]);
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&entry.to_le_bytes());
        elf.extend_from_slice(&(ELF_HEADER_SIZE as u64).to_le_bytes()); // e_phoff
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        elf.extend_from_slice(&(ELF_HEADER_SIZE as u16).to_le_bytes());
        elf.extend_from_slice(&(PROGRAM_HEADER_SIZE as u16).to_le_bytes());
        elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        elf.extend_from_slice(&[0u8; 6]); // e_shentsize, e_shnum, e_shstrndx
        debug_assert_eq!(elf.len(), ELF_HEADER_SIZE);
        elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
        elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
        elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // p_vaddr
        elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // p_paddr
        elf.extend_from_slice(&total.to_le_bytes()); // p_filesz
        elf.extend_from_slice(&total.to_le_bytes()); // p_memsz
        elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
        elf.extend_from_slice(&self.code);
        elf
    }

    /// Writes the ELF to `path`.
    pub fn write(&self, path: &std::path::Path) {
        std::fs::write(path, self.elf()).expect("write the test guest");
    }
}

/// The console of a [`Program::count`] guest: every byte is the one before
/// plus one (wrapping), from the first.
pub fn assert_counts(bytes: &[u8], what: &str) {
    for (index, pair) in bytes.windows(2).enumerate() {
        assert_eq!(
            pair[1],
            pair[0].wrapping_add(1),
            "{what}: byte {} breaks the count",
            index + 1
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_layout() {
        let elf = Program::new().print("A").reset().elf();
        assert_eq!(&elf[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(entry, LOAD_ADDRESS + 120);
        let code = &elf[120..];
        assert_eq!(
            code,
            &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'A', 0xee, 0xb0, 0xfe, 0xe6, 0x64]
        );
    }

    #[test]
    fn loops_jump_back_to_their_top() {
        let code = Program::new().echo().code;
        // jz rel8 lands on offset 0.
        let jz_end = 4 + 3 + 2;
        assert_eq!(jz_end as i64 + i64::from(code[jz_end - 1] as i8), 0);
        let jmp_end = code.len();
        assert_eq!(jmp_end as i64 + i64::from(code[jmp_end - 1] as i8), 0);
        let count = Program::new().count(10).code;
        let end = count.len();
        // Back to the load from the counter, after `mov dx` and `mov rbx`.
        assert_eq!(end as i64 + i64::from(count[end - 1] as i8), 4 + 10);
        let beat = Program::new().heartbeat(b'.', 10).code;
        let end = beat.len();
        assert_eq!(end as i64 + i64::from(beat[end - 1] as i8), 4);
    }
}
