//! A tenant's microVMs: checking a definition, assigning its NICs' MACs and
//! addresses (this host's IPAM, or the overlay network's home host), the
//! storage quota and the host's reserve, recording it, and its lifecycle.
//! A VM whose NICs' rules the host refused is not kept (it would run
//! unguarded), and addresses a home host granted for a VM that was not
//! made go back to it.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use nubis_api::vm::MAX_VM_SSH_KEYS;
use nubis_api::vm::{DEFAULT_EXEC_TIMEOUT_S, MAX_EXEC_COMMAND, MAX_EXEC_TIMEOUT_S};
use nubis_api::{
    Image, NamedSshKey, Quota, RateLimit, Vm, VmCreate, VmEvent, VmExec, VmMetadata, VmNic, VmState,
};

use super::{images, networks, placed, Result, Scope, ServiceError, Services};
use crate::network;
use crate::network::nic_address;
use crate::store::{NetworkRow, NewVm, VmRow};
use crate::supervisor::guest_agent::ExecStream;
use crate::validate;

impl From<VmRow> for Vm {
    fn from(row: VmRow) -> Self {
        Vm {
            id: row.id,
            tenant_id: row.tenant_id,
            name: row.name,
            image_id: row.image_id,
            state: row.state,
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            kernel_args: row.kernel_args,
            root_rate_limit: row.root_rate_limit,
            disks: row.disks,
            nics: row.nics,
            pid: row.pid,
            last_exit: row.last_exit,
            restore_from: row.restore_from,
            created_at: row.created_at,
            host: None,
            placement: Default::default(),
            ssh_keys: row
                .metadata
                .ssh_keys
                .iter()
                .map(|key| key.name.clone())
                .collect(),
            tags: row.metadata.tags,
            user_data_bytes: row
                .metadata
                .user_data
                .as_deref()
                .map(crate::metadata::inputs::decoded_len),
        }
    }
}

/// A VM as its source host gives it (an incoming migration).
impl From<Vm> for VmRow {
    fn from(vm: Vm) -> Self {
        VmRow {
            id: vm.id,
            tenant_id: vm.tenant_id,
            name: vm.name,
            image_id: vm.image_id,
            state: vm.state,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel_args: vm.kernel_args,
            root_rate_limit: vm.root_rate_limit,
            disks: vm.disks,
            nics: vm.nics,
            pid: vm.pid,
            last_exit: vm.last_exit,
            restore_from: vm.restore_from,
            restore_as_clone: false,
            created_at: vm.created_at,
            // Carried beside the VM (`IncomingMigration::metadata`).
            metadata: VmMetadata::default(),
        }
    }
}

/// Largest vCPU count and memory a VM may ask for here (the VMM checks
/// against the host again).
const MAX_VCPUS: u32 = 254;
const MIN_MEMORY_MIB: u64 = 32;
const MAX_DATA_DISKS: usize = 8;
const MAX_DISK_MIB: u64 = 1 << 24;
const MAX_NICS: usize = 4;

fn check_rate(field: &str, limit: &RateLimit) -> Result<()> {
    if limit.bytes_per_s == Some(0) || limit.ops_per_s == Some(0) {
        return Err(ServiceError::invalid(
            field,
            "a rate of 0 would stop the device: leave it out",
        ));
    }
    Ok(())
}

