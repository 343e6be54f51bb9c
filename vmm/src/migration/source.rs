//! The sending side: a thread that copies guest RAM while the guest runs,
//! then hands the VM over (see the module docs and [`super::protocol`]),
//! every byte both ways in the records of [`super::secure`].

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::dirty::{is_zero, pages_of, reset_vmm_bitmaps, take_dirty_pages};
use super::protocol::{
    self, decode, disk_chunk, push_page, receive, send, send_json, Hello, Kind, Refusal,
    PAGES_PER_FRAME, PAGE_SIZE,
};
use super::secure::{random_salt, Keys, Role, SecureStream};
use super::{estimate_downtime, MigrationError, Phase, Progress, Settings};
use crate::device_manager::HeldDevices;
use crate::devices::bus::lock;
use crate::devices::virtio::block::tracker::CHUNK;
use crate::devices::virtio::DiskCopySource;
use crate::parts::VmParts;
use crate::vstate::exit::ExitReason;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to answer, or to build the VM.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a send may block before the destination counts as gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long vCPUs get to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection to the destination, encrypted and authenticated.
type Channel = SecureStream<TcpStream>;

/// A migration in progress (or ended), as the control socket sees it.
pub struct Migration {
    progress: Mutex<Progress>,
    cancel: AtomicBool,
    /// The connection, shut down by a cancel so that a blocked send or
    /// receive gives up at once.
    connection: Mutex<Option<TcpStream>>,
}

impl Migration {
    pub fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    /// Asks the migration to give up; it does so at its next step, unless
    /// it has already handed over.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(stream) = lock(&self.connection).as_ref() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn update(&self, change: impl FnOnce(&mut Progress)) {
        change(&mut lock(&self.progress));
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::SeqCst) {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Starts migrating `parts`' VM; returns at once.
pub fn start(parts: Arc<VmParts>, settings: Settings) -> std::io::Result<Arc<Migration>> {
    let migration = Arc::new(Migration {
        progress: Mutex::new(Progress::new(&settings.to)),
        cancel: AtomicBool::new(false),
        connection: Mutex::new(None),
    });
    let worker = migration.clone();
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || run(&parts, &settings, &worker))?;
    Ok(migration)
}

fn run(parts: &VmParts, settings: &Settings, migration: &Migration) {
    let started = Instant::now();
    let outcome = crate::seccomp::apply(crate::seccomp::ThreadClass::Migration)
        .map_err(|err| Outcome::Failed(MigrationError::Seccomp(err.to_string())))
        .and_then(|()| migrate(parts, settings, migration, started));
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(downtime) => {
            log::info!(
                "migrated to {} in {elapsed_ms} ms, guest paused {} ms",
                settings.to,
                downtime.as_millis()
            );
            migration.update(|p| {
                p.phase = Phase::Completed;
                p.downtime_ms = Some(downtime.as_millis() as u64);
                p.elapsed_ms = elapsed_ms;
            });
            parts
                .exit
                .notify(ExitReason::Stopped(format!("migrated to {}", settings.to)));
        }
        Err(Outcome::Unconfirmed(err)) => {
            log::error!(
                "migration to {}: the hand-over is unconfirmed ({err}); the VM stays paused",
                settings.to
            );
            migration.update(|p| {
                p.phase = Phase::Unconfirmed;
                p.error = Some(err.to_string());
                p.elapsed_ms = elapsed_ms;
            });
        }
        Err(Outcome::Failed(err)) => {
            let cancelled = migration.cancelled();
            log::warn!(
                "migration to {} ended, the VM runs on here: {err}",
                settings.to
            );
            migration.update(|p| {
                p.phase = if cancelled {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                p.error = Some(err.to_string());
                p.elapsed_ms = elapsed_ms;
            });
        }
    }
}

/// How a migration that did not complete ended.
enum Outcome {
    /// Before the hand-over: the source runs on.
    Failed(MigrationError),
    /// After `Commit`, without `Running`.
    Unconfirmed(MigrationError),
}

