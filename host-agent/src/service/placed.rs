//! A VM's life in a cluster, as the hosts see it: the host that takes a
//! tenant's request writes the definition to etcd ([`define`]) and the
//! controller places it; the host it is placed on defines it in its own
//! store and starts it if asked ([`realize`]), and reports how each of its
//! VMs is (`status/{vm}`), so that every host lists the same VMs.
//!
//! Each agent follows the VM records for as long as it runs ([`follow`]):
//! a full read at start and on every change (a broken watch costs one more
//! read, never a missed VM). At its first read it also sweeps the VMs it
//! still has whose record is gone (deleted through another host while it
//! was away). Host-local facts (the VMM's pid, its jail, its console)
//! stay in this host's store.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nubis_api::{HostLossPolicy, Vm, VmCreate, VmNic, VmState};

use super::vms::{self, Action};
use super::{images, Result, Scope, ServiceError, Services};
use crate::cluster::claims::{Claim, ClaimKind, LocalClaim};
use crate::cluster::inventory::Inventory;
use crate::cluster::networks::NetworkRecord;
use crate::cluster::vms::{ClusterVm, VmRecord};
use crate::cluster::{Cluster, ClusterError};
use crate::store::{new_id, now};

/// How often this host's VMs are compared with their reports at least.
const REPORT_PERIOD: Duration = Duration::from_secs(1);
/// In the data directory once this host published its standalone VMs.
const PUBLISHED_MARKER: &str = "cluster-vms-published";
/// How long a VM of this host's store may lack its record in the cluster
/// before it is deleted here (see `sweep`).
const ORPHAN_GRACE: Duration = Duration::from_secs(10);
/// How long to wait after a failed read.
const RETRY: Duration = Duration::from_secs(1);

/// Defines `request` of `tenant_id` in the cluster: checked here (the
/// image, the placement's labels and group), counted against the tenant's
/// quota cluster-wide, and pending until the controller places it.
pub async fn define(
    svc: &Services,
    cluster: &Cluster,
    tenant_id: &str,
    mut request: VmCreate,
) -> Result<Vm> {
    check_placement(&request)?;
    let image = images::get(svc, Scope::Tenant(tenant_id), &request.image)
        .await
        .map_err(|_| {
            ServiceError::unprocessable("image", format!("no image '{}'", request.image))
        })?;
    request.image = image.id;
    let ssh_keys = super::ssh_keys::resolve(svc, tenant_id, &request.ssh_keys).await?;
    let storage_mib = crate::quota::mib_of(image.rootfs_bytes)
        + request.disks.iter().map(|disk| disk.size_mib).sum::<u64>();
    let tenant = svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::Unauthorized("the token's tenant is gone".to_string()))?;
    let mut record = VmRecord {
        id: new_id("vm")?,
        tenant_id: tenant_id.to_string(),
        spec: request,
        host: None,
        created_at: now(),
        nics: Vec::new(),
        events: Vec::new(),
        storage_mib,
        moving: None,
        failed_moves: 0,
        generation: 0,
        instance: None,
        retiring: None,
        ssh_keys,
    };
    record.record_event("created", "VM defined in the cluster; waiting to be placed");
    let networks = cluster.networks().await?;
    let mut attempts = 0;
    loop {
        record.nics = assign_nics(cluster, tenant_id, &record.spec, &networks).await?;
        match cluster.define_vm(&record, Some(&tenant.quota)).await {
            Ok(()) => break,
            // Another VM took an address first: draw again.
            Err(ClusterError::Raced(_)) if attempts < ADDRESS_ATTEMPTS => attempts += 1,
            Err(err) => return Err(err.into()),
        }
    }
    tracing::info!(vm = %record.id, tenant = tenant_id, "VM defined in the cluster");
    Ok(record.pending())
}

/// How many times a VM's addresses are drawn again after another VM took
/// one first.
const ADDRESS_ATTEMPTS: usize = 8;

/// The NICs of `spec` (see [`Cluster::assign_nics`]), a network the
/// tenant lacks or one without a free address refused in the API's terms.
async fn assign_nics(
    cluster: &Cluster,
    tenant_id: &str,
    spec: &VmCreate,
    networks: &[NetworkRecord],
) -> Result<Vec<VmNic>> {
    cluster
        .assign_nics(tenant_id, spec, networks)
        .await
        .map_err(|err| match err {
            ClusterError::NoNetwork { index, name } => ServiceError::unprocessable(
                format!("nics[{index}].network"),
                format!("no network '{name}'"),
            ),
            ClusterError::AddressesExhausted(message) => ServiceError::Exhausted(message),
            other => other.into(),
        })
}