pub(crate) fn check(request: &VmCreate) -> Result<()> {
    validate::name("name", &request.name, false)?;
    validate::kernel_args("kernel_args", &request.kernel_args)?;
    if !(1..=MAX_VCPUS).contains(&request.vcpus) {
        return Err(ServiceError::invalid(
            "vcpus",
            format!("must be 1 to {MAX_VCPUS}"),
        ));
    }
    if request.memory_mib < MIN_MEMORY_MIB {
        return Err(ServiceError::invalid(
            "memory_mib",
            format!("must be at least {MIN_MEMORY_MIB}"),
        ));
    }
    if request.disks.len() > MAX_DATA_DISKS {
        return Err(ServiceError::invalid(
            "disks",
            format!("at most {MAX_DATA_DISKS} data disks"),
        ));
    }
    check_rate("root_rate_limit", &request.root_rate_limit)?;
    for (index, disk) in request.disks.iter().enumerate() {
        if !(1..=MAX_DISK_MIB).contains(&disk.size_mib) {
            return Err(ServiceError::invalid(
                format!("disks[{index}].size_mib"),
                format!("must be 1 to {MAX_DISK_MIB}"),
            ));
        }
        check_rate(&format!("disks[{index}].rate_limit"), &disk.rate_limit)?;
    }
    if request.nics.len() > MAX_NICS {
        return Err(ServiceError::invalid(
            "nics",
            format!("at most {MAX_NICS} NICs"),
        ));
    }
    for (index, nic) in request.nics.iter().enumerate() {
        check_rate(&format!("nics[{index}].rate_limit"), &nic.rate_limit)?;
    }
    if request.ssh_keys.len() > MAX_VM_SSH_KEYS {
        return Err(ServiceError::invalid(
            "ssh_keys",
            format!("at most {MAX_VM_SSH_KEYS} SSH keys"),
        ));
    }
    crate::metadata::inputs::tags(&request.tags)?;
    if let Some(user_data) = &request.user_data {
        crate::metadata::inputs::user_data(user_data)?;
    }
    Ok(())
}

/// A VM the cluster placed on this host: its id, and what the cluster
/// assigned and kept for it when it was defined.
pub(crate) struct Placed<'a> {
    pub id: &'a str,
    /// MACs and addresses on the cluster's networks.
    pub nics: &'a [VmNic],
    /// Its SSH keys as they were at its creation.
    pub ssh_keys: &'a [NamedSshKey],
}

/// Defines `request` for `tenant_id`, and starts it if it asks to be
/// started. In a cluster the definition goes to etcd, for the controller
/// to place (`placed.rs`): the VM is pending until its host defines it.
pub async fn create(svc: &Services, tenant_id: &str, request: VmCreate) -> Result<Vm> {
    check(&request)?;
    if let Some(cluster) = &svc.cluster {
        return super::placed::define(svc, cluster, tenant_id, request).await;
    }
    if !request.placement.is_empty() {
        return Err(ServiceError::unprocessable(
            "placement",
            "placement constraints need a cluster: this host is standalone",
        ));
    }
    svc.refuse_if_cordoned().await?;
    let start = request.start;
    let vm = define_here(svc, tenant_id, request, None).await?;
    if start {
        return act(svc, Scope::Tenant(tenant_id), &vm.id, Action::Start).await;
    }
    Ok(svc.vm_view(vm))
}