impl<E: Into<MigrationError>> From<E> for Outcome {
    fn from(err: E) -> Self {
        Outcome::Failed(err.into())
    }
}

/// A local disk being copied, with its own read handle.
struct CopiedDisk {
    index: u32,
    source: DiskCopySource,
    file: std::fs::File,
}

/// Starts tracking writes on every disk and opens each for reading.
fn start_disk_copies(parts: &VmParts) -> Result<Vec<CopiedDisk>, MigrationError> {
    let mut disks = Vec::new();
    for device in parts.devices() {
        let Some(source) = lock(device).track_writes(true) else {
            continue;
        };
        let index = disks.len();
        let file = std::fs::File::open(&source.path).map_err(|err| MigrationError::Disk {
            index,
            path: source.path.display().to_string(),
            source: err,
        })?;
        disks.push(CopiedDisk {
            index: index as u32,
            source,
            file,
        });
    }
    Ok(disks)
}

fn stop_disk_copies(parts: &VmParts) {
    for device in parts.devices() {
        lock(device).track_writes(false);
    }
}

/// Sends chunks of `disk` (all of them with `skip_zero` on the first
/// pass); returns the bytes sent.
fn send_chunks(
    stream: &mut Channel,
    disk: &CopiedDisk,
    chunks: impl Iterator<Item = u64>,
    skip_zero: bool,
    migration: &Migration,
) -> Result<u64, MigrationError> {
    use std::os::unix::fs::FileExt;
    let mut sent = 0u64;
    let mut buffer = vec![0u8; CHUNK as usize];
    for chunk in chunks {
        let offset = chunk * CHUNK;
        let len = CHUNK.min(disk.source.capacity.saturating_sub(offset)) as usize;
        if len == 0 {
            continue;
        }
        disk.file
            .read_exact_at(&mut buffer[..len], offset)
            .map_err(|source| MigrationError::Disk {
                index: disk.index as usize,
                path: disk.source.path.display().to_string(),
                source,
            })?;
        if skip_zero && is_zero(&buffer[..len]) {
            continue;
        }
        send(
            stream,
            Kind::Disk,
            &disk_chunk(disk.index, offset, &buffer[..len]),
        )?;
        sent += len as u64 + 12;
        migration.update(|p| p.bytes_sent += len as u64 + 12);
        migration.check_cancel()?;
    }
    Ok(sent)
}

fn connect(to: &str) -> Result<TcpStream, MigrationError> {
    let failed = |source| MigrationError::Connect {
        to: to.to_string(),
        source,
    };
    let address = to
        .to_socket_addrs()
        .map_err(failed)?
        .next()
        .ok_or_else(|| failed(std::io::Error::other("no address")))?;
    // A destination VMM started a moment ago may not listen yet.
    let start = Instant::now();
    let stream = loop {
        match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(stream) => break stream,
            Err(err)
                if err.kind() == std::io::ErrorKind::ConnectionRefused
                    && start.elapsed() < CONNECT_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => return Err(failed(err)),
        }
    };
    stream.set_nodelay(true).map_err(failed)?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(failed)?;
    // A destination that stops taking data (a cut link) fails the
    // migration instead of hanging it.
    stream
        .set_write_timeout(Some(SEND_TIMEOUT))
        .map_err(failed)?;
    Ok(stream)
}

/// Waits for `expected` from the destination.
pub(crate) fn expect(
    stream: &mut impl std::io::Read,
    expected: Kind,
) -> Result<(), MigrationError> {
    match receive(stream)? {
        (kind, _) if kind == expected => Ok(()),
        (Kind::Refuse | Kind::Abort, payload) => {
            let refusal: Refusal = decode("refusal", &payload)?;
            Err(MigrationError::Refused(refusal.message))
        }
        (got, _) => Err(protocol::ProtocolError::Unexpected {
            expected: match expected {
                Kind::Accept => "Accept",
                Kind::Ready => "Ready",
                _ => "Running",
            },
            got,
        }
        .into()),
    }
}

