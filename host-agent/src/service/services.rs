//! Services: a tenant's roles that the cluster's controller keeps at
//! their instance count (`cluster::service_control`). Here the requests
//! are checked (each role as the VMs it makes would be, its image and
//! networks resolved) and written to the service's record; what the
//! instances are and how rollouts go is read back from the cluster.
//! A standalone host has no controller: it has no services.

use std::net::Ipv4Addr;

use nubis_api::{
    Role, RoleRollback, RoleScale, RoleSpec, RoleUpgrade, Service, ServiceCreate, ServiceInstance,
    VmCreate, VmNicCreate,
};

use super::{images, Result, Scope, ServiceError, Services};
use crate::cluster::networks::NetworkRecord;
use crate::cluster::service_control::instance_health;
use crate::cluster::service_plan::start_rollout;
use crate::cluster::services::{PreviousRevision, RoleRecord, ServiceRecord};
use crate::cluster::vms::ClusterVm;
use crate::cluster::{Cluster, ClusterError};
use crate::store::{new_id, now};

/// At most this many roles in a service.
const MAX_ROLES: usize = 8;
/// At most this many instances in a role.
const MAX_INSTANCES: u32 = 64;
/// At most this many endpoints in a role.
const MAX_ENDPOINTS: usize = 4;
/// At most this many update domains in a role.
const MAX_UPDATE_DOMAINS: u32 = 20;
/// Service and role names are short: an instance is named
/// `{service}-{role}-{index}-{suffix}`, within a VM name's 63.
const MAX_NAME: usize = 20;

fn cluster(svc: &Services) -> Result<&Cluster> {
    svc.cluster.as_ref().ok_or_else(|| {
        ServiceError::unprocessable(
            "services",
            "services need a cluster (a controller keeps their instances): this host is standalone",
        )
    })
}

/// Defines service `request` of `tenant_id`; the controller makes its
/// instances.
pub async fn create(svc: &Services, tenant_id: &str, request: ServiceCreate) -> Result<Service> {
    let cluster = cluster(svc)?;
    short_name("name", &request.name)?;
    if request.roles.is_empty() || request.roles.len() > MAX_ROLES {
        return Err(ServiceError::invalid(
            "roles",
            format!("a service has 1 to {MAX_ROLES} roles"),
        ));
    }
    let networks = cluster.networks().await?;
    let mut roles = Vec::with_capacity(request.roles.len());
    for (index, spec) in request.roles.into_iter().enumerate() {
        let field = format!("roles[{index}]");
        if roles
            .iter()
            .any(|role: &RoleRecord| role.spec.name == spec.name)
        {
            return Err(ServiceError::invalid(
                format!("{field}.name"),
                format!("two roles are named '{}'", spec.name),
            ));
        }
        let (spec, storage_mib) = resolve(svc, tenant_id, &field, spec, &networks).await?;
        roles.push(RoleRecord {
            spec,
            revision: 1,
            storage_mib,
            previous: None,
            rollout: None,
            virtual_address: None,
        });
    }
    check_host_ports(&roles)?;
    let quota = svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::Unauthorized("the token's tenant is gone".to_string()))?
        .quota;
    check_quota(&roles, &quota)?;
    let mut record = ServiceRecord {
        id: new_id("svc")?,
        tenant_id: tenant_id.to_string(),
        name: request.name,
        created_at: now(),
        roles,
        events: Vec::new(),
    };
    record.record_event(
        "created",
        "service defined; the controller makes its instances",
    );
    let mut attempts = 0;
    loop {
        draw_virtual_addresses(cluster, &mut record.roles, &networks).await?;
        match cluster.define_service(&record).await {
            Ok(()) => break,
            // A VM took the address first: draw again.
            Err(ClusterError::Raced(what)) if what.starts_with("address") && attempts < 8 => {
                attempts += 1
            }
            Err(ClusterError::Raced(what)) => {
                return Err(ServiceError::Conflict(format!(
                    "{what} is held by another service"
                )))
            }
            Err(err) => return Err(err.into()),
        }
    }
    tracing::info!(service = %record.id, tenant = tenant_id, "service defined");
    show(cluster, &record).await
}

