//! Live migration through the agents (issue #6): two simulated hosts
//! (network namespaces with an agent each, an underlay veth), a tenant's
//! network spanning both, and a VM with a NIC on it running the counting
//! test guest. `POST /v1/vms/{id}/migration` moves it from A to B while it
//! runs: it keeps its id, MAC and address, its count goes on from where it
//! was on A, and it is gone from A; then it moves back. A VM whose NIC the
//! destination does not carry, and a stopped VM, are refused. Between two
//! members of a cluster the same move needs no registration: the tenant,
//! image and network are the cluster's, the VM is placed on A by the
//! controller, and the cluster's record of it follows it to B and back.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nubis_api::{
    ClusterHost, DrainPolicy, HostState, Image, ImageCreate, Migration, MigrationCreate, Network,
    NetworkCreate, Vm, VmCreate, VmNicCreate, VmPlacement, VmState,
};
use nubis_tests::agent::{
    counter_vm, expect, host_path, jailed_pids, migrate, parent_cgroup, register_peer, tenant,
    tenant_token, wait_for_migration, Agent, CounterImages, RemoteHost,
};
use nubis_tests::etcd::EtcdCluster;
use nubis_tests::guest::assert_counts;
use nubis_tests::netns::simulated_host;
use nubis_tests::{require_kvm, TestDir};

const PORT: u16 = 8181;
const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const TOKEN_A: &str = "host-a-operator-token-0001";
const TOKEN_B: &str = "host-b-operator-token-0002";
/// Hang guard, not a timing assertion.
const WAIT: Duration = Duration::from_secs(120);

fn console_path(agent: &Agent, vm: &str) -> PathBuf {
    agent.data_dir.join("vms").join(vm).join("vm/console.log")
}

