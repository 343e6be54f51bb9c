//! VMs in a cluster on real etcd, real agents and real KVM guests (issue
//! #16): four simulated hosts (network namespaces, each running its own
//! agent, joined by an underlay switch for the peer channel) in one etcd
//! cluster. VMs created through one host are placed by the controller:
//! an anti-affinity group spreads over a, b and c, whose guests boot and
//! whose consoles are read through host a (forwarded to their hosts);
//! every host lists the same VMs. Required labels pick the host; a VM no
//! host can take stays pending with the reason as an event, and is placed
//! when a host with room joins. When the controller's agent dies another
//! host places the new VMs. Two creations racing for a tenant's last vCPU
//! through two hosts: one wins, one gets 429. VMs deleted through hosts
//! other than their own are gone everywhere, VMMs included.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use nubis_api::{
    AntiAffinity, AntiAffinityScope, ClusterHost, HostLossPolicy, HostState, Image, Network,
    NetworkCreate, PortForward, PortForwardCreate, Protocol, Quota, Snapshot, Vm, VmCreate,
    VmEvent, VmNicCreate, VmPlacement, VmState,
};
use nubis_tests::agent::{
    busybox_image, console_value, expect_as, jailed_pids, parent_cgroup, tenant_with_quota,
    vmm_pid, Reply, BOOT_GUARD,
};
use nubis_tests::cluster::{
    host_states, tail, Cluster, Host, Layout, Member, Underlay, COMPUTE, MAY_LEAD, SETTLE,
};
use nubis_tests::etcd::EtcdCluster;
use nubis_tests::{guest_images, require_kvm, TestDir};
use serde::Serialize;

/// Seconds of a host's lease: short, so that a dead controller is
/// replaced quickly.
const LEASE_TTL_S: u64 = 3;
/// What each guest prints once its user space runs, then its name.
const MARKER: &str = "CLUSTER_VM_UP";
/// The guests' memory: small, they only print a line.
const GUEST_MEMORY_MIB: u64 = 128;

/// This test's cluster, apart from cluster_services' (same lane, but a
/// binary's namespaces may outlive it on a crash).
const LAYOUT: Layout = Layout {
    prefix: "nbv",
    underlay_octet: 47,
    port: 8282,
    lease_ttl_s: LEASE_TTL_S,
};

/// What this test checks of the cluster beyond the shared helpers.
trait VmChecks {
    fn unplaceable(&self, via: &str, token: &str, id: &str, reason: &str) -> VmEvent;
    fn same_everywhere(
        &self,
        token: &str,
        expected: Option<&BTreeSet<VmShape>>,
    ) -> BTreeSet<VmShape>;
    fn race(
        &self,
        path: &str,
        token: &str,
        bodies: [(&str, impl Serialize); 2],
        refused: u16,
    ) -> Vec<Reply>;
}

impl VmChecks for Cluster {
    /// Waits until VM `id`'s events (through `via`) have an `unplaceable`
    /// one that mentions `reason`; checks it is still pending.
    fn unplaceable(&self, via: &str, token: &str, id: &str, reason: &str) -> VmEvent {
        let event = self.wait_for(
            &format!("VM {id} is unplaceable for {reason}"),
            SETTLE,
            || {
                let events: Vec<VmEvent> = self
                    .member(via)
                    .get(&format!("/v1/vms/{id}/events"), token)?;
                events
                    .iter()
                    .find(|event| event.kind == "unplaceable" && event.message.contains(reason))
                    .cloned()
                    .ok_or_else(|| format!("{events:?}"))
            },
        );
        let vm = self.vm(via, token, id).expect("the unplaceable VM");
        assert_eq!(
            (vm.state, vm.host.as_deref()),
            (VmState::Pending, None),
            "{vm:?}"
        );
        event
    }

    /// `token`'s VMs as every running host lists them, once they all list
    /// the same (id, name, host, state) and that is `expected` (when
    /// given).
    fn same_everywhere(
        &self,
        token: &str,
        expected: Option<&BTreeSet<VmShape>>,
    ) -> BTreeSet<VmShape> {
        self.wait_for("every host lists the same VMs", SETTLE, || {
            let mut seen = Vec::new();
            for member in self.running() {
                let vms: Vec<Vm> = member.get("/v1/vms", token)?;
                seen.push((
                    member.name(),
                    vms.iter().map(shape).collect::<BTreeSet<_>>(),
                ));
            }
            let first = seen[0].1.clone();
            let agree = seen.iter().all(|(_, vms)| *vms == first);
            if agree && expected.is_none_or(|expected| *expected == first) {
                Ok(first)
            } else {
                Err(format!("expected {expected:?}, listed: {seen:#?}"))
            }
        })
    }

