//! The controller's service pass: for each role of each service, the plan
//! of `service_plan.rs` applied. New instances are VM records defined as
//! the controller (conditioned on its leadership, counted against the
//! tenant's quota) and placed by the next pass like any VM; an instance
//! retires through its record (`retiring`: its host deletes it, then the
//! record), or at once when no host holds it; rollout progress and events
//! go into the service record, conditioned on it being unchanged.

use std::collections::HashMap;

use nubis_api::{
    AntiAffinity, AntiAffinityScope, DrainPolicy, FaultDomainSpread, HostLossPolicy,
    InstanceHealth, RestartPolicy, VmCreate, VmNicCreate, VmPlacement,
};

use super::networks::NetworkRecord;
use super::service_plan::{self, Instance, RolePlan};
use super::services::{InstanceOf, RoleRecord, ServiceRecord, StoredService};
use super::tenants::TenantRecord;
use super::view::View;
use super::vms::{ClusterVm, VmRecord};
use super::{Cluster, ClusterError};
use crate::store::{new_id, now, random_hex};

/// One pass over every service: whether it wrote anything.
pub(super) async fn run_pass(
    cluster: &Cluster,
    vms: &[ClusterVm],
    view: &View,
) -> Result<bool, ClusterError> {
    let services = cluster.services().await?;
    let instances: Vec<&ClusterVm> = vms
        .iter()
        .filter(|vm| vm.record.instance.is_some())
        .collect();
    if services.is_empty() && instances.is_empty() {
        return Ok(false);
    }
    let mut wrote = false;
    // Instances of services (or roles) that are gone.
    for vm in &instances {
        let Some(of) = &vm.record.instance else {
            continue;
        };
        let kept = services.iter().any(|service| {
            service.record.id == of.service && service.record.role(&of.role).is_some()
        });
        if !kept && vm.record.retiring.is_none() {
            retire(cluster, vm, view, "its service or role was deleted").await?;
            wrote = true;
        }
    }
    let mut networks: Option<Vec<NetworkRecord>> = None;
    for service in &services {
        wrote |= run_service(cluster, service, &instances, view, &mut networks).await?;
    }
    Ok(wrote)
}

/// The plans of `service`'s roles, applied.
async fn run_service(
    cluster: &Cluster,
    service: &StoredService,
    instances: &[&ClusterVm],
    view: &View,
    networks: &mut Option<Vec<NetworkRecord>>,
) -> Result<bool, ClusterError> {
    let record = &service.record;
    let now = now();
    let mut updated = record.clone();
    let mut wrote = false;
    for role in &record.roles {
        let mine: Vec<&ClusterVm> = instances
            .iter()
            .copied()
            .filter(|vm| {
                vm.record
                    .instance
                    .as_ref()
                    .is_some_and(|of| of.service == record.id && of.role == role.spec.name)
            })
            .collect();
        let seen: Vec<Instance<'_>> = mine.iter().filter_map(|vm| instance(vm, view)).collect();
        let plan = service_plan::plan_role(role, &seen, now);
        let by_id: HashMap<&str, &ClusterVm> =
            mine.iter().map(|vm| (vm.record.id.as_str(), *vm)).collect();
        let RolePlan {
            create,
            retire: retiring,
            rollout,
            events,
        } = plan;
        for (id, reason) in &retiring {
            if let Some(vm) = by_id.get(id.as_str()) {
                retire(cluster, vm, view, reason).await?;
                wrote = true;
            }
        }
        for slot in create {
            match create_instance(cluster, record, role, slot, networks).await {
                Ok(true) => wrote = true,
                Ok(false) => return Ok(wrote),
                Err(err) => {
                    let message = format!(
                        "role {}: cannot create instance {slot}: {err}",
                        role.spec.name
                    );
                    tracing::warn!(service = %record.id, "{message}");
                    let told = updated
                        .events
                        .last()
                        .is_some_and(|last| last.message == message);
                    if !told {
                        updated.record_event("create-failed", message);
                    }
                    break;
                }
            }
        }
        if let Some(rollout) = rollout {
            if let Some(role) = updated.role_mut(&role.spec.name) {
                role.rollout = Some(rollout);
            }
        }
        for (kind, message) in events {
            updated.record_event(&kind, message);
        }
    }
    if updated != *record {
        wrote |= cluster
            .write_service_as_controller(&updated, service.revision)
            .await?;
    }
    Ok(wrote)
}

