//! `--share DIR[:ro|:rw]`: a host directory handed to the guest as an ext4
//! disk image built from it (`mkfs.ext4 -d`, no mounts, no root), and with
//! `:rw` the files the command wrote copied back afterwards (`debugfs
//! rdump`, then merged into the directory).
//!
//! Why a disk and not a shared filesystem: a disk is a device the VMM
//! already has and a warm snapshot can carry (the guest mounts it only after
//! the restore); virtio-fs or 9p would need a host daemon per run.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

/// The share disk's size: the guest sees this capacity whatever the
/// directory holds (the image is sparse, so it costs only what is in it),
/// and a warm snapshot is taken with a disk of exactly this size.
pub const SHARE_DISK_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("invalid --share '{0}': expected HOST_DIR, HOST_DIR:ro or HOST_DIR:rw")]
    Syntax(String),
    #[error("--share {path}: not a directory")]
    NotADirectory { path: PathBuf },
    #[error("--share {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--share {path} holds about {needed_mib} MiB; the share disk holds {limit_mib} MiB")]
    TooLarge {
        path: PathBuf,
        needed_mib: u64,
        limit_mib: u64,
    },
    #[error("cannot create the share disk {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{tool} failed on {path}: {detail}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("the share disk {path} is refused, nothing was copied back: {detail}")]
    Unsafe { path: PathBuf, detail: String },
    #[error("cannot copy {from} back to {to}: {source}")]
    CopyBack {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// A `--share` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub host_dir: PathBuf,
    /// `:rw`: what the command writes comes back to `host_dir`.
    pub writable: bool,
}

impl FromStr for Share {
    type Err = ShareError;

    /// `DIR`, `DIR:ro` or `DIR:rw` (a directory whose name ends in `:ro`
    /// is written `DIR:ro:ro`).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let (dir, writable) = match value.rsplit_once(':') {
            Some((dir, "ro")) => (dir, false),
            Some((dir, "rw")) => (dir, true),
            _ => (value, false),
        };
        if dir.is_empty() {
            return Err(ShareError::Syntax(value.to_string()));
        }
        Ok(Self {
            host_dir: PathBuf::from(dir),
            writable,
        })
    }
}

/// Bytes the files under `dir` take, in 4 KiB blocks, plus one block per
/// entry (inodes and directory blocks).
pub(crate) fn tree_bytes(dir: &Path) -> Result<u64, ShareError> {
    let read_error = |source| ShareError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            let meta = entry.path().symlink_metadata().map_err(read_error)?;
            total = total.saturating_add(meta.len().div_ceil(4096) * 4096 + 4096);
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Builds the share disk `image` (of [`SHARE_DISK_BYTES`]) from `share`'s
/// directory.
pub fn build_image(share: &Share, image: &Path) -> Result<(), ShareError> {
    let dir = &share.host_dir;
    if !dir.is_dir() {
        return Err(ShareError::NotADirectory { path: dir.clone() });
    }
    // ext4's own metadata (inode tables, bitmaps) takes about 2% here.
    let needed = tree_bytes(dir)?;
    let usable = SHARE_DISK_BYTES / 100 * 90;
    if needed > usable {
        return Err(ShareError::TooLarge {
            path: dir.clone(),
            needed_mib: needed >> 20,
            limit_mib: usable >> 20,
        });
    }
    create_sparse(image, SHARE_DISK_BYTES)?;
    run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-L", "nubis-share", "-d"])
            .arg(dir)
            .arg(image),
        "mkfs.ext4",
        image,
    )
}

