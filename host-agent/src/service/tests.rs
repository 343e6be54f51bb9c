//! The services in-process: a real store in a temporary directory and a
//! host network that changes nothing (`testing::FakeNetwork`).

use std::sync::atomic::Ordering;

use nubis_api::{NetworkCreate, Quota, Tenant, TenantCreate, VmCreate, VmDisk, VmNicCreate};

use super::testing::Fixture;
use super::{images, networks, port_forwards, snapshots, tenants, vms, Scope, ServiceError};
use crate::store::{NetworkRow, StoreError, TenantRow};

fn network_request(name: &str, cidr: &str) -> NetworkCreate {
    serde_json::from_value(serde_json::json!({"name": name, "cidr": cidr}))
        .unwrap_or_else(|err| panic!("network request: {err}"))
}

fn vm_request(name: &str, image: &str, nics: &[Option<&str>]) -> VmCreate {
    let mut request: VmCreate =
        serde_json::from_value(serde_json::json!({"name": name, "image": image}))
            .unwrap_or_else(|err| panic!("VM request: {err}"));
    request.nics = nics
        .iter()
        .map(|network| VmNicCreate {
            network: network.map(str::to_string),
            ..VmNicCreate::default()
        })
        .collect();
    request
}

#[tokio::test]
async fn a_network_quota_at_its_limit_refuses_one_more() {
    let fixture = Fixture::new();
    let quota = Quota {
        max_networks: 1,
        ..Quota::default()
    };
    let (tenant, _) = fixture.tenant("acme", quota);
    let svc = &fixture.services;
    networks::create(svc, &tenant.id, &network_request("a", "10.1.0.0/24"))
        .await
        .expect("the first network fits the quota");
    let err = networks::create(svc, &tenant.id, &network_request("b", "10.2.0.0/24"))
        .await
        .expect_err("a second network is over the quota");
    assert!(
        matches!(err, ServiceError::Store(StoreError::Quota(_))),
        "{err:?}"
    );
    assert_eq!(
        networks::list(svc, Scope::Operator)
            .await
            .map(|n| n.len())
            .ok(),
        Some(1)
    );
}