/// `vm` as the plan sees it.
fn instance<'a>(vm: &'a ClusterVm, view: &View) -> Option<Instance<'a>> {
    let of = vm.record.instance.as_ref()?;
    let host_down = vm.record.host.as_deref().is_some_and(|host| {
        view.member(host)
            .is_none_or(|member| member.alive.is_none())
    });
    Some(Instance {
        vm_id: &vm.record.id,
        name: &vm.record.spec.name,
        of,
        retiring: vm.record.retiring.is_some(),
        health: instance_health(vm),
        host_down,
        moving: vm.record.moving.is_some(),
    })
}

/// An instance's health as the API and the plan see it.
pub fn instance_health(vm: &ClusterVm) -> InstanceHealth {
    let reported = vm
        .status
        .as_ref()
        .filter(|status| vm.record.host.as_deref() == Some(status.host.as_str()))
        .and_then(|status| status.health);
    let probed = vm
        .record
        .instance
        .as_ref()
        .is_some_and(|of| of.probe.is_some());
    service_plan::health(vm.view().state, reported, probed)
}

/// Retires `vm`: its host deletes it (and then its record); a VM no live
/// host holds is deleted from the cluster at once (a host that comes
/// back sweeps its copy).
async fn retire(
    cluster: &Cluster,
    vm: &ClusterVm,
    view: &View,
    reason: &str,
) -> Result<(), ClusterError> {
    let held = vm
        .record
        .host
        .as_deref()
        .and_then(|host| view.member(host))
        .is_some_and(|member| member.alive.is_some());
    tracing::info!(vm = %vm.record.id, "cluster: retiring a service instance: {reason}");
    if !held {
        if cluster.inner.leader_key().is_some() {
            cluster.delete_vm(&vm.record.id).await?;
        }
        return Ok(());
    }
    let mut record = vm.record.clone();
    record.retiring = Some(reason.to_string());
    record.record_event("retiring", reason);
    cluster.place_vm(&record, vm.revision).await?;
    Ok(())
}

/// Defines a new instance of `role` in `slot`: whether it was written
/// (false: this host no longer leads).
async fn create_instance(
    cluster: &Cluster,
    service: &ServiceRecord,
    role: &RoleRecord,
    slot: u32,
    networks: &mut Option<Vec<NetworkRecord>>,
) -> Result<bool, ClusterError> {
    let tenant_key = cluster.inner.keys.tenant(&service.tenant_id);
    let tenant = cluster
        .inner
        .etcd
        .get::<TenantRecord>(&tenant_key)
        .await?
        .ok_or_else(|| ClusterError::NoSuchTenant(service.tenant_id.clone()))?
        .value;
    let networks = match networks {
        Some(networks) => networks,
        None => networks.insert(cluster.networks().await?),
    };
    let mut record = instance_record(service, role, slot)?;
    record.nics = cluster
        .assign_nics(&service.tenant_id, &record.spec, networks)
        .await?;
    cluster
        .define_vm_as_controller(&record, &tenant.quota)
        .await
}