    /// Sends two creations at once, each through its host (`via`), from
    /// threads released together: their replies, which must be one 201
    /// and one `refused`.
    fn race(
        &self,
        path: &str,
        token: &str,
        bodies: [(&str, impl Serialize); 2],
        refused: u16,
    ) -> Vec<Reply> {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = bodies
            .into_iter()
            .map(|(via, body)| {
                let address = self.member(via).agent().address;
                let (token, barrier) = (token.to_string(), barrier.clone());
                let path = path.to_string();
                let body = nubis_tests::agent::json_body(&body);
                std::thread::spawn(move || {
                    barrier.wait();
                    nubis_tests::agent::http(address, "POST", &path, Some(&token), Some(&body))
                })
            })
            .collect();
        let replies: Vec<Reply> = racers
            .into_iter()
            .map(|racer| racer.join().expect("a racing creation"))
            .collect();
        let mut statuses: Vec<u16> = replies.iter().map(|reply| reply.status).collect();
        statuses.sort();
        let mut expected = [201, refused];
        expected.sort();
        assert_eq!(statuses, expected, "{replies:#?}");
        replies
    }
}

/// The state of VM `id` in host `host`'s own store (its agent's API
/// asks etcd, which a lost host cannot reach): None if it has none.
fn local_state(cluster: &Cluster, dir: &TestDir, host: &str, id: &str) -> Option<String> {
    let db = cluster.member(host).host.data_dir(dir).join("agent.db");
    let script = "import sqlite3, sys\n\
                  db = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True)\n\
                  row = db.execute('SELECT state FROM vms WHERE id = ?', (sys.argv[2],)).fetchone()\n\
                  print(row[0] if row else '-')\n";
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(&db)
        .arg(id)
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "{host}'s store: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let state = String::from_utf8_lossy(&output.stdout).trim().to_string();
    (state != "-").then_some(state)
}

/// Step 7b of the test (see there).
fn lost_host_and_back(cluster: &Cluster, dir: &TestDir, token: &str, phase: &dyn Fn(&str)) {
    let names: Vec<&str> = cluster.members.iter().map(|m| m.name()).collect();
    let leader = cluster.controller("a", &names);
    let lost = *names
        .iter()
        .find(|name| **name != leader)
        .expect("a host that does not lead");
    let others: Vec<&str> = names.iter().copied().filter(|name| *name != lost).collect();
    let operator = |via: &str, path: &str| {
        let reply = cluster
            .member(via)
            .call("POST", path, &cluster.member(via).host.token, None);
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
    };
    // Both land on the host to lose: the others cordoned meanwhile.
    for name in &others {
        operator(leader.as_str(), &format!("/v1/hosts/{name}/cordon"));
    }
    let phoenix = VmCreate {
        placement: VmPlacement {
            on_host_loss: HostLossPolicy::Restart,
            ..VmPlacement::default()
        },
        ..guest("phoenix", None, true)
    };
    let phoenix = cluster.create(leader.as_str(), token, &phoenix);
    let stayer = cluster.create(leader.as_str(), token, &guest("stayer", None, true));
    for vm in [&phoenix, &stayer] {
        cluster.wait_for(&format!("{} running on {lost}", vm.name), SETTLE, || {
            let seen = cluster.vm(leader.as_str(), token, &vm.id)?;
            (seen.state == VmState::Running && seen.host.as_deref() == Some(lost))
                .then_some(())
                .ok_or_else(|| format!("{seen:?}"))
        });
    }
    for name in &others {
        operator(leader.as_str(), &format!("/v1/hosts/{name}/uncordon"));
    }
    phase(&format!("phoenix and stayer running on {lost}"));

    cluster.member(lost).host.netns.set_host_link_up(false);
    let moved_to = cluster.wait_for(
        &format!("phoenix restarted away from {lost}"),
        SETTLE,
        || {
            let seen = cluster.vm(leader.as_str(), token, &phoenix.id)?;
            match seen.host.as_deref() {
                Some(host) if host != lost && seen.state == VmState::Running => {
                    Ok(host.to_string())
                }
                _ => Err(format!("{seen:?}")),
            }
        },
    );
    // The lost host paused its copy when it lost the cluster, before the
    // controller restarted it (two lease TTLs after the host went down).
    let old = local_state(cluster, dir, lost, &phoenix.id);
    assert_eq!(
        old.as_deref(),
        Some("paused"),
        "phoenix's copy on the lost host"
    );
    let kept = local_state(cluster, dir, lost, &stayer.id);
    assert_eq!(kept.as_deref(), Some("running"), "stayer on the lost host");
    let events: Vec<VmEvent> = cluster
        .member(leader.as_str())
        .get(&format!("/v1/vms/{}/events", stayer.id), token)
        .expect("stayer's events");
    assert!(
        events.iter().any(|event| event.kind == "host-lost"),
        "{events:?}"
    );
    phase(&format!(
        "{lost} lost: phoenix restarted on {moved_to}, its old copy paused; stayer waits"
    ));

    cluster.member(lost).host.netns.set_host_link_up(true);
    cluster.wait_for(
        &format!("{lost}'s copy of phoenix fenced off"),
        SETTLE,
        || match local_state(cluster, dir, lost, &phoenix.id) {
            None => Ok(()),
            Some(state) => Err(state),
        },
    );
    let data_dir = cluster.member(lost).host.data_dir(dir);
    assert_eq!(vmm_pid(&data_dir, &phoenix.id), None, "phoenix's old VMM");
    for (vm, host) in [(&phoenix, moved_to.as_str()), (&stayer, lost)] {
        cluster.wait_for(
            &format!("{} running on {host}, seen from every host", vm.name),
            SETTLE,
            || {
                for name in &names {
                    let seen = cluster.vm(name, token, &vm.id)?;
                    if seen.state != VmState::Running || seen.host.as_deref() != Some(host) {
                        return Err(format!("through {name}: {seen:?}"));
                    }
                }
                Ok(())
            },
        );
    }
    for vm in [&phoenix, &stayer] {
        let reply = cluster.member(leader.as_str()).call(
            "DELETE",
            &format!("/v1/vms/{}", vm.id),
            token,
            None,
        );
        assert_eq!(reply.status, 204, "{reply:?}");
    }
    phase(&format!(
        "{lost} back: its replaced copy fenced off, stayer kept running there"
    ));
}

