//! Placement over random clusters, checked against the rules written out
//! again here (not through the crate's own filters): a placed host passes
//! every filter, an unplaceable VM's explanation names every host once and
//! only when no host fits, the scores pick the extreme load, a batch never
//! overfills a host or breaks anti-affinity, and the order of the hosts
//! does not matter.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use nubis_placement::{
    place, place_batch, AntiAffinity, Decision, Filter, GroupMember, HostState, HostView,
    NetworkReach, Request, Resources, Scope, Strategy as Scoring,
};
use proptest::prelude::*;
use proptest::sample::subsequence;

const NETWORKS: [&str; 3] = ["n1", "n2", "n3"];
const GROUPS: [&str; 2] = ["g1", "g2"];

/// Mostly small amounts (so hosts fill up and loads tie), sometimes any.
fn amount(small: u64) -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0..=small, 1 => Just(u64::MAX), 1 => any::<u64>()]
}

fn resources(vcpus: u64, memory: u64, disk: u64) -> impl Strategy<Value = Resources> {
    (amount(vcpus), amount(memory), amount(disk))
        .prop_map(|(v, m, d)| Resources::new(u32::try_from(v).unwrap_or(u32::MAX), m, d))
}

/// Some part of `capacity`, or now and then more than all of it.
fn allocation(capacity: Resources) -> impl Strategy<Value = Resources> {
    fn part(of: u64) -> impl Strategy<Value = u64> {
        prop_oneof![9 => 0..=of, 1 => any::<u64>()]
    }
    (
        part(capacity.vcpus.into()),
        part(capacity.memory_mib),
        part(capacity.disk_mib),
    )
        .prop_map(|(v, m, d)| Resources::new(u32::try_from(v).unwrap_or(u32::MAX), m, d))
}

fn label(
    key: &'static str,
    values: &'static [&'static str],
) -> impl Strategy<Value = Option<(String, String)>> {
    proptest::option::of(
        proptest::sample::select(values).prop_map(move |v| (key.to_string(), v.to_string())),
    )
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    (
        label("zone", &["cloud", "onprem"]),
        label("fault-domain", &["1", "2", "3"]),
        label("gpu", &["yes", "no"]),
    )
        .prop_map(|(a, b, c)| [a, b, c].into_iter().flatten().collect())
}

fn network_set() -> impl Strategy<Value = BTreeSet<String>> {
    subsequence(NETWORKS.to_vec(), 0..=2).prop_map(|n| n.into_iter().map(String::from).collect())
}

fn host(index: usize) -> impl Strategy<Value = HostView> {
    let state = prop_oneof![6 => Just(HostState::Up), 1 => Just(HostState::Cordoned), 1 => Just(HostState::Down)];
    let reach = prop_oneof![
        Just(NetworkReach::Any),
        network_set().prop_map(NetworkReach::Only)
    ];
    (
        proptest::sample::select(vec!['a', 'b', 'c']),
        state,
        labels(),
        resources(8, 4096, 100).prop_flat_map(|capacity| (Just(capacity), allocation(capacity))),
        reach,
        0u32..6,
    )
        .prop_map(
            move |(prefix, state, labels, (capacity, allocated), networks, vms)| HostView {
                // Unique names, in an order unrelated to the slice's.
                name: format!("{prefix}{index}"),
                state,
                labels,
                capacity,
                allocated,
                networks,
                vms,
            },
        )
}

fn cluster() -> impl Strategy<Value = Vec<HostView>> {
    (0usize..=12).prop_flat_map(|n| (0..n).map(host).collect::<Vec<_>>())
}

/// A request for `vm`; `names` are the cluster's hosts (for a named host).
fn request(vm: String, names: Vec<String>) -> impl Strategy<Value = Request> {
    let named = if names.is_empty() {
        Just(None).boxed()
    } else {
        proptest::sample::select(names).prop_map(Some).boxed()
    };
    let host = prop_oneof![8 => Just(None), 2 => named, 1 => Just(Some("missing".to_string()))];
    let anti = proptest::option::of(
        (
            proptest::sample::select(GROUPS.to_vec()),
            prop_oneof![Just(Scope::Host), Just(Scope::FaultDomain)],
            proptest::bool::weighted(0.25),
        )
            .prop_map(|(group, scope, preferred)| AntiAffinity {
                group: group.to_string(),
                scope,
                preferred,
            }),
    );
    let require = (
        label("zone", &["cloud", "onprem"]),
        prop_oneof![9 => Just(None), 1 => label("fault-domain", &["1", "2"])],
        prop_oneof![3 => Just(None), 1 => label("gpu", &["yes"])],
    )
        .prop_map(|(a, b, c)| [a, b, c].into_iter().flatten().collect());
    (
        resources(4, 2048, 50),
        require,
        network_set(),
        anti,
        host,
        prop_oneof![Just(Scoring::Spread), Just(Scoring::BinPack)],
    )
        .prop_map(
            move |(needs, require, networks, anti_affinity, host, strategy)| Request {
                vm: vm.clone(),
                needs,
                require,
                networks,
                anti_affinity,
                host,
                strategy,
            },
        )
}