/// Defines `request` for `tenant_id` on this host, not started; `placed`
/// is a VM the cluster placed here.
pub(crate) async fn define_here(
    svc: &Services,
    tenant_id: &str,
    request: VmCreate,
    placed: Option<Placed<'_>>,
) -> Result<VmRow> {
    let id = placed.as_ref().map(|placed| placed.id);
    check(&request)?;
    let ssh_keys = match &placed {
        Some(placed) => placed.ssh_keys.to_vec(),
        None => super::ssh_keys::resolve(svc, tenant_id, &request.ssh_keys).await?,
    };
    let _hold = svc.hold_tenant(tenant_id).await?;
    // The NICs as the agent will record them: MAC, address and tap are
    // assigned here, never taken from the request.
    let mut nics: Vec<VmNic> = request
        .nics
        .iter()
        .map(|nic| VmNic {
            rate_limit: nic.rate_limit,
            network: nic.network.clone(),
            ..VmNic::default()
        })
        .collect();
    if let Some(placed) = &placed {
        for (nic, given) in nics.iter_mut().zip(placed.nics) {
            if given.address.is_some() {
                nic.network = given.network.clone();
                nic.address = given.address.clone();
                nic.mac = given.mac.clone();
            }
        }
    }
    let image = images::get_here(svc, Scope::Tenant(tenant_id), &request.image).map_err(|_| {
        ServiceError::unprocessable("image", format!("no image '{}'", request.image))
    })?;
    let tenant = svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::Unauthorized("the token's tenant is gone".to_string()))?;
    // NICs on overlay networks homed on another host get their address
    // from that host (no lock held while asking: the home takes its own).
    let mut remote_grants = Vec::new();
    for (index, nic) in nics.iter_mut().enumerate() {
        let Some(wanted) = &nic.network else { continue };
        if nic.address.is_some() {
            // Assigned by the cluster.
            continue;
        }
        let net = nic_network(svc, tenant_id, index, wanted)?;
        if let Some(home) = networks::remote_home(svc, &net)? {
            let granted = networks::remote_address(svc, &home, &net, &request.name).await;
            let address = match granted {
                Ok(address) => address,
                Err(err) => {
                    networks::release_remote_addresses(svc, &remote_grants).await;
                    return Err(err);
                }
            };
            if let Some(parsed) = nic_address(&address) {
                remote_grants.push((net.clone(), parsed));
            }
            nic.network = Some(net.id);
            nic.address = Some(address);
            nic.mac = Some(network::random_mac()?.to_string());
            nic.tap = None;
        }
    }
    let metadata = VmMetadata {
        tags: request.tags.clone(),
        ssh_keys,
        user_data: request.user_data.clone(),
    };
    let created = create_locked(
        svc,
        request,
        Defined {
            nics,
            metadata,
            tenant_id,
            image: &image,
            quota: tenant.quota,
            id,
        },
    )
    .await;
    if created.is_err() {
        networks::release_remote_addresses(svc, &remote_grants).await;
    }
    created
}

/// The tenant's network that NIC `index` names.
fn nic_network(svc: &Services, tenant_id: &str, index: usize, wanted: &str) -> Result<NetworkRow> {
    svc.store
        .get_network(Some(tenant_id), wanted)?
        .ok_or_else(|| {
            ServiceError::unprocessable(
                format!("nics[{index}].network"),
                format!("no network '{wanted}'"),
            )
        })
}

/// What a VM's definition adds to its request.
struct Defined<'a> {
    nics: Vec<VmNic>,
    metadata: VmMetadata,
    tenant_id: &'a str,
    image: &'a Image,
    quota: Quota,
    /// Its id when the cluster gave it one.
    id: Option<&'a str>,
}

/// Assigns this host's addresses and MACs, and records the VM.
async fn create_locked(svc: &Services, request: VmCreate, defined: Defined<'_>) -> Result<VmRow> {
    let Defined {
        mut nics,
        metadata,
        tenant_id,
        image,
        quota,
        id,
    } = defined;
    // Addresses and MACs are assigned under one lock, so that concurrent
    // creations never hand out the same address.
    let network_lock = svc.host_network.lock().await;
    // Disk space: the root disk (the image's size) and the data disks at
    // their full size, as a cloud bills them.
    let asked_mib = crate::quota::mib_of(image.rootfs_bytes)
        + request.disks.iter().map(|disk| disk.size_mib).sum::<u64>();
    crate::quota::check_storage(&svc.store, &svc.data_dir, tenant_id, &quota, asked_mib)?;
    let reserve = svc.supervisor.config().reserved_disk_mib;
    crate::quota::check_host_space(&svc.data_dir, reserve, asked_mib)?;
    if !nics.is_empty() {
        assign_addresses(svc, tenant_id, &mut nics)?;
    }
    let new = NewVm {
        tenant_id: tenant_id.to_string(),
        name: request.name,
        image_id: image.id.clone(),
        vcpus: request.vcpus,
        memory_mib: request.memory_mib,
        kernel_args: request.kernel_args,
        root_rate_limit: request.root_rate_limit,
        disks: request.disks,
        nics,
        restore_from: None,
        restore_as_clone: false,
        metadata,
    };
    let vm = match id {
        Some(id) => svc.store.create_vm_with_id(id, &new, quota)?,
        None => svc.store.create_vm(&new, quota)?,
    };
    svc.store.add_event(&vm.id, "created", "VM defined")?;
    drop(network_lock);
    if !vm.nics.is_empty() {
        // The anti-spoofing rules of its NICs exist before its taps do; a
        // VM whose rules the host refused is not kept, to run unguarded.
        if let Err(err) = svc.host_network.reconcile().await {
            svc.store.delete_vm(&vm.id)?;
            return Err(err.into());
        }
    }
    tracing::info!(vm = %vm.id, tenant = %vm.tenant_id, "VM created");
    Ok(vm)
}