#[tokio::test]
async fn a_network_the_host_uses_is_unprocessable() {
    let fixture = Fixture::new();
    let (tenant, _) = fixture.tenant("acme", Quota::default());
    let err = networks::create(
        &fixture.services,
        &tenant.id,
        &network_request("a", "192.168.4.0/24"),
    )
    .await
    .expect_err("the host's own network");
    assert!(
        matches!(&err, ServiceError::Unprocessable { field: Some(field), .. } if field == "cidr"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_network_whose_bridge_the_host_refuses_is_not_kept() {
    let fixture = Fixture::new();
    let (tenant, _) = fixture.tenant("acme", Quota::default());
    fixture.network.refuse.store(true, Ordering::SeqCst);
    let err = networks::create(
        &fixture.services,
        &tenant.id,
        &network_request("a", "10.1.0.0/24"),
    )
    .await
    .expect_err("the host refused the bridge");
    assert!(matches!(err, ServiceError::Supervisor(_)), "{err:?}");
    let left = networks::list(&fixture.services, Scope::Operator)
        .await
        .expect("list");
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn addresses_run_out_and_are_not_handed_out_twice() {
    let fixture = Fixture::new();
    let (tenant, _) = fixture.tenant("acme", Quota::default());
    let svc = &fixture.services;
    fixture.image(&tenant, "base", 4096);
    // A /29: the gateway and 5 addresses for VMs.
    networks::create(svc, &tenant.id, &network_request("small", "10.9.0.0/29"))
        .await
        .expect("network");
    let mut addresses = std::collections::HashSet::new();
    for index in 0..5 {
        let vm = vms::create(
            svc,
            &tenant.id,
            vm_request(&format!("vm{index}"), "base", &[Some("small")]),
        )
        .await
        .unwrap_or_else(|err| panic!("VM {index}: {err}"));
        let address = vm.nics[0].address.clone().expect("an address");
        assert!(addresses.insert(address.clone()), "{address} twice");
    }
    let err = vms::create(svc, &tenant.id, vm_request("vm5", "base", &[Some("small")]))
        .await
        .expect_err("the network is full");
    assert!(
        matches!(&err, ServiceError::Exhausted(message) if message == "no free address left in 10.9.0.0/29"),
        "{err:?}"
    );
    let names: Vec<String> = vms::list(svc, Scope::Operator, None, None)
        .await
        .expect("list")
        .into_iter()
        .map(|vm| vm.name)
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
}

#[tokio::test]
async fn vcpu_and_storage_quotas_hold_at_their_limit() {
    let fixture = Fixture::new();
    let quota = Quota {
        max_vcpus: 2,
        max_storage_mib: 10,
        ..Quota::default()
    };
    let (tenant, _) = fixture.tenant("acme", quota);
    let svc = &fixture.services;
    fixture.image(&tenant, "base", 1 << 20);
    let mut two = vm_request("two", "base", &[]);
    two.vcpus = 2;
    vms::create(svc, &tenant.id, two)
        .await
        .expect("2 vCPUs fit");
    let err = vms::create(svc, &tenant.id, vm_request("one-more", "base", &[]))
        .await
        .expect_err("a third vCPU is over the quota");
    assert!(
        matches!(err, ServiceError::Store(StoreError::Quota(_))),
        "{err:?}"
    );
    let (other, _) = fixture.tenant(
        "other",
        Quota {
            max_storage_mib: 10,
            ..Quota::default()
        },
    );
    fixture.image(&other, "base", 1 << 20);
    let mut big = vm_request("big", "base", &[]);
    big.disks = vec![VmDisk {
        size_mib: 10,
        rate_limit: Default::default(),
    }];
    let err = vms::create(svc, &other.id, big)
        .await
        .expect_err("1 + 10 MiB is over 10 MiB");
    assert!(
        matches!(err, ServiceError::Store(StoreError::Quota(_))),
        "{err:?}"
    );
    assert!(vms::list(svc, Scope::Tenant(&other.id), None, None)
        .await
        .expect("list")
        .is_empty());
}

#[tokio::test]
async fn a_vm_whose_rules_the_host_refuses_is_not_kept() {
    let fixture = Fixture::new();
    let (tenant, _) = fixture.tenant("acme", Quota::default());
    let svc = &fixture.services;
    fixture.image(&tenant, "base", 4096);
    networks::create(svc, &tenant.id, &network_request("net", "10.9.0.0/29"))
        .await
        .expect("network");
    fixture.network.refuse.store(true, Ordering::SeqCst);
    let err = vms::create(svc, &tenant.id, vm_request("vm", "base", &[Some("net")]))
        .await
        .expect_err("the host refused the NIC's rules");
    assert!(matches!(err, ServiceError::Supervisor(_)), "{err:?}");
    assert!(vms::list(svc, Scope::Operator, None, None)
        .await
        .expect("list")
        .is_empty());
    // Its address is free again.
    fixture.network.refuse.store(false, Ordering::SeqCst);
    let vm = vms::create(svc, &tenant.id, vm_request("vm", "base", &[Some("net")]))
        .await
        .expect("the same VM once the host takes the rules");
    assert_eq!(vm.nics[0].address.as_deref(), Some("10.9.0.2/29"));
}

#[tokio::test]
async fn another_tenants_resources_are_not_found() {
    let fixture = Fixture::new();
    let (mine, _) = fixture.tenant("mine", Quota::default());
    let (theirs, _) = fixture.tenant("theirs", Quota::default());
    let svc = &fixture.services;
    fixture.image(&mine, "base", 4096);
    let net = networks::create(svc, &mine.id, &network_request("net", "10.9.0.0/24"))
        .await
        .expect("network");
    let vm = vms::create(svc, &mine.id, vm_request("vm", "base", &[]))
        .await
        .expect("VM");
    let theirs = Scope::Tenant(&theirs.id);
    for id in [&vm.id, &vm.name] {
        let err = vms::get(svc, theirs, id).await.expect_err("not theirs");
        assert!(
            matches!(err, ServiceError::NotFound { what: "VM", .. }),
            "{err:?}"
        );
    }
    let err = networks::get(svc, theirs, &net.id)
        .await
        .expect_err("not theirs");
    assert_eq!(err.to_string(), format!("no network '{}'", net.id));
    let err = networks::delete(svc, theirs, &net.id)
        .await
        .expect_err("not theirs to delete");
    assert!(matches!(err, ServiceError::NotFound { .. }), "{err:?}");
    let err = vms::delete(svc, theirs, &vm.id)
        .await
        .expect_err("not theirs to delete");
    assert!(matches!(err, ServiceError::NotFound { .. }), "{err:?}");
    assert!(vms::list(svc, theirs, None, None)
        .await
        .expect("list")
        .is_empty());
    assert_eq!(
        vms::get(svc, Scope::Operator, &vm.id)
            .await
            .map(|found| found.id)
            .ok(),
        Some(vm.id.clone())
    );
}

#[tokio::test]
async fn a_network_with_nics_on_it_is_not_deleted() {
    let fixture = Fixture::new();
    let (tenant, _) = fixture.tenant("acme", Quota::default());
    let svc = &fixture.services;
    fixture.image(&tenant, "base", 4096);
    let net = networks::create(svc, &tenant.id, &network_request("net", "10.9.0.0/24"))
        .await
        .expect("network");
    let vm = vms::create(svc, &tenant.id, vm_request("web", "base", &[Some("net")]))
        .await
        .expect("VM");
    let scope = Scope::Tenant(&tenant.id);
    let err = networks::delete(svc, scope, &net.id)
        .await
        .expect_err("a VM uses it");
    assert!(
        matches!(&err, ServiceError::Conflict(message) if message.contains("web")),
        "{err:?}"
    );
    vms::delete(svc, scope, &vm.id).await.expect("VM deleted");
    networks::delete(svc, scope, &net.id)
        .await
        .expect("network deleted");
    assert!(networks::list(svc, scope).await.expect("list").is_empty());
}

#[tokio::test]
async fn port_forwards_hold_their_quota_and_a_refused_rule_leaves_none() {
    let fixture = Fixture::new();
    let quota = Quota {
        max_port_forwards: 1,
        ..Quota::default()
    };
    let (tenant, _) = fixture.tenant("acme", quota);
    let (other, _) = fixture.tenant("other", Quota::default());
    let svc = &fixture.services;
    fixture.image(&tenant, "base", 4096);
    vms::create(svc, &tenant.id, vm_request("web", "base", &[None]))
        .await
        .expect("VM on the default bridge");
    let forward = |host_port: u16| -> nubis_api::PortForwardCreate {
        serde_json::from_value(serde_json::json!({
            "vm": "web", "host_port": host_port, "vm_port": 80
        }))
        .unwrap_or_else(|err| panic!("forward request: {err}"))
    };
    fixture.network.refuse.store(true, Ordering::SeqCst);
    let err = port_forwards::create(svc, &tenant.id, &forward(30080))
        .await
        .expect_err("the host refused the rule");
    assert!(matches!(err, ServiceError::Supervisor(_)), "{err:?}");
    assert!(port_forwards::list(svc, Scope::Operator)
        .await
        .expect("list")
        .is_empty());
    fixture.network.refuse.store(false, Ordering::SeqCst);
    let made = port_forwards::create(svc, &tenant.id, &forward(30080))
        .await
        .expect("the forward once the host takes its rule");
    let err = port_forwards::create(svc, &tenant.id, &forward(30081))
        .await
        .expect_err("a second forward is over the quota");
    assert!(
        matches!(err, ServiceError::Store(StoreError::Quota(_))),
        "{err:?}"
    );
    let err = port_forwards::create(svc, &tenant.id, &forward(22))
        .await
        .expect_err("outside the host's range");
    assert!(
        matches!(&err, ServiceError::Unprocessable { field: Some(field), .. } if field == "host_port"),
        "{err:?}"
    );
    let err = port_forwards::get(svc, Scope::Tenant(&other.id), &made.id)
        .await
        .expect_err("not the other tenant's");
    assert_eq!(err.to_string(), format!("no port forward '{}'", made.id));
    assert_eq!(
        port_forwards::get(svc, Scope::Tenant(&tenant.id), &made.id)
            .await
            .ok(),
        Some(made)
    );
}

#[tokio::test]
async fn tenants_answer_as_stored_and_replicas_are_stored_as_given() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let quota = Quota {
        max_vcpus: 3,
        ..Quota::default()
    };
    let created = tenants::create(
        svc,
        &TenantCreate {
            name: "acme".into(),
            quota: Some(quota),
        },
    )
    .await
    .expect("tenant");
    let row = svc
        .store
        .get_tenant(&created.id)
        .expect("store")
        .expect("stored");
    assert_eq!(Tenant::from(row.clone()), created);
    assert_eq!(created.quota.max_vcpus, 3);
    assert_eq!(tenants::get(svc, &created.id).expect("get"), created);
    assert_eq!(tenants::list(svc).expect("list"), vec![created.clone()]);
    // A tenant from another host keeps its id, name, quota and age.
    let replica = Tenant {
        id: "t-0123456789abcdef".into(),
        name: "globex".into(),
        quota,
        created_at: 7,
    };
    let stored = TenantRow::from(replica.clone());
    svc.store.create_tenant_with_id(&stored).expect("replica");
    assert_eq!(tenants::get(svc, &replica.id).expect("get"), replica);
}

#[tokio::test]
async fn images_answer_as_stored_and_start_from_their_row() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let (tenant, _token) = fixture.tenant("acme", Quota::default());
    let image = fixture.image(&tenant, "debian", 4096);
    let row = svc
        .store
        .get_image(&tenant.id, &image.id)
        .expect("store")
        .expect("stored");
    assert_eq!(nubis_api::Image::from(row.clone()), image);
    assert_eq!(image.rootfs_bytes, 4096);
    let scope = Scope::Tenant(&tenant.id);
    assert_eq!(
        images::get(svc, scope, "debian").await.expect("by name"),
        image
    );
    assert_eq!(
        images::list(svc, Scope::Operator).await.expect("list"),
        vec![image.clone()]
    );
    // What a VM starts from is the stored row itself, files checked again.
    let created = vms::create(svc, &tenant.id, vm_request("web", "debian", &[]))
        .await
        .expect("VM");
    let vm = vms::find(svc, scope, &created.id).expect("VM");
    assert_eq!(images::usable_image(svc, &vm).expect("usable"), row);
    images::delete(svc, Scope::Operator, &image.id)
        .await
        .expect_err("a VM uses it");
}

#[tokio::test]
async fn snapshots_answer_as_stored() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let (tenant, _token) = fixture.tenant("acme", Quota::default());
    fixture.image(&tenant, "debian", 4096);
    let vm = vms::create(svc, &tenant.id, vm_request("web", "debian", &[]))
        .await
        .expect("VM");
    // Recorded as a snapshot of the VM would be (taking one needs a VMM).
    let id = svc.store.new_snapshot_id().expect("id");
    let row = svc
        .store
        .record_snapshot(&id, &vm.clone().into(), 8192)
        .expect("record");
    let snapshot = nubis_api::Snapshot::from(row.clone());
    assert_eq!(
        (
            snapshot.id.as_str(),
            snapshot.vm_id.as_str(),
            snapshot.vm_name.as_str()
        ),
        (id.as_str(), vm.id.as_str(), "web")
    );
    assert_eq!(
        (snapshot.vcpus, snapshot.memory_mib, snapshot.size_bytes),
        (vm.vcpus, vm.memory_mib, 8192)
    );
    let scope = Scope::Tenant(&tenant.id);
    assert_eq!(
        snapshots::get(svc, scope, &id).await.expect("get"),
        snapshot
    );
    assert_eq!(
        snapshots::list(svc, scope).await.expect("list"),
        vec![snapshot]
    );
    let (other, _token) = fixture.tenant("globex", Quota::default());
    assert!(matches!(
        snapshots::get(svc, Scope::Tenant(&other.id), &id).await,
        Err(ServiceError::NotFound { .. })
    ));
}

#[tokio::test]
async fn networks_answer_as_stored_and_a_replica_converts_both_ways() {
    let fixture = Fixture::new();
    let svc = &fixture.services;
    let (tenant, _token) = fixture.tenant("acme", Quota::default());
    let network = networks::create(svc, &tenant.id, &network_request("front", "10.9.0.0/24"))
        .await
        .expect("network");
    let row = svc
        .store
        .get_network(None, &network.id)
        .expect("store")
        .expect("stored");
    assert_eq!(nubis_api::Network::from(row.clone()), network);
    assert_eq!(
        (network.gateway.as_str(), network.bridge.as_str()),
        (row.gateway.as_str(), row.bridge.as_str())
    );
    let scope = Scope::Tenant(&tenant.id);
    assert_eq!(
        networks::get(svc, scope, "front").await.expect("by name"),
        network
    );
    assert_eq!(
        networks::list(svc, Scope::Operator).await.expect("list"),
        vec![network.clone()]
    );
    // What a peer sends (the API's Network) is stored as it is given.
    assert_eq!(NetworkRow::from(network.clone()), row);
}