fn members(names: Vec<String>) -> impl Strategy<Value = Vec<GroupMember>> {
    let mut hosts = names;
    hosts.push("gone".to_string());
    proptest::collection::vec(
        (
            proptest::sample::select(GROUPS.to_vec()),
            proptest::sample::select(hosts),
        ),
        0..6,
    )
    .prop_map(|picks| {
        picks
            .into_iter()
            .enumerate()
            .map(|(i, (group, host))| GroupMember {
                vm: format!("old{i}"),
                group: group.to_string(),
                host,
            })
            .collect()
    })
}

fn names(hosts: &[HostView]) -> Vec<String> {
    hosts.iter().map(|h| h.name.clone()).collect()
}

/// A cluster, its group members and one request (now and then for a VM
/// that is a member already, placed again).
fn case() -> impl Strategy<Value = (Vec<HostView>, Vec<GroupMember>, Request)> {
    cluster().prop_flat_map(|hosts| {
        let host_names = names(&hosts);
        let group_members = members(host_names.clone());
        let vm = prop_oneof![4 => Just("new"), 1 => Just("old0"), 1 => Just("old1")];
        let request = vm.prop_flat_map(move |vm| request(vm.to_string(), host_names.clone()));
        (Just(hosts), group_members, request)
    })
}

// The rules again, written plainly.

/// The fault domain as a string no host name can collide with.
fn domain(hosts: &[HostView], name: &str) -> String {
    match hosts
        .iter()
        .find(|h| h.name == name)
        .and_then(|h| h.labels.get("fault-domain"))
    {
        Some(label) => format!("label {label}"),
        None => format!("host {name}"),
    }
}

/// The first filter `host` fails, if any.
fn first_failure(
    hosts: &[HostView],
    members: &[GroupMember],
    request: &Request,
    host: &HostView,
) -> Option<Filter> {
    if request
        .host
        .as_ref()
        .is_some_and(|pinned| *pinned != host.name)
    {
        return Some(Filter::Pinned);
    }
    match host.state {
        HostState::Down => return Some(Filter::Down),
        HostState::Cordoned => return Some(Filter::Cordoned),
        HostState::Up => {}
    }
    if request
        .require
        .iter()
        .any(|(k, v)| host.labels.get(k) != Some(v))
    {
        return Some(Filter::Label);
    }
    if let NetworkReach::Only(carried) = &host.networks {
        if !request.networks.is_subset(carried) {
            return Some(Filter::Network);
        }
    }
    // A preferred anti-affinity never excludes a host.
    if let Some(anti) = request
        .anti_affinity
        .as_ref()
        .filter(|anti| !anti.preferred)
    {
        let clash = members.iter().any(|m| {
            m.group == anti.group
                && m.vm != request.vm
                && match anti.scope {
                    Scope::Host => m.host == host.name,
                    Scope::FaultDomain => domain(hosts, &m.host) == domain(hosts, &host.name),
                }
        });
        if clash {
            return Some(Filter::AntiAffinity);
        }
    }
    let (cap, alloc, needs) = (host.capacity, host.allocated, request.needs);
    let fits = needs.vcpus <= cap.vcpus.saturating_sub(alloc.vcpus)
        && needs.memory_mib <= cap.memory_mib.saturating_sub(alloc.memory_mib)
        && needs.disk_mib <= cap.disk_mib.saturating_sub(alloc.disk_mib);
    if !fits {
        return Some(Filter::Capacity);
    }
    None
}