/// A sparse file of `len` bytes (an empty share disk).
pub fn create_sparse(path: &Path, len: u64) -> Result<(), ShareError> {
    let create_error = |source| ShareError::Create {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::create(path).map_err(create_error)?;
    file.set_len(len).map_err(create_error)
}

/// Bytes of a tool's standard output read at most: a listing of the share
/// disk is about 80 bytes per entry, so this is ~800 000 entries.
const MAX_TOOL_OUTPUT: usize = 64 << 20;
/// Bytes of a tool's standard error kept for its error message.
const MAX_TOOL_ERRORS: usize = 64 << 10;
/// The longest line of a listing: a 255-byte name escaped as `\xNN` (four
/// bytes each) and the fields before it, with room to spare.
const MAX_LISTING_LINE: usize = 4096;
/// Directory entries (names, so hard links count) a share disk may hold.
const MAX_TREE_ENTRIES: usize = 1 << 20;
/// Directory levels a share disk may have: each adds at least two bytes
/// to a path, which Linux limits to 4096.
const MAX_TREE_DEPTH: usize = 2048;
/// Reasons for skipped entries kept for the report; the rest are counted.
pub const MAX_COPY_BACK_NOTES: usize = 20;

/// Runs a tool with bounded output; its standard output when it succeeded.
fn run_tool_output(
    command: &mut Command,
    tool: &'static str,
    path: &Path,
) -> Result<Vec<u8>, ShareError> {
    use std::process::Stdio;
    let failed = |detail: String| ShareError::Tool {
        tool,
        path: path.to_path_buf(),
        detail,
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| {
            failed(format!(
                "cannot run it ({err}); it is in Debian's e2fsprogs"
            ))
        })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(failed("its output cannot be read".into()));
    };
    // Standard error is read on the side, so that neither pipe fills up
    // while the other is read; past the limit it is drained, not kept.
    let errors = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut stderr = stderr;
        let _ = (&mut stderr)
            .take(MAX_TOOL_ERRORS as u64)
            .read_to_end(&mut kept);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        kept
    });
    let mut output = Vec::new();
    let read = stdout
        .take(MAX_TOOL_OUTPUT as u64 + 1)
        .read_to_end(&mut output);
    let too_much = output.len() > MAX_TOOL_OUTPUT;
    if too_much || read.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    let stderr = errors.join().unwrap_or_default();
    if too_much {
        return Err(failed(format!(
            "it printed more than {MAX_TOOL_OUTPUT} bytes"
        )));
    }
    if let Err(err) = read {
        return Err(failed(format!("cannot read its output: {err}")));
    }
    let status = status.map_err(|err| failed(format!("cannot wait for it: {err}")))?;
    let stderr = String::from_utf8_lossy(&stderr);
    // debugfs prints its banner on stderr and exits 0 even when a request
    // fails; its errors are the lines after the banner.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.starts_with("debugfs ") && !line.trim().is_empty())
        .collect();
    if !status.success() || !complaints.is_empty() {
        return Err(failed(if complaints.is_empty() {
            status.to_string()
        } else {
            complaints.join("; ")
        }));
    }
    Ok(output)
}

fn run_tool(command: &mut Command, tool: &'static str, path: &Path) -> Result<(), ShareError> {
    run_tool_output(command, tool, path).map(|_| ())
}

/// What copying back did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyBack {
    pub files: u64,
    pub bytes: u64,
    /// Entries the guest left that were not copied back: symlinks out of
    /// the share, device nodes, fifos and sockets, names that a host
    /// directory or special file holds.
    pub skipped: u64,
}

/// Why entries were skipped: at most [`MAX_COPY_BACK_NOTES`] reasons.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyBackNotes(pub Vec<String>);

impl CopyBackNotes {
    fn skip(&mut self, stats: &mut CopyBack, path: &Path, why: &str) {
        stats.skipped += 1;
        if self.0.len() < MAX_COPY_BACK_NOTES {
            self.0
                .push(format!("{}: {why}; not copied back", path.display()));
        }
    }
}

/// One entry of a directory on the share disk, as debugfs lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListedEntry {
    inode: u32,
    mode: u32,
    pub(crate) name: Vec<u8>,
}

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;

/// Undoes debugfs's escaping of names: `\xNN` for the bytes below 32, from
/// 127 up, and the backslash; anything else printable is itself.
fn unescape_name(text: &[u8]) -> Option<Vec<u8>> {
    let mut name = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some((&byte, after)) = rest.split_first() {
        if byte == b'\\' {
            let hex = after.get(..3).filter(|hex| hex[0] == b'x')?;
            let hex = std::str::from_utf8(&hex[1..]).ok()?;
            name.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &after[3..];
        } else if (32..127).contains(&byte) {
            name.push(byte);
            rest = after;
        } else {
            return None;
        }
    }
    Some(name)
}

/// Parses one line of `ls -l`: `INODE MODE (TYPE) UID GID SIZE DATE TIME NAME`,
/// the name escaped (so a line is one entry, whatever the name holds).
fn parse_listing_line(line: &[u8]) -> Option<ListedEntry> {
    let mut fields = Vec::with_capacity(8);
    let mut rest = line;
    for _ in 0..8 {
        let start = rest.iter().position(|byte| *byte != b' ')?;
        rest = &rest[start..];
        let end = rest.iter().position(|byte| *byte == b' ')?;
        fields.push(&rest[..end]);
        rest = &rest[end..];
    }
    let name = rest.strip_prefix(b" ")?;
    let number = |field: &[u8], radix| {
        std::str::from_utf8(field)
            .ok()
            .and_then(|text| u32::from_str_radix(text, radix).ok())
    };
    let kind = fields[2];
    if !(kind.starts_with(b"(") && kind.ends_with(b")")) {
        return None;
    }
    Some(ListedEntry {
        inode: number(fields[0], 10)?,
        mode: number(fields[1], 8)?,
        name: unescape_name(name)?,
    })
}