fn wait_for_output(path: &Path) -> Vec<u8> {
    let start = Instant::now();
    loop {
        let out = std::fs::read(path).unwrap_or_default();
        if out.len() > 100 {
            return out;
        }
        assert!(
            start.elapsed() < WAIT,
            "only {} bytes in {}",
            out.len(),
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `path` until it disappears (the VM left the host); returns the
/// last bytes seen.
fn follow_until_gone(path: PathBuf) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut last = Vec::new();
        let start = Instant::now();
        while let Ok(bytes) = std::fs::read(&path) {
            last = bytes;
            if start.elapsed() > WAIT {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        last
    })
}

/// Tenant acme on both hosts with the counter image, its network "span"
/// on `cidr` (home A, spanning B) and its VM "x" (64 MiB, stopped) with a
/// NIC on it: (acme's token on A, its token on B, x).
fn spanning_vm(
    agent_a: &Agent,
    agent_b: &Agent,
    counter: &CounterImages,
    cidr: &str,
) -> (String, String, Vm) {
    let (tenant_id, acme_a) = counter.tenant(agent_a, "acme");
    let span = NetworkCreate {
        hosts: vec!["b".to_string()],
        ..NetworkCreate::new("span", cidr)
    };
    agent_a.create::<Network>("/v1/networks", &acme_a, &span);
    let acme_b = tenant_token(agent_b, &tenant_id);
    counter.register(agent_b, &acme_b, "counter", None);
    let x = VmCreate {
        memory_mib: 64,
        nics: vec![VmNicCreate::on_network("span")],
        ..counter_vm("x")
    };
    let x = agent_a.create("/v1/vms", &acme_a, &x);
    (acme_a, acme_b, x)
}

/// The first byte on the destination follows the last one seen on the
/// source within a few values (the source may print a few more between
/// the last look and the pause), and the count goes on.
fn assert_continues(before: &[u8], after: &[u8]) {
    let last = *before.last().expect("output before the move");
    let step = after[0].wrapping_sub(last);
    assert!(
        (1..=64).contains(&step),
        "the count went from {last} to {} across the move",
        after[0]
    );
    assert_counts(after, "after the move");
}

#[test]
fn a_running_vm_moves_between_hosts_and_back() {
    require_kvm();
    let dir = TestDir::new("agent-migration");
    let counter = CounterImages::new(&dir);
    let images = counter.dir.clone();

    let host_a = simulated_host("nbma", 1);
    let host_b = simulated_host("nbmb", 2);
    host_a.link_to(
        &host_b,
        "under",
        &format!("{UNDERLAY_A}/24"),
        "under",
        &format!("{UNDERLAY_B}/24"),
    );
    let spec_a = RemoteHost {
        netns: &host_a.name,
        port: PORT,
        reach: Ipv4Addr::new(10, 97, 1, 2),
        operator_token: TOKEN_A,
        underlay: UNDERLAY_A,
    };
    let spec_b = RemoteHost {
        netns: &host_b.name,
        reach: Ipv4Addr::new(10, 97, 2, 2),
        operator_token: TOKEN_B,
        underlay: UNDERLAY_B,
        ..spec_a
    };
    let agent_a = Agent::start_remote(&dir.join("a"), &images, &spec_a);
    let agent_b = Agent::start_remote(&dir.join("b"), &images, &spec_b);
    register_peer(&agent_a, "b", UNDERLAY_B, &agent_b);
    register_peer(&agent_b, "a", UNDERLAY_A, &agent_a);
    moves_there_and_back(&agent_a, &agent_b, &counter);
}

/// Two members of one etcd cluster, both controller candidates: no peer
/// registration (each resolves the other by its membership; registering
/// one by hand is refused). The tenant, its image and its network are the
/// cluster's, each defined once through a; the VM is created through a,
/// pinned to a and started there; it moves to b while it runs and the
/// cluster's record follows it (both members show it on b), then back with
/// nubisctl talking to b, and is deleted through b.
#[test]
fn a_running_vm_moves_between_cluster_members_without_registration() {
    require_kvm();
    let dir = TestDir::new("agent-migration-cluster");
    let counter = CounterImages::new(&dir);
    let images = counter.dir.clone();
    let host_a = simulated_host("nbqa", 45);
    let host_b = simulated_host("nbqb", 46);
    host_a.link_to(
        &host_b,
        "under",
        &format!("{UNDERLAY_A}/24"),
        "under",
        &format!("{UNDERLAY_B}/24"),
    );
    let etcd = EtcdCluster::start(&dir.join("etcd"), 1, Ipv4Addr::LOCALHOST, None);
    let spec_a = RemoteHost {
        netns: &host_a.name,
        port: PORT,
        reach: Ipv4Addr::new(10, 97, 45, 2),
        operator_token: TOKEN_A,
        underlay: UNDERLAY_A,
    };
    let spec_b = RemoteHost {
        netns: &host_b.name,
        reach: Ipv4Addr::new(10, 97, 46, 2),
        operator_token: TOKEN_B,
        underlay: UNDERLAY_B,
        ..spec_a
    };
    // Both run VMs and may be the controller that places them.
    let member = |name: &str, gateway: Ipv4Addr| {
        vec![
            "--cluster".to_string(),
            etcd.cluster_arg(gateway),
            "--host-name".to_string(),
            name.to_string(),
            "--roles".to_string(),
            "compute,controller".to_string(),
        ]
    };
    let none = serde_json::Value::Null;
    let agent_a = Agent::start_member(
        &dir.join("a"),
        &images,
        &spec_a,
        &none,
        &member("a", Ipv4Addr::new(10, 97, 45, 1)),
    );
    let agent_b = Agent::start_member(
        &dir.join("b"),
        &images,
        &spec_b,
        &none,
        &member("b", Ipv4Addr::new(10, 97, 46, 1)),
    );
    let both = [&agent_a, &agent_b];
    // Both up, one of them the controller.
    wait_until("a and b up, one the controller", &both, || {
        let hosts: Vec<ClusterHost> = get_via(&agent_a, "/v1/hosts", TOKEN_A)?;
        let up = ["a", "b"].iter().all(|name| {
            hosts
                .iter()
                .any(|host| host.name == *name && host.state == HostState::Up)
        });
        let leaders = hosts.iter().filter(|host| host.controller).count();
        (up && leaders == 1)
            .then_some(())
            .ok_or_else(|| format!("{hosts:?}"))
    });
    // Each lists the other as its peer, from the membership.
    wait_until("b is a's peer", &both, || {
        let peers: Vec<nubis_api::Peer> = get_via(&agent_a, "/v1/peers", TOKEN_A)?;
        peers
            .iter()
            .any(|peer| peer.name == "b" && peer.address == UNDERLAY_B.to_string())
            .then_some(())
            .ok_or_else(|| format!("{peers:?}"))
    });
    let register = agent_a.send(
        "POST",
        "/v1/peers",
        Some(TOKEN_A),
        &nubis_api::PeerCreate {
            name: "c".into(),
            address: "10.99.0.3".into(),
            fingerprint: "a".repeat(64),
            peer_port: None,
        },
    );
    assert_eq!(register.status, 409, "{register:?}");
    moves_between_members(&agent_a, &agent_b, &counter);
}

/// `GET path` through `agent` as `token`: the body if it answered 200.
fn get_via<T: serde::de::DeserializeOwned>(
    agent: &Agent,
    path: &str,
    token: &str,
) -> Result<T, String> {
    let reply = agent.call("GET", path, Some(token), None);
    if reply.status != 200 {
        return Err(format!("GET {path}: {} {}", reply.status, reply.text));
    }
    serde_json::from_value(reply.body.clone()).map_err(|err| format!("GET {path}: {err}"))
}

/// Polls `check` until it holds; after [`WAIT`], panics with `what`, the
/// last answer and the agents' logs.
fn wait_until<T>(what: &str, agents: &[&Agent], mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if start.elapsed() > WAIT => {
                let logs: Vec<String> = agents.iter().map(|agent| agent.log()).collect();
                panic!("{what}: {last}\n{}", logs.join("\n---\n"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `body` pinned to member `host`, started once defined there if `start`.
fn pinned(body: VmCreate, host: &str, start: bool) -> VmCreate {
    VmCreate {
        placement: VmPlacement {
            host: Some(host.to_string()),
            ..VmPlacement::default()
        },
        start,
        ..body
    }
}

/// Waits until every one of `agents` shows VM `id` on `host` in `state`:
/// the VM as the last of them shows it.
fn wait_for_vm(agents: &[&Agent], token: &str, id: &str, host: &str, state: VmState) -> Vm {
    wait_until(
        &format!("VM {id} is {} on {host}", state.as_str()),
        agents,
        || {
            let mut last = None;
            for agent in agents {
                let vm: Vm = get_via(agent, &format!("/v1/vms/{id}"), token)?;
                assert_ne!(vm.state, VmState::Failed, "{vm:?}");
                if vm.state != state || vm.host.as_deref() != Some(host) {
                    return Err(format!("through {}: {vm:?}", agent.address));
                }
                last = Some(vm);
            }
            last.ok_or_else(|| "no agent".to_string())
        },
    )
}

/// Waits until neither of `agents` lists VM `id`.
fn wait_for_gone(agents: &[&Agent], token: &str, id: &str) {
    wait_until(&format!("VM {id} is gone everywhere"), agents, || {
        for agent in agents {
            let vms: Vec<Vm> = get_via(agent, "/v1/vms", token)?;
            if vms.iter().any(|vm| vm.id == id) {
                return Err(format!("{} lists it: {vms:?}", agent.address));
            }
        }
        Ok(())
    });
}

/// Nothing of VM `id` is left on `agent`'s host: no VMM, no files.
fn assert_left(agent: &Agent, id: &str) {
    assert_eq!(
        nubis_tests::agent::vmm_pid(&agent.data_dir, id),
        None,
        "a VMM of {id} still runs under {}",
        agent.data_dir.display()
    );
    let files = agent.data_dir.join("vms").join(id);
    assert!(!files.exists(), "{} is still there", files.display());
}

/// `nubisctl --url AGENT --token TOKEN vm migrate ID --host HOST`: its
/// stdout, stderr, after checking it succeeded.
fn nubisctl_migrate(agent: &Agent, token: &str, id: &str, host: &str) -> (String, String) {
    let moved = std::process::Command::new(nubis_tests::workspace_binary("nubisctl"))
        .args([
            "--url",
            &format!("http://{}", agent.address),
            "--token",
            token,
        ])
        .args(["vm", "migrate", id, "--host", host])
        .output()
        .expect("run nubisctl");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&moved.stdout).to_string(),
        String::from_utf8_lossy(&moved.stderr).to_string(),
    );
    assert!(
        moved.status.success(),
        "{stdout}\n{stderr}\n{}",
        agent.log()
    );
    (stdout, stderr)
}

/// The cluster's moves: VM "x" on network "span", pinned to a and started
/// there; refusals first; a to b while it runs, driven through a; back
/// with nubisctl talking to b; deleted through b.
fn moves_between_members(agent_a: &Agent, agent_b: &Agent, counter: &CounterImages) {
    let both = [agent_a, agent_b];
    // The tenant, its image and its network, each defined once through a:
    // b knows them too.
    let (_, acme) = counter.tenant(agent_a, "acme");
    let span = NetworkCreate::new("span", "10.70.0.0/24");
    let span: Network = agent_a.create("/v1/networks", &acme, &span);
    wait_until("acme's token, image and network work on b", &both, || {
        let images: Vec<Image> = get_via(agent_b, "/v1/images", &acme)?;
        let networks: Vec<Network> = get_via(agent_b, "/v1/networks", &acme)?;
        (images.iter().any(|image| image.name == "counter")
            && networks.iter().any(|network| network.id == span.id))
        .then_some(())
        .ok_or_else(|| format!("{images:?} {networks:?}"))
    });
    let again = ImageCreate {
        name: "counter".to_string(),
        kernel: host_path(&counter.kernel),
        rootfs: host_path(&counter.rootfs),
        initrd: None,
        cmdline: String::new(),
    };
    let again = agent_b.send("POST", "/v1/images", Some(&acme), &again);
    assert_eq!(again.status, 409, "the image registered again: {again:?}");
    // Every member carries every network: naming hosts is refused.
    let hosted = NetworkCreate {
        hosts: vec!["b".to_string()],
        ..NetworkCreate::new("hosted", "10.72.0.0/24")
    };
    let hosted = agent_a.send("POST", "/v1/networks", Some(&acme), &hosted);
    assert_eq!(hosted.status, 400, "{hosted:?}");

    // x, created through a, pinned to a, started there.
    let x = VmCreate {
        memory_mib: 64,
        nics: vec![VmNicCreate::on_network("span")],
        ..counter_vm("x")
    };
    let x: Vm = agent_a.create("/v1/vms", &acme, &pinned(x, "a", true));
    let id = x.id.clone();
    let on_a = wait_for_vm(&both, &acme, &id, "a", VmState::Running);
    let nic = on_a.nics[0].clone();
    assert_eq!(nic.network.as_deref(), Some(span.id.as_str()), "{on_a:?}");
    assert!(nic.address.is_some(), "{on_a:?}");
    assert!(
        nubis_tests::agent::vmm_pid(&agent_a.data_dir, &id).is_some(),
        "no VMM of x on a"
    );

    // Refused: a stopped VM; a VM on the tenant's default bridge, which
    // is its host's own; a host that is not a member.
    let to_b = MigrationCreate::new("b");
    let s = VmCreate {
        nics: vec![VmNicCreate::on_network("span")],
        ..counter_vm("s")
    };
    let s = agent_a
        .create::<Vm>("/v1/vms", &acme, &pinned(s, "a", false))
        .id;
    wait_for_vm(&both, &acme, &s, "a", VmState::Stopped);
    let stopped = agent_a.send(
        "POST",
        &format!("/v1/vms/{s}/migration"),
        Some(&acme),
        &to_b,
    );
    assert_eq!(stopped.status, 409, "{stopped:?}");
    let local = VmCreate {
        nics: vec![VmNicCreate::default()],
        ..counter_vm("y")
    };
    let y = agent_a
        .create::<Vm>("/v1/vms", &acme, &pinned(local, "a", true))
        .id;
    wait_for_vm(&both, &acme, &y, "a", VmState::Running);
    let bridged = agent_a.send(
        "POST",
        &format!("/v1/vms/{y}/migration"),
        Some(&acme),
        &to_b,
    );
    assert_eq!(bridged.status, 409, "{bridged:?}");
    assert!(bridged.text.contains("does not carry"), "{bridged:?}");
    let unknown = agent_a.send(
        "POST",
        &format!("/v1/vms/{y}/migration"),
        Some(&acme),
        &MigrationCreate::new("nowhere"),
    );
    assert_eq!(unknown.status, 422, "{unknown:?}");
    for vm in [&s, &y] {
        let deleted = agent_a.call("DELETE", &format!("/v1/vms/{vm}"), Some(&acme), None);
        assert_eq!(deleted.status, 204, "{deleted:?}");
    }

    // a to b, running, driven through a.
    wait_for_output(&console_path(agent_a, &id));
    let follower = follow_until_gone(console_path(agent_a, &id));
    let progress = migrate(agent_a, &acme, &id, "b", WAIT);
    assert_eq!(
        progress.phase,
        "completed",
        "{progress:?}\n{}\n{}",
        agent_a.log(),
        agent_b.log()
    );
    assert!(progress.downtime_ms.is_some(), "{progress:?}");
    let before = follower.join().unwrap();
    assert_counts(&before, "on a");
    let after = wait_for_output(&console_path(agent_b, &id));
    assert_continues(&before, &after);
    // Both members show it on b, with its MAC and address; a asks b.
    let on_b = wait_for_vm(&both, &acme, &id, "b", VmState::Running);
    for agent in both {
        let shown: Vm = agent.get(&format!("/v1/vms/{id}"), &acme);
        assert_eq!(shown.host.as_deref(), Some("b"), "{shown:?}");
        assert_eq!(shown.nics[0].mac, nic.mac, "{shown:?}");
        assert_eq!(shown.nics[0].address, nic.address, "{shown:?}");
    }
    assert_eq!(on_b.nics[0].network, nic.network, "{on_b:?}");
    assert_left(agent_a, &id);
    assert!(
        nubis_tests::agent::vmm_pid(&agent_b.data_dir, &id).is_some(),
        "no VMM of x on b"
    );

    // The cluster keeps the address for the VM on b: a new VM gets
    // another one.
    let other = VmCreate {
        nics: vec![VmNicCreate::on_network("span")],
        ..counter_vm("z")
    };
    let other: Vm = agent_a.create("/v1/vms", &acme, &pinned(other, "a", false));
    assert_ne!(
        other.nics[0].address, nic.address,
        "the moved VM's address was handed out again"
    );
    let z = &other.id;
    wait_for_vm(&both, &acme, z, "a", VmState::Stopped);
    let deleted = agent_a.call("DELETE", &format!("/v1/vms/{z}"), Some(&acme), None);
    assert_eq!(deleted.status, 204, "{deleted:?}");

    // And back to a, with nubisctl talking to b.
    let follower = follow_until_gone(console_path(agent_b, &id));
    let (stdout, stderr) = nubisctl_migrate(agent_b, &acme, &id, "a");
    assert!(
        stderr.contains(&format!("{id} runs on a; the guest was paused")),
        "{stderr}"
    );
    // The record of this move (to a), not of the first one (to b).
    let shows = |key: &str, value: &str| {
        stdout
            .lines()
            .any(|line| line.split_whitespace().eq([key, value]))
    };
    assert!(
        shows("phase", "completed") && shows("host", "a"),
        "{stdout}"
    );
    let before = follower.join().unwrap();
    let after = wait_for_output(&console_path(agent_a, &id));
    assert_continues(&before, &after);
    let back = wait_for_vm(&both, &acme, &id, "a", VmState::Running);
    assert_eq!(back.nics[0].mac, nic.mac, "{back:?}");
    assert_eq!(back.nics[0].address, nic.address, "{back:?}");
    assert_left(agent_b, &id);

    drains_a(agent_a, agent_b, &acme, &id);

    // Deleted through b, which asks a: gone from both lists, its VMM gone.
    let deleted = agent_b.call("DELETE", &format!("/v1/vms/{id}"), Some(&acme), None);
    assert_eq!(
        deleted.status,
        204,
        "{deleted:?}\n{}\n{}",
        agent_a.log(),
        agent_b.log()
    );
    wait_for_gone(&both, &acme, &id);
    wait_until(
        "x's VMM ends on a",
        &both,
        || match nubis_tests::agent::vmm_pid(&agent_a.data_dir, &id) {
            None => Ok(()),
            Some(pid) => Err(format!("VMM pid {pid}")),
        },
    );
}

/// `nubisctl host drain a` through b, with x (pinned to a) running there
/// and three VMs placed on a while b was cordoned: m (live migration) runs
/// on b afterwards, r (restart) runs on b afresh, t (stop) is stopped on
/// a, x stays (no other host may take it) and the drain says so; `host
/// uncordon a` ends the drain.
fn drains_a(agent_a: &Agent, agent_b: &Agent, acme: &str, x: &str) {
    let both = [agent_a, agent_b];
    // Each host has its own operator token.
    let operator = |agent: &Agent, path: &str| {
        let token = if std::ptr::eq(agent, agent_a) {
            TOKEN_A
        } else {
            TOKEN_B
        };
        let reply = agent.call("POST", path, Some(token), None);
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
    };
    operator(agent_a, "/v1/hosts/b/cordon");
    let on_span = |name: &str, policy: DrainPolicy| VmCreate {
        nics: vec![VmNicCreate::on_network("span")],
        placement: VmPlacement {
            on_drain: policy,
            ..VmPlacement::default()
        },
        start: true,
        ..counter_vm(name)
    };
    let [m, r, t] = [
        ("m", DrainPolicy::LiveMigrate),
        ("r", DrainPolicy::Restart),
        ("t", DrainPolicy::Stop),
    ]
    .map(|(name, policy)| {
        agent_a
            .create::<Vm>("/v1/vms", acme, &on_span(name, policy))
            .id
    });
    for vm in [&m, &r, &t] {
        wait_for_vm(&both, acme, vm, "a", VmState::Running);
        wait_for_output(&console_path(agent_a, vm));
    }
    operator(agent_a, "/v1/hosts/b/uncordon");
    let follower = follow_until_gone(console_path(agent_a, &m));
    let drained = std::process::Command::new(nubis_tests::workspace_binary("nubisctl"))
        .args(["--url", &format!("http://{}", agent_b.address)])
        .args(["--token", TOKEN_B, "--json", "host", "drain", "a"])
        .output()
        .expect("run nubisctl");
    assert!(
        drained.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&drained.stderr),
        agent_a.log()
    );
    let host: ClusterHost =
        serde_json::from_slice(&drained.stdout).expect("nubisctl's JSON of host a");
    let drain = host.drain.clone().expect("a's drain");
    assert!(drain.done, "{drain:?}");
    assert_eq!(drain.stuck, [x.to_string()], "x is pinned to a: {drain:?}");
    assert_eq!(host.state, HostState::Cordoned, "{host:?}");
    // m moved live: its counter went on, on b.
    let before = follower.join().unwrap();
    let after = wait_for_output(&console_path(agent_b, &m));
    assert_continues(&before, &after);
    wait_for_vm(&both, acme, &m, "b", VmState::Running);
    assert_left(agent_a, &m);
    // r started afresh on b; t stopped on a; x runs on, on a.
    wait_for_vm(&both, acme, &r, "b", VmState::Running);
    assert_left(agent_a, &r);
    wait_for_vm(&both, acme, &t, "a", VmState::Stopped);
    wait_for_vm(&both, acme, x, "a", VmState::Running);
    let events: Vec<nubis_api::VmEvent> =
        get_via(agent_a, &format!("/v1/vms/{x}/events"), acme).expect("x's events");
    assert!(
        events.iter().any(|event| event.kind == "drain-unplaceable"),
        "{events:?}"
    );
    operator(agent_b, "/v1/hosts/a/uncordon");
    let host: ClusterHost = get_via(agent_a, "/v1/hosts/a", TOKEN_A).expect("host a");
    assert!(
        host.drain.is_none() && host.state == HostState::Up,
        "{host:?}"
    );
    for vm in [&m, &r, &t] {
        let deleted = agent_a.call("DELETE", &format!("/v1/vms/{vm}"), Some(acme), None);
        assert_eq!(deleted.status, 204, "{deleted:?}");
        wait_for_gone(&both, acme, vm);
    }
}

/// A VM on a network spanning A and B moves from A to B while it runs,
/// and back with nubisctl; refusals first.
fn moves_there_and_back(agent_a: &Agent, agent_b: &Agent, counter: &CounterImages) {
    let (acme_a, acme_b, x) = spanning_vm(agent_a, agent_b, counter, "10.70.0.0/24");
    let id = x.id.clone();
    let nic = x.nics[0].clone();

    // Refused: a stopped VM; a VM on the tenant's default bridge, which
    // does not span hosts.
    let to_b = MigrationCreate::new("b");
    let stopped = agent_a.send(
        "POST",
        &format!("/v1/vms/{id}/migration"),
        Some(&acme_a),
        &to_b,
    );
    assert_eq!(stopped.status, 409, "{stopped:?}");
    let local = VmCreate {
        nics: vec![VmNicCreate::default()],
        ..counter_vm("y")
    };
    let y = agent_a.create::<Vm>("/v1/vms", &acme_a, &local).id;
    expect(
        &agent_a.call("POST", &format!("/v1/vms/{y}/start"), Some(&acme_a), None),
        200,
    );
    let bridged = agent_a.send(
        "POST",
        &format!("/v1/vms/{y}/migration"),
        Some(&acme_a),
        &to_b,
    );
    assert_eq!(bridged.status, 409, "{bridged:?}");
    assert!(bridged.text.contains("does not carry"), "{bridged:?}");
    let unknown = agent_a.send(
        "POST",
        &format!("/v1/vms/{y}/migration"),
        Some(&acme_a),
        &MigrationCreate::new("nowhere"),
    );
    assert_eq!(unknown.status, 422, "{unknown:?}");
    assert_eq!(
        agent_a
            .call("DELETE", &format!("/v1/vms/{y}"), Some(&acme_a), None)
            .status,
        204
    );

    // A to B, running.
    expect(
        &agent_a.call("POST", &format!("/v1/vms/{id}/start"), Some(&acme_a), None),
        200,
    );
    wait_for_output(&console_path(agent_a, &id));
    let follower = follow_until_gone(console_path(agent_a, &id));
    let progress = migrate(agent_a, &acme_a, &id, "b", WAIT);
    assert_eq!(
        progress.phase,
        "completed",
        "{progress:?}\n{}\n{}",
        agent_a.log(),
        agent_b.log()
    );
    assert!(progress.downtime_ms.is_some(), "{progress:?}");
    let before = follower.join().unwrap();
    assert_counts(&before, "on A");
    let gone = agent_a.call("GET", &format!("/v1/vms/{id}"), Some(&acme_a), None);
    assert_eq!(gone.status, 404, "the VM is still on A: {gone:?}");
    let on_b: Vm = agent_b.get(&format!("/v1/vms/{id}"), &acme_b);
    assert_eq!(on_b.state, VmState::Running, "{on_b:?}");
    assert_eq!(on_b.nics[0].mac, nic.mac);
    assert_eq!(on_b.nics[0].address, nic.address);
    let after = wait_for_output(&console_path(agent_b, &id));
    assert_continues(&before, &after);

    // A, the network's home, keeps the address for the VM on B: a new VM
    // on A gets another one.
    let other = VmCreate {
        nics: vec![VmNicCreate::on_network("span")],
        ..counter_vm("z")
    };
    let other: Vm = agent_a.create("/v1/vms", &acme_a, &other);
    assert_ne!(
        other.nics[0].address, nic.address,
        "the moved VM's address was handed out again"
    );
    let z = &other.id;
    assert_eq!(
        agent_a
            .call("DELETE", &format!("/v1/vms/{z}"), Some(&acme_a), None)
            .status,
        204
    );

    // And back to A (the network's home), with nubisctl.
    let follower = follow_until_gone(console_path(agent_b, &id));
    let moved = std::process::Command::new(nubis_tests::workspace_binary("nubisctl"))
        .args([
            "--url",
            &format!("http://{}", agent_b.address),
            "--token",
            &acme_b,
        ])
        .args(["vm", "migrate", &id, "--host", "a"])
        .output()
        .expect("run nubisctl");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&moved.stdout),
        String::from_utf8_lossy(&moved.stderr),
    );
    assert!(
        moved.status.success(),
        "{stdout}\n{stderr}\n{}",
        agent_b.log()
    );
    assert!(
        stderr.contains(&format!("{id} runs on a; the guest was paused")),
        "{stderr}"
    );
    assert!(stdout.contains("completed"), "{stdout}");
    let before = follower.join().unwrap();
    let back = agent_a.call("GET", &format!("/v1/vms/{id}"), Some(&acme_a), None);
    assert_eq!(expect(&back, 200)["state"], "running");
    assert_eq!(
        agent_b
            .call("GET", &format!("/v1/vms/{id}"), Some(&acme_b), None)
            .status,
        404
    );
    let after = wait_for_output(&console_path(agent_a, &id));
    assert_continues(&before, &after);

    assert_eq!(
        agent_a
            .call("DELETE", &format!("/v1/vms/{id}"), Some(&acme_a), None)
            .status,
        204
    );
}

/// Starts a migration that never converges (a zero downtime budget): it
/// copies until something ends it. Returns once it copies.
fn start_endless(agent: &Agent, token: &str, vm: &str) {
    let endless = MigrationCreate {
        downtime_ms: Some(0),
        max_rounds: Some(100_000_000),
        max_seconds: Some(600),
        ..MigrationCreate::new("b")
    };
    let started = agent.send(
        "POST",
        &format!("/v1/vms/{vm}/migration"),
        Some(token),
        &endless,
    );
    assert_eq!(started.status, 202, "{started:?}");
    let start = Instant::now();
    loop {
        let progress: Migration = agent.get(&format!("/v1/vms/{vm}/migration"), token);
        if progress.phase == "copying" {
            return;
        }
        assert!(
            progress.phase != "failed" && progress.phase != "completed",
            "{progress:?}"
        );
        assert!(
            start.elapsed() < WAIT,
            "the migration never started copying: {progress:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM still runs on `agent`: running, and its console grows.
fn assert_runs_on(agent: &Agent, token: &str, vm: &str) {
    let shown: Vm = agent.get(&format!("/v1/vms/{vm}"), token);
    assert_eq!(shown.state, VmState::Running, "{shown:?}");
    let path = console_path(agent, vm);
    let seen = std::fs::read(&path).unwrap_or_default().len();
    let start = Instant::now();
    while std::fs::read(&path).unwrap_or_default().len() <= seen + 50 {
        assert!(start.elapsed() < WAIT, "the VM stopped counting");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A failed migration leaves nothing on its destination: the VM is exactly
/// a 404 `not_found` there, and no VMM of it runs. Either the source told
/// the destination to drop its copy (`DELETE /v1/overlay/migrations/{id}`),
/// or it could not (the link was down, the destination's agent was), and
/// the destination dropped the copy itself when its receiving VMM ended
/// without a hand-over (exit `EXIT_NOT_RECEIVED`, or a log without one
/// when the agent was down). While it winds down (the abort under way, the
/// receiving VMM not yet given up, its exit just recorded) the VM may
/// still be `starting` or `failed` there; any other answer (an error, a
/// 401, `running`) fails.
fn assert_destination_forgot(agent: &Agent, vm: &str) {
    let start = Instant::now();
    loop {
        let shown = agent.call(
            "GET",
            &format!("/v1/vms/{vm}"),
            Some(&agent.operator_token),
            None,
        );
        let state = shown.body["state"].as_str().unwrap_or("");
        match (shown.status, state) {
            (404, _) => {
                assert_eq!(shown.code(), "not_found", "{shown:?}");
                assert_eq!(
                    jailed_pids(&parent_cgroup(&agent.data_dir), Some(vm)),
                    Vec::<i32>::new(),
                    "a VMM of the dropped copy still runs on the destination"
                );
                return;
            }
            (200, "starting" | "failed") => {}
            _ => panic!("the destination should have dropped the VM: {shown:?}"),
        }
        assert!(
            start.elapsed() < WAIT,
            "the destination still holds the VM: {shown:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cancels_cut_links_and_a_dead_destination_leave_the_vm_running() {
    require_kvm();
    let dir = TestDir::new("agent-migration-failures");
    let counter = CounterImages::new(&dir);
    let images = counter.dir.clone();

    let host_a = simulated_host("nbfa", 3);
    let host_b = simulated_host("nbfb", 4);
    host_a.link_to(
        &host_b,
        "under",
        &format!("{UNDERLAY_A}/24"),
        "under",
        &format!("{UNDERLAY_B}/24"),
    );
    let spec_a = RemoteHost {
        netns: &host_a.name,
        port: PORT,
        reach: Ipv4Addr::new(10, 97, 3, 2),
        operator_token: TOKEN_A,
        underlay: UNDERLAY_A,
    };
    let spec_b = RemoteHost {
        netns: &host_b.name,
        reach: Ipv4Addr::new(10, 97, 4, 2),
        operator_token: TOKEN_B,
        underlay: UNDERLAY_B,
        ..spec_a
    };
    let agent_a = Agent::start_remote(&dir.join("a"), &images, &spec_a);
    let mut agent_b = Agent::start_remote(&dir.join("b"), &images, &spec_b);
    register_peer(&agent_a, "b", UNDERLAY_B, &agent_b);
    register_peer(&agent_b, "a", UNDERLAY_A, &agent_a);
    let (acme_a, acme_b, x) = spanning_vm(&agent_a, &agent_b, &counter, "10.71.0.0/24");
    let (_, globex) = tenant(&agent_a, "globex");
    let id = x.id;
    expect(
        &agent_a.call("POST", &format!("/v1/vms/{id}/start"), Some(&acme_a), None),
        200,
    );
    wait_for_output(&console_path(&agent_a, &id));

    // Only the VM's tenant (or the operator) moves it.
    let foreign = agent_a.send(
        "POST",
        &format!("/v1/vms/{id}/migration"),
        Some(&globex),
        &MigrationCreate::new("b"),
    );
    assert_eq!(foreign.status, 404, "{foreign:?}");

    // A cancel while it copies.
    start_endless(&agent_a, &acme_a, &id);
    let cancelled = agent_a.call(
        "DELETE",
        &format!("/v1/vms/{id}/migration"),
        Some(&acme_a),
        None,
    );
    assert_eq!(cancelled.status, 204, "{cancelled:?}");
    assert_eq!(
        wait_for_migration(&agent_a, &acme_a, &id, WAIT).phase,
        "cancelled"
    );
    assert_runs_on(&agent_a, &acme_a, &id);
    assert_destination_forgot(&agent_b, &id);

    // The link between the hosts cut while it copies.
    let dropped = "dropped a migrated-in copy that was never handed over";
    let drops = |agent: &Agent| agent.log().matches(dropped).count();
    let drops_before = drops(&agent_b);
    start_endless(&agent_a, &acme_a, &id);
    let down = host_a.run("ip", &["link", "set", "under", "down"]);
    assert!(down.status.success(), "{down:?}");
    let ended = wait_for_migration(&agent_a, &acme_a, &id, WAIT);
    assert_eq!(ended.phase, "failed", "{ended:?}");
    assert_runs_on(&agent_a, &acme_a, &id);
    let up = host_a.run("ip", &["link", "set", "under", "up"]);
    assert!(up.status.success(), "{up:?}");
    assert_destination_forgot(&agent_b, &id);
    // The source's abort never came: the destination dropped the copy on
    // its own.
    assert_eq!(drops(&agent_b), drops_before + 1, "{}", agent_b.log());

    // The destination's agent killed while it copies: its receiving VMM
    // goes with it.
    start_endless(&agent_a, &acme_a, &id);
    agent_b.kill();
    let ended = wait_for_migration(&agent_a, &acme_a, &id, WAIT);
    assert_eq!(ended.phase, "failed", "{ended:?}");
    assert_runs_on(&agent_a, &acme_a, &id);
    let agent_b = Agent::start_remote(&dir.join("b"), &images, &spec_b);
    assert_destination_forgot(&agent_b, &id);
    // (One agent log across the restart.)
    assert_eq!(
        drops(&agent_b),
        drops_before + 2,
        "the restarted destination did not drop the copy:\n{}",
        agent_b.log()
    );

    // After all that, a migration succeeds.
    let follower = follow_until_gone(console_path(&agent_a, &id));
    let progress = migrate(&agent_a, &acme_a, &id, "b", WAIT);
    assert_eq!(
        progress.phase,
        "completed",
        "{progress:?}\n{}\n{}",
        agent_a.log(),
        agent_b.log()
    );
    let before = follower.join().unwrap();
    let after = wait_for_output(&console_path(&agent_b, &id));
    assert_continues(&before, &after);
    let on_b: Vm = agent_b.get(&format!("/v1/vms/{id}"), &acme_b);
    assert_eq!(on_b.state, VmState::Running);
    assert_eq!(
        agent_b
            .call("DELETE", &format!("/v1/vms/{id}"), Some(&acme_b), None)
            .status,
        204
    );
}

/// The source agent dies (SIGKILL, its debug-build crash hook) right after
/// its VMM handed the VM over, before it told the destination: restarted,
/// it finds the recorded hand-over, asks the destination, which runs the
/// VM, and completes the migration there. The VM never runs twice: it is
/// gone from A and runs on B.
#[test]
fn a_source_that_crashed_at_the_hand_over_completes_it_on_restart() {
    require_kvm();
    let _host = nubis_tests::agent::one_agent_per_host();
    let dir = TestDir::new("agent-migration-crash");
    let counter = CounterImages::new(&dir);
    let images = counter.dir.clone();
    let host_a = simulated_host("nbca", 1);
    let host_b = simulated_host("nbcb", 2);
    host_a.link_to(
        &host_b,
        "under",
        &format!("{UNDERLAY_A}/24"),
        "under",
        &format!("{UNDERLAY_B}/24"),
    );
    let spec_a = RemoteHost {
        netns: &host_a.name,
        port: PORT,
        reach: Ipv4Addr::new(10, 97, 1, 2),
        operator_token: TOKEN_A,
        underlay: UNDERLAY_A,
    };
    let spec_b = RemoteHost {
        netns: &host_b.name,
        reach: Ipv4Addr::new(10, 97, 2, 2),
        operator_token: TOKEN_B,
        underlay: UNDERLAY_B,
        ..spec_a
    };
    let agent_a =
        Agent::start_remote_crashing(&dir.join("a"), &images, &spec_a, "migration_handed_over");
    let agent_b = Agent::start_remote(&dir.join("b"), &images, &spec_b);
    register_peer(&agent_a, "b", UNDERLAY_B, &agent_b);
    register_peer(&agent_b, "a", UNDERLAY_A, &agent_a);
    let (acme_a, acme_b, x) = spanning_vm(&agent_a, &agent_b, &counter, "10.71.0.0/24");
    let id = x.id;
    expect(
        &agent_a.call("POST", &format!("/v1/vms/{id}/start"), Some(&acme_a), None),
        200,
    );
    wait_for_output(&console_path(&agent_a, &id));
    let started = agent_a.send(
        "POST",
        &format!("/v1/vms/{id}/migration"),
        Some(&acme_a),
        &MigrationCreate::new("b"),
    );
    assert_eq!(started.status, 202, "{started:?}");
    // The migration runs in the background; the agent dies at the hand-over.
    let (_status, log) = agent_a.crashed();
    assert!(
        log.contains("migration_handed_over"),
        "no crash at the hand-over:\n{log}"
    );

    // B has the VM with its VMM, still `starting`: nobody told it yet.
    let on_b: Vm = agent_b.get(&format!("/v1/vms/{id}"), &acme_b);
    assert_eq!(on_b.state, VmState::Starting, "{on_b:?}");
    // A, restarted, asks B and completes the hand-over.
    let agent_a = Agent::start_remote(&dir.join("a"), &images, &spec_a);
    let start = Instant::now();
    loop {
        let on_a = agent_a.call("GET", &format!("/v1/vms/{id}"), Some(&acme_a), None);
        let on_b = agent_b.call("GET", &format!("/v1/vms/{id}"), Some(&acme_b), None);
        if on_a.status == 404 && on_b.status == 200 && on_b.body["state"] == "running" {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "the hand-over was not completed: A {on_a:?}\nB {on_b:?}\n{}",
            agent_a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent_a.log().contains("completing the hand-over"),
        "{}",
        agent_a.log()
    );
    assert!(
        nubis_tests::agent::vmm_pid(&agent_a.data_dir, &id).is_none(),
        "a VMM of the VM runs on A"
    );
    assert!(
        nubis_tests::agent::vmm_pid(&agent_b.data_dir, &id).is_some(),
        "no VMM on B"
    );
}
