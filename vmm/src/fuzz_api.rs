//! Entry points for the fuzz targets in `fuzz/` (scripts/fuzz.sh): each
//! takes arbitrary bytes and feeds them to a parser of something a guest
//! or a peer controls, the way the VMM itself would. None may panic,
//! whatever the bytes; the assertions here are invariants that must hold
//! for every input.
//!
//! Why a module of its own: the targets live outside the workspace and
//! see only the crate's public API; these functions reach the private
//! parsers without making them public one by one.

use std::cell::RefCell;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use crate::devices::legacy::IrqLine;
use crate::devices::virtio::console::backend::ConsoleBackend;
use crate::devices::virtio::console::device::Console;
use crate::devices::virtio::queue_handler::EventDrivenDevice;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt};
use crate::memory::GuestMemoryMmap;
use crate::migration::destination::{
    judge_first_record, judge_hello, receive_ram_and_state, HelloVerdict,
};
use crate::migration::protocol::{self, Kind};
use crate::migration::secure::{Keys, MigrationKey, Role, SecureStream, KEY_LEN, SALT_LEN};
use crate::migration::source::expect;

/// The token the migration targets' destination expects.
pub const MIGRATION_TOKEN: &str = "fuzz-migration-token";
/// Guest RAM of the device and migration targets.
const MEMORY_SIZE: usize = 0x1_0000;
/// The size of the disk a migration target receives.
const DISK_SIZE: u64 = 256 * 1024;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Guest RAM and a disk file for the migration targets, made once per
/// thread (the targets run millions of inputs).
struct MigrationTarget {
    memory: GuestMemoryMmap,
    disks: Vec<(std::fs::File, u64)>,
}

thread_local! {
    static MIGRATION: RefCell<Option<MigrationTarget>> = const { RefCell::new(None) };
}

fn memfd(size: u64) -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new
    // descriptor (or -1), which nothing else owns.
    let fd = unsafe { libc::memfd_create(c"nubis-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).ok()?;
    Some(file)
}

/// The destination's side of a migration: `data` is what a peer sends to
/// `--migrate-listen`. First the record layer, as a stranger without the
/// key reaches it (its first record judged, then records read: nothing
/// opens, but lengths and cuts are the peer's); then, as the plaintext
/// inside records that opened, the handshake's judgement of its first
/// frame, then (as if accepted) pages, disk pieces and the state.
pub fn migration_destination(data: &[u8]) {
    let key = MigrationKey::from_bytes([7; KEY_LEN]);
    let _ = judge_first_record(data, &key, MIGRATION_TOKEN);
    let mut opened = 0;
    if let Some((salt, records)) = data.split_first_chunk::<SALT_LEN>() {
        if let Ok(keys) = Keys::derive(&key, salt, Role::Destination) {
            let mut records = SecureStream::new(records, keys);
            let mut plaintext = [0u8; 4096];
            while let Ok(got @ 1..) = std::io::Read::read(&mut records, &mut plaintext) {
                opened += got;
            }
        }
    }
    // Nothing opens without the key: no plaintext comes of a stranger's
    // bytes.
    assert_eq!(opened, 0);
    if let HelloVerdict::Source(hello) = judge_hello(data, MIGRATION_TOKEN) {
        assert!(protocol::tokens_match(MIGRATION_TOKEN, &hello.token));
    }
    MIGRATION.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            let Ok(memory) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
                return;
            };
            let disks = memfd(DISK_SIZE)
                .map(|file| vec![(file, DISK_SIZE)])
                .unwrap_or_default();
            *cell = Some(MigrationTarget { memory, disks });
        }
        if let Some(target) = cell.as_ref() {
            let _ = receive_ram_and_state(&mut &data[..], &target.memory, &target.disks);
            if let Some((file, size)) = target.disks.first() {
                // A disk never grows past the size the source announced.
                assert_eq!(file.metadata().map(|meta| meta.len()).ok(), Some(*size));
            }
        }
    });
}

/// The source's side: `data` is what the destination answers, read as
/// the source reads it at each of its steps.
pub fn migration_source(data: &[u8]) {
    let mut stream = data;
    for expected in [Kind::Accept, Kind::Ready, Kind::Running] {
        if expect(&mut stream, expected).is_err() {
            break;
        }
    }
    let mut stream = data;
    while let Ok((kind, payload)) = protocol::receive(&mut stream) {
        assert!(payload.len() as u64 <= protocol::max_payload(kind));
        if kind == Kind::Pages {
            if let Ok(pages) = protocol::pages(&payload) {
                for (_, page) in pages {
                    assert_eq!(page.len(), protocol::PAGE_SIZE);
                }
            }
        }
        if kind == Kind::Disk {
            let _ = protocol::parse_disk_chunk(&payload);
        }
    }
}