/// Refuses placement constraints that no host could ever meet because
/// they are malformed.
pub(crate) fn check_placement(request: &VmCreate) -> Result<()> {
    let placement = &request.placement;
    for (key, value) in &placement.require {
        if !nubis_placement::is_label_key(key) || !nubis_placement::is_label_value(value) {
            return Err(ServiceError::invalid(
                format!("placement.require.{key}"),
                "a label is a key (1 to 63 of a-z 0-9 . - / starting with a letter or digit) and a value (up to 63 of A-Z a-z 0-9 . _ -)",
            ));
        }
    }
    if let Some(anti) = &placement.anti_affinity {
        crate::validate::name("placement.anti_affinity.group", &anti.group, false)?;
    }
    if let Some(host) = &placement.host {
        host.parse::<crate::cluster::settings::HostName>()
            .map_err(|err| ServiceError::invalid("placement.host", err.to_string()))?;
    }
    Ok(())
}

/// `vm` as this host shows it: its row here if it has one (the freshest),
/// else what the cluster has.
pub fn view(svc: &Services, cluster: &Cluster, vm: &ClusterVm) -> Vm {
    match local(svc, cluster, vm) {
        Some(row) => {
            let mut shown = svc.vm_view(row);
            shown.placement = vm.record.spec.placement.clone();
            shown
        }
        None => vm.view(),
    }
}

/// `vm`'s row in this host's store, if it is placed here and defined.
fn local(svc: &Services, cluster: &Cluster, vm: &ClusterVm) -> Option<crate::store::VmRow> {
    if vm.record.host.as_deref() != Some(cluster.host_name().as_str()) {
        return None;
    }
    svc.store.get_vm(None, &vm.record.id).ok().flatten()
}

/// Why `vm`, which is not defined on this host, cannot be acted on here:
/// it is pending, or its host is away.
pub fn not_here(cluster: &Cluster, vm: &ClusterVm) -> ServiceError {
    match &vm.record.host {
        Some(host) if host != cluster.host_name().as_str() => ServiceError::Unavailable(format!(
            "VM {} is on host {host}, which cannot be reached now",
            vm.record.id
        )),
        _ => ServiceError::Conflict(format!(
            "VM {} is pending: it is not defined on a host yet (see its events)",
            vm.record.id
        )),
    }
}

/// Does `action` to a VM that no host has defined yet: starting or
/// stopping it says whether it starts once defined; anything else waits.
pub async fn act_pending(cluster: &Cluster, vm: &ClusterVm, action: Action) -> Result<Vm> {
    let elsewhere = vm
        .record
        .host
        .as_deref()
        .is_some_and(|host| host != cluster.host_name().as_str());
    let start = match action {
        Action::Start if !elsewhere => true,
        Action::Stop | Action::ForceStop if !elsewhere => false,
        _ => return Err(not_here(cluster, vm)),
    };
    let record = cluster
        .update_vm(&vm.record.id, |record| {
            record.spec.start = start;
            Ok(())
        })
        .await?;
    Ok(record.pending())
}

