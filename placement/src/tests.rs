//! Each filter, each score, the explanations' text, and the batch.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

const MAX: Resources = Resources::new(u32::MAX, u64::MAX, u64::MAX);

fn host(name: &str, vcpus: u32, memory_mib: u64) -> HostView {
    HostView {
        name: name.to_string(),
        state: HostState::Up,
        labels: BTreeMap::new(),
        capacity: Resources::new(vcpus, memory_mib, 100_000),
        allocated: Resources::ZERO,
        networks: NetworkReach::Any,
        vms: 0,
    }
}

fn with_labels(mut host: HostView, labels: &str) -> HostView {
    host.labels = parse_labels(labels).unwrap();
    host
}

fn with_allocated(mut host: HostView, vcpus: u32, memory_mib: u64, vms: u32) -> HostView {
    host.allocated = Resources::new(vcpus, memory_mib, 0);
    host.vms = vms;
    host
}

fn with_state(mut host: HostView, state: HostState) -> HostView {
    host.state = state;
    host
}

fn request(vcpus: u32, memory_mib: u64) -> Request {
    Request::new("vm", Resources::new(vcpus, memory_mib, 0))
}

fn in_group(mut request: Request, vm: &str, group: &str, scope: Scope) -> Request {
    request.vm = vm.to_string();
    request.anti_affinity = Some(AntiAffinity {
        group: group.to_string(),
        scope,
        preferred: false,
    });
    request
}

fn preferring(mut request: Request) -> Request {
    if let Some(anti) = &mut request.anti_affinity {
        anti.preferred = true;
    }
    request
}

fn member(vm: &str, group: &str, host: &str) -> GroupMember {
    GroupMember {
        vm: vm.to_string(),
        group: group.to_string(),
        host: host.to_string(),
    }
}

fn placed(hosts: &[HostView], members: &[GroupMember], request: &Request) -> String {
    match place(hosts, members, request) {
        Decision::Placed { host } => host,
        Decision::Unplaceable(why) => panic!("expected a host, got: {why}"),
    }
}

fn unplaceable(hosts: &[HostView], members: &[GroupMember], request: &Request) -> Explanation {
    match place(hosts, members, request) {
        Decision::Placed { host } => panic!("expected no host, got {host}"),
        Decision::Unplaceable(why) => why,
    }
}

#[test]
fn an_empty_cluster_says_so() {
    let why = unplaceable(&[], &[], &request(1, 1));
    assert!(why.rejections.is_empty());
    assert!(!why.pinned_host_missing());
    assert_eq!(why.to_string(), "no host fits: the cluster has no hosts");
}

#[test]
fn down_and_cordoned_hosts_take_nothing() {
    let hosts = [
        with_state(host("a", 8, 8192), HostState::Down),
        with_state(host("b", 8, 8192), HostState::Cordoned),
        host("c", 1, 1024),
    ];
    assert_eq!(placed(&hosts, &[], &request(1, 512)), "c");
    let why = unplaceable(&hosts, &[], &request(2, 512));
    assert_eq!(why.reason("a"), Some(&Reason::Down));
    assert_eq!(why.reason("b"), Some(&Reason::Cordoned));
    assert_eq!(
        why.to_string(),
        "no host fits: down: a; cordoned: b; capacity: c (needs 2 vCPUs, has 1 free)"
    );
}

#[test]
fn capacity_counts_every_dimension() {
    let mut small_disk = host("d", 8, 8192);
    small_disk.capacity.disk_mib = 10;
    let hosts = [
        with_allocated(host("a", 4, 4096), 2, 0, 1),
        with_allocated(host("b", 8, 1024), 0, 512, 1),
        small_disk,
    ];
    let mut needs = request(4, 1024);
    needs.needs.disk_mib = 20;
    let why = unplaceable(&hosts, &[], &needs);
    assert_eq!(
        why.reason("a"),
        Some(&Reason::Capacity {
            free: Resources::new(2, 4096, 100_000),
            needs: Resources::new(4, 1024, 20),
        })
    );
    assert_eq!(
        why.to_string(),
        "no host fits: capacity: a (needs 4 vCPUs, has 2 free), \
         b (needs 1024 MiB memory, has 512 free), d (needs 20 MiB disk, has 10 free)"
    );
    needs.needs = Resources::new(2, 512, 10);
    assert_eq!(placed(&hosts, &[], &needs), "d");
}

