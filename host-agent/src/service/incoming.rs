//! Live migration, the destination's side: a peer host (the source, see
//! `service::migrations`) asks this host to receive one of its VMs. This
//! host records the VM, starts a VMM that waits for the stream on a port
//! of its migration range with a one-time token and key, and later is
//! told that the VM is its own now (`done`) or to drop it (`abort`).
//!
//! Why so careful with what a peer sends: the VM definition reaches
//! command lines, rules and paths here, so it is checked as a tenant's
//! would be; and a peer sees and finishes only the VMs it sent itself.

use std::net::Ipv4Addr;

use nubis_api::{ApiError, IncomingMigration, IncomingReady, Vm, VmState};

use super::{Result, ServiceError, Services};
use crate::ipv4::Cidr;
use crate::network::nic_address;
use crate::store::VmRow;
use crate::supervisor::migration as handover;
use crate::validate;

/// A free TCP port on `address` in the host's migration port range (the
/// VMM binds it right after): never one a tenant's port forward may take.
fn free_port(address: Ipv4Addr, range: crate::config::PortRange) -> Result<u16> {
    let span = u32::from(range.high - range.low) + 1;
    let start = crate::store::random_hex(4)
        .ok()
        .and_then(|hex| u32::from_str_radix(&hex, 16).ok())
        .unwrap_or_default()
        % span;
    (0..span)
        .filter_map(|step| u16::try_from(u32::from(range.low) + (start + step) % span).ok())
        .find(|port| std::net::TcpListener::bind((address, *port)).is_ok())
        .ok_or_else(|| {
            ServiceError::Internal(format!(
                "no free port on {address} in the migration range {range}"
            ))
        })
}

/// A VM definition a peer sent: every value that reaches a command line, a
/// rule or a path is checked as if a tenant had sent it. NICs keep their
/// MAC and address (a migrating VM keeps its identity), but only a unicast
/// MAC and an address inside the NIC's own network are taken.
fn check_incoming_vm(svc: &Services, vm: &Vm) -> Result<()> {
    validate::name("vm.name", &vm.name, false)?;
    validate::id("vm.id", &vm.id, "vm")?;
    validate::kernel_args("vm.kernel_args", &vm.kernel_args)?;
    for (index, nic) in vm.nics.iter().enumerate() {
        let field = |name: &str| format!("vm.nics[{index}].{name}");
        let mac = nic.mac.as_deref().unwrap_or_default();
        crate::network::MacAddr::parse_unicast(mac)
            .map_err(|err| ApiError::invalid(&field("mac"), err.to_string()))?;
        let address = nic
            .address
            .as_deref()
            .and_then(nic_address)
            .ok_or_else(|| ApiError::invalid(&field("address"), "an IPv4 address is needed"))?;
        let inside = match &nic.network {
            Some(id) => svc
                .store
                .get_network(None, id)?
                .and_then(|net| net.cidr.parse::<Cidr>().ok())
                .is_some_and(|cidr| {
                    cidr.contains(address)
                        && address != cidr.gateway()
                        && address != cidr.base()
                        && address != cidr.broadcast_address()
                }),
            None => false,
        };
        if !inside {
            return Err(ApiError::invalid(
                &field("address"),
                format!("{address} is not a NIC address of the NIC's network"),
            )
            .into());
        }
    }
    Ok(())
}