/// The VM record of a new instance of `role` in `slot` (its NICs not yet
/// assigned).
pub fn instance_record(
    service: &ServiceRecord,
    role: &RoleRecord,
    slot: u32,
) -> Result<VmRecord, ClusterError> {
    fn random(what: &'static str) -> impl Fn(crate::store::StoreError) -> ClusterError {
        move |err| ClusterError::Corrupt {
            key: what.to_string(),
            reason: err.to_string(),
        }
    }
    let suffix = random_hex(2).map_err(random("a random name suffix"))?;
    let id = new_id("vm").map_err(random("a random VM id"))?;
    let spec = &role.spec;
    let nics = if spec.networks.is_empty() {
        vec![VmNicCreate::default()]
    } else {
        spec.networks
            .iter()
            .map(|network| VmNicCreate::on_network(network.clone()))
            .collect()
    };
    let placement = VmPlacement {
        require: spec.require.clone(),
        anti_affinity: Some(AntiAffinity {
            group: instance_group(service, role),
            scope: AntiAffinityScope::FaultDomain,
            preferred: spec.fault_domains == FaultDomainSpread::Preferred,
        }),
        on_host_loss: match spec.restart {
            RestartPolicy::Always => HostLossPolicy::Restart,
            RestartPolicy::Never => HostLossPolicy::Wait,
        },
        on_drain: DrainPolicy::LiveMigrate,
        ..VmPlacement::default()
    };
    let vm = VmCreate {
        name: format!("{}-{}-{slot}-{suffix}", service.name, spec.name),
        image: spec.image.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        kernel_args: spec.kernel_args.clone(),
        nics,
        placement,
        start: true,
        ..VmCreate::new("", "")
    };
    let mut record = VmRecord {
        id,
        tenant_id: service.tenant_id.clone(),
        spec: vm,
        host: None,
        created_at: now(),
        nics: Vec::new(),
        events: Vec::new(),
        storage_mib: role.storage_mib,
        moving: None,
        failed_moves: 0,
        generation: 0,
        instance: Some(InstanceOf {
            service: service.id.clone(),
            role: spec.name.clone(),
            index: slot,
            revision: role.revision,
            probe: spec.probe.clone(),
        }),
        retiring: None,
        ssh_keys: Vec::new(),
    };
    record.record_event(
        "created",
        format!(
            "instance {slot} of service {} role {} (revision {})",
            service.name, spec.name, role.revision
        ),
    );
    Ok(record)
}

/// The anti-affinity group of a role's instances (a name of the tenant's
/// groups: the service's id and the role).
pub fn instance_group(service: &ServiceRecord, role: &RoleRecord) -> String {
    format!("{}-{}", service.id, role.spec.name)
}

#[cfg(test)]
mod tests {
    use nubis_api::{Probe, ProbeProtocol, RoleSpec};

    use super::*;

    #[test]
    fn an_instance_record_carries_the_role() {
        let mut spec = RoleSpec::new("web", "img-1", 3);
        spec.networks = vec!["lan".into()];
        spec.kernel_args = "nubis_cmd=\"httpd\"".into();
        spec.probe = Some(Probe::new(ProbeProtocol::Tcp, 80));
        spec.fault_domains = FaultDomainSpread::Required;
        let role = RoleRecord {
            spec,
            revision: 4,
            storage_mib: 12,
            previous: None,
            rollout: None,
            virtual_address: None,
        };
        let service = ServiceRecord {
            id: "svc-0123456789abcdef".into(),
            tenant_id: "t-1".into(),
            name: "shop".into(),
            created_at: 1,
            roles: vec![role.clone()],
            events: Vec::new(),
        };
        let record = instance_record(&service, &role, 2).expect("a record");
        assert!(
            record.spec.name.starts_with("shop-web-2-"),
            "{}",
            record.spec.name
        );
        assert_eq!(record.spec.name.len(), "shop-web-2-".len() + 4);
        assert!(crate::validate::name("name", &record.spec.name, false).is_ok());
        assert_eq!(record.spec.image, "img-1");
        assert_eq!(record.spec.nics, [VmNicCreate::on_network("lan")]);
        assert!(record.spec.start);
        assert_eq!(record.storage_mib, 12);
        let anti = record
            .spec
            .placement
            .anti_affinity
            .clone()
            .expect("a group");
        assert_eq!(anti.group, "svc-0123456789abcdef-web");
        assert!(crate::validate::name("group", &anti.group, false).is_ok());
        assert!(!anti.preferred);
        assert_eq!(record.spec.placement.on_host_loss, HostLossPolicy::Restart);
        let of = record.instance.expect("an instance");
        assert_eq!((of.index, of.revision), (2, 4));
        assert_eq!(of.probe, Some(Probe::new(ProbeProtocol::Tcp, 80)));
    }
}