/// Gives each NIC without an address (one not granted by its network's
/// home host) a free address of its network, or of the tenant's default
/// bridge, and a MAC. The caller holds the network lock.
pub(crate) fn assign_addresses(svc: &Services, tenant_id: &str, nics: &mut [VmNic]) -> Result<()> {
    let vms = svc.store.list_vms(Some(tenant_id), None)?;
    // Addresses in use, across the tenant's VMs and this request.
    let mut used: HashSet<Ipv4Addr> = vms
        .iter()
        .flat_map(|vm| vm.nics.iter())
        .filter_map(|nic| nic.address.as_deref().and_then(nic_address))
        .collect();
    let exhausted = |what: &str| ServiceError::Exhausted(format!("no free address left in {what}"));
    for (index, nic) in nics.iter_mut().enumerate() {
        if nic.address.is_some() {
            // Granted by the network's home host (see `create`).
            continue;
        }
        let (address, prefix) = match &nic.network {
            Some(wanted) => {
                let net = nic_network(svc, tenant_id, index, wanted)?;
                // Those the home granted to other hosts' VMs too.
                used.extend(networks::used_addresses(svc, &net)?);
                let cidr = networks::stored_cidr(&net)?;
                nic.network = Some(net.id);
                let address = cidr.allocate(&used).ok_or_else(|| exhausted(&net.cidr))?;
                (address, cidr.prefix())
            }
            None => {
                let subnet = svc.store.tenant_subnet(tenant_id)?;
                let hosts = used
                    .iter()
                    .filter(|address| address.octets()[..3] == [10, 88, subnet])
                    .map(|address| address.octets()[3])
                    .collect();
                let host = network::free_host(&hosts, subnet)
                    .map_err(|_| exhausted(&format!("10.88.{subnet}.0/24")))?;
                (Ipv4Addr::new(10, 88, subnet, host), 24)
            }
        };
        used.insert(address);
        nic.address = Some(format!("{address}/{prefix}"));
        nic.mac = Some(network::random_mac()?.to_string());
        nic.tap = None;
    }
    Ok(())
}

/// The VMs `scope` sees, in `wanted` state and named `name` if given: in
/// a cluster, every host's.
pub async fn list(
    svc: &Services,
    scope: Scope<'_>,
    wanted: Option<VmState>,
    name: Option<&str>,
) -> Result<Vec<Vm>> {
    let mut vms: Vec<Vm> = match &svc.cluster {
        Some(cluster) => cluster
            .vms()
            .await?
            .0
            .iter()
            .filter(|vm| {
                scope
                    .tenant()
                    .is_none_or(|tenant| vm.record.tenant_id == tenant)
            })
            .map(|vm| placed::view(svc, cluster, vm))
            .collect(),
        None => svc
            .store
            .list_vms(scope.tenant(), None)?
            .into_iter()
            .map(Vm::from)
            .collect(),
    };
    vms.retain(|vm| wanted.is_none_or(|state| vm.state == state));
    if let Some(name) = name {
        vms.retain(|vm| vm.name == name);
    }
    Ok(vms)
}