/// What every host must agree on about a VM: id, name, host, state.
type VmShape = (String, String, Option<String>, &'static str);

fn shape(vm: &Vm) -> VmShape {
    (
        vm.id.clone(),
        vm.name.clone(),
        vm.host.clone(),
        vm.state.as_str(),
    )
}

/// A busybox guest `name` that prints [`MARKER`] and its name, then
/// waits; in anti-affinity group `group` (per host) if given.
fn guest(name: &str, group: Option<&str>, start: bool) -> VmCreate {
    VmCreate {
        memory_mib: GUEST_MEMORY_MIB,
        kernel_args: format!("nubis_cmd=\"echo {MARKER} {name}; read wait_forever\""),
        placement: VmPlacement {
            anti_affinity: group.map(|group| AntiAffinity {
                group: group.to_string(),
                scope: AntiAffinityScope::Host,
                preferred: false,
            }),
            ..VmPlacement::default()
        },
        start,
        ..VmCreate::new(name, "busybox")
    }
}

/// The tenant's network that the web guests share: one L2 segment over
/// VXLAN across the hosts they run on.
const LAN: &str = "10.70.0.0/24";

/// Web guest `n` (1 to 3) of group "web", started, with a NIC on the lan:
/// the cluster gives web-N address 10.70.0.(N+1) (created in order), and
/// each pings the next one (on another host: the group spreads them),
/// then prints how many tries it took.
fn web_guest(n: u8) -> VmCreate {
    let name = format!("web-{n}");
    let next = n % 3 + 2;
    let script = format!(
        "echo {MARKER} {name}; echo MTU {name} $(cat /sys/class/net/eth0/mtu); \
         n=0; until ping -c1 -W1 10.70.0.{next} >/dev/null; \
         do n=$((n+1)); [ $n -gt 300 ] && break; done; echo PING_NEXT {name} $n; read wait_forever"
    );
    VmCreate {
        kernel_args: format!("nubis_cmd=\"{script}\""),
        nics: vec![VmNicCreate::on_network("lan")],
        ..guest(&name, Some("web"), true)
    }
}

/// A quota large enough for a 16-vCPU VM and a dozen small ones.
fn large_quota() -> Quota {
    Quota {
        max_vcpus: 64,
        max_memory_mib: 16384,
        max_vms: 16,
        ..Quota::default()
    }
}

#[test]
fn vms_are_placed_across_hosts_and_reached_through_any() {
    require_kvm();
    let started = Instant::now();
    let phase = |what: &str| eprintln!("cluster_vms: {what} ({} s)", started.elapsed().as_secs());
    let dir = TestDir::new("cluster-vms");
    let images = guest_images();
    let image_dir = images
        .vmlinux
        .parent()
        .expect("the guest images' directory")
        .to_path_buf();
    let underlay = Underlay::new(LAYOUT);
    // One member: the cluster's etcd is not what this test is about.
    let etcd = EtcdCluster::start(&dir.join("etcd"), 1, Ipv4Addr::LOCALHOST, None);
    // a and b may lead; c only runs VMs. Each offers 4 vCPUs and 2 GiB.
    let first_three = [
        (0, "a", 47, "zone=onprem,fault-domain=1", MAY_LEAD),
        (1, "b", 48, "zone=onprem,fault-domain=2", MAY_LEAD),
        (2, "c", 49, "zone=cloud,fault-domain=3", COMPUTE),
    ];
    let mut cluster = Cluster {
        members: first_three
            .into_iter()
            .map(|(index, name, subnet, labels, roles)| {
                let host = Host::new(&underlay, index, name, subnet, labels, roles, (4, 2048));
                Member {
                    agent: Some(host.join(&dir, &image_dir, &etcd)),
                    host,
                }
            })
            .collect(),
    };
    cluster.controller("a", &["a", "b", "c"]);
    phase("three hosts up");

    // 1. A tenant, its token and the busybox image, all through a; the
    // image is every host's, under the same id.
    let (acme_id, acme) = tenant_with_quota(cluster.member("a").agent(), "acme", large_quota());
    let image = busybox_image(cluster.member("a").agent(), &acme, &images);
    for name in ["b", "c"] {
        cluster.wait_for(
            &format!("the image registered through a is listed on {name}"),
            SETTLE,
            || {
                let listed: Vec<Image> = cluster.member(name).get("/v1/images", &acme)?;
                listed
                    .iter()
                    .any(|listed| listed.id == image.id && listed.name == "busybox")
                    .then_some(())
                    .ok_or_else(|| format!("{listed:?}"))
            },
        );
    }

    // 2. Three started VMs of group "web", all created through a: one on
    // each of a, b and c, on one network of the cluster.
    let lan: Network =
        cluster
            .member("a")
            .agent()
            .create("/v1/networks", &acme, &NetworkCreate::new("lan", LAN));
    let web: Vec<Vm> = (1..=3)
        .map(|n| cluster.create("a", &acme, &web_guest(n)))
        .collect();
    for (vm, n) in web.iter().zip(2..) {
        assert_eq!(vm.state, VmState::Pending, "{vm:?}");
        assert_eq!(vm.host, None, "{vm:?}");
        assert_eq!(
            vm.nics[0].network.as_deref(),
            Some(lan.id.as_str()),
            "{vm:?}"
        );
        assert_eq!(
            vm.nics[0].address,
            Some(format!("10.70.0.{n}/24")),
            "{vm:?}"
        );
    }
    let web_hosts: Vec<String> = web
        .iter()
        .map(|vm| cluster.placed("a", &acme, &vm.id))
        .collect();
    let distinct: BTreeSet<&str> = web_hosts.iter().map(String::as_str).collect();
    assert_eq!(
        distinct,
        BTreeSet::from(["a", "b", "c"]),
        "the group spreads over the three hosts: {web_hosts:?}"
    );
    phase("web-1..3 placed on a, b and c");

    // While they boot: 3. required labels pick the host: zone=cloud is c.
    let mut zoned = guest("zoned", None, false);
    zoned
        .placement
        .require
        .insert("zone".to_string(), "cloud".to_string());
    // It takes an SSH key registered through a (the cluster keeps keys
    // in etcd) and a tag: its host has them for the metadata service.
    let key = nubis_tests::agent::ssh_key(cluster.member("a").agent(), &acme, "laptop");
    zoned.ssh_keys = vec!["laptop".into()];
    zoned.tags.insert("role".into(), "zoned".into());
    let zoned = cluster.create("b", &acme, &zoned);
    assert_eq!(cluster.placed("a", &acme, &zoned.id), "c");
    let on_c: Vm = cluster
        .member("c")
        .get(&format!("/v1/vms/{}", zoned.id), &acme)
        .expect("the zoned VM through c");
    assert_eq!(on_c.ssh_keys, ["laptop"], "{on_c:?}");
    assert_eq!(on_c.tags["role"], "zoned", "{on_c:?}");
    let keys: Vec<nubis_api::SshKey> = cluster
        .member("c")
        .get("/v1/ssh-keys", &acme)
        .expect("the keys through c");
    assert_eq!(keys, std::slice::from_ref(&key));
    let deleted = cluster.member("b").agent().call(
        "DELETE",
        &format!("/v1/ssh-keys/{}", key.id),
        Some(&acme),
        None,
    );
    assert_eq!(deleted.status, 204, "{deleted:?}");

    // 4. A fourth "web" finds every host holding one of its group; a
    // 16-vCPU VM fits no host of 4: both wait, saying why.
    let web4 = cluster.create("a", &acme, &guest("web-4", Some("web"), false));
    let told = cluster.unplaceable("a", &acme, &web4.id, "anti-affinity");
    // It names each host's member of the group.
    for (vm, host) in web.iter().zip(&web_hosts) {
        let member = format!("{host} ({}", vm.id);
        assert!(told.message.contains(&member), "{member} in {told:?}");
    }
    let big = VmCreate {
        vcpus: 16,
        ..guest("big", None, false)
    };
    let big = cluster.create("c", &acme, &big);
    let told = cluster.unplaceable("b", &acme, &big.id, "capacity");
    assert!(told.message.contains("16 vCPUs"), "{told:?}");
    phase("web-4 and big pending");
    // A host with room joins: both go there (it holds nothing of "web").
    let d = Host::new(
        &underlay,
        3,
        "d",
        50,
        "zone=cloud,fault-domain=4",
        COMPUTE,
        (32, 8192),
    );
    let d_agent = d.join(&dir, &image_dir, &etcd);
    cluster.members.push(Member {
        agent: Some(d_agent),
        host: d,
    });
    assert_eq!(cluster.placed("a", &acme, &big.id), "d");
    assert_eq!(cluster.placed("a", &acme, &web4.id), "d");
    phase("d joined: web-4 and big placed on it");

    // 2 (continued). Each web guest runs on its host, where its VMM is;
    // each console, read through a, shows its guest's line. (A VM placed
    // on a host is defined there, stopped, then started.)
    for (vm, host) in web.iter().zip(&web_hosts) {
        cluster.wait_for(
            &format!("{} runs on host {host}", vm.name),
            2 * SETTLE,
            || {
                let seen = cluster.vm("a", &acme, &vm.id)?;
                match seen.state {
                    VmState::Running => Ok(()),
                    VmState::Failed => panic!(
                        "{} failed on host {host}: {seen:?}\n{}",
                        vm.name,
                        cluster.logs()
                    ),
                    VmState::Stopped if seen.last_exit.is_some() => panic!(
                        "{} stopped on host {host}: {seen:?}\n{}",
                        vm.name,
                        cluster.logs()
                    ),
                    _ => Err(format!("{seen:?}")),
                }
            },
        );
        let data_dir = cluster.member(host).host.data_dir(&dir);
        assert!(
            vmm_pid(&data_dir, &vm.id).is_some(),
            "no VMM of {} on host {host}",
            vm.name
        );
    }
    phase("web-1..3 running");
    let mut waiting: Vec<&Vm> = web.iter().collect();
    cluster.wait_for(
        "every web guest's console, read through a, shows its line",
        BOOT_GUARD,
        || {
            let mut last = String::new();
            waiting.retain(|vm| {
                let path = format!("/v1/vms/{}/console", vm.id);
                let reply = cluster.member("a").call("GET", &path, &acme, None);
                assert_eq!(reply.status, 200, "{path} through a: {reply:?}");
                let needle = format!("\n{MARKER} {}", vm.name);
                let up = reply.text.contains(&needle);
                if !up {
                    last = format!("{}:\n{}", vm.name, tail(&reply.text, 15));
                }
                !up
            });
            waiting.is_empty().then_some(()).ok_or(last)
        },
    );
    phase("web-1..3 consoles show their guests' lines");
    // Each web guest reached the next one, on another host, over the lan.
    for vm in &web {
        // At a line's start: the kernel echoes its command line, script
        // included.
        let key = format!("PING_NEXT {}", vm.name);
        let needle = format!("\n{key} ");
        let console = cluster.wait_for(
            &format!("{} pings the next web guest across hosts", vm.name),
            BOOT_GUARD,
            || {
                let path = format!("/v1/vms/{}/console", vm.id);
                let reply = cluster.member("a").call("GET", &path, &acme, None);
                reply
                    .text
                    .contains(&needle)
                    .then(|| reply.text.clone())
                    .ok_or_else(|| tail(&reply.text, 15))
            },
        );
        let tries: u32 = console_value(&console, &key).parse().unwrap_or(u32::MAX);
        assert!(
            tries <= 300,
            "{} never reached the next guest:\n{console}",
            vm.name
        );
        // Its host's DHCP gave it the overlay's MTU: the underlay's 1500
        // less VXLAN's 50 bytes.
        let mtu = console_value(&console, &format!("MTU {}", vm.name));
        assert_eq!(mtu, "1450", "{}'s MTU:\n{console}", vm.name);
    }
    phase("web-1..3 ping each other over the lan, their MTU the overlay's");
    // Every host lists the same VMs, with their hosts and states.
    let mut expected: BTreeSet<VmShape> = web
        .iter()
        .zip(&web_hosts)
        .map(|(vm, host)| {
            (
                vm.id.clone(),
                vm.name.clone(),
                Some(host.clone()),
                VmState::Running.as_str(),
            )
        })
        .collect();
    for (vm, host) in [(&zoned, "c"), (&web4, "d"), (&big, "d")] {
        expected.insert((
            vm.id.clone(),
            vm.name.clone(),
            Some(host.to_string()),
            VmState::Stopped.as_str(),
        ));
    }
    cluster.same_everywhere(&acme, Some(&expected));
    phase("every host lists the same six VMs");

    // What lives on one host is seen from every host, and reached through
    // any: a snapshot of a running web guest and a port forward to one,
    // both made through a host other than the guest's.
    let (snapped, snapped_host) = web
        .iter()
        .zip(&web_hosts)
        .find(|(_, host)| host.as_str() != "a")
        .expect("a web guest off a");
    let taken = cluster.member("a").call(
        "POST",
        &format!("/v1/vms/{}/snapshots", snapped.id),
        &acme,
        None,
    );
    let snapshot: Snapshot = expect_as(&taken, 201);
    let forward = PortForwardCreate {
        vm: snapped.name.clone(),
        nic: 0,
        protocol: Protocol::Tcp,
        host_port: 30080,
        vm_port: 80,
    };
    let made = cluster
        .member("a")
        .agent()
        .send("POST", "/v1/port-forwards", Some(&acme), &forward);
    let forward: PortForward = expect_as(&made, 201);
    for member in &cluster.members {
        let name = member.name();
        cluster.wait_for(
            &format!("{name} lists the snapshot and the port forward on {snapped_host}"),
            SETTLE,
            || {
                let snapshots: Vec<Snapshot> = member.get("/v1/snapshots", &acme)?;
                let forwards: Vec<PortForward> = member.get("/v1/port-forwards", &acme)?;
                (snapshots.iter().any(|s| s.id == snapshot.id)
                    && forwards.iter().any(|f| f.id == forward.id))
                .then_some(())
                .ok_or_else(|| format!("{snapshots:?} {forwards:?}"))
            },
        );
    }
    let elsewhere = cluster
        .members
        .iter()
        .map(Member::name)
        .find(|name| name != snapped_host && *name != "a")
        .expect("a third host");
    for path in [
        format!("/v1/snapshots/{}", snapshot.id),
        format!("/v1/port-forwards/{}", forward.id),
    ] {
        let reply = cluster.member(elsewhere).call("DELETE", &path, &acme, None);
        assert_eq!(
            reply.status, 204,
            "DELETE {path} through {elsewhere}: {reply:?}"
        );
    }
    let seen = cluster
        .vm("a", &acme, &snapped.id)
        .expect("the snapshot's VM");
    assert_eq!(seen.state, VmState::Running, "{seen:?}");
    phase("a snapshot and a port forward made, listed and deleted through other hosts");

    // 5. The controller's agent dies: another host leads, and places a
    // VM created through a surviving host.
    let leader = cluster.controller("a", &["a", "b", "c", "d"]);
    let dead = cluster
        .members
        .iter()
        .position(|member| member.name() == leader)
        .expect("the controller is a member");
    cluster.members[dead]
        .agent
        .as_mut()
        .expect("the controller's agent")
        .kill();
    let witness = cluster
        .members
        .iter()
        .find(|member| member.name() != leader)
        .expect("a survivor")
        .name();
    let new_leader = cluster.wait_for("another host leads", SETTLE, || {
        let hosts = cluster.member(witness).hosts()?;
        let gone = hosts
            .iter()
            .any(|h| h.name == leader && h.state == HostState::Down);
        let leaders: Vec<&ClusterHost> = hosts.iter().filter(|h| h.controller).collect();
        match leaders.as_slice() {
            [one] if gone && one.name != leader => Ok(one.name.clone()),
            _ => Err(host_states(&hosts)),
        }
    });
    phase(&format!("{leader}'s agent killed: {new_leader} leads"));
    let late = cluster.create(witness, &acme, &guest("late", None, false));
    let late_host = cluster.placed(witness, &acme, &late.id);
    assert_ne!(late_host, leader, "placed on the dead host");
    phase(&format!("late placed on {late_host} by {new_leader}"));
    // The dead agent comes back (its guest ran on meanwhile: its VMMs are
    // left running, not killed with its handle).
    let (_, _) = cluster.members[dead]
        .agent
        .take()
        .expect("the killed agent's handle")
        .crashed();
    let back = cluster.members[dead].host.join(&dir, &image_dir, &etcd);
    cluster.members[dead].agent = Some(back);
    cluster.controller(&leader, &["a", "b", "c", "d"]);
    let (index, _) = web_hosts
        .iter()
        .enumerate()
        .find(|(_, host)| **host == leader)
        .expect("a web VM on every host of a, b, c");
    cluster.wait_for(
        &format!("{} still runs on {leader}, back", web[index].name),
        SETTLE,
        || {
            let seen = cluster.vm(&leader, &acme, &web[index].id)?;
            (seen.state == VmState::Running)
                .then_some(())
                .ok_or_else(|| format!("{seen:?}"))
        },
    );
    phase(&format!("{leader}'s agent back"));

    // 6. Quota race: a tenant with room for one more vCPU; two creations
    // at once through b and c: one 201, one 429. Then its one port
    // forward, asked for at once for two VMs on two hosts.
    let race_quota = Quota {
        max_vcpus: 2,
        max_port_forwards: 1,
        ..Quota::default()
    };
    let (racer_id, racer) = tenant_with_quota(cluster.member("a").agent(), "racer", race_quota);
    let race_image = busybox_image(cluster.member("a").agent(), &racer, &images);
    for name in ["b", "c"] {
        cluster.wait_for(
            &format!("racer's token and image work on {name}"),
            SETTLE,
            || {
                let listed: Vec<Image> = cluster.member(name).get("/v1/images", &racer)?;
                listed
                    .iter()
                    .any(|listed| listed.id == race_image.id)
                    .then_some(())
                    .ok_or_else(|| format!("{listed:?}"))
            },
        );
    }
    // On their host's default bridge: a port forward needs a NIC.
    let racing = |name: &str| VmCreate {
        nics: vec![VmNicCreate::default()],
        ..guest(name, Some("race"), false)
    };
    let first = cluster.create("a", &racer, &racing("race-0"));
    let replies = cluster.race(
        "/v1/vms",
        &racer,
        [("b", racing("race-1")), ("c", racing("race-2"))],
        429,
    );
    let refused = replies.iter().find(|r| r.status == 429).expect("a 429");
    assert!(refused.text.contains("vCPUs"), "{refused:?}");
    let winner: Vm = expect_as(
        replies.iter().find(|r| r.status == 201).expect("a 201"),
        201,
    );
    let race_vms = [first, winner];
    let race_expected: BTreeSet<VmShape> = race_vms
        .iter()
        .map(|vm| {
            let host = cluster.placed("a", &racer, &vm.id);
            (
                vm.id.clone(),
                vm.name.clone(),
                Some(host),
                VmState::Stopped.as_str(),
            )
        })
        .collect();
    cluster.same_everywhere(&racer, Some(&race_expected));
    phase("quota race: one 201, one 429");
    // The two VMs are on two hosts (their group): each host counts the
    // other's forwards.
    let forward_to = |vm: &Vm, host_port: u16| PortForwardCreate {
        vm: vm.name.clone(),
        nic: 0,
        protocol: Protocol::Tcp,
        host_port,
        vm_port: 80,
    };
    let replies = cluster.race(
        "/v1/port-forwards",
        &racer,
        [
            ("b", forward_to(&race_vms[0], 30090)),
            ("c", forward_to(&race_vms[1], 30091)),
        ],
        429,
    );
    let refused = replies.iter().find(|r| r.status == 429).expect("a 429");
    assert!(refused.text.contains("port forwards"), "{refused:?}");
    let kept: PortForward = expect_as(
        replies.iter().find(|r| r.status == 201).expect("a 201"),
        201,
    );
    // Deleted through the other host, its claim goes with it: the other
    // VM's forward fits now.
    let other = race_vms
        .iter()
        .find(|vm| vm.id != kept.vm_id)
        .expect("the VM without a forward");
    let deleted = cluster.member("a").call(
        "DELETE",
        &format!("/v1/port-forwards/{}", kept.id),
        &racer,
        None,
    );
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let made = cluster.member("a").agent().send(
        "POST",
        "/v1/port-forwards",
        Some(&racer),
        &forward_to(other, 30092),
    );
    let made: PortForward = expect_as(&made, 201);
    let deleted = cluster.member("b").call(
        "DELETE",
        &format!("/v1/port-forwards/{}", made.id),
        &racer,
        None,
    );
    assert_eq!(deleted.status, 204, "{deleted:?}");
    phase("port forward quota race through two hosts: one 201, one 429");

    // 6b. The last address of a network: a /29 has five for VMs; four are
    // taken, two creations race for the fifth through two hosts.
    let (addr_id, addr) = tenant_with_quota(cluster.member("a").agent(), "addr", large_quota());
    busybox_image(cluster.member("a").agent(), &addr, &images);
    let tiny: Network = cluster.member("b").agent().create(
        "/v1/networks",
        &addr,
        &NetworkCreate::new("tiny", "10.71.0.0/29"),
    );
    let on_tiny = |name: &str| VmCreate {
        nics: vec![VmNicCreate::on_network("tiny")],
        ..guest(name, None, false)
    };
    let mut holders: Vec<Vm> = (2..=5)
        .map(|n| cluster.create("a", &addr, &on_tiny(&format!("holder-{n}"))))
        .collect();
    let replies = cluster.race(
        "/v1/vms",
        &addr,
        [("b", on_tiny("last-1")), ("c", on_tiny("last-2"))],
        429,
    );
    let refused = replies.iter().find(|r| r.status == 429).expect("a 429");
    assert!(refused.text.contains("no free address"), "{refused:?}");
    holders.push(expect_as(
        replies.iter().find(|r| r.status == 201).expect("a 201"),
        201,
    ));
    let addresses: BTreeSet<Option<String>> = holders
        .iter()
        .map(|vm| vm.nics[0].address.clone())
        .collect();
    assert_eq!(addresses.len(), 5, "five VMs, five addresses: {holders:#?}");
    // The operator sees a tenant's VM through any host (forwarded, the
    // forwarding host vouching for its operator).
    let on_other = holders
        .iter()
        .map(|vm| (vm, cluster.placed("a", &addr, &vm.id)))
        .find(|(_, host)| host != "a")
        .expect("a VM placed on another host than a");
    let seen = cluster.member("a").call(
        "GET",
        &format!("/v1/vms/{}", on_other.0.id),
        &cluster.member("a").host.token,
        None,
    );
    assert_eq!(seen.status, 200, "the operator through a: {seen:?}");
    for vm in &holders {
        let reply = cluster
            .member("c")
            .call("DELETE", &format!("/v1/vms/{}", vm.id), &addr, None);
        assert_eq!(reply.status, 204, "{reply:?}");
    }
    let reply =
        cluster
            .member("a")
            .call("DELETE", &format!("/v1/networks/{}", tiny.id), &addr, None);
    assert_eq!(reply.status, 204, "{reply:?}");
    // Two overlapping networks asked for at once through two hosts: one
    // is defined, the other refused for its range.
    let replies = cluster.race(
        "/v1/networks",
        &addr,
        [
            ("b", NetworkCreate::new("left", "10.72.0.0/24")),
            ("c", NetworkCreate::new("right", "10.72.0.0/25")),
        ],
        422,
    );
    let refused = replies.iter().find(|r| r.status == 422).expect("a 422");
    assert!(refused.text.contains("overlaps"), "{refused:?}");
    let defined: Network = expect_as(
        replies.iter().find(|r| r.status == 201).expect("a 201"),
        201,
    );
    let reply = cluster.member("a").call(
        "DELETE",
        &format!("/v1/networks/{}", defined.id),
        &addr,
        None,
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    phase("address race: one 201, one 429; overlapping networks: one 201, one 422; the operator reads through any host");

    // 7. Every VM is deleted through a host other than its own: gone
    // from every host's list, its VMM gone.
    let mut all: Vec<(String, Vm)> = Vec::new();
    for token in [&acme, &racer] {
        let vms: Vec<Vm> = cluster.member("a").get("/v1/vms", token).expect("a's list");
        all.extend(vms.into_iter().map(|vm| (token.to_string(), vm)));
    }
    assert_eq!(all.len(), 9, "{all:#?}");
    for (token, vm) in &all {
        let own = vm.host.as_deref().expect("every VM is placed");
        let via = cluster
            .members
            .iter()
            .map(Member::name)
            .find(|name| *name != own)
            .expect("another host");
        let path = format!("/v1/vms/{}", vm.id);
        let reply = cluster.member(via).call("DELETE", &path, token, None);
        assert_eq!(
            reply.status,
            204,
            "deleting {} (on {own}) through {via}: {reply:?}\n{}",
            vm.name,
            cluster.logs()
        );
    }
    for token in [&acme, &racer] {
        cluster.same_everywhere(token, Some(&BTreeSet::new()));
    }
    for member in &cluster.members {
        let data_dir = member.host.data_dir(&dir);
        cluster.wait_for(
            &format!("no VMM left on host {}", member.name()),
            SETTLE,
            || {
                let pids = jailed_pids(&parent_cgroup(&data_dir), None);
                pids.is_empty()
                    .then_some(())
                    .ok_or_else(|| format!("VMM pids {pids:?}"))
            },
        );
    }
    for (vm, host) in web.iter().zip(&web_hosts) {
        let data_dir = cluster.member(host).host.data_dir(&dir);
        assert_eq!(vmm_pid(&data_dir, &vm.id), None, "{}'s VMM", vm.name);
    }
    phase("every VM deleted through another host");

    // 7b. A host lost while it still runs: its link cut, a VM that asks
    // to be restarted elsewhere is, and the copy on the lost host was
    // paused before (never two running copies); a VM that waits keeps
    // running there. When the link is back the lost host fences its
    // replaced copy off (gone) and keeps the other.
    lost_host_and_back(&cluster, &dir, &acme, &phase);
    // The lan, free of NICs, is deleted through b; every host drops it.
    let reply =
        cluster
            .member("b")
            .call("DELETE", &format!("/v1/networks/{}", lan.id), &acme, None);
    assert_eq!(reply.status, 204, "deleting the lan: {reply:?}");
    for member in &cluster.members {
        let listed: Vec<Network> = cluster
            .member(member.name())
            .get("/v1/networks", &acme)
            .expect("networks");
        assert!(listed.is_empty(), "{}: {listed:?}", member.name());
    }
    // No network left: no host keeps a VXLAN device.
    for member in &cluster.members {
        cluster.wait_for(
            &format!("{}'s VXLAN devices gone", member.name()),
            SETTLE,
            || {
                let output = member
                    .host
                    .netns
                    .run("ip", &["-o", "link", "show", "type", "vxlan"]);
                let links = String::from_utf8_lossy(&output.stdout).into_owned();
                links.trim().is_empty().then_some(()).ok_or(links)
            },
        );
    }
    phase("the lan deleted through b: gone from every host, VXLAN devices too");
    // 8. The tenants go through b once their images are deleted through
    // c: every host drops its copies and the holdings that kept them.
    let operator = cluster.member("b").host.token.clone();
    for (tenant, token) in [(&acme_id, &acme), (&racer_id, &racer), (&addr_id, &addr)] {
        let listed: Vec<Image> = cluster
            .member("c")
            .get("/v1/images", token)
            .expect("images");
        for image in listed {
            let path = format!("/v1/images/{}", image.id);
            let reply = cluster.member("c").call("DELETE", &path, token, None);
            assert_eq!(reply.status, 204, "{path}: {reply:?}");
        }
        cluster.wait_for(&format!("tenant {tenant} deleted"), SETTLE, || {
            let path = format!("/v1/tenants/{tenant}");
            let reply = cluster.member("b").call("DELETE", &path, &operator, None);
            match reply.status {
                204 => Ok(()),
                409 => Err(reply.text),
                _ => panic!("{path}: {reply:?}"),
            }
        });
    }
    phase("every tenant deleted once its images were");
    // Dropped in reverse order: the agents (with their VMMs) and their
    // namespaces, etcd, the underlay, the test directory.
}