/// Splits the output of a debugfs script of `ls -l <INODE>` commands into
/// each listed directory's entries.
pub(crate) fn parse_listings(output: &[u8]) -> Result<Vec<(u32, Vec<ListedEntry>)>, String> {
    let mut listings: Vec<(u32, Vec<ListedEntry>)> = Vec::new();
    for line in output.split(|byte| *byte == b'\n') {
        if line.len() > MAX_LISTING_LINE {
            return Err(format!(
                "a listing line of {} bytes (at most {MAX_LISTING_LINE})",
                line.len()
            ));
        }
        if line.is_empty() {
            continue;
        }
        if let Some(command) = line.strip_prefix(b"debugfs: ls -l <") {
            let inode = command
                .strip_suffix(b">")
                .and_then(|number| std::str::from_utf8(number).ok())
                .and_then(|number| number.parse().ok())
                .ok_or_else(|| {
                    format!(
                        "an unexpected listing header '{}'",
                        String::from_utf8_lossy(line)
                    )
                })?;
            listings.push((inode, Vec::new()));
            continue;
        }
        // Unused space in a directory block is listed as inode 0, which
        // rdump skips as well.
        if line
            .split(|byte| *byte == b' ')
            .find(|field| !field.is_empty())
            == Some(b"0")
        {
            continue;
        }
        let entry = parse_listing_line(line).ok_or_else(|| {
            format!(
                "an unreadable listing line '{}'",
                String::from_utf8_lossy(line).escape_debug()
            )
        })?;
        let Some((_, entries)) = listings.last_mut() else {
            return Err("a listing line before any directory".into());
        };
        entries.push(entry);
    }
    Ok(listings)
}

/// Walks the share disk's directories (reading it with debugfs, never
/// mounting it) and refuses what would make `debugfs rdump` write outside
/// its target directory: the guest owns the disk's bytes, so a name may
/// hold a `/` or be `..`, a directory may hold one name twice (a symlink
/// `x` to anywhere, then a file `x` written through it) or be reachable
/// twice. Returns the number of entries.
fn check_tree(image: &Path, scratch: &Path) -> Result<usize, ShareError> {
    let refuse = |detail: String| ShareError::Unsafe {
        path: image.to_path_buf(),
        detail,
    };
    const ROOT_INODE: u32 = 2;
    let mut seen_dirs = std::collections::HashSet::from([ROOT_INODE]);
    let mut level = vec![ROOT_INODE];
    let mut entries = 0usize;
    let script = scratch.join("share-listing");
    for depth in 0.. {
        if level.is_empty() {
            break;
        }
        if depth > MAX_TREE_DEPTH {
            return Err(refuse(format!(
                "directories nested deeper than {MAX_TREE_DEPTH} levels"
            )));
        }
        let commands: String = level
            .iter()
            .map(|inode| format!("ls -l <{inode}>\n"))
            .collect();
        fs::write(&script, commands).map_err(|source| ShareError::Create {
            path: script.clone(),
            source,
        })?;
        let output = run_tool_output(
            Command::new("debugfs").arg("-f").arg(&script).arg(image),
            "debugfs",
            image,
        )?;
        let listings = parse_listings(&output).map_err(refuse)?;
        let listed: Vec<u32> = listings.iter().map(|(inode, _)| *inode).collect();
        if listed != level {
            return Err(refuse(format!(
                "directories {level:?} were asked for, {listed:?} listed"
            )));
        }
        let mut next = Vec::new();
        for (directory, children) in listings {
            let mut names = std::collections::HashSet::new();
            for child in children {
                let name = String::from_utf8_lossy(&child.name).into_owned();
                let is_dir = child.mode & S_IFMT == S_IFDIR;
                if child.name == b"." || child.name == b".." {
                    if !is_dir {
                        return Err(refuse(format!(
                            "'{name}' in directory inode {directory} is not a directory"
                        )));
                    }
                    continue;
                }
                if child.name.is_empty() || child.name.contains(&b'/') || child.name.contains(&0) {
                    return Err(refuse(format!(
                        "directory inode {directory} holds the name '{}'",
                        name.escape_debug()
                    )));
                }
                if !names.insert(child.name) {
                    return Err(refuse(format!(
                        "directory inode {directory} holds '{}' twice",
                        name.escape_debug()
                    )));
                }
                entries += 1;
                if entries > MAX_TREE_ENTRIES {
                    return Err(refuse(format!("more than {MAX_TREE_ENTRIES} entries")));
                }
                if is_dir {
                    if !seen_dirs.insert(child.inode) {
                        return Err(refuse(format!(
                            "directory inode {} is reachable twice",
                            child.inode
                        )));
                    }
                    next.push(child.inode);
                }
            }
        }
        level = next;
    }
    let _ = fs::remove_file(&script);
    Ok(entries)
}