/// Every service `scope` may see.
pub async fn list(svc: &Services, scope: Scope<'_>) -> Result<Vec<Service>> {
    let Some(cluster) = &svc.cluster else {
        return Ok(Vec::new());
    };
    let (vms, _) = cluster.vms().await?;
    Ok(cluster
        .services()
        .await?
        .into_iter()
        .filter(|service| {
            scope
                .tenant()
                .is_none_or(|tenant| service.record.tenant_id == tenant)
        })
        .map(|service| view(cluster, &service.record, &vms))
        .collect())
}

/// Service `id` (id or name).
pub async fn get(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Service> {
    let cluster = found(svc)?;
    let record = find(cluster, scope, id).await?;
    show(cluster, &record).await
}

/// Sets a role's instance count.
pub async fn scale(
    svc: &Services,
    scope: Scope<'_>,
    id: &str,
    request: RoleScale,
) -> Result<Service> {
    let cluster = found(svc)?;
    let service = find(cluster, scope, id).await?;
    if request.instances > MAX_INSTANCES {
        return Err(ServiceError::invalid(
            "instances",
            format!("{} is over {MAX_INSTANCES}", request.instances),
        ));
    }
    let quota = tenant_quota(svc, &service.tenant_id)?;
    let record = cluster
        .update_service(&service.id, |record| {
            let role = role_of(record, &request.role)?;
            let from = role.spec.instances;
            role.spec.instances = request.instances;
            check_quota(&record.roles, &quota)?;
            record.record_event(
                "scaled",
                format!(
                    "role {}: {from} -> {} instances",
                    request.role, request.instances
                ),
            );
            Ok(())
        })
        .await
        .map_err(role_error)?;
    show(cluster, &record).await
}

/// Upgrades a role: a new revision, rolled out one update domain at a
/// time.
pub async fn upgrade(
    svc: &Services,
    scope: Scope<'_>,
    id: &str,
    request: RoleUpgrade,
) -> Result<Service> {
    let cluster = found(svc)?;
    let service = find(cluster, scope, id).await?;
    let current = service.role(&request.role).ok_or_else(|| {
        ServiceError::unprocessable("role", format!("no role '{}'", request.role))
    })?;
    let RoleUpgrade {
        role: _,
        image,
        vcpus,
        memory_mib,
        kernel_args,
        probe,
    } = request.clone();
    if image.is_none()
        && vcpus.is_none()
        && memory_mib.is_none()
        && kernel_args.is_none()
        && probe.is_none()
    {
        return Err(ServiceError::invalid(
            "role",
            "an upgrade changes at least one of image, vcpus, memory_mib, kernel_args, probe",
        ));
    }
    let mut spec = current.spec.clone();
    if let Some(image) = image {
        spec.image = image;
    }
    spec.vcpus = vcpus.unwrap_or(spec.vcpus);
    spec.memory_mib = memory_mib.unwrap_or(spec.memory_mib);
    spec.kernel_args = kernel_args.unwrap_or(spec.kernel_args);
    if probe.is_some() {
        spec.probe = probe;
    }
    let networks = cluster.networks().await?;
    let (spec, storage_mib) = resolve(svc, &service.tenant_id, "upgrade", spec, &networks).await?;
    if spec == current.spec {
        return Err(ServiceError::Conflict(format!(
            "role {} is at that already (revision {})",
            request.role, current.revision
        )));
    }
    let quota = tenant_quota(svc, &service.tenant_id)?;
    let record = cluster
        .update_service(&service.id, |record| {
            let role = role_of(record, &request.role)?;
            let from = role.revision;
            let revision = from.max(role.previous.as_ref().map_or(0, |p| p.revision)) + 1;
            role.previous = Some(PreviousRevision {
                revision: from,
                spec: role.spec.clone(),
                storage_mib: role.storage_mib,
            });
            // The instance count is the current one: only the instances'
            // make changes.
            role.spec = RoleSpec {
                instances: role.spec.instances,
                ..spec.clone()
            };
            role.storage_mib = storage_mib;
            role.revision = revision;
            role.rollout = Some(start_rollout(role, from, false, now()));
            check_quota(&record.roles, &quota)?;
            record.record_event(
                "rollout",
                format!(
                    "role {}: upgrade from revision {from} to {revision} started",
                    request.role
                ),
            );
            Ok(())
        })
        .await
        .map_err(role_error)?;
    show(cluster, &record).await
}

/// Rolls a role back to the revision before its current one.
pub async fn rollback(
    svc: &Services,
    scope: Scope<'_>,
    id: &str,
    request: RoleRollback,
) -> Result<Service> {
    let cluster = found(svc)?;
    let service = find(cluster, scope, id).await?;
    let record = cluster
        .update_service(&service.id, |record| {
            let role = role_of(record, &request.role)?;
            let Some(previous) = role.previous.take() else {
                return Err(ClusterError::Held(format!(
                    "role {} has no earlier revision to go back to",
                    request.role
                )));
            };
            let from = role.revision;
            let instances = role.spec.instances;
            role.previous = Some(PreviousRevision {
                revision: from,
                spec: role.spec.clone(),
                storage_mib: role.storage_mib,
            });
            role.spec = RoleSpec {
                instances,
                ..previous.spec
            };
            role.storage_mib = previous.storage_mib;
            role.revision = previous.revision;
            role.rollout = Some(start_rollout(role, from, true, now()));
            record.record_event(
                "rollout",
                format!(
                    "role {}: rollback from revision {from} to {} started",
                    request.role, previous.revision
                ),
            );
            Ok(())
        })
        .await
        .map_err(role_error)?;
    show(cluster, &record).await
}

/// Deletes service `id`: the controller retires its instances.
pub async fn delete(svc: &Services, scope: Scope<'_>, id: &str) -> Result<()> {
    let cluster = found(svc)?;
    let service = find(cluster, scope, id).await?;
    cluster.delete_service(&service.id).await?;
    tracing::info!(service = %service.id, "service deleted");
    Ok(())
}

/// The cluster, for a request about one service (a standalone host has
/// none: not found).
fn found(svc: &Services) -> Result<&Cluster> {
    svc.cluster
        .as_ref()
        .ok_or_else(|| ServiceError::not_found("service", "(this host is standalone)"))
}

async fn find(cluster: &Cluster, scope: Scope<'_>, id: &str) -> Result<ServiceRecord> {
    match cluster.service(scope.tenant(), id).await {
        Ok(stored) => Ok(stored.record),
        Err(ClusterError::NoSuchService(_)) => Err(ServiceError::not_found("service", id)),
        Err(err) => Err(err.into()),
    }
}

fn role_of<'r>(
    record: &'r mut ServiceRecord,
    name: &str,
) -> std::result::Result<&'r mut RoleRecord, ClusterError> {
    record
        .role_mut(name)
        .ok_or_else(|| ClusterError::Held(format!("no role '{name}'")))
}