/// A snapshot's state file: magic, version, length, SHA-256, JSON.
pub fn snapshot_state(data: &[u8]) {
    let path = Path::new("fuzz-state");
    if let Ok(snapshot) = crate::snapshot::file::decode_state(data, path) {
        let shape = snapshot.machine.clone();
        assert!(snapshot.machine.check(&shape).is_ok());
        // What decodes encodes again, and that decodes to the same.
        if let Ok(bytes) = crate::snapshot::file::encode_state(&snapshot) {
            let again = crate::snapshot::file::decode_state(&bytes, path);
            assert!(again.is_ok());
        }
    }
}

/// Lines of the control protocol, as a client sends them.
pub fn control_request(data: &[u8]) {
    use crate::control::protocol::{encode_response, parse_request};
    for line in data.split(|byte| *byte == b'\n') {
        let answer = match parse_request(line) {
            Ok(request) => {
                // A request that parses serializes and parses back to itself.
                if let Ok(text) = serde_json::to_vec(&request) {
                    assert_eq!(parse_request(&text).ok().as_ref(), Some(&request));
                }
                continue;
            }
            Err(response) => encode_response(&response),
        };
        assert_eq!(answer.last(), Some(&b'\n'));
        assert_eq!(answer.iter().filter(|byte| **byte == b'\n').count(), 1);
    }
}

/// Where one queue's rings are in guest RAM.
struct Rings {
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    size: u16,
}

impl Rings {
    /// The device's side of the queue, set up and ready.
    fn queue(&self) -> Option<virtio_queue::Queue> {
        use virtio_queue::QueueT;
        let mut queue = virtio_queue::Queue::new(self.size).ok()?;
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.desc_table as u32), Some(0));
        queue.set_avail_ring_address(Some(self.avail_ring as u32), Some(0));
        queue.set_used_ring_address(Some(self.used_ring as u32), Some(0));
        queue.set_ready(true);
        Some(queue)
    }
}

fn interrupt() -> Option<std::sync::Arc<VirtioInterrupt>> {
    Some(std::sync::Arc::new(VirtioInterrupt::new(
        IrqLine::new().ok()?,
    )))
}

/// Copies `data` over guest RAM from address 0 (descriptor tables, rings
/// and buffers alike); returns how much was copied.
fn fill_memory(memory: &GuestMemoryMmap, data: &[u8]) -> usize {
    let len = data.len().min(MEMORY_SIZE);
    let _ = memory.write_slice(&data[..len], GuestAddress(0));
    len
}

/// A virtio-console port: guest RAM (both queues' rings, descriptors and
/// buffers) from `data`, host input waiting on the socket, then the
/// device's events as the event loop would deliver them.
pub fn virtio_console(data: &[u8]) {
    const RX: Rings = Rings {
        desc_table: 0x0000,
        avail_ring: 0x0100,
        used_ring: 0x0200,
        size: 16,
    };
    const TX: Rings = Rings {
        desc_table: 0x0400,
        avail_ring: 0x0500,
        used_ring: 0x0600,
        size: 16,
    };
    let Ok((mut host, device_end)) = UnixStream::pair() else {
        return;
    };
    let Ok(backend) = ConsoleBackend::from_inherited_fd(device_end.into_raw_fd()) else {
        return;
    };
    let Some(interrupt) = interrupt() else {
        return;
    };
    let Ok(mut console) = Console::new("fuzz", backend, interrupt) else {
        return;
    };
    let Ok(memory) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
        return;
    };
    fill_memory(&memory, data);
    let activated = console.activate(Activation {
        memory: memory.clone(),
        queues: match (RX.queue(), TX.queue()) {
            (Some(rx), Some(tx)) => vec![rx, tx],
            _ => return,
        },
        acked_features: VIRTIO_F_VERSION_1,
    });
    if activated.is_err() {
        return;
    }
    let _ = host.set_nonblocking(true);
    let input = data.get(..data.len().min(512)).unwrap_or_default();
    let _ = host.write_all(input);
    for source in [0, 1, 2] {
        console.on_event(source);
    }
    let mut sink = [0u8; 4096];
    let mut rounds = 0;
    while std::io::Read::read(&mut host, &mut sink).is_ok_and(|got| got > 0) && rounds < 64 {
        console.on_event(2);
        rounds += 1;
    }
}

