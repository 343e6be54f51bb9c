//! A tenant's host-local resources (snapshots, port forwards) counted
//! against its quota cluster-wide. Each one has a claim key
//! (`claims/{tenant}/{host}/{id}`, with the disk it takes) written before
//! the host makes it, in a transaction conditioned on none of the tenant's
//! claims and usage having changed since they were read: two hosts racing
//! for the last snapshot of a quota cannot both win.
//!
//! Claims are counts, not counters: the host that holds a claim keeps it
//! true ([`Cluster::sync_claims`], every follow pass). A claim whose
//! resource never came to be (a failed snapshot, an agent killed between
//! the claim and the record) is dropped by its host once the creation is
//! no longer in flight; a resource without a claim (made while standalone)
//! gets one; a snapshot's claim shrinks from the bound asked to its size.

use std::collections::{HashMap, HashSet};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use nubis_api::Quota;
use serde::{Deserialize, Serialize};

use super::etcd::encode;
use super::vms::{TenantUsage, ATTEMPTS};
use super::{Cluster, ClusterError};

/// What one claim stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClaimKind {
    Snapshot,
    PortForward,
}

/// `claims/{tenant}/{host}/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub kind: ClaimKind,
    /// Disk MiB it takes (a snapshot: at most its VM's memory and disks
    /// until taken, then its size).
    #[serde(default)]
    pub storage_mib: u64,
}

/// A tenant's claims summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Claimed {
    pub snapshots: u64,
    pub port_forwards: u64,
    pub storage_mib: u64,
}

impl Claimed {
    pub fn of<'c>(claims: impl IntoIterator<Item = &'c Claim>) -> Self {
        claims
            .into_iter()
            .fold(Claimed::default(), |mut sum, claim| {
                match claim.kind {
                    ClaimKind::Snapshot => sum.snapshots += 1,
                    ClaimKind::PortForward => sum.port_forwards += 1,
                }
                sum.storage_mib = sum.storage_mib.saturating_add(claim.storage_mib);
                sum
            })
    }
}

/// Whether `quota` leaves room for `claim` next to what the tenant has
/// claimed and its VMs take (`usage`).
pub fn check(
    claimed: &Claimed,
    usage: &TenantUsage,
    claim: &Claim,
    quota: &Quota,
) -> Result<(), ClusterError> {
    let (what, used, max) = match claim.kind {
        ClaimKind::Snapshot => ("snapshots", claimed.snapshots, quota.max_snapshots),
        ClaimKind::PortForward => (
            "port forwards",
            claimed.port_forwards,
            quota.max_port_forwards,
        ),
    };
    if used.saturating_add(1) > u64::from(max) {
        return Err(ClusterError::Quota(format!(
            "{what}: {used} in use in the cluster + 1 requested exceeds the tenant's quota of {max}"
        )));
    }
    check_storage(claimed, usage, claim.storage_mib, quota)
}

/// Whether `quota` leaves `asked_mib` more of disk next to the tenant's
/// claims and VMs.
pub fn check_storage(
    claimed: &Claimed,
    usage: &TenantUsage,
    asked_mib: u64,
    quota: &Quota,
) -> Result<(), ClusterError> {
    let used = claimed.storage_mib.saturating_add(usage.storage_mib);
    if asked_mib > 0 && used.saturating_add(asked_mib) > quota.max_storage_mib {
        return Err(ClusterError::Quota(format!(
            "storage: {used} MiB in use in the cluster + {asked_mib} MiB requested exceeds the tenant's quota of {} MiB",
            quota.max_storage_mib
        )));
    }
    Ok(())
}