/// A refusal inside a service update in the API's terms: no such role is
/// a 422 on `role`, no earlier revision a 409.
fn role_error(err: ClusterError) -> ServiceError {
    match err {
        ClusterError::Held(message) if message.starts_with("no role") => {
            ServiceError::unprocessable("role", message)
        }
        ClusterError::Held(message) => ServiceError::Conflict(message),
        other => other.into(),
    }
}

fn tenant_quota(svc: &Services, tenant_id: &str) -> Result<nubis_api::Quota> {
    Ok(svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::not_found("tenant", tenant_id))?
        .quota)
}

/// Refuses a service whose instances alone would exceed the tenant's
/// quota (the controller counts each instance against it as it makes it).
fn check_quota(
    roles: &[RoleRecord],
    quota: &nubis_api::Quota,
) -> std::result::Result<(), ClusterError> {
    let (mut vms, mut vcpus, mut memory) = (0u64, 0u64, 0u64);
    for role in roles {
        let count = u64::from(role.spec.instances);
        vms += count;
        vcpus += count * u64::from(role.spec.vcpus);
        memory += count.saturating_mul(role.spec.memory_mib);
    }
    for (what, asked, max) in [
        ("VMs", vms, u64::from(quota.max_vms)),
        ("vCPUs", vcpus, u64::from(quota.max_vcpus)),
        ("memory MiB", memory, quota.max_memory_mib),
    ] {
        if asked > max {
            return Err(ClusterError::Quota(format!(
                "the service's instances take {asked} {what}, over the tenant's quota of {max}"
            )));
        }
    }
    Ok(())
}

