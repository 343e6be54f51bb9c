//! Being a member: the lasting record written once at join, and a session
//! that keeps this host's heartbeat alive. A session is one etcd lease: the
//! `alive/` key and, for a controller candidate, its election key are bound
//! to it, so when the host or its link dies both vanish together after the
//! lease's TTL, and another candidate is elected. A session that is lost
//! (etcd unreachable for longer than the TTL, or the lease expired) is
//! replaced by a new one as soon as etcd answers again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::records::{AliveRecord, MemberRecord};
use super::settings::Role;
use super::{ClusterError, Inner};
use crate::store::now;

/// How long to wait before trying etcd again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// Writes or refreshes this host's lasting record: its roles and labels
/// as configured now, its cordon and join time as they were. A member of
/// that name with another certificate is another host: refused.
pub(super) async fn register(inner: &Inner) -> Result<MemberRecord, ClusterError> {
    let settings = &inner.settings;
    let key = inner.keys.member(&settings.host_name);
    inner
        .etcd
        .update(&key, |current: Option<MemberRecord>| match current {
            Some(member) if member.fingerprint != inner.local.fingerprint => {
                Err(ClusterError::NameTaken {
                    name: settings.host_name.to_string(),
                    fingerprint: member.fingerprint,
                })
            }
            current => Ok(MemberRecord {
                name: settings.host_name.clone(),
                fingerprint: inner.local.fingerprint.clone(),
                roles: settings.roles.clone(),
                labels: settings.labels.clone(),
                joined_at: current.as_ref().map_or_else(now, |m| m.joined_at),
                cordoned: current.as_ref().is_some_and(|m| m.cordoned),
                drain: current.and_then(|m| m.drain),
                underlay_address: inner.local.underlay_address,
            }),
        })
        .await
}

/// The heartbeat this host writes now.
fn alive_record(inner: &Inner) -> AliveRecord {
    let usage = (inner.local.usage)();
    AliveRecord {
        api_address: inner.local.api_address,
        underlay_address: inner.local.underlay_address,
        peer_port: inner.local.peer_port,
        capacity: inner.local.capacity,
        usage: usage.resources,
        vms: usage.vms,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: inner.started_at,
    }
}

/// Starts a session: a new lease with this host's heartbeat on it. A
/// heartbeat left by this host's previous agent (same certificate: the
/// member record says so) is taken over: its lease is revoked first.
pub(super) async fn open_session(inner: &Inner) -> Result<Session, ClusterError> {
    let key = inner.keys.alive(&inner.settings.host_name);
    let lease = inner.etcd.grant(inner.settings.lease_ttl_s).await?;
    let record = alive_record(inner);
    loop {
        let previous = inner.etcd.get::<serde_json::Value>(&key).await?;
        let seen = match previous {
            Some(stored) if stored.lease != lease => {
                inner.etcd.revoke(stored.lease).await?;
                0
            }
            Some(stored) => stored.mod_revision,
            None => 0,
        };
        if inner.etcd.put_if(&key, &record, seen, Some(lease)).await? {
            tracing::info!(
                "cluster: {} is up (lease {lease:x}, TTL {} s)",
                inner.settings.host_name,
                inner.settings.lease_ttl_s
            );
            return Ok(Session {
                lease,
                written: record,
            });
        }
    }
}

/// One lease and what was last written under it.
pub(super) struct Session {
    pub lease: i64,
    written: AliveRecord,
}

/// Whether this host leads, as one session sees it: elected under the
/// session's lease, and not lapsed (no renewal got through for a whole
/// TTL, so etcd may have let the lease go and elected another host: a
/// controller that cannot be sure it still leads stops acting as one).
#[derive(Default)]
struct Leadership {
    elected: AtomicBool,
    lapsed: AtomicBool,
}

impl Leadership {
    fn publish(&self, inner: &Inner) {
        let leads = self.elected.load(Ordering::SeqCst) && !self.lapsed.load(Ordering::SeqCst);
        inner.controller.send_if_modified(|current| {
            let changed = *current != leads;
            *current = leads;
            changed
        });
    }
}

/// Keeps sessions alive for as long as the agent runs; `first` is the one
/// `Cluster::join` opened.
pub(super) async fn run(inner: Arc<Inner>, first: Session) {
    let mut session = Some(first);
    loop {
        let current = match session.take() {
            Some(current) => current,
            None => match open_session(&inner).await {
                Ok(current) => current,
                Err(err) => {
                    tracing::warn!("cluster: cannot start a session: {err}");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            },
        };
        if let Ok(mut lease) = inner.lease.lock() {
            *lease = Some(current.lease);
        }
        let leadership = Arc::new(Leadership::default());
        let (ended_tx, ended_rx) = watch::channel(false);
        let election = inner.settings.roles.contains(&Role::Controller).then(|| {
            tokio::spawn(campaign(
                inner.clone(),
                current.lease,
                leadership.clone(),
                ended_rx,
            ))
        });
        keep_alive(&inner, current, &leadership).await;
        // The lease is gone: this host may be taken for lost until a new
        // session is up.
        inner.lapsed.send_replace(true);
        let _ = ended_tx.send(true);
        inner.controller.send_replace(false);
        inner.set_leader_key(None);
        if let Some(election) = election {
            let _ = election.await;
        }
        tracing::warn!(
            "cluster: {} lost its session; joining again",
            inner.settings.host_name
        );
    }
}

/// Whether etcd said the lease is gone (as opposed to not answering).
fn lease_gone(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound || status.message().contains("lease not found")
        }
        _ => false,
    }
}