/// Sends the non-zero (`skip_zero`) or all of `pages`; returns the bytes sent.
fn send_pages(
    stream: &mut Channel,
    parts: &VmParts,
    pages: &[u64],
    skip_zero: bool,
    migration: &Migration,
) -> Result<u64, MigrationError> {
    let mut payload = Vec::with_capacity(PAGES_PER_FRAME * (PAGE_SIZE + 8));
    let mut page = vec![0u8; PAGE_SIZE];
    let mut sent = 0u64;
    for address in pages {
        parts
            .memory
            .read_slice(&mut page, GuestAddress(*address))
            .map_err(|_| MigrationError::PageOutsideRam(*address))?;
        if skip_zero && is_zero(&page) {
            continue;
        }
        push_page(&mut payload, *address, &page);
        if payload.len() >= PAGES_PER_FRAME * (PAGE_SIZE + 8) {
            send(stream, Kind::Pages, &payload)?;
            sent += payload.len() as u64;
            payload.clear();
            migration.update(|p| {
                p.bytes_sent += (PAGES_PER_FRAME * (PAGE_SIZE + 8)) as u64;
                p.pages_sent += PAGES_PER_FRAME as u64;
            });
            migration.check_cancel()?;
        }
    }
    if !payload.is_empty() {
        send(stream, Kind::Pages, &payload)?;
        sent += payload.len() as u64;
        let rest = payload.len() as u64;
        migration.update(|p| {
            p.bytes_sent += rest;
            p.pages_sent += rest / (PAGE_SIZE as u64 + 8);
        });
    }
    Ok(sent)
}

fn migrate(
    parts: &VmParts,
    settings: &Settings,
    migration: &Migration,
    started: Instant,
) -> Result<Duration, Outcome> {
    let mut stream = connect(&settings.to)?;
    if let Ok(clone) = stream.try_clone() {
        *lock(&migration.connection) = Some(clone);
    }
    // The connection's salt, in clear, then only records: keys of this
    // connection's own, whatever connections the key saw before.
    let salt = random_salt().map_err(MigrationError::Random)?;
    std::io::Write::write_all(&mut stream, &salt).map_err(protocol::ProtocolError::from)?;
    let keys = Keys::derive(&settings.key, &salt, Role::Source).map_err(MigrationError::Keys)?;
    let mut stream = SecureStream::new(stream, keys);
    migration.check_cancel()?;
    // Writes are tracked from before the first copy of each disk.
    let disks = if settings.copy_disks {
        match start_disk_copies(parts) {
            Ok(disks) => disks,
            Err(err) => {
                stop_disk_copies(parts);
                return Err(Outcome::Failed(err));
            }
        }
    } else {
        Vec::new()
    };
    let result = migrate_with(&mut stream, parts, settings, migration, started, &disks);
    stop_disk_copies(parts);
    // The connection ends with the migration: the clone kept for a cancel
    // would otherwise hold it open until the next one.
    if let Some(connection) = lock(&migration.connection).take() {
        let _ = connection.shutdown(std::net::Shutdown::Both);
    }
    result
}