/// Checks role `spec` (at `field`) as the VMs it makes would be checked,
/// and resolves its image (to the image's id; the disk MiB an instance
/// takes) and its networks (to their ids).
async fn resolve(
    svc: &Services,
    tenant_id: &str,
    field: &str,
    mut spec: RoleSpec,
    networks: &[NetworkRecord],
) -> Result<(RoleSpec, u64)> {
    let within = |err: ServiceError| prefixed(field, err);
    short_name(&format!("{field}.name"), &spec.name)?;
    if spec.instances > MAX_INSTANCES {
        return Err(ServiceError::invalid(
            format!("{field}.instances"),
            format!("{} is over {MAX_INSTANCES}", spec.instances),
        ));
    }
    if !(1..=MAX_UPDATE_DOMAINS).contains(&spec.update_domains) {
        return Err(ServiceError::invalid(
            format!("{field}.update_domains"),
            format!("must be 1 to {MAX_UPDATE_DOMAINS}"),
        ));
    }
    if let Some(probe) = &spec.probe {
        super::probes::validate(&format!("{field}.probe"), probe)?;
    }
    check_endpoints(svc, field, &spec)?;
    for (index, wanted) in spec.networks.iter_mut().enumerate() {
        let network = networks
            .iter()
            .find(|network| network.is(Some(tenant_id), wanted))
            .ok_or_else(|| {
                ServiceError::unprocessable(
                    format!("{field}.networks[{index}]"),
                    format!("no network '{wanted}'"),
                )
            })?;
        *wanted = network.id.clone();
    }
    // An instance as the controller will make it, checked as a VM is.
    let probe_vm = VmCreate {
        name: format!("{}-{}-0-0000", "x".repeat(MAX_NAME), spec.name),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        kernel_args: spec.kernel_args.clone(),
        nics: spec
            .networks
            .iter()
            .map(|network| VmNicCreate::on_network(network.clone()))
            .collect(),
        placement: nubis_api::VmPlacement {
            require: spec.require.clone(),
            ..Default::default()
        },
        ..VmCreate::new("", "")
    };
    super::vms::check(&probe_vm).map_err(within)?;
    super::placed::check_placement(&probe_vm).map_err(within)?;
    let image = images::get(svc, Scope::Tenant(tenant_id), &spec.image)
        .await
        .map_err(|_| {
            ServiceError::unprocessable(
                format!("{field}.image"),
                format!("no image '{}'", spec.image),
            )
        })?;
    spec.image = image.id;
    Ok((spec, crate::quota::mib_of(image.rootfs_bytes)))
}

/// Gives each role with endpoints a free address of its first network.
async fn draw_virtual_addresses(
    cluster: &Cluster,
    roles: &mut [RoleRecord],
    networks: &[NetworkRecord],
) -> Result<()> {
    let mut chosen: std::collections::HashMap<String, std::collections::HashSet<Ipv4Addr>> =
        Default::default();
    for role in roles.iter_mut() {
        if role.spec.endpoints.is_empty() {
            continue;
        }
        let Some(network) = role.endpoint_network().map(str::to_string) else {
            continue;
        };
        let record = networks
            .iter()
            .find(|record| record.id == network)
            .ok_or_else(|| ServiceError::Internal(format!("network {network} went away")))?;
        let cidr: crate::ipv4::Cidr = record
            .cidr
            .parse()
            .map_err(|err: String| ServiceError::Internal(format!("network {network}: {err}")))?;
        let taken = chosen.entry(network.clone()).or_default();
        let mut used = cluster.used_addresses(&network).await?;
        used.extend(taken.iter().copied());
        let address = cidr.allocate(&used).ok_or_else(|| {
            ServiceError::Exhausted(format!("no free address left in {}", record.cidr))
        })?;
        taken.insert(address);
        role.virtual_address = Some(address);
    }
    Ok(())
}

