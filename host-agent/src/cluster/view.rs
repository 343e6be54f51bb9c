//! The membership as this agent last read it, kept current by a watch on
//! the membership keys: what host-to-host calls resolve a member's name
//! with (its underlay address, peer port and certificate), without asking
//! etcd on every call. `/v1/hosts` reads etcd afresh instead.
//!
//! Any change under `alive/`, `election/` or `members/` makes the agent
//! read the whole membership again (it is small): no event is applied on
//! its own, so a missed or compacted event cannot leave the view wrong. A
//! broken watch is opened again after a full read.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use super::records::{AliveRecord, MemberRecord};
use super::{typed, ClusterError, Inner};

/// One member: its lasting record and, while it is up, its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub record: MemberRecord,
    pub alive: Option<AliveRecord>,
}

/// The membership at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// By name.
    pub members: Vec<Member>,
    /// The controller's host name.
    pub leader: Option<String>,
    /// The etcd revision it was read at.
    pub revision: i64,
}

impl View {
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|member| member.record.name.as_str() == name)
    }
}

impl Member {
    /// Where the overlay reaches it: as its heartbeat says, or while it
    /// has none (its agent restarting), as it said at its last join.
    pub fn underlay_address(&self) -> Option<Ipv4Addr> {
        self.alive
            .as_ref()
            .and_then(|alive| alive.underlay_address)
            .or(self.record.underlay_address)
    }
}

/// How long to wait before reading again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// Reads the membership and the leader.
pub(super) async fn read(inner: &Inner) -> Result<View, ClusterError> {
    let keys = &inner.keys;
    let (members_prefix, alive_prefix) = (keys.members(), keys.alive_all());
    let (mut read, revision) = inner
        .etcd
        .get_prefixes_at::<serde_json::Value>(&[&members_prefix, &alive_prefix])
        .await?;
    let alive_values = read.pop().unwrap_or_default();
    let member_values = read.pop().unwrap_or_default();
    let leader = inner.etcd.leader(&keys.controller_election()).await?;
    let mut heartbeats = std::collections::BTreeMap::new();
    for (key, stored) in alive_values {
        if let Some(host) = keys.host_of(&key) {
            let record: AliveRecord = typed(&key, stored.value)?;
            heartbeats.insert(host.to_string(), record);
        }
    }
    let mut members = Vec::new();
    for (key, stored) in member_values {
        let record: MemberRecord = typed(&key, stored.value)?;
        let alive = heartbeats.remove(record.name.as_str());
        members.push(Member { record, alive });
    }
    members.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    Ok(View {
        members,
        leader,
        revision,
    })
}

/// Keeps `inner.view` current for as long as the agent runs.
pub(super) async fn follow(inner: Arc<Inner>) {
    loop {
        let view = match read(&inner).await {
            Ok(view) => view,
            Err(err) => {
                tracing::warn!("cluster: cannot read the membership: {err}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let revision = view.revision;
        inner.view.send_if_modified(|current| {
            let changed = **current != view;
            if changed {
                *current = Arc::new(view);
            }
            changed
        });
        // "alive/" < "election/" < "members/": one range holds all three.
        let (start, end) = (inner.keys.alive_all(), inner.keys.members_end());
        let watched = inner
            .etcd
            .changed("the membership", (&start, &end), revision);
        if let Err(err) = watched.await {
            tracing::warn!("cluster: the membership watch broke: {err}");
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Member `name` for unit tests: up (with 8 vCPUs, 4 GiB) or down,
/// cordoned or not.
#[cfg(test)]
pub fn test_member(name: &str, up: bool, cordoned: bool) -> Member {
    use super::settings::Role;
    Member {
        record: MemberRecord {
            name: name.parse().expect("name"),
            fingerprint: "f".repeat(64),
            roles: [Role::Compute].into(),
            labels: Default::default(),
            joined_at: 1,
            cordoned,
            drain: None,
            underlay_address: None,
        },
        alive: up.then(|| AliveRecord {
            api_address: "10.0.0.1:8080".parse().expect("address"),
            underlay_address: None,
            peer_port: 7443,
            capacity: nubis_api::HostResources {
                vcpus: 8,
                memory_mib: 4096,
                disk_mib: 10_000,
            },
            usage: nubis_api::HostResources::default(),
            vms: 0,
            agent_version: "0.1.0".into(),
            started_at: 1,
        }),
    }
}