#[test]
fn capacity_lists_several_short_dimensions_together() {
    let hosts = [with_allocated(host("a", 4, 1024), 3, 1000, 2)];
    let why = unplaceable(&hosts, &[], &request(2, 512));
    assert_eq!(
        why.to_string(),
        "no host fits: capacity: a (needs 2 vCPUs and 512 MiB memory, has 1 and 24 free)"
    );
}

#[test]
fn a_host_exactly_full_after_placement_fits() {
    let hosts = [with_allocated(host("a", 4, 1024), 2, 512, 1)];
    assert_eq!(placed(&hosts, &[], &request(2, 512)), "a");
}

#[test]
fn required_labels_must_match() {
    let hosts = [
        with_labels(host("a", 8, 8192), "zone=cloud,gpu=yes"),
        with_labels(host("e", 8, 8192), "zone=onprem"),
        host("f", 8, 8192),
    ];
    let mut cloud = request(1, 512);
    cloud.require = parse_labels("zone=cloud").unwrap();
    assert_eq!(placed(&hosts, &[], &cloud), "a");

    cloud.require = parse_labels("zone=cloud,gpu=no").unwrap();
    let why = unplaceable(&hosts, &[], &cloud);
    // Each host under the first label (by key) it fails.
    assert_eq!(
        why.reason("a"),
        Some(&Reason::Label {
            key: "gpu".into(),
            want: "no".into(),
            have: Some("yes".into()),
        })
    );
    assert_eq!(
        why.to_string(),
        "no host fits: label gpu=no: a (gpu=yes), e (no gpu), f (no gpu)"
    );

    cloud.require = parse_labels("zone=cloud").unwrap();
    let why = unplaceable(&hosts[1..], &[], &cloud);
    assert_eq!(
        why.to_string(),
        "no host fits: label zone=cloud: e (zone=onprem), f (no zone)"
    );
}

#[test]
fn hosts_must_carry_the_vm_networks() {
    let mut a = host("a", 8, 8192);
    a.networks = NetworkReach::Only(BTreeSet::from(["n1".to_string()]));
    let mut b = host("b", 8, 8192);
    b.networks = NetworkReach::Only(BTreeSet::new());
    let hosts = [a, b];
    let mut req = request(1, 512);
    req.networks = BTreeSet::from(["n1".to_string()]);
    assert_eq!(placed(&hosts, &[], &req), "a");
    req.networks.insert("n2".to_string());
    let why = unplaceable(&hosts, &[], &req);
    assert_eq!(
        why.to_string(),
        "no host fits: networks: a (lacks n2), b (lacks n1, n2)"
    );
    let mut c = host("c", 1, 512);
    c.allocated.vcpus = 1;
    let hosts = [hosts[0].clone(), hosts[1].clone(), c];
    let why = unplaceable(&hosts, &[], &req);
    assert_eq!(
        why.to_string(),
        "no host fits: networks: a (lacks n2), b (lacks n1, n2); \
         capacity: c (needs 1 vCPU, has 0 free)"
    );
}

#[test]
fn anti_affinity_keeps_a_group_off_one_host() {
    let hosts = [host("a", 8, 8192), host("b", 4, 4096)];
    let members = [member("web-1", "web", "a"), member("db-1", "db", "b")];
    let req = in_group(request(1, 512), "web-2", "web", Scope::Host);
    // Spread alone would pick a (the larger, so less loaded).
    assert_eq!(placed(&hosts, &[], &req), "a");
    assert_eq!(placed(&hosts, &members, &req), "b");
    let members = [member("web-1", "web", "a"), member("web-3", "web", "b")];
    let why = unplaceable(&hosts, &members, &req);
    assert_eq!(
        why.to_string(),
        "no host fits: anti-affinity web: a (web-1), b (web-3)"
    );
}

