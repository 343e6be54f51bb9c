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
                Kind::State => {
                    return decode("state", &payload).map_err(|err| failed(err.to_string()))
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
    send(&mut stream, Kind::Accept, &[]).map_err(MigrationError::from)?;
    let built = match restore_from(
        config,
        &mut Incoming {
            stream: &mut stream,
        },
    ) {
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