/// Follows the VM records for as long as the agent runs: defines here the
/// VMs placed here, reports how this host's VMs are, and at the first
/// read sweeps the VMs whose record is gone.
pub async fn follow(svc: Services, cluster: Cluster) {
    // A host's first join publishes its standalone VMs; later starts
    // sweep the VMs deleted while it was away instead.
    let marker = svc.data_dir.join(PUBLISHED_MARKER);
    let mut swept = false;
    if !marker.exists() {
        loop {
            match publish_standalone(&svc, &cluster).await {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!("cluster: cannot publish this host's VMs: {err}");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        if let Err(err) = std::fs::write(&marker, cluster.host_name().as_str()) {
            tracing::warn!("cannot write {}: {err}", marker.display());
        }
        swept = true;
    }
    // The record revisions this host failed to define, not tried again
    // until the record changes.
    let mut failed: HashSet<(String, i64)> = HashSet::new();
    let mut reported = HashMap::new();
    let mut claims_synced = ClaimsSynced::default();
    let mut absent: HashMap<String, std::time::Instant> = HashMap::new();
    let mut unowned: HashSet<String> = HashSet::new();
    let mut images_seen: HashSet<String> = HashSet::new();
    let mut moves_started = HashSet::new();
    let mut endpoints = super::endpoints::Endpoints::default();
    loop {
        let (vms, revision) = match cluster.vms().await {
            Ok(read) => read,
            Err(err) => {
                tracing::warn!("cluster: cannot read the VMs: {err}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        // At the first read, what was deleted while this host was away;
        // then what a deletion racing its placement left here.
        let grace = if swept { ORPHAN_GRACE } else { Duration::ZERO };
        sweep(&svc, &vms, &mut absent, &mut unowned, grace).await;
        fence(&svc, &cluster, &vms).await;
        resume_self_fenced(&svc, &cluster, &vms).await;
        cluster.set_restartable(
            vms.iter()
                .filter(|vm| vm.record.host.as_deref() == Some(cluster.host_name().as_str()))
                .filter(|vm| vm.record.spec.placement.on_host_loss == HostLossPolicy::Restart)
                .map(|vm| vm.record.id.clone())
                .collect(),
        );
        swept = true;
        let services = match cluster.services().await {
            Ok(services) => Some(services),
            Err(err) => {
                tracing::warn!("cluster: cannot read the services: {err}");
                None
            }
        };
        let balanced = services
            .as_deref()
            .map(super::endpoints::balanced_networks)
            .unwrap_or_default();
        // One view of the members for the pass: the flood lists and the
        // endpoints' backends agree on which hosts there are.
        let view = cluster.view();
        // The networks first: the VMs placed here need their bridges.
        if let Err(err) = super::networks::mirror(&svc, &cluster, &view, &vms, &balanced).await {
            tracing::warn!("cannot carry the cluster's networks: {err}");
        }
        let me = cluster.host_name().as_str();
        for vm in vms
            .iter()
            .filter(|vm| vm.record.host.as_deref() == Some(me))
        {
            let key = (vm.record.id.clone(), vm.revision);
            // A VM being moved away is not made here again (`moves`), nor
            // one that retires.
            if vm.record.moving.is_some()
                || vm.record.retiring.is_some()
                || failed.contains(&key)
                || matches!(svc.store.get_vm(None, &vm.record.id), Ok(Some(_)))
            {
                continue;
            }
            if let Err(err) = realize(&svc, &cluster, vm).await {
                tracing::warn!(vm = %vm.record.id, "cannot define a VM placed here: {err}");
                report_failure(&cluster, vm, &err).await;
                failed.insert(key);
            }
        }
        retire(&svc, &cluster, &vms).await;
        if let Some(services) = &services {
            super::endpoints::sync(&cluster, &view, services, &vms, &mut endpoints).await;
        }
        svc.probes.set_targets(probe_targets(&svc, &cluster, &vms));
        report(&svc, &cluster, &vms, &mut reported).await;
        super::moves::carry_out(&svc, &cluster, &vms, &mut moves_started).await;
        publish_host_local(&svc, &cluster, &mut claims_synced).await;
        if let Err(err) = images::sweep_copies(&svc, &mut images_seen).await {
            tracing::warn!("cannot sweep the copies of deleted images: {err}");
        }
        tokio::select! {
            changed = cluster.vms_changed(revision) => {
                if let Err(err) = changed {
                    tracing::warn!("cluster: the VMs watch broke: {err}");
                    tokio::time::sleep(RETRY).await;
                }
            }
            _ = tokio::time::sleep(REPORT_PERIOD) => {}
        }
    }
}

/// How long a retiring instance keeps running once no host sends it new
/// flows (each host stops at its next pass), so that the connections it
/// has finish: a load balancer's deregistration delay.
const RETIRE_DRAIN_S: u64 = 10;

/// Deletes the service instances placed here that the controller
/// retires (once their connections had [`RETIRE_DRAIN_S`] to finish),
/// then their records.
async fn retire(svc: &Services, cluster: &Cluster, vms: &[ClusterVm]) {
    let me = cluster.host_name().as_str();
    let drained = |vm: &&ClusterVm| {
        let since = vm
            .record
            .events
            .iter()
            .rev()
            .find(|event| event.kind == "retiring")
            .map_or(0, |event| event.at);
        now().saturating_sub(since) >= RETIRE_DRAIN_S
    };
    for vm in vms
        .iter()
        .filter(|vm| vm.record.host.as_deref() == Some(me) && vm.record.retiring.is_some())
        .filter(drained)
    {
        let id = &vm.record.id;
        let deleted = async {
            let _guard = svc.supervisor.lock(id).await;
            if svc.store.get_vm(None, id)?.is_some() {
                vms::delete_locked(svc, id).await?;
            }
            cluster.delete_vm(id).await?;
            Ok::<(), ServiceError>(())
        };
        match deleted.await {
            Ok(()) => tracing::info!(vm = %id, "service instance retired"),
            Err(err) => tracing::warn!(vm = %id, "cannot retire a service instance: {err}"),
        }
    }
}

/// The service instances placed here that have a probe and run, with
/// their first address.
fn probe_targets(
    svc: &Services,
    cluster: &Cluster,
    vms: &[ClusterVm],
) -> HashMap<String, super::probes::Target> {
    let me = cluster.host_name().as_str();
    vms.iter()
        .filter(|vm| vm.record.host.as_deref() == Some(me) && vm.record.retiring.is_none())
        .filter_map(|vm| {
            let probe = vm.record.instance.as_ref()?.probe.clone()?;
            let row = svc.store.get_vm(None, &vm.record.id).ok()??;
            if row.state != VmState::Running {
                return None;
            }
            let address = row
                .nics
                .first()
                .and_then(|nic| nic.address.as_deref())
                .and_then(crate::network::nic_address)?;
            Some((
                vm.record.id.clone(),
                super::probes::Target {
                    probe,
                    address,
                    pid: row.pid?,
                },
            ))
        })
        .collect()
}

/// Defines VM `vm`, placed here, in this host's store, and starts it if
/// its definition asks. Under the VM's lock, with its record read again:
/// a VM deleted meanwhile is not defined.
async fn realize(svc: &Services, cluster: &Cluster, vm: &ClusterVm) -> Result<()> {
    let id = &vm.record.id;
    let _guard = svc.supervisor.lock(id).await;
    let current = match cluster.vm(None, id).await {
        Ok(current) => current,
        Err(crate::cluster::ClusterError::NoSuchVm(_)) => return Ok(()),
        Err(err) => return Err(err.into()),
    };
    if current.record.host.as_deref() != Some(cluster.host_name().as_str())
        || svc.store.get_vm(None, id)?.is_some()
    {
        return Ok(());
    }
    let record = current.record;
    images::ensure(svc, &record.tenant_id, &record.spec.image).await?;
    vms::define_here(
        svc,
        &record.tenant_id,
        record.spec.clone(),
        Some(vms::Placed {
            id,
            nics: &record.nics,
            ssh_keys: &record.ssh_keys,
        }),
    )
    .await?;
    svc.store.set_ownership(id, record.generation)?;
    tracing::info!(vm = %id, generation = record.generation, "VM placed here defined");
    drop(_guard);
    if record.spec.start {
        if let Err(err) = vms::act(svc, Scope::Operator, id, Action::Start).await {
            tracing::warn!(vm = %id, "cannot start a VM placed here: {err}");
        }
    }
    Ok(())
}

/// Tells the cluster that VM `vm` could not be defined here: its report
/// says failed, with why.
async fn report_failure(cluster: &Cluster, vm: &ClusterVm, err: &ServiceError) {
    let mut shown = vm.record.pending();
    shown.state = VmState::Failed;
    shown.last_exit = Some(format!(
        "cannot be defined on host {}: {err}",
        cluster.host_name()
    ));
    if let Err(err) = cluster.report_vm(&shown, None).await {
        tracing::warn!(vm = %vm.record.id, "cannot report a VM: {err}");
    }
}

/// Reports each VM of this host that changed since it was last reported.
async fn report(
    svc: &Services,
    cluster: &Cluster,
    vms: &[ClusterVm],
    reported: &mut HashMap<String, (Vm, Option<nubis_api::InstanceHealth>)>,
) {
    let rows = match svc.store.list_vms(None, None) {
        Ok(rows) => rows,
        Err(err) => {
            tracing::warn!("cannot list this host's VMs: {err}");
            return;
        }
    };
    let me = cluster.host_name().as_str();
    let placed_here: HashMap<&str, &ClusterVm> = vms
        .iter()
        .filter(|vm| vm.record.host.as_deref() == Some(me))
        .map(|vm| (vm.record.id.as_str(), vm))
        .collect();
    reported.retain(|id, _| placed_here.contains_key(id.as_str()));
    for row in rows {
        let Some(vm) = placed_here.get(row.id.as_str()) else {
            continue;
        };
        let shown = (svc.vm_view(row), svc.probes.health(&vm.record.id));
        let in_etcd = vm
            .status
            .as_ref()
            .filter(|status| status.host == me)
            .map(|status| (&status.vm, status.health));
        if in_etcd == Some((&shown.0, shown.1)) && reported.get(&shown.0.id) == Some(&shown) {
            continue;
        }
        match cluster.report_vm(&shown.0, shown.1).await {
            Ok(()) => {
                reported.insert(shown.0.id.clone(), shown);
            }
            Err(err) => tracing::warn!(vm = %shown.0.id, "cannot report a VM: {err}"),
        }
    }
}

/// Defines in the cluster, as placed here, every VM this host has that
/// the cluster lacks (its standalone past).
async fn publish_standalone(svc: &Services, cluster: &Cluster) -> Result<()> {
    images::publish_standalone(svc, cluster).await?;
    publish_networks(svc, cluster).await?;
    let (vms, _) = cluster.vms().await?;
    let known: HashSet<&str> = vms.iter().map(|vm| vm.record.id.as_str()).collect();
    for row in svc.store.list_vms(None, None)? {
        if known.contains(row.id.as_str()) {
            continue;
        }
        let mut record = VmRecord {
            id: row.id.clone(),
            tenant_id: row.tenant_id.clone(),
            spec: spec_of(&row),
            host: Some(cluster.host_name().to_string()),
            created_at: row.created_at,
            nics: row.nics.clone(),
            events: Vec::new(),
            storage_mib: crate::quota::disks_mib(&svc.store, &row)?,
            moving: None,
            failed_moves: 0,
            generation: 0,
            instance: None,
            retiring: None,
            ssh_keys: row.metadata.ssh_keys.clone(),
        };
        record.record_event(
            "joined",
            format!("published by host {} as it joined", cluster.host_name()),
        );
        match cluster.define_vm(&record, None).await {
            Ok(()) => tracing::info!(vm = %row.id, "VM published to the cluster"),
            Err(crate::cluster::ClusterError::Exists(what)) => {
                tracing::warn!(vm = %row.id, "VM not published: {what} exists in the cluster")
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// In a cluster, defines VM `vm`, just made in this host's store (a
/// snapshot restored here), as placed here, within the tenant's `quota`.
pub async fn publish_here(
    svc: &Services,
    vm: &crate::store::VmRow,
    quota: &nubis_api::Quota,
) -> Result<()> {
    let Some(cluster) = &svc.cluster else {
        return Ok(());
    };
    let mut record = VmRecord {
        id: vm.id.clone(),
        tenant_id: vm.tenant_id.clone(),
        spec: spec_of(vm),
        host: Some(cluster.host_name().to_string()),
        created_at: vm.created_at,
        nics: vm.nics.clone(),
        events: Vec::new(),
        storage_mib: crate::quota::disks_mib(&svc.store, vm)?,
        moving: None,
        failed_moves: 0,
        generation: 0,
        instance: None,
        retiring: None,
        ssh_keys: vm.metadata.ssh_keys.clone(),
    };
    record.record_event(
        "created",
        format!("defined on host {}", cluster.host_name()),
    );
    cluster.define_vm(&record, Some(quota)).await?;
    Ok(())
}

/// Defines in the cluster every network this host has that the cluster
/// lacks (its standalone past, as it joins for the first time).
async fn publish_networks(svc: &Services, cluster: &Cluster) -> Result<()> {
    let known: HashSet<String> = cluster
        .networks()
        .await?
        .into_iter()
        .map(|record| record.id)
        .collect();
    for row in svc.store.list_networks(None)? {
        if known.contains(&row.id) {
            continue;
        }
        let record = NetworkRecord {
            id: row.id.clone(),
            tenant_id: row.tenant_id.clone(),
            name: row.name.clone(),
            cidr: row.cidr.clone(),
            gateway: row.gateway.clone(),
            nat: row.nat,
            dhcp: row.dhcp,
            dns: row.dns.clone(),
            mtu: row.mtu,
            vni: row.vni,
            created_at: row.created_at,
        };
        match cluster
            .define_network(&record, &crate::cluster::vms::UNLIMITED, None)
            .await
        {
            Ok(()) => tracing::info!(network = %row.id, "network published to the cluster"),
            Err(err @ (ClusterError::Exists(_) | ClusterError::Raced(_))) => {
                tracing::warn!(network = %row.id, "network not published: {err}")
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// The definition a VM of this host's store was made from.
fn spec_of(row: &crate::store::VmRow) -> VmCreate {
    let mut spec = VmCreate::new(row.name.clone(), row.image_id.clone());
    spec.vcpus = row.vcpus;
    spec.memory_mib = row.memory_mib;
    spec.kernel_args = row.kernel_args.clone();
    spec.root_rate_limit = row.root_rate_limit;
    spec.disks = row.disks.clone();
    spec.nics = row
        .nics
        .iter()
        .map(|nic| nubis_api::VmNicCreate {
            rate_limit: nic.rate_limit,
            network: nic.network.clone(),
        })
        .collect();
    spec.ssh_keys = row
        .metadata
        .ssh_keys
        .iter()
        .map(|key| key.name.clone())
        .collect();
    spec.tags = row.metadata.tags.clone();
    spec.user_data = row.metadata.user_data.clone();
    spec
}

/// How often this host's claims are checked against its resources when
/// nothing changed here (another host or an operator may have touched
/// them).
const CLAIMS_PERIOD: Duration = Duration::from_secs(60);

/// When this host's claims were last made to match its resources.
#[derive(Default)]
struct ClaimsSynced {
    /// [`Cluster::claims_ended`] and the inventory's changes then.
    claims_ended: u64,
    inventory_changes: u64,
    at: Option<std::time::Instant>,
}

/// Publishes this host's snapshots and port forwards (`inventory/`) if
/// they changed: after each change, and at every follow pass.
pub async fn publish_inventory(svc: &Services, cluster: &Cluster) -> Result<u64> {
    let mut published = cluster.published_inventory().await;
    let inventory = Inventory {
        snapshots: svc
            .store
            .list_snapshots(None)?
            .into_iter()
            .map(Into::into)
            .collect(),
        port_forwards: svc
            .store
            .list_port_forwards(None)?
            .into_iter()
            .map(Into::into)
            .collect(),
    };
    cluster.publish_inventory(&mut published, inventory).await?;
    Ok(published.changes)
}

/// In a cluster, shows a snapshot or port forward just made or deleted
/// here to the other hosts now, rather than at the next follow pass.
pub async fn announce_host_local(svc: &Services) {
    if let Some(cluster) = &svc.cluster {
        if let Err(err) = publish_inventory(svc, cluster).await {
            tracing::warn!("cannot publish this host's snapshots and port forwards: {err}");
        }
    }
}

/// Publishes this host's inventory, and makes its claims (`claims/`)
/// match its snapshots and port forwards when a claimed creation ended or
/// the inventory changed since `synced`, or every [`CLAIMS_PERIOD`].
async fn publish_host_local(svc: &Services, cluster: &Cluster, synced: &mut ClaimsSynced) {
    let changes = match publish_inventory(svc, cluster).await {
        Ok(changes) => changes,
        Err(err) => {
            tracing::warn!("cannot publish this host's snapshots and port forwards: {err}");
            return;
        }
    };
    let due = synced.at.is_none_or(|at| at.elapsed() >= CLAIMS_PERIOD);
    let ended = cluster.claims_ended();
    if !due && ended == synced.claims_ended && changes == synced.inventory_changes {
        return;
    }
    // The claims, then those in flight, then the store (`sync_claims`).
    let held = match cluster.held_claims().await {
        Ok(held) => held,
        Err(err) => {
            tracing::warn!("cannot read this host's quota claims: {err}");
            return;
        }
    };
    let in_flight = cluster.claims_in_flight();
    let (snapshots, forwards) = match (
        svc.store.list_snapshots(None),
        svc.store.list_port_forwards(None),
    ) {
        (Ok(snapshots), Ok(forwards)) => (snapshots, forwards),
        (Err(err), _) | (_, Err(err)) => {
            tracing::warn!("cannot list this host's snapshots and port forwards: {err}");
            return;
        }
    };
    let claims: Vec<LocalClaim> = snapshots
        .iter()
        .map(|snapshot| LocalClaim {
            tenant_id: snapshot.tenant_id.clone(),
            id: snapshot.id.clone(),
            claim: Claim {
                kind: ClaimKind::Snapshot,
                storage_mib: crate::quota::mib_of(snapshot.size_bytes),
            },
        })
        .chain(forwards.iter().map(|forward| LocalClaim {
            tenant_id: forward.tenant_id.clone(),
            id: forward.id.clone(),
            claim: Claim {
                kind: ClaimKind::PortForward,
                storage_mib: 0,
            },
        }))
        .collect();
    match cluster.sync_claims(&held, &in_flight, &claims).await {
        Ok(()) => {
            *synced = ClaimsSynced {
                claims_ended: ended,
                inventory_changes: changes,
                at: Some(std::time::Instant::now()),
            }
        }
        Err(err) => tracing::warn!("cannot bring this host's quota claims up to date: {err}"),
    }
}

/// What this host does with its copy of a VM, given the VM's record.
#[derive(Debug, PartialEq, Eq)]
enum Ownership {
    /// Its own, at this generation: nothing to do.
    Owned,
    /// Its own (a VM published here, or taken over by a migration the
    /// agent did not live to record): recorded at the record's generation.
    Adopt(u64),
    /// Another host holds the VM at a newer generation: this copy was
    /// replaced (its host lost, then back) and goes.
    Fence,
    /// Not this host's to judge: being received, or moving away.
    Leave,
}

/// How this host (`me`) stands to its copy of a VM held at `owned` (its
/// recorded generation, if any), given where its record puts it.
fn ownership(me: &str, owned: Option<u64>, host: Option<&str>, generation: u64) -> Ownership {
    match (owned, host) {
        (None, Some(host)) if host == me => Ownership::Adopt(generation),
        (Some(owned), Some(host)) if host == me && owned != generation => {
            Ownership::Adopt(generation)
        }
        (Some(owned), Some(host)) if host != me && generation > owned => Ownership::Fence,
        (Some(_), Some(host)) if host == me => Ownership::Owned,
        _ => Ownership::Leave,
    }
}

/// Pauses, for as long as the agent runs, this host's running VMs that the
/// cluster restarts elsewhere when it is lost, as soon as no lease
/// renewal got through for a whole TTL: the controller restarts them only
/// after two TTLs of the host being down, so the copy here is paused
/// before another starts. When the host is back they are resumed, or
/// fenced off if they were restarted elsewhere meanwhile.
pub async fn self_fence(svc: Services, cluster: Cluster) {
    let mut lapses = cluster.lapses();
    loop {
        if lapses.wait_for(|lapsed| *lapsed).await.is_err() {
            return;
        }
        for id in cluster.restartable() {
            let running = matches!(
                svc.store.get_vm(None, &id),
                Ok(Some(vm)) if vm.state == VmState::Running
            );
            if !running {
                continue;
            }
            match vms::pause_here(&svc, &id, true).await {
                Ok(()) => {
                    cluster.add_self_fenced(&id);
                    // Kept in the store: an agent restarted meanwhile
                    // still knows to resume it.
                    if let Err(err) = svc.store.add_event(
                        &id,
                        SELF_FENCED_EVENT,
                        "paused: this host lost the cluster",
                    ) {
                        tracing::warn!(vm = %id, "cannot record the self-fence: {err}");
                    }
                    tracing::warn!(vm = %id, "self-fenced: this host lost the cluster; the VM is paused until it is back (it may be restarted elsewhere)");
                }
                Err(err) => {
                    tracing::warn!(vm = %id, "cannot pause the VM to fence this host: {err}")
                }
            }
        }
        if lapses.wait_for(|lapsed| !*lapsed).await.is_err() {
            return;
        }
    }
}

/// Resumes the VMs this host paused when it lapsed, once it is back and
/// the VM is still its own: the record is touched first, conditioned on
/// the generation this host holds, so a controller restarting it
/// elsewhere meanwhile either fails (record changed) or wins (then the
/// copy here is fenced off, not resumed).
async fn resume_self_fenced(svc: &Services, cluster: &Cluster, vms: &[ClusterVm]) {
    if *cluster.lapses().borrow() {
        return;
    }
    let me = cluster.host_name().to_string();
    for id in cluster.take_self_fenced() {
        let Some(vm) = vms.iter().find(|vm| vm.record.id == id) else {
            continue;
        };
        let owned = match svc.store.ownership(&id) {
            Ok(Some(owned)) => owned,
            _ => continue,
        };
        let kept = cluster
            .update_vm(&id, |record| {
                if record.host.as_deref() != Some(me.as_str()) || record.generation != owned {
                    return Err(ClusterError::Raced(format!("VM {}", record.id)));
                }
                record.record_event(
                    "resumed",
                    format!("host {me} is back: the VM resumes there"),
                );
                Ok(())
            })
            .await;
        match kept {
            Ok(_) => match vms::pause_here(svc, &id, false).await {
                Ok(()) => tracing::info!(vm = %id, "self-fence lifted: the VM resumes"),
                Err(err) => tracing::warn!(vm = %id, "cannot resume the VM: {err}"),
            },
            Err(ClusterError::Raced(_)) => {
                tracing::warn!(vm = %id, host = ?vm.record.host, "not resumed: restarted elsewhere; fenced off at the next pass")
            }
            Err(err) => {
                tracing::warn!(vm = %id, "not resumed yet: {err}");
                cluster.add_self_fenced(&id);
            }
        }
    }
}

/// [`fence`] with the VM records read now.
/// At the agent's start, also finds the VMs it paused to fence itself
/// before it was restarted: the follow pass resumes them (or they were
/// fenced off here).
pub async fn fence_now(svc: &Services, cluster: &Cluster) -> Result<()> {
    let (vms, _) = cluster.vms().await?;
    fence(svc, cluster, &vms).await;
    for vm in svc.store.list_vms(None, None)? {
        let fenced = vm.state == VmState::Paused
            && svc
                .store
                .events(&vm.id)?
                .last()
                .is_some_and(|event| event.kind == SELF_FENCED_EVENT);
        if fenced {
            cluster.add_self_fenced(&vm.id);
        }
    }
    Ok(())
}

/// The event of a VM this host paused because it lost the cluster.
const SELF_FENCED_EVENT: &str = "self-fenced";

/// Fences off this host's copies of VMs that another host took over at a
/// newer generation (this host was lost and replaced, then came back):
/// stopped at once and deleted here, before anything else is done with
/// them. Records the generation of the VMs this host owns.
async fn fence(svc: &Services, cluster: &Cluster, vms: &[ClusterVm]) {
    let me = cluster.host_name().as_str();
    for vm in vms {
        let id = &vm.record.id;
        let owned = match svc.store.get_vm(None, id) {
            Ok(Some(_)) => match svc.store.ownership(id) {
                Ok(owned) => owned,
                Err(err) => {
                    tracing::warn!(vm = %id, "cannot read the VM's ownership: {err}");
                    continue;
                }
            },
            Ok(None) => continue,
            Err(err) => {
                tracing::warn!(vm = %id, "cannot read the VM: {err}");
                continue;
            }
        };
        let record = &vm.record;
        match ownership(me, owned, record.host.as_deref(), record.generation) {
            Ownership::Adopt(generation) => {
                if let Err(err) = svc.store.set_ownership(id, generation) {
                    tracing::warn!(vm = %id, "cannot record the VM's ownership: {err}");
                }
            }
            Ownership::Fence => {
                tracing::warn!(
                    vm = %id,
                    host = record.host.as_deref().unwrap_or_default(),
                    generation = record.generation,
                    "fenced: the VM was taken over by another host while this one was lost; its copy here goes"
                );
                match vms::delete_here(svc, id).await {
                    Ok(()) | Err(ServiceError::NotFound { .. }) => {}
                    Err(err) => tracing::warn!(vm = %id, "cannot fence the VM off: {err}"),
                }
            }
            Ownership::Owned | Ownership::Leave => {}
        }
    }
}

/// Deletes the VMs this host held as the cluster's whose record is gone
/// (deleted through another host while this one was away, or while this
/// host defined it as placed here), once missing for `grace`; says once
/// of each VM it never held as the cluster's (`unowned`) that it keeps it.
async fn sweep(
    svc: &Services,
    vms: &[ClusterVm],
    absent: &mut HashMap<String, std::time::Instant>,
    unowned: &mut HashSet<String>,
    grace: Duration,
) {
    let known: HashSet<&str> = vms.iter().map(|vm| vm.record.id.as_str()).collect();
    let rows = match svc.store.list_vms(None, None) {
        Ok(rows) => rows,
        Err(err) => {
            tracing::warn!("cannot list this host's VMs: {err}");
            return;
        }
    };
    // Only VMs this host held as the cluster's (an ownership recorded): a
    // VM of its standalone past that could not be published (its name
    // taken in the cluster) is the operator's to deal with, never deleted.
    let mut missing = HashSet::new();
    for row in rows.iter().filter(|row| !known.contains(row.id.as_str())) {
        match svc.store.ownership(&row.id) {
            Ok(Some(_)) => {
                missing.insert(row.id.clone());
            }
            Ok(None) => {
                if unowned.insert(row.id.clone()) {
                    tracing::warn!(vm = %row.id, name = %row.name, "VM not in the cluster and never the cluster's (not published?): kept here");
                }
            }
            Err(err) => tracing::warn!(vm = %row.id, "cannot read the VM's ownership: {err}"),
        }
    }
    absent.retain(|id, _| missing.contains(id));
    let now = std::time::Instant::now();
    for id in missing {
        // A VM made here a moment before its record (a restore) is not
        // swept: only one missing for `grace`.
        let since = *absent.entry(id.clone()).or_insert(now);
        if since.elapsed() < grace {
            continue;
        }
        tracing::info!(vm = %id, "VM no longer in the cluster (deleted while this host was away, or while it was placed here): deleting it here");
        match vms::delete_here(svc, &id).await {
            Ok(()) => {
                absent.remove(&id);
            }
            Err(err) => {
                tracing::warn!(vm = %id, "cannot delete a VM the cluster no longer has: {err}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ownership, Ownership};

    #[test]
    fn a_copy_replaced_at_a_newer_generation_is_fenced_off() {
        // Owned here at 2; another host took it over at 3.
        assert_eq!(ownership("a", Some(2), Some("b"), 3), Ownership::Fence);
        // Moving away (a migration under way): still generation 2.
        assert_eq!(ownership("a", Some(2), Some("b"), 2), Ownership::Leave);
        // Being received from b: not owned here yet.
        assert_eq!(ownership("a", None, Some("b"), 5), Ownership::Leave);
        // Handed over to this host: owned at the record's generation.
        assert_eq!(ownership("a", None, Some("a"), 6), Ownership::Adopt(6));
        assert_eq!(ownership("a", Some(5), Some("a"), 6), Ownership::Adopt(6));
        assert_eq!(ownership("a", Some(6), Some("a"), 6), Ownership::Owned);
        // Pending again (no host): not this host's to judge.
        assert_eq!(ownership("a", Some(6), None, 7), Ownership::Leave);
    }
}