/// The entropy device: guest RAM (its queue and buffers) from `data`, then
/// a queue notification.
pub fn virtio_rng(data: &[u8]) {
    const QUEUE: Rings = Rings {
        desc_table: 0x0000,
        avail_ring: 0x0100,
        used_ring: 0x0200,
        size: 16,
    };
    let Some(interrupt) = interrupt() else {
        return;
    };
    let Ok(mut rng) = Rng::new(interrupt) else {
        return;
    };
    let Ok(memory) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
        return;
    };
    fill_memory(&memory, data);
    let activated = rng.activate(Activation {
        memory: memory.clone(),
        queues: match QUEUE.queue() {
            Some(queue) => vec![queue],
            None => return,
        },
        acked_features: VIRTIO_F_VERSION_1,
    });
    if activated.is_err() {
        return;
    }
    // Served within libFuzzer's time limit, whatever the chains: the
    // buffers may even lie over the rings the device reads.
    rng.on_event(0);
}

/// The vsock device: guest RAM (its three queues, descriptors and
/// packets) from `data`, a host process that connects to guest port 52
/// and writes, a host listener on port 1024 for the guest's connections,
/// then notifications and the host sockets' events in turn.
pub fn virtio_vsock(data: &[u8]) {
    use crate::devices::virtio::vsock::Vsock;
    const QUEUES: [Rings; 3] = [
        Rings {
            desc_table: 0x0000,
            avail_ring: 0x0100,
            used_ring: 0x0200,
            size: 16,
        },
        Rings {
            desc_table: 0x0400,
            avail_ring: 0x0500,
            used_ring: 0x0600,
            size: 16,
        },
        Rings {
            desc_table: 0x0800,
            avail_ring: 0x0900,
            used_ring: 0x0a00,
            size: 16,
        },
    ];
    thread_local! {
        static DIR: std::path::PathBuf = {
            let dir = std::env::temp_dir()
                .join(format!("nubis-fuzz-vsock-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&dir);
            dir
        };
    }
    let socket = DIR.with(|dir| dir.join("v.sock"));
    let mut listener_path = socket.clone().into_os_string();
    listener_path.push("_1024");
    let _ = std::fs::remove_file(&listener_path);
    let Ok(listener) = std::os::unix::net::UnixListener::bind(&listener_path) else {
        return;
    };
    let _ = listener.set_nonblocking(true);
    let Some(interrupt) = interrupt() else {
        return;
    };
    let Ok(mut vsock) = Vsock::new(3, &socket, interrupt) else {
        return;
    };
    let Ok(memory) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
        return;
    };
    fill_memory(&memory, data);
    let mut queues = Vec::new();
    for rings in &QUEUES {
        match rings.queue() {
            Some(queue) => queues.push(queue),
            None => return,
        }
    }
    let activated = vsock.activate(Activation {
        memory: memory.clone(),
        queues,
        acked_features: VIRTIO_F_VERSION_1,
    });
    if activated.is_err() {
        return;
    }
    let mut host = UnixStream::connect(&socket).ok();
    if let Some(host) = host.as_mut() {
        let _ = host.set_nonblocking(true);
        let _ = host.write_all(b"CONNECT 52\n");
        let _ = host.write_all(data.get(..data.len().min(256)).unwrap_or_default());
    }
    let mut accepted = Vec::new();
    for source in [3, 1, 0, 2, 3, 1, 0] {
        vsock.on_event(source);
        while let Ok((stream, _)) = listener.accept() {
            accepted.push(stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::{send, send_json, Hello, Refusal};

    /// Valid inputs for each target, from which libFuzzer starts.
    fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        let mut out = Vec::new();
        let control = b"{\"command\":\"status\"}\n{\"command\":\"set_rate_limit\",\"device\":\"nubis-disk0\",\"bytes_per_s\":1048576,\"ops_per_s\":500}\n\
            {\"command\":\"snapshot\",\"dir\":\"/var/snap\"}\n{\"command\":\"migrate\",\"to\":\"10.0.0.2:7100\",\"token\":\"0123456789abcdef\",\"key\":\"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\",\"disks\":\"copy\",\"downtime_ms\":100,\"max_rounds\":30,\"max_seconds\":300}\n";
        out.push(("control_request", "requests", control.to_vec()));
        let machine = crate::snapshot::state::VmSnapshot::sample_for_tests().machine;
        let hello = Hello {
            magic: protocol::MAGIC.into(),
            version: protocol::VERSION,
            token: MIGRATION_TOKEN.into(),
            machine,
            disks: vec![DISK_SIZE],
        };
        let mut stream = Vec::new();
        send_json(&mut stream, Kind::Hello, &hello).unwrap();
        out.push(("migration_destination", "hello", stream.clone()));
        let mut pages = Vec::new();
        protocol::push_page(&mut pages, 0x3000, &[0x42; protocol::PAGE_SIZE]);
        let mut stream = Vec::new();
        send(&mut stream, Kind::Pages, &pages).unwrap();
        send(
            &mut stream,
            Kind::Disk,
            &protocol::disk_chunk(0, 4096, b"disk data"),
        )
        .unwrap();
        let state =
            serde_json::to_vec(&crate::snapshot::state::VmSnapshot::sample_for_tests()).unwrap();
        send(&mut stream, Kind::State, &state).unwrap();
        out.push(("migration_destination", "stream", stream));
        let mut answers = Vec::new();
        for kind in [Kind::Accept, Kind::Ready, Kind::Running] {
            send(&mut answers, kind, &[]).unwrap();
        }
        out.push(("migration_source", "answers", answers));
        let mut refusal = Vec::new();
        send(&mut refusal, Kind::Accept, &[]).unwrap();
        send_json(
            &mut refusal,
            Kind::Refuse,
            &Refusal {
                message: "no".into(),
            },
        )
        .unwrap();
        out.push(("migration_source", "refusal", refusal));
        let snapshot = crate::snapshot::state::VmSnapshot::sample_for_tests();
        out.push((
            "snapshot_state",
            "sample",
            crate::snapshot::file::encode_state(&snapshot).unwrap(),
        ));
        // A queue of 16 at 0 with one chain: a readable then a writable
        // buffer; the console's second queue at 0x400 the same.
        let mut ring = vec![0u8; 0x1000];
        for base in [0usize, 0x400] {
            let desc =
                |ring: &mut Vec<u8>, index: usize, addr: u64, len: u32, flags: u16, next: u16| {
                    let at = base + index * 16;
                    ring[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                    ring[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
                    ring[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
                    ring[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
                };
            desc(&mut ring, 0, 0x800 + base as u64, 64, 1, 1);
            desc(&mut ring, 1, 0x900 + base as u64, 64, 2, 0);
            ring[base + 0x102..base + 0x104].copy_from_slice(&1u16.to_le_bytes());
        }
        out.push(("virtio_console", "one-chain", ring.clone()));
        out.push(("virtio_rng", "one-chain", ring[..0x400].to_vec()));
        // The vsock device's transmit queue (at 0x400) with one chain: a
        // guest's REQUEST to host port 1024 in the first buffer.
        let mut vsock = ring.clone();
        vsock.resize(0x1000, 0);
        let request = crate::devices::virtio::vsock::packet::Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 5000,
            dst_port: 1024,
            len: 0,
            kind: 1,
            op: 1,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        };
        vsock[0xc00..0xc00 + 44].copy_from_slice(&request.to_bytes());
        vsock[0x400..0x408].copy_from_slice(&0xc00u64.to_le_bytes());
        vsock[0x408..0x40c].copy_from_slice(&44u32.to_le_bytes());
        vsock[0x40c..0x410].copy_from_slice(&0u16.to_le_bytes().repeat(2));
        out.push(("virtio_vsock", "request", vsock));
        out
    }

    /// The seeds run through their targets; with NUBIS_FUZZ_SEEDS=DIR they
    /// are written to DIR/<target>/<name> (fuzz/seeds is made so).
    #[test]
    fn seeds_are_taken() {
        let dir = std::env::var_os("NUBIS_FUZZ_SEEDS").map(std::path::PathBuf::from);
        for (target, name, bytes) in seeds() {
            match target {
                "control_request" => control_request(&bytes),
                "migration_destination" => migration_destination(&bytes),
                "migration_source" => migration_source(&bytes),
                "snapshot_state" => snapshot_state(&bytes),
                "virtio_console" => virtio_console(&bytes),
                "virtio_rng" => virtio_rng(&bytes),
                "virtio_vsock" => virtio_vsock(&bytes),
                other => panic!("no target {other}"),
            }
            if let Some(dir) = &dir {
                std::fs::create_dir_all(dir.join(target)).unwrap();
                std::fs::write(dir.join(target).join(name), &bytes).unwrap();
            }
        }
        let all = seeds();
        assert!(matches!(
            judge_hello(&all[1].2, MIGRATION_TOKEN),
            HelloVerdict::Source(_)
        ));
        let sample = crate::snapshot::state::VmSnapshot::sample_for_tests();
        let encoded = crate::snapshot::file::encode_state(&sample).unwrap();
        assert!(crate::snapshot::file::decode_state(&encoded, Path::new("s")).is_ok());
    }

    /// Every entry point takes empty, short and arbitrary input.
    #[test]
    fn entry_points_take_any_bytes() {
        let mut noise = vec![0u8; 70_000];
        let mut state = 0x1234_5678u32;
        for byte in &mut noise {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            *byte = state as u8;
        }
        for input in [&[][..], &[0], &[1, 2, 3], &noise[..100], &noise[..]] {
            migration_destination(input);
            migration_source(input);
            snapshot_state(input);
            control_request(input);
            virtio_console(input);
            virtio_rng(input);
            virtio_vsock(input);
        }
    }
}