/// VM `id` (id or name; any tenant's, by id, for the operator).
pub async fn get(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Vm> {
    match &svc.cluster {
        Some(cluster) => {
            let vm = cluster.vm(scope.tenant(), id).await?;
            Ok(placed::view(svc, cluster, &vm))
        }
        None => find(svc, scope, id).map(Vm::from),
    }
}

/// In a cluster: VM `id` as the cluster has it, and whether this host
/// has it defined (else its requests cannot be served here).
async fn in_cluster(
    svc: &Services,
    scope: Scope<'_>,
    id: &str,
) -> Result<Option<(crate::cluster::vms::ClusterVm, bool)>> {
    let Some(cluster) = &svc.cluster else {
        return Ok(None);
    };
    let vm = cluster.vm(scope.tenant(), id).await?;
    let here = svc.store.get_vm(None, &vm.record.id)?.is_some();
    Ok(Some((vm, here)))
}

/// The stored VM `id` (id or name), as [`get`] finds it.
pub(crate) fn find(svc: &Services, scope: Scope<'_>, id: &str) -> Result<VmRow> {
    svc.store
        .get_vm(scope.tenant(), id)?
        .ok_or_else(|| ServiceError::not_found("VM", id))
}

/// What can be done to a VM that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    /// Ctrl-Alt-Del, forced after the agent's timeout.
    Stop,
    ForceStop,
    Reboot,
    Pause,
    Resume,
}

/// Does `action` to VM `id` under its lock, with a fresh copy of it, and
/// returns the VM as it is afterwards.
pub async fn act(svc: &Services, scope: Scope<'_>, id: &str, action: Action) -> Result<Vm> {
    if let (Some(cluster), Some((vm, false))) = (&svc.cluster, in_cluster(svc, scope, id).await?) {
        return placed::act_pending(cluster, &vm, action).await;
    }
    let vm = find(svc, scope, id)?;
    let _guard = svc.supervisor.lock(&vm.id).await;
    let vm = find(svc, scope, &vm.id)?;
    match action {
        Action::Start => {
            let image = images::usable_image(svc, &vm)?;
            svc.supervisor.start(&vm, &image).await?;
        }
        Action::Stop => svc.supervisor.stop(&vm, false).await?,
        Action::ForceStop => svc.supervisor.stop(&vm, true).await?,
        Action::Reboot => {
            svc.supervisor.stop(&vm, false).await?;
            let image = images::usable_image(svc, &vm)?;
            let stopped = find(svc, Scope::Operator, &vm.id)?;
            svc.supervisor.start(&stopped, &image).await?;
        }
        Action::Pause => svc.supervisor.pause(&vm, true).await?,
        Action::Resume => svc.supervisor.pause(&vm, false).await?,
    }
    get(svc, scope, &vm.id).await
}

/// Deletes VM `id`, stopping it at once first if it runs; its NICs'
/// rules, port forwards and overlay addresses go with it. In a cluster its
/// record goes too (a VM whose host is away is deleted there when that
/// host comes back).
pub async fn delete(svc: &Services, scope: Scope<'_>, id: &str) -> Result<()> {
    let Some(cluster) = &svc.cluster else {
        let vm = find(svc, scope, id)?;
        return delete_here(svc, &vm.id).await;
    };
    let vm = cluster.vm(scope.tenant(), id).await?;
    let id = &vm.record.id;
    {
        // The lock orders this with the VM's definition here (`placed`).
        let _guard = svc.supervisor.lock(id).await;
        if svc.store.get_vm(None, id)?.is_some() {
            delete_locked(svc, id).await?;
        }
        cluster.delete_vm(id).await?;
    }
    tracing::info!(vm = %id, "VM deleted from the cluster");
    Ok(())
}

/// Pauses (or resumes) VM `id` of this host's store, without asking the
/// cluster: what a host that lost the cluster does to fence itself.
pub(crate) async fn pause_here(svc: &Services, id: &str, paused: bool) -> Result<()> {
    let _guard = svc.supervisor.lock(id).await;
    let vm = find(svc, Scope::Operator, id)?;
    svc.supervisor.pause(&vm, paused).await?;
    Ok(())
}

/// Deletes VM `id` of this host's store (see [`delete`]).
pub(crate) async fn delete_here(svc: &Services, id: &str) -> Result<()> {
    let _guard = svc.supervisor.lock(id).await;
    delete_locked(svc, id).await
}