/// Copies what the guest left on the share disk `image` into `share`'s
/// directory: new and changed files, directories and symlinks. Files the
/// guest deleted stay on the host (a copy back never destroys host data).
///
/// Nothing on the disk is trusted: its tree is checked before it is
/// extracted ([`check_tree`]), symlinks whose target is absolute or leads
/// out of the share are not recreated, permissions keep only the 0o777
/// bits (no setuid, setgid or sticky bit), device nodes, fifos and sockets
/// are skipped, and a host symlink in the way is replaced, never written
/// through. Skipped entries are counted and, the first few, explained.
pub fn copy_back(
    image: &Path,
    share: &Share,
    scratch: &Path,
) -> Result<(CopyBack, CopyBackNotes), ShareError> {
    let extracted = scratch.join("share-out");
    let _ = fs::remove_dir_all(&extracted);
    fs::create_dir_all(&extracted).map_err(|source| ShareError::Create {
        path: extracted.clone(),
        source,
    })?;
    check_tree(image, scratch)?;
    run_tool(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / {}", extracted.display()))
            .arg(image),
        "debugfs",
        image,
    )?;
    let _ = fs::remove_dir(extracted.join("lost+found"));
    let mut stats = CopyBack::default();
    let mut notes = CopyBackNotes::default();
    let to = &share.host_dir;
    fs::create_dir_all(to).map_err(|source| ShareError::CopyBack {
        from: extracted.clone(),
        to: to.clone(),
        source,
    })?;
    merge(&extracted, to, Path::new(""), &mut stats, &mut notes)?;
    let _ = fs::remove_dir_all(&extracted);
    Ok((stats, notes))
}

/// Opens a file for reading or writing without following a symlink and
/// without waiting on a fifo.
fn open_options() -> fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = fs::OpenOptions::new();
    options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    options
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(meta_a), Ok(meta_b)) = (fs::symlink_metadata(a), fs::symlink_metadata(b)) else {
        return false;
    };
    if !meta_a.is_file() || !meta_b.is_file() || meta_a.len() != meta_b.len() {
        return false;
    }
    let (Ok(mut file_a), Ok(mut file_b)) = (
        open_options().read(true).open(a),
        open_options().read(true).open(b),
    ) else {
        return false;
    };
    let mut buf_a = vec![0u8; 64 * 1024];
    let mut buf_b = vec![0u8; 64 * 1024];
    loop {
        let Ok(got) = file_a.read(&mut buf_a) else {
            return false;
        };
        if got == 0 {
            return true;
        }
        if file_b.read_exact(&mut buf_b[..got]).is_err() || buf_a[..got] != buf_b[..got] {
            return false;
        }
    }
}

/// Whether a symlink in `dir` (a path relative to the share's root) to
/// `target` stays inside the share, resolving `.` and `..` lexically: an
/// absolute target, or one with more `..` than levels above it, leaves.
fn link_stays_inside(dir: &Path, target: &Path) -> bool {
    use std::path::Component;
    if target.as_os_str().is_empty() {
        return false;
    }
    let mut depth = 0usize;
    for component in dir.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
    }
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(up) => depth = up,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Writes `source`'s bytes into `target`, which is a regular file or
/// nothing (never a symlink: O_NOFOLLOW), with permission bits `mode`.
fn write_file(source: &Path, target: &Path, mode: u32, exists: bool) -> std::io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut from = open_options().read(true).open(source)?;
    let mut to = if exists {
        let file = open_options().write(true).open(target)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("no longer a regular file"));
        }
        file.set_len(0)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file
    } else {
        // A new file gets the mode less the umask.
        open_options()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(target)?
    };
    std::io::copy(&mut from, &mut to)
}