/// A claim being made real: while it lives, this host's sweep leaves the
/// claim alone even though its resource is not recorded yet.
#[must_use = "the claim is swept once this is dropped and its resource is not recorded"]
pub struct InFlight {
    cluster: Cluster,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.cluster.in_flight().remove(&self.id);
        self.cluster
            .inner
            .claims_ended
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One of this host's resources, as its claim should be.
pub struct LocalClaim {
    pub tenant_id: String,
    pub id: String,
    pub claim: Claim,
}

impl Cluster {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.inner
            .claims_in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many creations with a claim have ended here (made or not):
    /// when it moved, the claims are worth a sync.
    pub fn claims_ended(&self) -> u64 {
        self.inner
            .claims_ended
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The ids of the resources being created here now: read before the
    /// store, for [`Cluster::sync_claims`].
    pub fn claims_in_flight(&self) -> HashSet<String> {
        self.in_flight().clone()
    }

    /// The tenant's claims, its usage (and that key's revision) and the
    /// revision they were read at.
    pub(super) async fn claimed(
        &self,
        tenant: &str,
    ) -> Result<(Claimed, TenantUsage, i64, i64), ClusterError> {
        let keys = &self.inner.keys;
        let usage_key = keys.usage(tenant);
        let (mut read, revision) = self
            .inner
            .etcd
            .get_prefixes_at::<serde_json::Value>(&[&keys.claims_of(tenant), &usage_key])
            .await?;
        let usage_read = read.pop().unwrap_or_default();
        let claims_read = read.pop().unwrap_or_default();
        let mut claims = Vec::with_capacity(claims_read.len());
        for (key, stored) in claims_read {
            claims.push(super::typed::<Claim>(&key, stored.value)?);
        }
        let (usage, seen) = match usage_read.into_iter().find(|(key, _)| *key == usage_key) {
            Some((key, stored)) => (super::typed(&key, stored.value)?, stored.mod_revision),
            None => (TenantUsage::default(), 0),
        };
        Ok((Claimed::of(&claims), usage, seen, revision))
    }

    /// Claims `id` (a snapshot or port forward this host is about to
    /// make) for `tenant`, within `quota` cluster-wide.
    pub async fn claim(
        &self,
        tenant: &str,
        id: &str,
        claim: Claim,
        quota: &Quota,
    ) -> Result<InFlight, ClusterError> {
        self.in_flight().insert(id.to_string());
        let in_flight = InFlight {
            cluster: self.clone(),
            id: id.to_string(),
        };
        let keys = &self.inner.keys;
        let host = self.inner.settings.host_name.as_str();
        let (claims_prefix, claim_key) = (keys.claims_of(tenant), keys.claim(tenant, host, id));
        let (tenant_key, usage_key) = (keys.tenant(tenant), keys.usage(tenant));
        let value = encode(&claim_key, &claim)?;
        for _ in 0..ATTEMPTS {
            let (claimed, usage, usage_seen, revision) = self.claimed(tenant).await?;
            check(&claimed, &usage, &claim, quota)?;
            let txn = Txn::new()
                .when([
                    Compare::create_revision(tenant_key.as_str(), CompareOp::Greater, 0),
                    // No claim of the tenant written since the read.
                    Compare::mod_revision(claims_prefix.as_str(), CompareOp::Less, revision + 1)
                        .with_prefix(),
                    super::vms::unchanged(&usage_key, usage_seen),
                ])
                .and_then([TxnOp::put(claim_key.as_str(), value.clone(), None)]);
            let (done, _) = self
                .inner
                .etcd
                .txn(&format!("claim {claim_key}"), txn)
                .await?;
            if done {
                return Ok(in_flight);
            }
            self.require_tenant(tenant).await?;
        }
        Err(ClusterError::Contended {
            key: claims_prefix,
            attempts: ATTEMPTS,
        })
    }

    /// Gives `id`'s claim back (its resource is gone).
    pub async fn release(&self, tenant: &str, id: &str) -> Result<(), ClusterError> {
        let key = self
            .inner
            .keys
            .claim(tenant, self.inner.settings.host_name.as_str(), id);
        self.inner.etcd.delete(&key).await
    }

    /// This host's claims, by key: read before [`Cluster::claims_in_flight`]
    /// and the store, for [`Cluster::sync_claims`].
    pub async fn held_claims(&self) -> Result<HashMap<String, Claim>, ClusterError> {
        let keys = &self.inner.keys;
        let host = self.inner.settings.host_name.as_str();
        Ok(self
            .inner
            .etcd
            .list::<Claim>(&keys.claims())
            .await?
            .into_iter()
            .filter(|(key, _)| keys.claim_host(key) == Some(host))
            .collect())
    }

    /// Makes this host's claims (`held`) match its resources (`local`),
    /// read in this order: `held`, `in_flight`, `local`. A claim in `held`
    /// was made before `in_flight` was read, so its creation is either
    /// still there or over, its resource recorded in `local` or never
    /// made: claims of resources this host does not have, and not being
    /// created, go; resources without their claim get it.
    pub async fn sync_claims(
        &self,
        held: &HashMap<String, Claim>,
        in_flight: &HashSet<String>,
        local: &[LocalClaim],
    ) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let host = self.inner.settings.host_name.as_str();
        let wanted: HashMap<String, &Claim> = local
            .iter()
            .map(|local| (keys.claim(&local.tenant_id, host, &local.id), &local.claim))
            .collect();
        for (key, claim) in held {
            let id = key.rsplit('/').next().unwrap_or_default();
            if !wanted.contains_key(key) && !in_flight.contains(id) {
                tracing::info!(claim = %key, kind = ?claim.kind, "claim without its resource given back");
                self.inner.etcd.delete(key).await?;
            }
        }
        for (key, claim) in wanted {
            if held.get(&key) != Some(claim) {
                self.inner.etcd.put(&key, claim, None).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(snapshots: u32, forwards: u32, storage_mib: u64) -> Quota {
        Quota {
            max_snapshots: snapshots,
            max_port_forwards: forwards,
            max_storage_mib: storage_mib,
            ..Quota::default()
        }
    }

    const SNAPSHOT: Claim = Claim {
        kind: ClaimKind::Snapshot,
        storage_mib: 300,
    };
    const FORWARD: Claim = Claim {
        kind: ClaimKind::PortForward,
        storage_mib: 0,
    };

    #[test]
    fn claims_are_summed_by_kind() {
        let claimed = Claimed::of(&[SNAPSHOT, FORWARD, SNAPSHOT]);
        assert_eq!(
            claimed,
            Claimed {
                snapshots: 2,
                port_forwards: 1,
                storage_mib: 600
            }
        );
        assert_eq!(Claimed::of(&[]), Claimed::default());
    }

    #[test]
    fn the_last_snapshot_and_forward_of_a_quota_are_given_once() {
        let usage = TenantUsage::default();
        let q = quota(2, 1, 10_000);
        check(&Claimed::of(&[SNAPSHOT]), &usage, &SNAPSHOT, &q).expect("the second snapshot");
        let err = check(&Claimed::of(&[SNAPSHOT, SNAPSHOT]), &usage, &SNAPSHOT, &q)
            .expect_err("a third snapshot");
        assert_eq!(
            err.to_string(),
            "quota exceeded: snapshots: 2 in use in the cluster + 1 requested exceeds the tenant's quota of 2"
        );
        check(&Claimed::of(&[SNAPSHOT, SNAPSHOT]), &usage, &FORWARD, &q).expect("a forward");
        let err = check(&Claimed::of(&[FORWARD]), &usage, &FORWARD, &q).expect_err("a second");
        assert!(err.to_string().contains("port forwards: 1 in use"), "{err}");
    }

    #[test]
    fn storage_counts_the_vms_disks_and_the_claims() {
        let usage = TenantUsage {
            storage_mib: 9_500,
            ..TenantUsage::default()
        };
        let q = quota(10, 10, 10_000);
        check(&Claimed::default(), &usage, &SNAPSHOT, &q).expect("9800 of 10000");
        let err =
            check(&Claimed::of(&[SNAPSHOT]), &usage, &SNAPSHOT, &q).expect_err("10100 of 10000");
        assert!(
            err.to_string()
                .contains("storage: 9800 MiB in use in the cluster + 300 MiB requested"),
            "{err}"
        );
        // A forward takes no disk: over the storage quota already, it is
        // still given.
        check(&Claimed::of(&[SNAPSHOT, SNAPSHOT]), &usage, &FORWARD, &q).expect("a forward");
    }
}
