//! Being a member: the lasting record written once at join, and a session
//! that keeps this host's heartbeat alive. A session is one etcd lease: the
//! `alive/` key and, for a controller candidate, its election key are bound
//! to it, so when the host or its link dies both vanish together after the
//! lease's TTL, and another candidate is elected. A session that is lost
//! (etcd unreachable for longer than the TTL, or the lease expired) is
//! replaced by a new one as soon as etcd answers again.

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
                cordoned: current.is_some_and(|m| m.cordoned),
            }),
        })
        .await
}

/// The heartbeat this host writes now.
fn alive_record(inner: &Inner) -> AliveRecord {
    let (usage, vms) = (inner.local.usage)();
    AliveRecord {
        api_address: inner.local.api_address,
        underlay_address: inner.local.underlay_address,
        peer_port: inner.local.peer_port,
        capacity: inner.local.capacity,
        usage,
        vms,
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
        let (ended_tx, ended_rx) = watch::channel(false);
        let election = inner
            .settings
            .roles
            .contains(&Role::Controller)
            .then(|| tokio::spawn(campaign(inner.clone(), current.lease, ended_rx)));
        keep_alive(&inner, current).await;
        let _ = ended_tx.send(true);
        inner.controller.send_replace(false);
        if let Some(election) = election {
            let _ = election.await;
        }
        tracing::warn!(
            "cluster: {} lost its session; joining again",
            inner.settings.host_name
        );
    }
}

/// Renews `session`'s lease every third of its TTL and rewrites the
/// heartbeat when the host's usage changed. Returns when the lease is
/// gone: etcd said so, or no renewal got through for a whole TTL.
async fn keep_alive(inner: &Inner, mut session: Session) {
    let ttl = Duration::from_secs(inner.settings.lease_ttl_s.unsigned_abs());
    let period = ttl / 3;
    let key = inner.keys.alive(&inner.settings.host_name);
    let mut renewed = Instant::now();
    let mut stream = None;
    loop {
        if renewed.elapsed() >= ttl {
            return;
        }
        if stream.is_none() {
            match inner
                .etcd
                .waiting_client()
                .lease_keep_alive(session.lease)
                .await
            {
                Ok(pair) => stream = Some(pair),
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
            Ok(Ok(_)) => {
                tracing::warn!("cluster: lease {:x} expired", session.lease);
                return;
            }
            Ok(Err(err)) => {
                tracing::warn!("cluster: lease renewal failed: {err}");
                stream = None;
            }
            Err(_) => stream = None,
        }
        let now = alive_record(inner);
        if now != session.written {
            match inner.etcd.put(&key, &now, Some(session.lease)).await {
                Ok(()) => session.written = now,
                Err(err) => tracing::warn!("cluster: cannot update the heartbeat: {err}"),
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// Runs for the controller election with `lease` until elected (then this
/// host is the controller until the session ends) or until the session
/// ends.
async fn campaign(inner: Arc<Inner>, lease: i64, mut ended: watch::Receiver<bool>) {
    let election = inner.keys.controller_election();
    let name = inner.settings.host_name.to_string();
    loop {
        let mut client = inner.etcd.waiting_client();
        let result = tokio::select! {
            result = client.campaign(election.as_str(), name.as_str(), lease) => result,
            _ = ended.wait_for(|ended| *ended) => return,
        };
        match result {
            Ok(_) => {
                tracing::info!("cluster: {name} is the controller");
                inner.controller.send_replace(true);
                let _ = ended.wait_for(|ended| *ended).await;
                return;
            }
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