fn migrate_with(
    stream: &mut Channel,
    parts: &VmParts,
    settings: &Settings,
    migration: &Migration,
    started: Instant,
    disks: &[CopiedDisk],
) -> Result<Duration, Outcome> {
    send_json(
        stream,
        Kind::Hello,
        &Hello {
            magic: protocol::MAGIC.into(),
            version: protocol::VERSION,
            token: settings.token.clone(),
            machine: parts.shape.clone(),
            disks: disks.iter().map(|disk| disk.source.capacity).collect(),
        },
    )?;
    // A destination that cannot open the Hello (another key) closes the
    // connection without a word: it cannot say so to a stranger.
    expect(stream, Kind::Accept).map_err(|err| match err {
        MigrationError::Protocol(protocol::ProtocolError::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            MigrationError::Unanswered(protocol::ProtocolError::Io(io))
        }
        other => other,
    })?;
    migration.update(|p| p.phase = Phase::Copying);

    // From here on the source must be put back as it was on failure.
    parts.vm.set_dirty_logging(&parts.memory, true)?;
    reset_vmm_bitmaps(&parts.memory);
    let copied = copy_rounds(stream, parts, settings, migration, started, disks);
    let handed = match copied {
        Ok(()) => hand_over(stream, parts, settings, migration, disks),
        Err(err) => Err(Outcome::Failed(err)),
    };
    if let Err(err) = parts.vm.set_dirty_logging(&parts.memory, false) {
        log::warn!("cannot switch dirty-page logging off: {err}");
    }
    if let Err(Outcome::Failed(err)) = &handed {
        // Tell the destination, if it still listens, and run on here.
        let _ = send_json(
            stream,
            Kind::Abort,
            &Refusal {
                message: err.to_string(),
            },
        );
    }
    handed
}

/// Round 0 sends all of RAM; the next rounds what was written meanwhile,
/// until the rest fits the downtime budget or a limit is reached.
fn copy_rounds(
    stream: &mut Channel,
    parts: &VmParts,
    settings: &Settings,
    migration: &Migration,
    started: Instant,
    disks: &[CopiedDisk],
) -> Result<(), MigrationError> {
    let round_start = Instant::now();
    let mut sent = 0;
    for disk in disks {
        let chunks = disk.source.capacity.div_ceil(CHUNK);
        sent += send_chunks(stream, disk, 0..chunks, true, migration)?;
    }
    // Round 0: the pages that exist (untouched ones are zero on both sides).
    let populated = parts
        .backing
        .populated(&parts.memory)
        .map_err(MigrationError::Memory)?;
    sent += send_pages(stream, parts, &pages_of(&populated), true, migration)?;
    let mut bandwidth = sent as f64 / round_start.elapsed().as_secs_f64().max(1e-6);
    let mut round_time = round_start.elapsed();
    let mut rounds = 0u32;
    loop {
        migration.check_cancel()?;
        let dirty = take_dirty_pages(&parts.vm, &parts.memory)?;
        let dirty_chunks: Vec<Vec<u64>> = disks
            .iter()
            .map(|disk| disk.source.tracker.take())
            .collect();
        let chunk_pages: u64 =
            dirty_chunks.iter().map(|c| c.len() as u64).sum::<u64>() * (CHUNK / PAGE_SIZE as u64);
        let expected = estimate_downtime(dirty.len() as u64 + chunk_pages, bandwidth);
        let rate = dirty.len() as f64 / round_time.as_secs_f64().max(1e-6);
        migration.update(|p| {
            p.rounds = rounds;
            p.dirty_pages = dirty.len() as u64;
            p.dirty_rate_pages_per_s = rate;
            p.bandwidth_bytes_per_s = bandwidth;
            p.expected_downtime_ms = expected.as_millis().min(u128::from(u64::MAX)) as u64;
            p.elapsed_ms = started.elapsed().as_millis() as u64;
        });
        // A zero budget never converges: the copy goes on until a limit.
        let converged = !settings.downtime_budget.is_zero() && expected <= settings.downtime_budget;
        let out_of_rounds = rounds >= settings.max_rounds;
        let out_of_time = started.elapsed() >= settings.max_copy_time;
        if converged || out_of_rounds || out_of_time {
            log::info!(
                "migration: handing over after {rounds} round(s): {} dirty pages, expected downtime {} ms{}",
                dirty.len(),
                expected.as_millis(),
                if converged { "" } else { " (a limit was reached)" }
            );
            // Those pages and chunks go in the final round, with the rest.
            mark_dirty(parts, &dirty);
            for (disk, chunks) in disks.iter().zip(&dirty_chunks) {
                for chunk in chunks {
                    disk.source.tracker.mark(chunk * CHUNK, 1);
                }
            }
            return Ok(());
        }
        if dirty.is_empty() && dirty_chunks.iter().all(Vec::is_empty) {
            // Nothing to send: give the guest time to write something.
            std::thread::sleep(Duration::from_millis(10));
        }
        let round_start = Instant::now();
        let mut sent = 0;
        for (disk, chunks) in disks.iter().zip(dirty_chunks) {
            sent += send_chunks(stream, disk, chunks.into_iter(), false, migration)?;
        }
        sent += send_pages(stream, parts, &dirty, false, migration)?;
        round_time = round_start.elapsed();
        bandwidth = sent as f64 / round_time.as_secs_f64().max(1e-6);
        rounds += 1;
    }
}