/// used / capacity, exactly: (numerator, denominator), with x / 0 as 0 for
/// x = 0 and as 1 / 0 (more than any fraction) otherwise.
fn fraction(used: u128, capacity: u128) -> (u128, u128) {
    match (used, capacity) {
        (0, 0) => (0, 1),
        (_, 0) => (1, 0),
        pair => pair,
    }
}

/// Compares fractions of feasible hosts, whose numerators are at most
/// u64::MAX (a host takes a VM only into what it has free, or, allocated
/// beyond its capacity, one that needs none of it): the products fit.
fn compare(a: (u128, u128), b: (u128, u128)) -> Ordering {
    (a.0 * b.1).cmp(&(b.0 * a.1))
}

fn load(host: &HostView, needs: Resources) -> (u128, u128) {
    let (cap, alloc) = (host.capacity, host.allocated);
    [
        fraction(
            u128::from(alloc.vcpus) + u128::from(needs.vcpus),
            cap.vcpus.into(),
        ),
        fraction(
            u128::from(alloc.memory_mib) + u128::from(needs.memory_mib),
            cap.memory_mib.into(),
        ),
        fraction(
            u128::from(alloc.disk_mib) + u128::from(needs.disk_mib),
            cap.disk_mib.into(),
        ),
    ]
    .into_iter()
    .max_by(|a, b| compare(*a, *b))
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (1) A placed host passes every filter; (2) an unplaceable decision
    /// comes only when no host does, and names every host exactly once,
    /// under the first filter it fails.
    #[test]
    fn decisions_agree_with_the_filters((hosts, members, request) in case()) {
        let feasible: Vec<&HostView> = hosts
            .iter()
            .filter(|h| first_failure(&hosts, &members, &request, h).is_none())
            .collect();
        match place(&hosts, &members, &request) {
            Decision::Placed { host } => {
                let chosen = hosts.iter().find(|h| h.name == host).expect("a host of the cluster");
                prop_assert_eq!(first_failure(&hosts, &members, &request, chosen), None);
            }
            Decision::Unplaceable(why) => {
                prop_assert!(feasible.is_empty());
                let mut named: Vec<&str> = why.rejections.iter().map(|r| r.host.as_str()).collect();
                named.sort_unstable();
                let mut all: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                all.sort_unstable();
                prop_assert_eq!(named, all);
                for host in &hosts {
                    let reason = why.reason(&host.name).expect("every host has a reason");
                    prop_assert_eq!(Some(reason.filter()), first_failure(&hosts, &members, &request, host));
                }
                // In filter order.
                let filters: Vec<Filter> = why.rejections.iter().map(|r| r.reason.filter()).collect();
                prop_assert!(filters.windows(2).all(|w| w[0] <= w[1]));
                prop_assert_eq!(why.pinned.as_ref(), request.host.as_ref());
                prop_assert_eq!(
                    why.pinned_host_missing(),
                    request.host.as_ref().is_some_and(|p| !hosts.iter().any(|h| h.name == *p))
                );
                // The text lists every host not left out for being another
                // than the one named.
                let text = why.to_string();
                prop_assert!(text.starts_with("no host fits: "), "{}", text);
                let words: BTreeSet<&str> = text.split([' ', ',', ';', ':', '(', ')']).collect();
                for rejection in &why.rejections {
                    if rejection.reason.filter() != Filter::Pinned {
                        prop_assert!(words.contains(rejection.host.as_str()), "{} not in {}", rejection.host, text);
                    }
                }
            }
        }
    }

    /// (3) Spread picks the lowest load after placement (then fewest VMs,
    /// then first name); bin-pack the highest (then first name).
    #[test]
    fn scores_pick_the_extreme_load((hosts, members, request) in case()) {
        let mut feasible: Vec<&HostView> = hosts
            .iter()
            .filter(|h| first_failure(&hosts, &members, &request, h).is_none())
            .collect();
        // A preferred anti-affinity scores only the least crowded hosts.
        if let Some(anti) = request.anti_affinity.as_ref().filter(|anti| anti.preferred) {
            let crowding = |host: &HostView| {
                members
                    .iter()
                    .filter(|m| m.group == anti.group && m.vm != request.vm)
                    .filter(|m| match anti.scope {
                        Scope::Host => m.host == host.name,
                        Scope::FaultDomain => domain(&hosts, &m.host) == domain(&hosts, &host.name),
                    })
                    .count()
            };
            let least = feasible.iter().map(|h| crowding(h)).min();
            feasible.retain(|h| Some(crowding(h)) == least);
        }
        let Decision::Placed { host } = place(&hosts, &members, &request) else {
            return Ok(());
        };
        let chosen = feasible.iter().find(|h| h.name == host).expect("a feasible host");
        let chosen_load = load(chosen, request.needs);
        for other in &feasible {
            let other_load = load(other, request.needs);
            let by_load = compare(chosen_load, other_load);
            match request.strategy {
                Scoring::Spread => {
                    prop_assert_ne!(by_load, Ordering::Greater, "{} is less loaded than {}", other.name, host);
                    if by_load == Ordering::Equal {
                        prop_assert!((chosen.vms, &chosen.name) <= (other.vms, &other.name));
                    }
                }
                Scoring::BinPack => {
                    prop_assert_ne!(by_load, Ordering::Less, "{} is more loaded than {}", other.name, host);
                    if by_load == Ordering::Equal {
                        prop_assert!(chosen.name <= other.name);
                    }
                }
            }
        }
    }

    /// (5) The order of the hosts, and of the group members, does not
    /// change the decision, explanation included.
    #[test]
    fn the_order_of_the_inputs_does_not_matter(
        ((hosts, members, request), shuffled_hosts, shuffled_members) in case().prop_flat_map(|(hosts, members, request)| {
            let shuffled_hosts = Just(hosts.clone()).prop_shuffle();
            let shuffled_members = Just(members.clone()).prop_shuffle();
            (Just((hosts, members, request)), shuffled_hosts, shuffled_members)
        })
    ) {
        prop_assert_eq!(
            place(&hosts, &members, &request),
            place(&shuffled_hosts, &shuffled_members, &request)
        );
    }

    /// (4) A batch never gives a host more than it had free, nor puts two
    /// VMs of a group on one host (or fault domain, as each asks).
    #[test]
    fn batches_respect_capacity_and_anti_affinity(
        (hosts, members, requests) in cluster().prop_flat_map(|hosts| {
            let names = names(&hosts);
            let requests: Vec<_> = (0..8).map(|i| request(format!("vm{i}"), names.clone())).collect();
            (Just(hosts), members(names), requests)
        })
    ) {
        let mut after = hosts.clone();
        let mut now = members.clone();
        let decisions = place_batch(&mut after, &mut now, &requests);
        prop_assert_eq!(decisions.len(), requests.len());

        let mut given: BTreeMap<&str, [u128; 3]> = BTreeMap::new();
        let mut placed_members = members.clone();
        for (request, decision) in requests.iter().zip(&decisions) {
            let Decision::Placed { host } = decision else { continue };
            let sum = given.entry(host).or_default();
            sum[0] += u128::from(request.needs.vcpus);
            sum[1] += u128::from(request.needs.memory_mib);
            sum[2] += u128::from(request.needs.disk_mib);
            if let Some(anti) = &request.anti_affinity {
                for earlier in placed_members.iter().filter(|m| m.group == anti.group && !anti.preferred) {
                    let clash = match anti.scope {
                        Scope::Host => earlier.host == *host,
                        Scope::FaultDomain => domain(&hosts, &earlier.host) == domain(&hosts, host),
                    };
                    prop_assert!(!clash, "{} on {} next to {} on {}", request.vm, host, earlier.vm, earlier.host);
                }
                placed_members.push(GroupMember {
                    vm: request.vm.clone(),
                    group: anti.group.clone(),
                    host: host.clone(),
                });
            }
        }
        for (before, after) in hosts.iter().zip(&after) {
            let free = before.free();
            let sum = given.get(before.name.as_str()).copied().unwrap_or_default();
            prop_assert!(sum[0] <= u128::from(free.vcpus), "{}: {:?} of {:?}", before.name, sum, free);
            prop_assert!(sum[1] <= u128::from(free.memory_mib), "{}: {:?} of {:?}", before.name, sum, free);
            prop_assert!(sum[2] <= u128::from(free.disk_mib), "{}: {:?} of {:?}", before.name, sum, free);
            let placed_here = decisions
                .iter()
                .filter(|d| matches!(d, Decision::Placed { host } if *host == before.name))
                .count();
            prop_assert_eq!(u64::from(after.vms), (u64::from(before.vms) + placed_here as u64).min(u32::MAX.into()));
        }
        prop_assert_eq!(now, placed_members);
    }
}