fn merge(
    from: &Path,
    to: &Path,
    relative: &Path,
    stats: &mut CopyBack,
    notes: &mut CopyBackNotes,
) -> Result<(), ShareError> {
    let copy_error = |from: &Path, to: &Path| {
        let (from, to) = (from.to_path_buf(), to.to_path_buf());
        move |source| ShareError::CopyBack { from, to, source }
    };
    for entry in fs::read_dir(from).map_err(copy_error(from, to))? {
        let entry = entry.map_err(copy_error(from, to))?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let shown = relative.join(entry.file_name());
        let meta = source
            .symlink_metadata()
            .map_err(copy_error(&source, &target))?;
        let existing = target.symlink_metadata().ok();
        let host_is_link = existing
            .as_ref()
            .is_some_and(|meta| meta.file_type().is_symlink());
        let host_is_special = existing.as_ref().is_some_and(|meta| {
            !meta.is_file() && !meta.is_dir() && !meta.file_type().is_symlink()
        });
        if meta.is_dir() {
            match &existing {
                Some(host) if host.is_dir() => {}
                Some(_) if host_is_link => {
                    // The guest replaced the host's symlink by a directory:
                    // the link goes (unlink never follows it), a directory
                    // takes its place.
                    fs::remove_file(&target).map_err(copy_error(&source, &target))?;
                    fs::create_dir(&target).map_err(copy_error(&source, &target))?;
                }
                Some(_) => {
                    notes.skip(stats, &shown, "a directory where the host has a file");
                    continue;
                }
                None => fs::create_dir(&target).map_err(copy_error(&source, &target))?,
            }
            merge(&source, &target, &shown, stats, notes)?;
        } else if meta.file_type().is_symlink() {
            let link = fs::read_link(&source).map_err(copy_error(&source, &target))?;
            if !link_stays_inside(relative, &link) {
                notes.skip(
                    stats,
                    &shown,
                    &format!("a symlink to {}, outside the share", link.display()),
                );
                continue;
            }
            match &existing {
                Some(_) if host_is_link => {
                    if fs::read_link(&target).ok().as_ref() == Some(&link) {
                        continue;
                    }
                    fs::remove_file(&target).map_err(copy_error(&source, &target))?;
                }
                Some(host) if host.is_file() => {
                    fs::remove_file(&target).map_err(copy_error(&source, &target))?;
                }
                Some(_) => {
                    notes.skip(
                        stats,
                        &shown,
                        "a symlink where the host has a directory or special file",
                    );
                    continue;
                }
                None => {}
            }
            std::os::unix::fs::symlink(&link, &target).map_err(copy_error(&source, &target))?;
            stats.files += 1;
        } else if meta.is_file() {
            if host_is_special || existing.as_ref().is_some_and(|host| host.is_dir()) {
                notes.skip(
                    stats,
                    &shown,
                    "a file where the host has a directory or special file",
                );
                continue;
            }
            let mode = meta.mode() & 0o777;
            if same_content(&source, &target) {
                continue;
            }
            if host_is_link {
                // A file the guest made in place of the host's symlink: the
                // link goes, and is never written through.
                fs::remove_file(&target).map_err(copy_error(&source, &target))?;
            }
            let bytes = write_file(&source, &target, mode, existing.is_some() && !host_is_link)
                .map_err(copy_error(&source, &target))?;
            stats.files += 1;
            stats.bytes += bytes;
        } else {
            notes.skip(stats, &shown, "a device node, fifo or socket");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nubis-share-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn share_syntax() {
        assert_eq!(
            "/data".parse::<Share>().unwrap(),
            Share {
                host_dir: "/data".into(),
                writable: false
            }
        );
        assert!("/data:rw".parse::<Share>().unwrap().writable);
        assert!(!"/data:ro".parse::<Share>().unwrap().writable);
        assert_eq!(
            "/a:b".parse::<Share>().unwrap().host_dir,
            PathBuf::from("/a:b")
        );
        assert_eq!(
            "/x:ro:ro".parse::<Share>().unwrap().host_dir,
            PathBuf::from("/x:ro")
        );
        for bad in ["", ":rw", ":ro"] {
            assert!(bad.parse::<Share>().is_err(), "accepted {bad:?}");
        }
    }

    /// mkfs.ext4 -d and debugfs rdump, as the guest would leave the disk:
    /// new, changed and unchanged files, a symlink and a subdirectory.
    #[test]
    fn an_image_round_trips_and_only_changes_come_back() {
        let dir = scratch("roundtrip");
        let host = dir.join("host");
        fs::create_dir_all(host.join("sub")).unwrap();
        fs::write(host.join("keep"), "same").unwrap();
        fs::write(host.join("sub/change"), "old").unwrap();
        let share = Share {
            host_dir: host.clone(),
            writable: true,
        };
        let image = dir.join("share.img");
        build_image(&share, &image).unwrap();
        assert_eq!(fs::metadata(&image).unwrap().len(), SHARE_DISK_BYTES);

        // What a guest would write: a changed file and a new one, put
        // into the image with debugfs the way the guest's ext4 would.
        let edits = dir.join("edits");
        fs::create_dir_all(&edits).unwrap();
        fs::write(edits.join("change"), "new content").unwrap();
        fs::write(edits.join("made"), "by the guest").unwrap();
        fs::remove_file(host.join("sub/change")).unwrap();
        let script = format!(
            "cd /sub\nrm change\nwrite {} change\ncd /\nwrite {} made\nsymlink link made\n",
            edits.join("change").display(),
            edits.join("made").display()
        );
        fs::write(dir.join("script"), script).unwrap();
        run_tool(
            Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(dir.join("script"))
                .arg(&image),
            "debugfs",
            &image,
        )
        .unwrap();
        fs::write(host.join("sub/change"), "old").unwrap();

        let (stats, notes) = copy_back(&image, &share, &dir).unwrap();
        assert_eq!(notes, CopyBackNotes::default());
        assert_eq!(
            fs::read_to_string(host.join("sub/change")).unwrap(),
            "new content"
        );
        assert_eq!(
            fs::read_to_string(host.join("made")).unwrap(),
            "by the guest"
        );
        assert_eq!(
            fs::read_link(host.join("link")).unwrap(),
            PathBuf::from("made")
        );
        assert_eq!(fs::read_to_string(host.join("keep")).unwrap(), "same");
        assert!(!host.join("lost+found").exists());
        assert_eq!(
            stats.files, 3,
            "changed, new and the link; not the unchanged file"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Runs a debugfs script on `image` (writable), as the guest's ext4
    /// would have changed it.
    fn guest_writes(image: &Path, dir: &Path, script: &str) {
        let path = dir.join("guest-script");
        fs::write(&path, script).unwrap();
        run_tool(
            Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(&path)
                .arg(image),
            "debugfs",
            image,
        )
        .unwrap();
    }

    /// A writable share of `dir/host` with its image built.
    fn share_with_image(dir: &Path) -> (Share, PathBuf) {
        let share = Share {
            host_dir: dir.join("host"),
            writable: true,
        };
        fs::create_dir_all(&share.host_dir).unwrap();
        let image = dir.join("share.img");
        build_image(&share, &image).unwrap();
        (share, image)
    }

    #[test]
    fn symlinks_out_of_the_share_are_not_recreated() {
        let dir = scratch("links");
        let (share, image) = share_with_image(&dir);
        let host = &share.host_dir;
        fs::write(dir.join("made"), "by the guest").unwrap();
        guest_writes(
            &image,
            &dir,
            &format!(
                "write {} made\nsymlink absolute /etc/passwd\nsymlink up ../outside\n\
                 mkdir d\ncd d\nsymlink up2 ../../outside\nsymlink sneaky ../d/../../outside\n\
                 symlink fine ../made\nsymlink fine2 .././d/../made\ncd /\nsymlink here made\n",
                dir.join("made").display()
            ),
        );
        let (stats, notes) = copy_back(&image, &share, &dir).unwrap();
        for gone in ["absolute", "up", "d/up2", "d/sneaky"] {
            assert!(
                host.join(gone).symlink_metadata().is_err(),
                "{gone} was recreated"
            );
        }
        assert_eq!(
            fs::read_link(host.join("d/fine")).unwrap(),
            Path::new("../made")
        );
        assert_eq!(
            fs::read_to_string(host.join("d/fine2")).unwrap(),
            "by the guest"
        );
        assert_eq!(fs::read_link(host.join("here")).unwrap(), Path::new("made"));
        assert_eq!(stats.skipped, 4);
        assert_eq!(stats.files, 4, "made, fine, fine2, here");
        assert_eq!(notes.0.len(), 4);
        assert!(
            notes.0.iter().any(|note| note.contains("/etc/passwd")),
            "{notes:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lexical_link_resolution() {
        let inside = |dir: &str, target: &str| link_stays_inside(Path::new(dir), Path::new(target));
        assert!(inside("", "a"));
        assert!(inside("", "./a/../b"));
        assert!(inside("a/b", "../../c"));
        assert!(inside("a", ".."));
        assert!(!inside("", ".."));
        assert!(!inside("a/b", "../../../c"));
        assert!(!inside("a", "../x/../../y"));
        assert!(!inside("a", "/a"));
        assert!(!inside("a", ""));
    }

    #[test]
    fn setuid_setgid_and_sticky_bits_do_not_come_back() {
        // Through the disk (debugfs itself keeps only the rwx bits today).
        let dir = scratch("setuid");
        let (share, image) = share_with_image(&dir);
        fs::write(dir.join("tool"), "#!/bin/sh\n").unwrap();
        guest_writes(
            &image,
            &dir,
            &format!(
                "write {} tool\nsif tool mode 0107755\nsif tool uid 0\n",
                dir.join("tool").display()
            ),
        );
        copy_back(&image, &share, &dir).unwrap();
        let mode = fs::metadata(share.host_dir.join("tool")).unwrap().mode();
        assert_eq!(mode & 0o7000, 0, "mode {mode:o}");
        assert_ne!(mode & 0o100, 0, "the owner's execute bit stays: {mode:o}");

        // What the merge is given is not trusted either: a new file and a
        // changed one, both setuid root in the extracted tree.
        let from = dir.join("extracted");
        let to = dir.join("merged");
        fs::create_dir_all(&from).unwrap();
        fs::create_dir_all(&to).unwrap();
        for name in ["new", "changed"] {
            fs::write(from.join(name), "guest").unwrap();
            fs::set_permissions(from.join(name), fs::Permissions::from_mode(0o7755)).unwrap();
        }
        fs::write(to.join("changed"), "host").unwrap();
        let mut stats = CopyBack::default();
        merge(
            &from,
            &to,
            Path::new(""),
            &mut stats,
            &mut CopyBackNotes::default(),
        )
        .unwrap();
        for name in ["new", "changed"] {
            let mode = fs::metadata(to.join(name)).unwrap().mode();
            assert_eq!(mode & 0o7000, 0, "{name}: mode {mode:o}");
            assert_eq!(fs::read_to_string(to.join(name)).unwrap(), "guest");
        }
        assert_eq!(stats.files, 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_host_symlink_is_replaced_never_written_through() {
        let dir = scratch("hostlinks");
        let host = dir.join("host");
        fs::create_dir_all(&host).unwrap();
        fs::create_dir_all(dir.join("victim-dir")).unwrap();
        fs::write(dir.join("victim"), "host data").unwrap();
        std::os::unix::fs::symlink("../victim-dir", host.join("dirlink")).unwrap();
        std::os::unix::fs::symlink("../victim", host.join("filelink")).unwrap();
        std::os::unix::fs::symlink("../victim", host.join("kept")).unwrap();
        let share = Share {
            host_dir: host.clone(),
            writable: true,
        };
        let image = dir.join("share.img");
        build_image(&share, &image).unwrap();
        fs::write(dir.join("payload"), "from the guest").unwrap();
        let payload = dir.join("payload");
        guest_writes(
            &image,
            &dir,
            &format!(
                "rm dirlink\nmkdir dirlink\nwrite {p} dirlink/x\nrm filelink\nwrite {p} filelink\n",
                p = payload.display()
            ),
        );
        copy_back(&image, &share, &dir).unwrap();
        assert!(
            !dir.join("victim-dir/x").exists(),
            "written through a host symlink"
        );
        assert_eq!(fs::read_to_string(dir.join("victim")).unwrap(), "host data");
        assert!(fs::symlink_metadata(host.join("dirlink")).unwrap().is_dir());
        assert_eq!(
            fs::read_to_string(host.join("dirlink/x")).unwrap(),
            "from the guest"
        );
        assert!(fs::symlink_metadata(host.join("filelink"))
            .unwrap()
            .is_file());
        assert_eq!(
            fs::read_link(host.join("kept")).unwrap(),
            Path::new("../victim")
        );

        // A symlink the host made meanwhile, where the guest made a file.
        let from = dir.join("extracted");
        fs::create_dir_all(&from).unwrap();
        fs::write(from.join("late"), "guest").unwrap();
        std::os::unix::fs::symlink("../victim", host.join("late")).unwrap();
        let mut stats = CopyBack::default();
        merge(
            &from,
            &host,
            Path::new(""),
            &mut stats,
            &mut CopyBackNotes::default(),
        )
        .unwrap();
        assert_eq!(fs::read_to_string(dir.join("victim")).unwrap(), "host data");
        assert!(fs::symlink_metadata(host.join("late")).unwrap().is_file());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn mkfifo(path: &Path) {
        let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that lives for the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o644) }, 0);
    }

    #[test]
    fn device_nodes_fifos_and_sockets_are_skipped() {
        let dir = scratch("special");
        let (share, image) = share_with_image(&dir);
        guest_writes(
            &image,
            &dir,
            "mknod fifo p\nmknod null c 1 3\nmknod disk b 8 0\n",
        );
        let (stats, _) = copy_back(&image, &share, &dir).unwrap();
        for name in ["fifo", "null", "disk"] {
            assert!(
                share.host_dir.join(name).symlink_metadata().is_err(),
                "{name}"
            );
        }
        assert_eq!(stats.files, 0);

        // The merge skips them too, and never replaces a host fifo (nor
        // opens it, which would wait for a reader).
        let from = dir.join("extracted");
        let to = dir.join("merged");
        fs::create_dir_all(&from).unwrap();
        fs::create_dir_all(&to).unwrap();
        mkfifo(&from.join("guest-fifo"));
        let _socket = std::os::unix::net::UnixListener::bind(from.join("socket")).unwrap();
        fs::write(from.join("pipe"), "guest").unwrap();
        mkfifo(&to.join("pipe"));
        let mut stats = CopyBack::default();
        let mut notes = CopyBackNotes::default();
        merge(&from, &to, Path::new(""), &mut stats, &mut notes).unwrap();
        assert_eq!(stats.skipped, 3, "{notes:?}");
        assert_eq!(stats.files, 0);
        assert!(to.join("guest-fifo").symlink_metadata().is_err());
        assert!(to.join("socket").symlink_metadata().is_err());
        use std::os::unix::fs::FileTypeExt;
        assert!(fs::symlink_metadata(to.join("pipe"))
            .unwrap()
            .file_type()
            .is_fifo());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// An image without metadata checksums (so that its bytes can be
    /// edited here as a guest would, checksums or not) holding `script`'s
    /// work, with each `(from, to)` byte string replaced (same length).
    fn crafted_image(dir: &Path, script: &str, edits: &[(&[u8], &[u8])]) -> PathBuf {
        let image = dir.join("crafted.img");
        let empty = dir.join("empty");
        fs::create_dir_all(&empty).unwrap();
        run_tool(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "^has_journal,^metadata_csum", "-d"])
                .arg(&empty)
                .arg(&image)
                .arg("16M"),
            "mkfs.ext4",
            &image,
        )
        .unwrap();
        guest_writes(&image, dir, script);
        let mut bytes = fs::read(&image).unwrap();
        for (from, to) in edits {
            assert_eq!(from.len(), to.len());
            let at: Vec<usize> = bytes
                .windows(from.len())
                .enumerate()
                .filter(|(_, window)| window == from)
                .map(|(at, _)| at)
                .collect();
            assert_eq!(at.len(), 1, "{:?}", String::from_utf8_lossy(from));
            bytes[at[0]..at[0] + to.len()].copy_from_slice(to);
        }
        fs::write(&image, bytes).unwrap();
        image
    }

    #[test]
    fn a_crafted_name_cannot_leave_the_extraction_directory() {
        let dir = scratch("crafted-name");
        let share = Share {
            host_dir: dir.join("host"),
            writable: true,
        };
        fs::create_dir_all(&share.host_dir).unwrap();
        fs::write(dir.join("payload"), "pwned").unwrap();
        // "../escaped" from the extraction directory (the scratch's
        // share-out) is the scratch directory itself.
        let image = crafted_image(
            &dir,
            &format!("write {} QQQQQQQQQQ\n", dir.join("payload").display()),
            &[(b"QQQQQQQQQQ", b"../escaped")],
        );
        let refused = copy_back(&image, &share, &dir);
        assert!(
            matches!(refused, Err(ShareError::Unsafe { .. })),
            "{refused:?}"
        );
        assert!(!dir.join("escaped").exists(), "debugfs wrote outside");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_name_twice_in_a_directory_is_refused() {
        // A symlink `x` to a host file, then a file `x`: extracting
        // would write the file's bytes through the symlink.
        let dir = scratch("crafted-twice");
        let share = Share {
            host_dir: dir.join("host"),
            writable: true,
        };
        fs::create_dir_all(&share.host_dir).unwrap();
        fs::write(dir.join("victim"), "host data").unwrap();
        fs::write(dir.join("payload"), "pwned").unwrap();
        let image = crafted_image(
            &dir,
            &format!(
                "symlink twiceA {}\nwrite {} twiceB\n",
                dir.join("victim").display(),
                dir.join("payload").display()
            ),
            &[(b"twiceB", b"twiceA")],
        );
        let refused = copy_back(&image, &share, &dir);
        assert!(
            matches!(&refused, Err(ShareError::Unsafe { detail, .. }) if detail.contains("twice")),
            "{refused:?}"
        );
        assert_eq!(fs::read_to_string(dir.join("victim")).unwrap(), "host data");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn listings_parse_and_odd_lines_are_refused() {
        let output =
            b"debugfs: ls -l <2>\n      2   40755 (2)      0      0    1024  6-Dec-2026 21:04 .\n \
            12  100644 (1)      0      0       2 16-Dec-2026 21:04  a\\x0ab\\x5c\n\n\
            debugfs: ls -l <12>\n";
        let listings = parse_listings(output).unwrap();
        assert_eq!(listings.len(), 2);
        assert_eq!(listings[0].0, 2);
        assert_eq!(
            listings[0].1[1],
            ListedEntry {
                inode: 12,
                mode: 0o100644,
                name: b" a\nb\\".to_vec()
            }
        );
        assert!(listings[1].1.is_empty());
        for bad in [
            &b"      2   40755 (2)      0      0    1024  6-Dec-2026 21:04 .\n"[..],
            b"debugfs: ls -l <2>\n 12 100644 (1) 0 0 2 6-Dec-2026 21:04 a\\qb\n",
            b"debugfs: ls -l <2>\n 12 100644 (1) 0 0 2 6-Dec-2026 21:04 \x01\n",
            b"debugfs: ls -l <2>\n 12 100644 1 0 0 2 6-Dec-2026 21:04 a\n",
            b"debugfs: ls -l <x>\n",
        ] {
            assert!(
                parse_listings(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = b"debugfs: ls -l <2>\n 12 100644 (1) 0 0 2 6-Dec-2026 21:04 ".to_vec();
        long.resize(long.len() + MAX_LISTING_LINE, b'a');
        assert!(parse_listings(&long)
            .unwrap_err()
            .contains("listing line of"));
    }

    #[test]
    fn a_tool_that_prints_without_end_is_stopped() {
        let dir = scratch("endless");
        let endless = run_tool_output(&mut Command::new("yes"), "yes", &dir);
        assert!(
            matches!(&endless, Err(ShareError::Tool { detail, .. }) if detail.contains("more than")),
            "{:?}",
            endless.map(|output| output.len())
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_refused() {
        let dir = scratch("missing");
        let share = Share {
            host_dir: dir.join("nope"),
            writable: false,
        };
        assert!(matches!(
            build_image(&share, &dir.join("img")),
            Err(ShareError::NotADirectory { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