/// Refuses two endpoints of the service on one host port.
fn check_host_ports(roles: &[RoleRecord]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (index, role) in roles.iter().enumerate() {
        for (at, endpoint) in role.spec.endpoints.iter().enumerate() {
            if let Some(port) = endpoint.host_port {
                if !seen.insert((endpoint.protocol, port)) {
                    return Err(ServiceError::invalid(
                        format!("roles[{index}].endpoints[{at}].host_port"),
                        format!("{} port {port} is given twice", endpoint.protocol.as_str()),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks the endpoints of role `spec` (at `field`).
fn check_endpoints(svc: &Services, field: &str, spec: &RoleSpec) -> Result<()> {
    if spec.endpoints.is_empty() {
        return Ok(());
    }
    if spec.endpoints.len() > MAX_ENDPOINTS {
        return Err(ServiceError::invalid(
            format!("{field}.endpoints"),
            format!("at most {MAX_ENDPOINTS} endpoints"),
        ));
    }
    if spec.networks.is_empty() {
        return Err(ServiceError::invalid(
            format!("{field}.endpoints"),
            "endpoints are on the role's first network: give the role a network",
        ));
    }
    let range = svc.supervisor.config().port_forward_range;
    let mut seen = std::collections::HashSet::new();
    for (index, endpoint) in spec.endpoints.iter().enumerate() {
        let at = format!("{field}.endpoints[{index}]");
        if endpoint.port == 0 || endpoint.target_port == Some(0) {
            return Err(ServiceError::invalid(at, "ports are 1 to 65535"));
        }
        if !seen.insert((endpoint.protocol, endpoint.port)) {
            return Err(ServiceError::invalid(
                format!("{at}.port"),
                format!(
                    "{} port {} is given twice",
                    endpoint.protocol.as_str(),
                    endpoint.port
                ),
            ));
        }
        if let Some(port) = endpoint.host_port {
            if !range.contains(port) {
                return Err(ServiceError::unprocessable(
                    format!("{at}.host_port"),
                    format!("must be in the hosts' port forward range, {range}"),
                ));
            }
        }
    }
    Ok(())
}

/// `err`'s field under `prefix` (`vcpus` of role 0: `roles[0].vcpus`).
fn prefixed(prefix: &str, err: ServiceError) -> ServiceError {
    let under = |field: Option<String>| {
        Some(match field {
            Some(field) => format!("{prefix}.{}", field.replace("placement.", "")),
            None => prefix.to_string(),
        })
    };
    match err {
        ServiceError::Invalid { field, message } => ServiceError::Invalid {
            field: under(field),
            message,
        },
        ServiceError::Unprocessable { field, message } => ServiceError::Unprocessable {
            field: under(field),
            message,
        },
        other => other,
    }
}

fn short_name(field: &str, name: &str) -> Result<()> {
    crate::validate::name(field, name, false)?;
    if name.len() > MAX_NAME {
        return Err(ServiceError::invalid(
            field,
            format!("'{name}' is longer than {MAX_NAME} characters"),
        ));
    }
    Ok(())
}

/// `record` with its instances as the cluster has them now.
async fn show(cluster: &Cluster, record: &ServiceRecord) -> Result<Service> {
    let (vms, _) = cluster.vms().await?;
    Ok(view(cluster, record, &vms))
}

/// `record` as the API shows it, its instances from `vms`.
pub fn view(cluster: &Cluster, record: &ServiceRecord, vms: &[ClusterVm]) -> Service {
    let members = cluster.view();
    let roles = record
        .roles
        .iter()
        .map(|role| {
            let mut instances: Vec<ServiceInstance> = vms
                .iter()
                .filter_map(|vm| {
                    let of = vm.record.instance.as_ref()?;
                    if of.service != record.id || of.role != role.spec.name {
                        return None;
                    }
                    let shown = vm.view();
                    let fault_domain = shown.host.as_deref().and_then(|host| {
                        let member = members.member(host)?;
                        Some(
                            member
                                .record
                                .labels
                                .get(nubis_placement::FAULT_DOMAIN_LABEL)
                                .cloned()
                                .unwrap_or_else(|| host.to_string()),
                        )
                    });
                    Some(ServiceInstance {
                        vm_id: vm.record.id.clone(),
                        name: vm.record.spec.name.clone(),
                        index: of.index,
                        update_domain: role.spec.update_domain(of.index),
                        revision: of.revision,
                        host: shown.host.clone(),
                        fault_domain,
                        address: shown.nics.first().and_then(|nic| nic.address.clone()),
                        state: shown.state,
                        health: instance_health(vm),
                        retiring: vm.record.retiring.is_some(),
                    })
                })
                .collect();
            instances.sort_by(|a, b| {
                (a.index, a.retiring, &a.vm_id).cmp(&(b.index, b.retiring, &b.vm_id))
            });
            let healthy = instances
                .iter()
                .filter(|instance| {
                    !instance.retiring && instance.health == nubis_api::InstanceHealth::Healthy
                })
                .count();
            Role {
                spec: role.spec.clone(),
                revision: role.revision,
                healthy: u32::try_from(healthy).unwrap_or(u32::MAX),
                instances,
                rollout: role.rollout.clone(),
                can_roll_back: role.previous.is_some(),
                virtual_address: role.virtual_address.map(|address| address.to_string()),
            }
        })
        .collect();
    Service {
        id: record.id.clone(),
        tenant_id: record.tenant_id.clone(),
        name: record.name.clone(),
        roles,
        created_at: record.created_at,
        events: record.events.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(instances: u32, vcpus: u32, memory_mib: u64) -> RoleRecord {
        let mut spec = RoleSpec::new("web", "img", instances);
        spec.vcpus = vcpus;
        spec.memory_mib = memory_mib;
        RoleRecord {
            spec,
            revision: 1,
            storage_mib: 0,
            previous: None,
            rollout: None,
            virtual_address: None,
        }
    }

    #[test]
    fn a_service_over_the_quota_is_refused() {
        let quota = nubis_api::Quota {
            max_vms: 4,
            max_vcpus: 8,
            max_memory_mib: 1024,
            ..nubis_api::Quota::default()
        };
        assert!(check_quota(&[role(2, 2, 256), role(2, 2, 256)], &quota).is_ok());
        for roles in [
            vec![role(5, 1, 128)],
            vec![role(3, 3, 128)],
            vec![role(2, 1, 600)],
        ] {
            assert!(check_quota(&roles, &quota).is_err(), "{roles:?}");
        }
    }

    #[test]
    fn refusals_name_the_role_field() {
        let err = prefixed(
            "roles[1]",
            ServiceError::invalid("vcpus", "must be 1 to 254"),
        );
        assert!(
            matches!(&err, ServiceError::Invalid { field: Some(field), .. } if field == "roles[1].vcpus"),
            "{err:?}"
        );
        let err = prefixed(
            "roles[0]",
            ServiceError::invalid("placement.require.zone", "bad"),
        );
        assert!(
            matches!(&err, ServiceError::Invalid { field: Some(field), .. } if field == "roles[0].require.zone"),
            "{err:?}"
        );
    }

    #[test]
    fn names_are_short() {
        assert!(short_name("name", "shop").is_ok());
        assert!(short_name("name", &"a".repeat(20)).is_ok());
        assert!(short_name("name", &"a".repeat(21)).is_err());
        assert!(short_name("name", "Shop").is_err());
    }
}