/// Puts pages back into the VMM's own dirty bitmap, so that the final
/// collection sends them.
fn mark_dirty(parts: &VmParts, pages: &[u64]) {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for address in pages {
        if let Some(region) = parts.memory.find_region(GuestAddress(*address)) {
            let offset = (*address - region.start_addr().0) as usize;
            super::dirty::vmm_bitmap(region).mark_dirty(offset, PAGE_SIZE);
        }
    }
}

/// Pauses, sends the last pages and the state, and hands over; on any
/// failure before `Commit` the vCPUs run again.
fn hand_over(
    stream: &mut Channel,
    parts: &VmParts,
    settings: &Settings,
    migration: &Migration,
    disks: &[CopiedDisk],
) -> Result<Duration, Outcome> {
    migration.check_cancel()?;
    migration.update(|p| p.phase = Phase::HandingOver);
    let paused_at = Instant::now();
    let was_paused = parts.control.state() == crate::vstate::vcpu::VcpusState::Paused;
    parts
        .control
        .pause_all(PAUSE_TIMEOUT)
        .map_err(|err| MigrationError::Vcpus(err.to_string()))?;
    let held = parts.hold_devices();
    let sent = final_copy(stream, parts, &held, disks, migration);
    let committed = match sent {
        Ok(()) => send(stream, Kind::Commit, &[]).map_err(MigrationError::from),
        Err(err) => Err(err),
    };
    if let Err(err) = committed {
        drop(held);
        if !was_paused {
            parts.control.resume_all();
        }
        return Err(Outcome::Failed(err));
    }
    // Committed: the destination may run the guest; this side must not.
    let confirmed = expect(stream, Kind::Running);
    let downtime = paused_at.elapsed();
    drop(held);
    match confirmed {
        Ok(()) => {
            log::info!("the destination {} runs the guest", settings.to);
            Ok(downtime)
        }
        Err(err) => Err(Outcome::Unconfirmed(err)),
    }
}

/// The pages dirtied since the last round and the whole state, then
/// `Ready` from the destination.
fn final_copy(
    stream: &mut Channel,
    parts: &VmParts,
    held: &HeldDevices<'_>,
    disks: &[CopiedDisk],
    migration: &Migration,
) -> Result<(), MigrationError> {
    // The devices are held: no write reaches a disk from here on.
    for disk in disks {
        send_chunks(
            stream,
            disk,
            disk.source.tracker.take().into_iter(),
            false,
            migration,
        )?;
    }
    // The vCPUs' pending I/O is completed as they save their state, which
    // may still write RAM: save first, then collect the last pages.
    let state = parts
        .capture_state(held)
        .map_err(|err| MigrationError::Vcpus(err.to_string()))?;
    let dirty = take_dirty_pages(&parts.vm, &parts.memory)?;
    let mut payload = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE];
    for address in &dirty {
        parts
            .memory
            .read_slice(&mut page, GuestAddress(*address))
            .map_err(|_| MigrationError::PageOutsideRam(*address))?;
        push_page(&mut payload, *address, &page);
        if payload.len() >= PAGES_PER_FRAME * (PAGE_SIZE + 8) {
            send(stream, Kind::Pages, &payload)?;
            payload.clear();
        }
    }
    if !payload.is_empty() {
        send(stream, Kind::Pages, &payload)?;
    }
    send_json(stream, Kind::State, &state)?;
    expect(stream, Kind::Ready)
}