#[test]
fn anti_affinity_per_fault_domain() {
    let hosts = [
        with_labels(host("a", 8, 8192), "fault-domain=1"),
        with_labels(host("b", 8, 8192), "fault-domain=1"),
        with_labels(host("c", 1, 1024), "fault-domain=2"),
    ];
    let members = [member("web-1", "web", "a")];
    let req = in_group(request(1, 512), "web-2", "web", Scope::FaultDomain);
    assert_eq!(placed(&hosts, &members, &req), "c");
    // With host scope, b will do (and is less loaded than c).
    let per_host = in_group(request(1, 512), "web-2", "web", Scope::Host);
    assert_eq!(placed(&hosts, &members, &per_host), "b");

    let big = in_group(request(2, 512), "web-2", "web", Scope::FaultDomain);
    let why = unplaceable(&hosts, &members, &big);
    assert_eq!(
        why.reason("b"),
        Some(&Reason::AntiAffinity {
            group: "web".into(),
            scope: Scope::FaultDomain,
            member: "web-1".into(),
            on: "a".into(),
            fault_domain: Some("1".into()),
        })
    );
    assert_eq!(
        why.to_string(),
        "no host fits: anti-affinity web per fault domain: a (web-1, fault domain 1), \
         b (web-1 on a, fault domain 1); capacity: c (needs 2 vCPUs, has 1 free)"
    );
}

#[test]
fn a_host_without_a_fault_domain_label_is_its_own_domain() {
    let hosts = [
        host("a", 8, 8192),
        with_labels(host("b", 4, 4096), "fault-domain=a"),
    ];
    let req = in_group(request(1, 512), "web-2", "web", Scope::FaultDomain);
    assert_eq!(placed(&hosts, &[member("web-1", "web", "a")], &req), "b");
    let why = unplaceable(&hosts[..1], &[member("web-1", "web", "a")], &req);
    assert_eq!(
        why.to_string(),
        "no host fits: anti-affinity web per fault domain: a (web-1)"
    );
}

#[test]
fn anti_affinity_ignores_the_vm_itself_and_hosts_that_are_gone() {
    let hosts = [host("a", 8, 8192)];
    let req = in_group(request(1, 512), "web-1", "web", Scope::FaultDomain);
    // Placing web-1 again (its host went down): its own entry is no obstacle.
    assert_eq!(placed(&hosts, &[member("web-1", "web", "a")], &req), "a");
    // A member on a host the cluster no longer has blocks no one.
    assert_eq!(placed(&hosts, &[member("web-2", "web", "gone")], &req), "a");
    // Nor does a request without a group.
    assert_eq!(
        placed(&hosts, &[member("web-2", "web", "a")], &request(1, 512)),
        "a"
    );
}

#[test]
fn a_named_host_is_used_if_it_passes_the_filters() {
    let hosts = [
        host("a", 8, 8192),
        with_allocated(host("b", 4, 4096), 2, 0, 1),
        with_state(host("c", 8, 8192), HostState::Cordoned),
    ];
    let mut req = request(2, 512);
    req.host = Some("b".into());
    assert_eq!(placed(&hosts, &[], &req), "b");

    req.needs.vcpus = 3;
    let why = unplaceable(&hosts, &[], &req);
    assert_eq!(why.reason("a"), Some(&Reason::NotPinned));
    assert!(!why.pinned_host_missing());
    assert_eq!(
        why.to_string(),
        "no host fits: pinned to b; capacity: b (needs 3 vCPUs, has 2 free)"
    );

    req.host = Some("c".into());
    assert_eq!(
        unplaceable(&hosts, &[], &req).to_string(),
        "no host fits: pinned to c; cordoned: c"
    );

    req.host = Some("x".into());
    let why = unplaceable(&hosts, &[], &req);
    assert!(why.pinned_host_missing());
    assert_eq!(why.rejections.len(), 3);
    assert_eq!(
        why.to_string(),
        "no host fits: pinned host x does not exist"
    );
    assert_eq!(
        unplaceable(&[], &[], &req).to_string(),
        "no host fits: pinned host x does not exist"
    );
}