/// Renews `session`'s lease every third of its TTL and rewrites the
/// heartbeat when the host's usage changed. Returns when etcd says the
/// lease is gone. While no renewal gets through for a whole TTL the
/// session has lapsed (this host does not act as the controller); a
/// renewal that gets through later (etcd extends leases when it elects a
/// new leader of its own) ends the lapse.
async fn keep_alive(inner: &Inner, mut session: Session, leadership: &Leadership) {
    let ttl = Duration::from_secs(inner.settings.lease_ttl_s.unsigned_abs());
    let period = ttl / 3;
    let key = inner.keys.alive(&inner.settings.host_name);
    let mut renewed = Instant::now();
    let mut stream = None;
    loop {
        let lapsed = renewed.elapsed() >= ttl;
        if lapsed != leadership.lapsed.swap(lapsed, Ordering::SeqCst) {
            if lapsed {
                tracing::warn!("cluster: no lease renewal for {} s", ttl.as_secs());
            }
            leadership.publish(inner);
        }
        inner.lapsed.send_if_modified(|current| {
            let changed = *current != lapsed;
            *current = lapsed;
            changed
        });
        if stream.is_none() {
            match inner
                .etcd
                .waiting_client()
                .lease_keep_alive(session.lease)
                .await
            {
                Ok(pair) => stream = Some(pair),
                Err(err) if lease_gone(&err) => {
                    tracing::warn!("cluster: lease {:x} is gone", session.lease);
                    return;
                }
                Err(err) => {
                    tracing::warn!("cluster: cannot renew the lease: {err}");
                    tokio::time::sleep(RETRY.min(period)).await;
                    continue;
                }
            }
        }
        let Some((keeper, responses)) = stream.as_mut() else {
            continue;
        };
        let renewal = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(period, renewal).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => renewed = Instant::now(),
            Ok(Ok(Some(_))) => {
                tracing::warn!("cluster: lease {:x} expired", session.lease);
                return;
            }
            Ok(Err(err)) if lease_gone(&err) => {
                tracing::warn!("cluster: lease {:x} is gone", session.lease);
                return;
            }
            Ok(Ok(None)) => stream = None,
            Ok(Err(err)) => {
                tracing::warn!("cluster: lease renewal failed: {err}");
                stream = None;
            }
            Err(_) => stream = None,
        }
        if renewed.elapsed() < period {
            let now = alive_record(inner);
            if now != session.written {
                match inner.etcd.put(&key, &now, Some(session.lease)).await {
                    Ok(()) => session.written = now,
                    Err(err) => tracing::warn!("cluster: cannot update the heartbeat: {err}"),
                }
            }
            tokio::time::sleep(period).await;
        } else {
            tokio::time::sleep(RETRY.min(period) / 4).await;
        }
    }
}

/// Runs for the controller election with `lease` until elected (then this
/// host leads until the session ends) or until the session ends.
async fn campaign(
    inner: Arc<Inner>,
    lease: i64,
    leadership: Arc<Leadership>,
    mut ended: watch::Receiver<bool>,
) {
    let election = inner.keys.controller_election();
    let name = inner.settings.host_name.to_string();
    loop {
        let mut client = inner.etcd.waiting_client();
        let result = tokio::select! {
            result = client.campaign(election.as_str(), name.as_str(), lease) => result,
            _ = ended.wait_for(|ended| *ended) => return,
        };
        match result {
            Ok(response) => {
                tracing::info!("cluster: {name} is the controller");
                inner.set_leader_key(response.leader().map(|leader| leader.key().to_vec()));
                leadership.elected.store(true, Ordering::SeqCst);
                leadership.publish(&inner);
                let _ = ended.wait_for(|ended| *ended).await;
                return;
            }
            Err(err) if lease_gone(&err) => return,
            Err(err) => {
                tracing::warn!("cluster: campaign failed: {err}");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = ended.wait_for(|ended| *ended) => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_gone_when_etcd_says_so() {
        let keep_alive = etcd_client::Error::LeaseKeepAliveError("lease not found".into());
        assert!(lease_gone(&keep_alive));
        let campaign = etcd_client::Error::GRpcStatus(tonic::Status::unknown(
            "etcdserver: requested lease not found",
        ));
        assert!(lease_gone(&campaign));
        let unreachable =
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("tcp connect error"));
        assert!(!lease_gone(&unreachable));
    }
}