/// Prepares to receive `request.vm` from its source: records it (in the
/// tenant's quota here) and starts a VMM that waits on `local`, this
/// host's underlay address. The caller has checked that the calling peer
/// is `request.source`.
pub async fn receive(
    svc: &Services,
    local: Ipv4Addr,
    request: &IncomingMigration,
) -> Result<IncomingReady> {
    let vm = &request.vm;
    check_incoming_vm(svc, vm)?;
    svc.refuse_if_cordoned().await?;
    let _hold = svc.hold_tenant(&vm.tenant_id).await?;
    let conflict = ServiceError::Conflict;
    if let Some(known) = svc.store.get_vm(None, &vm.id)? {
        // What a migration that failed while this agent was down left: a
        // VM that never ran here. A new attempt replaces it.
        let leftover = !known.state.has_process() && svc.supervisor.never_ran_here(&known.id)?;
        if !leftover {
            return Err(conflict(format!("VM {} exists here", vm.id)));
        }
        svc.supervisor.remove_files(&known)?;
        svc.store.delete_vm(&known.id)?;
    }
    let tenant = &request.tenant;
    match svc.store.get_tenant(&tenant.id)? {
        Some(known) if known.name != tenant.name => {
            return Err(conflict(format!(
                "tenant {} is '{}' here, not '{}'",
                tenant.id, known.name, tenant.name
            )))
        }
        Some(_) => {}
        None => svc.store.create_tenant_with_id(&tenant.clone().into())?,
    }
    // In a cluster the image is the cluster's, by id: fetched if this host
    // lacks it.
    let wanted_image = if svc.cluster.is_some() {
        super::images::ensure(svc, &tenant.id, &request.image.id).await?;
        &request.image.id
    } else {
        &request.image.name
    };
    let image = svc
        .store
        .get_image(&tenant.id, wanted_image)?
        .ok_or_else(|| {
            conflict(format!(
                "the tenant has no image '{}' on this host: register it here first",
                request.image.name
            ))
        })?;
    for (index, nic) in vm.nics.iter().enumerate() {
        let carried = match &nic.network {
            Some(id) => svc
                .store
                .get_network(None, id)?
                .and_then(|net| net.overlay)
                .is_some_and(|overlay| overlay.hosts.contains(&local.to_string())),
            None => false,
        };
        if !carried {
            return Err(conflict(format!(
                "NIC {index} is on {}, which this host does not carry",
                nic.network
                    .as_deref()
                    .unwrap_or("the tenant's default bridge")
            )));
        }
    }
    let quota = svc
        .store
        .get_tenant(&tenant.id)?
        .map(|tenant| tenant.quota)
        .unwrap_or(tenant.quota);
    let created = svc.store.create_vm_with_id(
        &vm.id,
        &crate::store::NewVm {
            tenant_id: tenant.id.clone(),
            name: vm.name.clone(),
            image_id: image.id.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel_args: vm.kernel_args.clone(),
            root_rate_limit: vm.root_rate_limit,
            disks: vm.disks.clone(),
            nics: vm.nics.clone(),
            restore_from: None,
            restore_as_clone: false,
            metadata: request.metadata.clone(),
        },
        quota,
    )?;
    svc.store.add_event(
        &created.id,
        "created",
        &format!("{}{}", handover::RECEIVED_FROM, request.source),
    )?;
    let port = free_port(local, svc.supervisor.config().migration_port_range)?;
    let listen = format!("{local}:{port}");
    let token = crate::store::random_hex(24)?;
    // The stream's key, one per migration: the VMMs encrypt and
    // authenticate every byte between them with it.
    let key = crate::store::random_hex(32)?;
    let prepared = async {
        svc.supervisor.reconcile_network().await?;
        svc.supervisor
            .receive(&created, &image, &listen, &token, &key)
            .await
    };
    if let Err(err) = prepared.await {
        svc.supervisor.remove_files(&created)?;
        svc.store.delete_vm(&created.id)?;
        if let Err(again) = svc.supervisor.reconcile_network().await {
            tracing::error!(vm = %created.id, "cannot undo the VM's network rules: {again}");
        }
        return Err(err.into());
    }
    tracing::info!(vm = %created.id, %listen, source = %request.source, "receiving a VM");
    Ok(IncomingReady { listen, token, key })
}

/// VM `id`, received from the peer at `source` (its underlay address):
/// another peer's VMs (or this host's own) are not this one's to see or
/// finish.
pub fn received_from(svc: &Services, source: &str, id: &str) -> Result<Vm> {
    received(svc, source, id).map(Vm::from)
}

/// The stored VM [`received_from`] finds.
fn received(svc: &Services, source: &str, id: &str) -> Result<VmRow> {
    let vm = incoming_vm(svc, id)?;
    let from = format!("{}{}", handover::RECEIVED_FROM, source);
    let received = svc
        .store
        .events(&vm.id)?
        .iter()
        .any(|event| event.kind == "created" && event.message == from);
    if !received {
        return Err(ServiceError::not_found("VM", id));
    }
    Ok(vm)
}

fn incoming_vm(svc: &Services, id: &str) -> Result<VmRow> {
    svc.store
        .get_vm(None, id)?
        .ok_or_else(|| ServiceError::not_found("VM", id))
}

/// The source handed VM `id` over: it runs here now, for good. In a
/// cluster its record says so first (the VM's requests come here).
pub async fn done(svc: &Services, source: &str, id: &str) -> Result<()> {
    let vm = received(svc, source, id)?;
    if !vm.state.has_process() {
        return Err(ServiceError::Conflict(format!(
            "VM {id} has no VMM here ({})",
            vm.state.as_str()
        )));
    }
    if let Some(cluster) = &svc.cluster {
        let here = cluster.host_name().to_string();
        let record = cluster
            .update_vm(id, |record| {
                record.assign_host(here.clone());
                record.moving = None;
                record.failed_moves = 0;
                record.record_event("migrated", format!("now on host {here}"));
                Ok(())
            })
            .await?;
        svc.store.set_ownership(id, record.generation)?;
    }
    svc.supervisor.incoming_done(&vm, "its source")?;
    Ok(())
}

/// The source gave the migration of VM `id` up: the copy being received
/// goes, unless it already runs here (then it was handed over).
pub async fn abort(svc: &Services, source: &str, id: &str) -> Result<()> {
    let vm = received(svc, source, id)?;
    let _guard = svc.supervisor.lock(&vm.id).await;
    let vm = incoming_vm(svc, id)?;
    if vm.state == VmState::Running {
        return Err(ServiceError::Conflict(format!(
            "VM {id} runs here: it was handed over"
        )));
    }
    svc.supervisor.incoming_abort(&vm).await?;
    svc.store.delete_vm(&vm.id)?;
    svc.supervisor.reconcile_network().await?;
    tracing::info!(vm = %id, "migration in abandoned");
    Ok(())
}