#[test]
fn a_host_is_reported_under_the_first_filter_that_excludes_it() {
    let mut d = with_state(host("d", 1, 64), HostState::Down);
    d.networks = NetworkReach::Only(BTreeSet::new());
    let hosts = [
        d,
        with_labels(
            with_state(host("c", 1, 64), HostState::Cordoned),
            "zone=cloud",
        ),
        with_labels(host("e", 1, 64), "zone=onprem"),
        with_labels(host("b", 1, 64), "zone=cloud"),
        with_labels(host("a", 1, 64), "zone=cloud"),
    ];
    let mut req = in_group(request(2, 512), "web-2", "web", Scope::Host);
    req.require = parse_labels("zone=cloud").unwrap();
    req.networks = BTreeSet::from(["n1".to_string()]);
    let why = unplaceable(&hosts, &[member("web-1", "web", "b")], &req);
    let order: Vec<(&str, Filter)> = why
        .rejections
        .iter()
        .map(|r| (r.host.as_str(), r.reason.filter()))
        .collect();
    assert_eq!(
        order,
        [
            ("d", Filter::Down),
            ("c", Filter::Cordoned),
            ("e", Filter::Label),
            ("b", Filter::AntiAffinity),
            ("a", Filter::Capacity),
        ]
    );
    assert_eq!(
        why.to_string(),
        "no host fits: down: d; cordoned: c; label zone=cloud: e (zone=onprem); \
         anti-affinity web: b (web-1); capacity: a (needs 2 vCPUs and 512 MiB memory, has 1 and 64 free)"
    );
}

#[test]
fn spread_picks_the_least_loaded_host_after_placement() {
    let hosts = [
        with_allocated(host("a", 4, 4096), 2, 1024, 2), // 3/4 vCPUs after
        with_allocated(host("b", 8, 4096), 2, 2048, 2), // 3/4 memory after
        with_allocated(host("c", 16, 8192), 8, 0, 4),   // 9/16 vCPUs after
    ];
    assert_eq!(placed(&hosts, &[], &request(1, 1024)), "c");
    // Load is the fullest dimension, not any one of them nor their sum.
    let hosts = [
        with_allocated(host("x", 8, 8192), 1, 6144, 1), // 7/8 memory after
        with_allocated(host("y", 8, 8192), 4, 0, 1),    // 5/8 vCPUs after
    ];
    assert_eq!(placed(&hosts, &[], &request(1, 1024)), "y");
}

#[test]
fn spread_breaks_ties_by_fewer_vms_then_name() {
    let hosts = [
        with_allocated(host("b", 4, 4096), 2, 2048, 5),
        with_allocated(host("a", 4, 4096), 2, 2048, 3),
        with_allocated(host("c", 4, 4096), 2, 2048, 3),
    ];
    assert_eq!(placed(&hosts, &[], &request(1, 0)), "a");
    let hosts = [host("c", 4, 4096), host("b", 4, 4096)];
    assert_eq!(placed(&hosts, &[], &request(1, 0)), "b");
}

#[test]
fn bin_pack_picks_the_fullest_host_that_still_fits() {
    let hosts = [
        with_allocated(host("a", 4, 4096), 3, 1024, 3),
        with_allocated(host("b", 8, 4096), 6, 1024, 2),
        with_allocated(host("c", 16, 8192), 8, 0, 4),
    ];
    let mut req = request(1, 1024);
    req.strategy = Strategy::BinPack;
    assert_eq!(placed(&hosts, &[], &req), "a"); // a full, b 7/8
    req.needs.vcpus = 2; // a cannot take it
    assert_eq!(placed(&hosts, &[], &req), "b");
    let hosts = [host("c", 4, 4096), host("b", 4, 4096)];
    assert_eq!(placed(&hosts, &[], &req), "b");
}

#[test]
fn zero_capacity_dimensions_are_not_divided_by() {
    // No local disk: fine for VMs that need none.
    let mut diskless = host("a", 4, 4096);
    diskless.capacity.disk_mib = 0;
    let mut empty = host("z", 0, 0);
    empty.capacity.disk_mib = 0;
    let hosts = [diskless, empty];
    // A VM that needs nothing fits even an empty host, which stays at load 0.
    assert_eq!(placed(&hosts, &[], &request(0, 0)), "a");
    let mut pack = request(0, 0);
    pack.strategy = Strategy::BinPack;
    assert_eq!(placed(&hosts, &[], &pack), "a");
    assert_eq!(placed(&hosts[1..], &[], &request(0, 0)), "z");
    let mut disk = request(1, 1);
    disk.needs.disk_mib = 1;
    assert_eq!(
        unplaceable(&hosts, &[], &disk).to_string(),
        "no host fits: capacity: a (needs 1 MiB disk, has 0 free), \
         z (needs 1 vCPU and 1 MiB memory and 1 MiB disk, has 0 and 0 and 0 free)"
    );
}