/// [`delete_here`], under the VM's lock.
pub(crate) async fn delete_locked(svc: &Services, id: &str) -> Result<()> {
    let vm = find(svc, Scope::Operator, id)?;
    if vm.state.has_process() {
        svc.supervisor.stop(&vm, true).await?;
    }
    svc.supervisor.remove_files(&vm)?;
    svc.store.delete_vm(&vm.id)?;
    if !vm.nics.is_empty() {
        svc.host_network.reconcile().await?;
        networks::release_remote_addresses(svc, &overlay_nics(svc, &vm)?).await;
    }
    tracing::info!(vm = %vm.id, "VM deleted");
    Ok(())
}

/// `vm`'s NICs on overlay networks, with their addresses.
fn overlay_nics(svc: &Services, vm: &VmRow) -> Result<Vec<(NetworkRow, Ipv4Addr)>> {
    let mut nics = Vec::new();
    for nic in &vm.nics {
        let (Some(id), Some(address)) =
            (&nic.network, nic.address.as_deref().and_then(nic_address))
        else {
            continue;
        };
        if let Some(net) = svc.store.get_network(None, id)? {
            if net.overlay.is_some() {
                nics.push((net, address));
            }
        }
    }
    Ok(nics)
}

/// VM `id`'s event log.
/// In a cluster, the cluster's events (placement) come first.
pub async fn events(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Vec<VmEvent>> {
    let mut events = Vec::new();
    let id = match in_cluster(svc, scope, id).await? {
        Some((vm, here)) => {
            events.extend(vm.record.events.iter().cloned());
            if !here {
                return Ok(events);
            }
            vm.record.id
        }
        None => find(svc, scope, id)?.id,
    };
    events.extend(svc.store.events(&id)?);
    events.sort_by_key(|event| event.at);
    Ok(events)
}

/// VM `id` and the path of its serial console log.
pub async fn console(svc: &Services, scope: Scope<'_>, id: &str) -> Result<(Vm, PathBuf)> {
    if let (Some(cluster), Some((vm, false))) = (&svc.cluster, in_cluster(svc, scope, id).await?) {
        return Err(placed::not_here(cluster, &vm));
    }
    let vm = find(svc, scope, id)?;
    let path = svc.supervisor.console_path(&vm.id);
    Ok((vm.into(), path))
}

/// The guest agent of VM `id` (running, on this host) runs `request`'s
/// command: its output as the guest sends it, and how long to wait for it.
pub async fn exec(
    svc: &Services,
    scope: Scope<'_>,
    id: &str,
    request: &VmExec,
) -> Result<(ExecStream, std::time::Duration)> {
    if request.command.is_empty()
        || request.command.chars().count() > MAX_EXEC_COMMAND
        || request.command.contains('\0')
    {
        return Err(ServiceError::invalid(
            "command",
            format!("a command is 1 to {MAX_EXEC_COMMAND} characters without NUL"),
        ));
    }
    let timeout_s = request.timeout_s.unwrap_or(DEFAULT_EXEC_TIMEOUT_S);
    if !(1..=MAX_EXEC_TIMEOUT_S).contains(&timeout_s) {
        return Err(ServiceError::invalid(
            "timeout_s",
            format!("timeout_s is 1 to {MAX_EXEC_TIMEOUT_S} seconds, got {timeout_s}"),
        ));
    }
    if let (Some(cluster), Some((vm, false))) = (&svc.cluster, in_cluster(svc, scope, id).await?) {
        return Err(placed::not_here(cluster, &vm));
    }
    let vm = find(svc, scope, id)?;
    if vm.state != VmState::Running {
        return Err(ServiceError::Conflict(format!(
            "VM {} is {}: only a running VM runs commands",
            vm.id,
            vm.state.as_str()
        )));
    }
    let stream = svc
        .supervisor
        .guest_agent(&vm.id)
        .exec(&request.command)
        .await
        .map_err(|err| ServiceError::PeerAnswer(format!("VM {}: {err}", vm.id)))?;
    Ok((stream, std::time::Duration::from_secs(u64::from(timeout_s))))
}

/// Whether VM `id` has a VMM process (its console may still grow).
pub fn has_process(svc: &Services, id: &str) -> bool {
    matches!(svc.store.get_vm(None, id), Ok(Some(vm)) if vm.state.has_process())
}
