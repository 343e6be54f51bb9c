//! The receiving side: `nubis-vmm --migrate-listen ADDR:PORT` waits for one
//! source, checks its token, version and machine, takes RAM and state, and
//! builds the VM; it runs it only after the source's `Commit`.

use std::net::{TcpListener, TcpStream};

use vm_memory::{Bytes, GuestAddress};

use super::protocol::{
    self, decode, pages, receive, send, send_json, tokens_match, Hello, Kind, Refusal,
};
use super::MigrationError;
use crate::builder::{restore_from, BuildError, BuiltVm, RestoreSource};
use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::file::SnapshotError;
use crate::snapshot::state::VmSnapshot;

/// How long the source may send nothing before it counts as gone.
const SOURCE_SILENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Errors of the receiving side.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// A migration stream as the builder's source of RAM and state.
struct Incoming<'a> {
    stream: &'a mut TcpStream,
    /// The disks being copied here: (file, size), in config order.
    disks: Vec<(std::fs::File, u64)>,
}

/// Opens the config's disk files to receive copies: emptied, then sized as
/// the source's (what is not sent is zero).
fn receive_disks(config: &VmConfig, sizes: &[u64]) -> Result<Vec<(std::fs::File, u64)>, String> {
    if sizes.len() != config.disks.len() {
        return Err(format!(
            "{} disk(s) offered, the VM has {}",
            sizes.len(),
            config.disks.len()
        ));
    }
    config
        .disks
        .iter()
        .zip(sizes)
        .map(|(disk, size)| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&disk.path)
                .and_then(|file| file.set_len(*size).map(|()| file))
                .map_err(|err| format!("cannot prepare disk {}: {err}", disk.path.display()))?;
            Ok((file, *size))
        })
        .collect()
}

impl RestoreSource for Incoming<'_> {
    fn load(&mut self, memory: &GuestMemoryMmap) -> Result<VmSnapshot, SnapshotError> {
        let failed = |detail: String| SnapshotError::Restore {
            what: "migrated".into(),
            detail,
        };
        loop {
            let (kind, payload) = receive(self.stream).map_err(|err| failed(err.to_string()))?;
            match kind {
                Kind::Pages => {
                    for (address, page) in pages(&payload).map_err(|err| failed(err.to_string()))? {
                        memory
                            .write_slice(page, GuestAddress(address))
                            .map_err(|_| {
                                failed(MigrationError::PageOutsideRam(address).to_string())
                            })?;
                    }
                }
                Kind::Disk => {
                    use std::os::unix::fs::FileExt;
                    let (index, offset, data) = protocol::parse_disk_chunk(&payload)
                        .map_err(|err| failed(err.to_string()))?;
                    let (file, size) = self.disks.get(index as usize).ok_or_else(|| {
                        failed(format!("a chunk of disk {index}, which is not copied"))
                    })?;
                    let end = offset.checked_add(data.len() as u64);
                    if end.is_none_or(|end| end > *size) {
                        return Err(failed(format!(
                            "a chunk of disk {index} at {offset} (+{}) is past its end",
                            data.len()
                        )));
                    }
                    file.write_all_at(data, offset)
                        .map_err(|err| failed(format!("cannot write disk {index}: {err}")))?;
                }
                Kind::State => {
                    for (file, _) in &self.disks {
                        file.sync_all()
                            .map_err(|err| failed(format!("cannot sync a copied disk: {err}")))?;
                    }
                    return decode("state", &payload).map_err(|err| failed(err.to_string()));
                }
                Kind::Abort => {
                    let refusal: Refusal = decode("abort", &payload).unwrap_or(Refusal {
                        message: "no reason given".into(),
                    });
                    return Err(failed(MigrationError::Aborted(refusal.message).to_string()));
                }
                other => return Err(failed(format!("unexpected {other:?} while receiving RAM"))),
            }
        }
    }
}

fn refuse(stream: &mut TcpStream, message: String) -> MigrationError {
    let _ = send_json(
        stream,
        Kind::Refuse,
        &Refusal {
            message: message.clone(),
        },
    );
    MigrationError::Refused(message)
}

/// Waits on `listen` for the source, receives the VM of `config`, and
/// returns it once handed over (the source has committed; `Running` has
/// gone back to it).
pub fn receive_vm(config: VmConfig, listen: &str, token: &str) -> Result<BuiltVm, ReceiveError> {
    let listener = TcpListener::bind(listen).map_err(|source| MigrationError::Listen {
        listen: listen.to_string(),
        source,
    })?;
    log::info!("waiting for a migration on {listen}");
    let (mut stream, peer) = listener.accept().map_err(|source| MigrationError::Listen {
        listen: listen.to_string(),
        source,
    })?;
    drop(listener);
    stream.set_nodelay(true).ok();
    // A source that goes silent (dead, or its link cut) ends the wait: this
    // VMM exits instead of holding the VM's place forever.
    stream.set_read_timeout(Some(SOURCE_SILENCE)).ok();
    log::info!("migration from {peer}");
    let (kind, payload) = receive(&mut stream).map_err(MigrationError::from)?;
    if kind != Kind::Hello {
        return Err(refuse(&mut stream, format!("expected Hello, got {kind:?}")).into());
    }
    let hello: Hello = decode("hello", &payload).map_err(MigrationError::from)?;
    if hello.magic != protocol::MAGIC || hello.version != protocol::VERSION {
        return Err(refuse(
            &mut stream,
            format!(
                "protocol {} version {}; this VMM speaks {} version {}",
                hello.magic,
                hello.version,
                protocol::MAGIC,
                protocol::VERSION
            ),
        )
        .into());
    }
    if !tokens_match(token, &hello.token) {
        return Err(refuse(&mut stream, "wrong migration token".into()).into());
    }
    let shape = crate::builder::machine_shape(&config);
    if let Err(err) = hello.machine.check(&shape) {
        return Err(refuse(&mut stream, err.to_string()).into());
    }
    let disks = if hello.disks.is_empty() {
        Vec::new()
    } else {
        match receive_disks(&config, &hello.disks) {
            Ok(disks) => disks,
            Err(message) => return Err(refuse(&mut stream, message).into()),
        }
    };
    send(&mut stream, Kind::Accept, &[]).map_err(MigrationError::from)?;
    let mut incoming = Incoming {
        stream: &mut stream,
        disks,
    };
    let built = restore_from(config, &mut incoming);
    drop(incoming);
    let built = match built {
        Ok(built) => built,
        Err(err) => {
            let _ = send_json(
                &mut stream,
                Kind::Refuse,
                &Refusal {
                    message: err.to_string(),
                },
            );
            return Err(err.into());
        }
    };
    send(&mut stream, Kind::Ready, &[]).map_err(MigrationError::from)?;
    match receive(&mut stream).map_err(MigrationError::from)? {
        (Kind::Commit, _) => {}
        (Kind::Abort, payload) => {
            let refusal: Refusal = decode("abort", &payload).unwrap_or(Refusal {
                message: "no reason given".into(),
            });
            return Err(MigrationError::Aborted(refusal.message).into());
        }
        (other, _) => {
            return Err(MigrationError::Aborted(format!("{other:?} instead of Commit")).into())
        }
    }
    send(&mut stream, Kind::Running, &[]).map_err(MigrationError::from)?;
    log::info!("migration from {peer} handed over");
    Ok(built)
}