#[test]
fn huge_values_neither_overflow_nor_panic() {
    let mut max = host("max", 0, 0);
    max.capacity = MAX;
    let mut full = max.clone();
    full.name = "full".into();
    full.allocated = MAX;
    full.vms = u32::MAX;
    let mut over = host("over", 1, 1);
    over.allocated = MAX;
    let hosts = [max.clone(), full.clone(), over];
    let req = Request::new("vm", MAX);
    assert_eq!(placed(&hosts, &[], &req), "max");
    let mut pack = req.clone();
    pack.strategy = Strategy::BinPack;
    assert_eq!(placed(&hosts, &[], &pack), "max");
    assert_eq!(
        placed(&hosts, &[], &Request::new("vm", Resources::ZERO)),
        "max"
    );
    // The fullest host (beyond its capacity) wins bin-packing a VM of nothing.
    let mut nothing = Request::new("vm", Resources::ZERO);
    nothing.strategy = Strategy::BinPack;
    assert_eq!(placed(&hosts, &[], &nothing), "over");
    let why = unplaceable(&hosts[1..], &[], &req);
    assert_eq!(
        why.reason("over"),
        Some(&Reason::Capacity {
            free: Resources::ZERO,
            needs: MAX
        })
    );

    let mut hosts = vec![max, full];
    let mut members = Vec::new();
    let decisions = place_batch(&mut hosts, &mut members, &[req.clone(), req]);
    assert_eq!(decisions[0], Decision::Placed { host: "max".into() });
    assert!(matches!(decisions[1], Decision::Unplaceable(_)));
    assert_eq!(hosts[0].allocated, MAX);
    assert_eq!(hosts[1].vms, u32::MAX);
}

#[test]
fn the_order_of_the_hosts_does_not_matter() {
    let hosts = vec![
        with_allocated(host("b", 4, 4096), 1, 0, 1),
        with_allocated(host("a", 4, 4096), 1, 0, 1),
        with_state(host("d", 4, 4096), HostState::Down),
        with_labels(host("c", 4, 4096), "zone=x"),
    ];
    let mut reversed = hosts.clone();
    reversed.reverse();
    for strategy in [Strategy::Spread, Strategy::BinPack] {
        let mut req = request(1, 512);
        req.strategy = strategy;
        assert_eq!(place(&hosts, &[], &req), place(&reversed, &[], &req));
        req.needs.vcpus = 4;
        assert_eq!(place(&hosts, &[], &req), place(&reversed, &[], &req));
    }
}

#[test]
fn a_batch_sees_the_placements_before_it() {
    let mut hosts = vec![host("a", 4, 4096), host("b", 2, 4096)];
    let mut members = vec![member("web-0", "web", "gone")];
    let requests = [
        in_group(request(2, 1024), "web-1", "web", Scope::Host),
        in_group(request(1, 1024), "web-2", "web", Scope::Host),
        in_group(request(1, 1024), "web-3", "web", Scope::Host),
        request(2, 1024),
        request(1, 0),
    ];
    let decisions = place_batch(&mut hosts, &mut members, &requests);
    let hosts_chosen: Vec<String> = decisions
        .iter()
        .map(|d| match d {
            Decision::Placed { host } => host.clone(),
            Decision::Unplaceable(why) => why.to_string(),
        })
        .collect();
    assert_eq!(
        hosts_chosen,
        [
            "a",
            "b",
            "no host fits: anti-affinity web: a (web-1), b (web-2)",
            "a",
            "b",
        ]
    );
    assert_eq!(hosts[0].allocated, Resources::new(4, 2048, 0));
    assert_eq!(hosts[0].vms, 2);
    assert_eq!(hosts[1].allocated, Resources::new(2, 1024, 0));
    assert_eq!(hosts[1].vms, 2);
    assert_eq!(
        members,
        [
            member("web-0", "web", "gone"),
            member("web-1", "web", "a"),
            member("web-2", "web", "b"),
        ]
    );
}

#[test]
fn a_batch_moves_a_vm_placed_again() {
    let mut hosts = vec![host("a", 4, 4096)];
    let mut members = vec![member("web-1", "web", "down-host")];
    let req = in_group(request(1, 512), "web-1", "web", Scope::Host);
    let decisions = place_batch(&mut hosts, &mut members, &[req]);
    assert_eq!(decisions, [Decision::Placed { host: "a".into() }]);
    assert_eq!(members, [member("web-1", "web", "a")]);
}

#[test]
fn requests_read_from_json_with_defaults() {
    let req: Request = serde_json::from_str(
        r#"{"vm": "web-1", "needs": {"vcpus": 2, "memory_mib": 512, "disk_mib": 0},
            "require": {"zone": "cloud"},
            "anti_affinity": {"group": "web", "scope": "fault_domain"}}"#,
    )
    .unwrap();
    assert_eq!(req.require, parse_labels("zone=cloud").unwrap());
    assert_eq!(req.strategy, Strategy::Spread);
    assert_eq!(req.host, None);
    assert!(req.networks.is_empty());
    assert_eq!(
        req.anti_affinity.as_ref().unwrap().scope,
        Scope::FaultDomain
    );
    let decision = place(&[with_labels(host("a", 4, 4096), "zone=cloud")], &[], &req);
    let json = serde_json::to_string(&decision).unwrap();
    assert_eq!(json, r#"{"placed":{"host":"a"}}"#);
    assert_eq!(serde_json::from_str::<Decision>(&json).unwrap(), decision);
}

#[test]
fn a_preferred_anti_affinity_spreads_but_never_refuses() {
    let hosts = [
        with_labels(host("a", 8, 8192), "fault-domain=1"),
        with_labels(host("b", 8, 8192), "fault-domain=1"),
        with_labels(
            with_allocated(host("c", 8, 8192), 6, 6000, 3),
            "fault-domain=2",
        ),
    ];
    let members = [member("web-1", "web", "a")];
    // Domain 2 has none of the group: c, although it is the most loaded.
    let req = preferring(in_group(
        request(1, 512),
        "web-2",
        "web",
        Scope::FaultDomain,
    ));
    assert_eq!(placed(&hosts, &members, &req), "c");
    // Every domain has one: the strategy decides among all hosts (a and
    // b are as empty; the first name).
    let members = [member("web-1", "web", "a"), member("web-2", "web", "c")];
    let req = preferring(in_group(
        request(1, 512),
        "web-3",
        "web",
        Scope::FaultDomain,
    ));
    assert_eq!(placed(&hosts, &members, &req), "a");
    // Per host: b has none.
    let req = preferring(in_group(request(1, 512), "web-3", "web", Scope::Host));
    assert_eq!(placed(&hosts, &members, &req), "b");
    // One host only, already holding a member: placed there anyway.
    let one = [host("a", 8, 8192)];
    let members = [member("web-1", "web", "a")];
    let req = preferring(in_group(request(1, 512), "web-2", "web", Scope::Host));
    assert_eq!(placed(&one, &members, &req), "a");
    // A batch of three over two domains: two in one, one in the other.
    let mut hosts = hosts.to_vec();
    let mut members = Vec::new();
    let requests: Vec<Request> = (1..=3)
        .map(|n| {
            preferring(in_group(
                request(1, 256),
                &format!("db-{n}"),
                "db",
                Scope::FaultDomain,
            ))
        })
        .collect();
    let decisions = place_batch(&mut hosts, &mut members, &requests);
    let on: Vec<String> = decisions
        .into_iter()
        .map(|decision| match decision {
            Decision::Placed { host } => host,
            Decision::Unplaceable(why) => panic!("{why}"),
        })
        .collect();
    assert_eq!(on[1], "c", "{on:?}");
    assert_ne!(on[0], "c", "{on:?}");
    assert_ne!(on[2], "c", "{on:?}");
}
