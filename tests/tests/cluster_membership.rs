//! Cluster membership on real etcd (issue #16): three simulated hosts
//! (network namespaces, each running its own agent) join a three-member
//! etcd cluster started by the test. Every host lists the same members;
//! one controller is elected, and when its agent is killed another takes
//! over; killing one etcd member changes nothing visible; a host whose
//! link is cut goes down after its lease and comes back when the link
//! does; cordons are seen everywhere; a second agent cannot take a
//! member's name. A second test runs etcd with TLS and client
//! certificates.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nubis_api::{
    ClusterHost, HostState, Image, ImageCreate, Tenant, TenantCreate, TokenCreated, Vm, VmCreate,
    VmEvent, VmState,
};
use nubis_tests::agent::{expect_as, Agent, RemoteHost};
use nubis_tests::cluster::host_states;
use nubis_tests::etcd::{ClientTls, EtcdCluster, Pki};
use nubis_tests::netns::{simulated_host, NetNs};
use nubis_tests::TestDir;

const PORT: u16 = 8282;
/// Seconds of a host's lease: short, so that the test sees hosts go down.
const LEASE_TTL_S: u64 = 3;
/// How long a change may take to show: a lease's TTL, a renewal period
/// and etcd's own election, with room for a loaded machine. A hang guard,
/// not a timing assertion.
const SETTLE: Duration = Duration::from_secs(30);

struct Host {
    name: &'static str,
    netns: NetNs,
    token: String,
    reach: Ipv4Addr,
}

impl Host {
    /// Host `name` in namespace `nbk{test}{name}` (unique per test: tests
    /// of one process run at once).
    fn new(test: char, name: &'static str, subnet: u8) -> Self {
        Host {
            name,
            netns: simulated_host(&format!("nbk{test}{name}"), subnet),
            token: format!("cluster-host-{name}-operator-token"),
            reach: Ipv4Addr::new(10, 97, subnet, 2),
        }
    }

    /// Where this host reaches the test's namespace (and etcd).
    fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.reach.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    fn remote(&self) -> RemoteHost<'_> {
        RemoteHost {
            netns: &self.netns.name,
            port: PORT,
            reach: self.reach,
            operator_token: &self.token,
            underlay: self.reach,
        }
    }

    fn args(&self, etcd: &EtcdCluster, labels: &str, extra: &[String]) -> Vec<String> {
        let mut args = vec![
            "--cluster".to_string(),
            etcd.cluster_arg(self.gateway()),
            "--host-name".to_string(),
            self.name.to_string(),
            "--labels".to_string(),
            labels.to_string(),
            "--lease-ttl".to_string(),
            LEASE_TTL_S.to_string(),
        ];
        args.extend_from_slice(extra);
        args
    }

    fn join(&self, dir: &TestDir, etcd: &EtcdCluster, labels: &str) -> Agent {
        self.join_with(dir, etcd, labels, &[])
    }

    fn join_with(
        &self,
        dir: &TestDir,
        etcd: &EtcdCluster,
        labels: &str,
        extra: &[String],
    ) -> Agent {
        let capacity = serde_json::json!({
            "capacity": {"vcpus": 4, "memory_mib": 2048, "disk_mib": 10240}
        });
        Agent::start_member(
            &dir.join(&format!("agent-{}", self.name)),
            &dir.join("images"),
            &self.remote(),
            &capacity,
            &self.args(etcd, labels, extra),
        )
    }

    /// `/v1/hosts` through this host's agent; an agent that does not
    /// answer fails the test with its log.
    fn hosts(&self, agent: &Agent) -> Vec<ClusterHost> {
        match agent.call_crashing("GET", "/v1/hosts", Some(&self.token), None) {
            Some(reply) => expect_as(&reply, 200),
            None => panic!(
                "host {}'s agent does not answer; its log:\n{}",
                self.name,
                agent.log()
            ),
        }
    }
}

/// Polls `check` until it holds; panics with `what` and the last view.
fn wait_for(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return,
            Err(last) if start.elapsed() > SETTLE => panic!("{what}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// What every member must agree on (usage and heartbeats aside).
fn shape(hosts: &[ClusterHost]) -> Vec<(String, HostState, bool, String, Option<u32>)> {
    hosts
        .iter()
        .map(|host| {
            (
                host.name.clone(),
                host.state,
                host.controller,
                format!("{:?}", host.labels),
                host.capacity.map(|capacity| capacity.vcpus),
            )
        })
        .collect()
}

fn controllers(hosts: &[ClusterHost]) -> Vec<String> {
    hosts
        .iter()
        .filter(|host| host.controller)
        .map(|host| host.name.clone())
        .collect()
}

/// A tenant created through one host is every host's: listed everywhere,
/// its token (made through another host) works on a third; names are
/// unique cluster-wide; a tenant is deleted only when no host holds
/// anything of it; a revoked token stops working everywhere.
fn tenants_are_the_clusters(dir: &TestDir, hosts: &[&Host; 3], agents: &[Option<Agent>]) {
    let agent = |index: usize| agents[index].as_ref().expect("a running agent");
    let (a, b, c) = (hosts[0], hosts[1], hosts[2]);
    let acme: Tenant = agent(0).create(
        "/v1/tenants",
        &a.token,
        &TenantCreate {
            name: "acme".into(),
            quota: None,
        },
    );
    // Every host mirrors it (within moments; the host that took the
    // request answered once it had).
    for (index, host) in hosts.iter().enumerate().skip(1) {
        wait_for("the tenant is listed on every host", || {
            let tenants: Vec<Tenant> = agent(index).get("/v1/tenants", &host.token);
            tenants
                .iter()
                .any(|t| t.id == acme.id)
                .then_some(())
                .ok_or_else(|| format!("host {index}: {tenants:?}"))
        });
    }
    let taken = agent(2).send(
        "POST",
        "/v1/tenants",
        Some(&c.token),
        &TenantCreate {
            name: "acme".into(),
            quota: None,
        },
    );
    assert_eq!(taken.status, 409, "{taken:?}");
    // A token made through b works on c as soon as b answered (c looks
    // up a token it has not mirrored yet), however quick the next call.
    let mut tokens: Vec<TokenCreated> = (0..5)
        .map(|_| {
            let token: TokenCreated = expect_as(
                &agent(1).call(
                    "POST",
                    &format!("/v1/tenants/{}/tokens", acme.id),
                    Some(&b.token),
                    None,
                ),
                201,
            );
            let vms = agent(2).call("GET", "/v1/vms", Some(&token.token), None);
            assert_eq!(vms.status, 200, "b's new token on c: {vms:?}");
            token
        })
        .collect();
    let token = tokens.pop().expect("a token");
    let unknown = agent(2).call("GET", "/v1/vms", Some("nbs_not-a-token"), None);
    assert_eq!(unknown.status, 401, "{unknown:?}");

    // An image on a: the tenant cannot go while a holds it.
    let images = dir.join("images");
    std::fs::write(images.join("vmlinux"), b"not a kernel").expect("kernel file");
    std::fs::write(images.join("rootfs"), vec![0u8; 4096]).expect("rootfs file");
    let image: Image = agent(0).create(
        "/v1/images",
        &token.token,
        &ImageCreate {
            name: "base".into(),
            kernel: images.join("vmlinux").display().to_string(),
            rootfs: images.join("rootfs").display().to_string(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    let tenant_path = format!("/v1/tenants/{}", acme.id);
    // a recorded in etcd that it holds some of acme's before it stored the
    // image: the refusal is immediate, from any host.
    let refused = agent(2).call("DELETE", &tenant_path, Some(&c.token), None);
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(refused.text.contains("host(s) a"), "{refused:?}");
    let removed = agent(0).call(
        "DELETE",
        &format!("/v1/images/{}", image.id),
        Some(&token.token),
        None,
    );
    assert_eq!(removed.status, 204, "{removed:?}");
    wait_for("c deletes the tenant once a holds nothing", || {
        let deleted = agent(2).call("DELETE", &tenant_path, Some(&c.token), None);
        match deleted.status {
            204 => Ok(()),
            409 => Err(deleted.text.clone()),
            other => panic!("deleting an empty tenant: {other} {deleted:?}"),
        }
    });
    wait_for("the deleted tenant's token works nowhere", || {
        let answers: Vec<u16> = (0..3)
            .map(|index| {
                agent(index)
                    .call("GET", "/v1/vms", Some(&token.token), None)
                    .status
            })
            .collect();
        (answers == [401, 401, 401])
            .then_some(())
            .ok_or_else(|| format!("{answers:?}"))
    });
}

#[test]
fn hosts_join_elect_a_controller_and_survive_failures() {
    let dir = TestDir::new("cluster-membership");
    std::fs::create_dir_all(dir.join("images")).expect("images dir");
    let a = Host::new('m', "a", 41);
    let b = Host::new('m', "b", 42);
    let c = Host::new('m', "c", 43);
    let mut etcd = EtcdCluster::start(&dir.join("etcd"), 3, Ipv4Addr::LOCALHOST, None);

    let mut agents = vec![
        Some(a.join(&dir, &etcd, "zone=onprem,fault-domain=1")),
        Some(b.join(&dir, &etcd, "zone=onprem,fault-domain=2")),
        Some(c.join(&dir, &etcd, "zone=cloud,fault-domain=3")),
    ];
    let hosts = [&a, &b, &c];
    let view = |index: usize, agents: &[Option<Agent>]| {
        let agent = agents[index].as_ref().expect("a running agent");
        hosts[index].hosts(agent)
    };

    // Every host sees the same three members, up, and one controller.
    wait_for("three hosts up, one controller", || {
        let seen = view(0, &agents);
        let up = seen.iter().filter(|h| h.state == HostState::Up).count();
        if up == 3 && controllers(&seen).len() == 1 {
            Ok(())
        } else {
            Err(host_states(&seen))
        }
    });
    let first = view(0, &agents);
    for index in 1..3 {
        assert_eq!(shape(&view(index, &agents)), shape(&first), "host {index}");
    }
    assert_eq!(first[2].labels["zone"], "cloud");
    assert_eq!(first[0].capacity.map(|c| c.memory_mib), Some(2048));
    assert_eq!(first[1].roles, vec!["compute", "controller"]);
    assert_eq!(first[0].api_address.as_deref(), Some("0.0.0.0:8282"));

    tenants_are_the_clusters(&dir, &hosts, &agents);

    // The controller's agent dies: another is elected; the dead one is down.
    let leader = controllers(&first)[0].clone();
    let leader_index = hosts.iter().position(|h| h.name == leader).expect("leader");
    let witness = (leader_index + 1) % 3;
    agents[leader_index].as_mut().expect("leader agent").kill();
    wait_for("a new controller after the old one's agent died", || {
        let seen = view(witness, &agents);
        let dead = seen.iter().find(|h| h.name == leader).expect("listed");
        let new = controllers(&seen);
        if dead.state == HostState::Down && new.len() == 1 && new[0] != leader {
            Ok(())
        } else {
            Err(host_states(&seen))
        }
    });
    let survivors = view(witness, &agents);
    let new_leader = controllers(&survivors)[0].clone();

    // The dead host's agent comes back (same data, same certificate): up
    // again, under the same name, and the controller stays where it is.
    // (The dead agent's handle goes first: dropping it kills whatever runs
    // with its data directory.)
    drop(agents[leader_index].take());
    agents[leader_index] = Some(hosts[leader_index].join(
        &dir,
        &etcd,
        if leader_index == 2 {
            "zone=cloud,fault-domain=3"
        } else {
            "zone=onprem"
        },
    ));
    wait_for("the restarted host is up again", || {
        let seen = view(leader_index, &agents);
        let back = seen.iter().find(|h| h.name == leader).expect("listed");
        if back.state == HostState::Up && controllers(&seen) == vec![new_leader.clone()] {
            Ok(())
        } else {
            Err(host_states(&seen))
        }
    });

    // One etcd member dies: nothing visible changes for two lease TTLs.
    etcd.kill(0);
    let until = Instant::now() + Duration::from_secs(2 * LEASE_TTL_S + 2);
    while Instant::now() < until {
        for index in 0..3 {
            let seen = view(index, &agents);
            assert!(
                seen.iter().all(|h| h.state == HostState::Up),
                "after an etcd member died, from host {index}: {}\n{}",
                host_states(&seen),
                etcd.logs()
            );
            assert_eq!(controllers(&seen), vec![new_leader.clone()]);
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // Host c's link is cut: down after its lease, seen from a; back when
    // the link is.
    c.netns.set_host_link_up(false);
    wait_for("c is down after its link was cut", || {
        let seen = view(0, &agents);
        let c_state = seen.iter().find(|h| h.name == "c").expect("c").state;
        (c_state == HostState::Down)
            .then_some(())
            .ok_or_else(|| host_states(&seen))
    });
    c.netns.set_host_link_up(true);
    wait_for("c is up once its link is back", || {
        let seen = view(0, &agents);
        let c_state = seen.iter().find(|h| h.name == "c").expect("c").state;
        (c_state == HostState::Up)
            .then_some(())
            .ok_or_else(|| host_states(&seen))
    });

    // A cordon set through one host is seen through another, and lasts
    // until it is lifted.
    let cordoned: ClusterHost = expect_as(
        &agents[0]
            .as_ref()
            .expect("a")
            .call("POST", "/v1/hosts/b/cordon", Some(&a.token), None),
        200,
    );
    assert_eq!(cordoned.state, HostState::Cordoned);
    let seen = view(2, &agents);
    assert!(
        seen.iter().any(|h| h.name == "b" && h.cordoned),
        "{}",
        host_states(&seen)
    );
    // A cordoned host takes no new VMs.
    let agent_b = agents[1].as_ref().expect("b");
    let globex: Tenant = agent_b.create(
        "/v1/tenants",
        &b.token,
        &TenantCreate {
            name: "globex".into(),
            quota: None,
        },
    );
    let globex_token: TokenCreated = expect_as(
        &agent_b.call(
            "POST",
            &format!("/v1/tenants/{}/tokens", globex.id),
            Some(&b.token),
            None,
        ),
        201,
    );
    // The controller places nothing on a cordoned host: a VM pinned to b
    // waits, and says why; once b is uncordoned it is placed there and b
    // defines it (not started: the image is not a real kernel).
    let images = dir.join("images");
    let image: Image = agent_b.create(
        "/v1/images",
        &globex_token.token,
        &ImageCreate {
            name: "base".into(),
            kernel: images.join("vmlinux").display().to_string(),
            rootfs: images.join("rootfs").display().to_string(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    let mut pinned = VmCreate::new("web", "base");
    pinned.placement.host = Some("b".into());
    let vm: Vm = agent_b.create("/v1/vms", &globex_token.token, &pinned);
    assert_eq!((vm.state, vm.host.as_deref()), (VmState::Pending, None));
    let events_path = format!("/v1/vms/{}/events", vm.id);
    wait_for("the VM pinned to cordoned b says why it waits", || {
        let events: Vec<VmEvent> = agent_b.get(&events_path, &globex_token.token);
        events
            .iter()
            .any(|event| event.kind == "unplaceable" && event.message.contains("cordoned"))
            .then_some(())
            .ok_or_else(|| format!("{events:?}"))
    });
    let uncordoned: ClusterHost = expect_as(
        &agents[2]
            .as_ref()
            .expect("c")
            .call("POST", "/v1/hosts/b/uncordon", Some(&c.token), None),
        200,
    );
    assert_eq!(uncordoned.state, HostState::Up);
    let vm_path = format!("/v1/vms/{}", vm.id);
    wait_for(
        "the VM is placed on b and defined there once b is uncordoned",
        || {
            let seen: Vm = agent_b.get(&vm_path, &globex_token.token);
            (seen.host.as_deref() == Some("b") && seen.state == VmState::Stopped)
                .then_some(())
                .ok_or_else(|| format!("{seen:?}"))
        },
    );
    // Every host lists it as b reports it (the hosts here cannot reach
    // each other: cluster_vms forwards requests between hosts).
    wait_for("c lists the VM as b reports it", || {
        let listed: Vec<Vm> = agents[2]
            .as_ref()
            .expect("c")
            .get("/v1/vms", &globex_token.token);
        listed
            .iter()
            .any(|seen| {
                seen.id == vm.id
                    && seen.host.as_deref() == Some("b")
                    && seen.state == VmState::Stopped
            })
            .then_some(())
            .ok_or_else(|| format!("{listed:?}"))
    });
    let deleted = agent_b.call("DELETE", &vm_path, Some(&globex_token.token), None);
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let removed = agent_b.call(
        "DELETE",
        &format!("/v1/images/{}", image.id),
        Some(&globex_token.token),
        None,
    );
    assert_eq!(removed.status, 204, "{removed:?}");
    // b drops its holding key for globex once it holds nothing of it.
    wait_for("globex is deleted once b holds nothing of it", || {
        let gone = agent_b.call(
            "DELETE",
            &format!("/v1/tenants/{}", globex.id),
            Some(&b.token),
            None,
        );
        match gone.status {
            204 => Ok(()),
            409 => Err(format!("{gone:?}")),
            other => panic!("deleting globex: {other} {gone:?}"),
        }
    });

    // Only a down host can be forgotten; an unknown one is a 404.
    let agent_a = agents[0].as_ref().expect("a");
    let up = agent_a.call("DELETE", "/v1/hosts/b", Some(&a.token), None);
    assert_eq!(up.status, 409, "{up:?}");
    let unknown = agent_a.call("DELETE", "/v1/hosts/nobody", Some(&a.token), None);
    assert_eq!(unknown.status, 404, "{unknown:?}");

    // A second agent cannot take b's name: it has another certificate.
    let impostor = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.netns.name))
        .arg("--")
        .arg(nubis_tests::workspace_binary("nubis-agent"))
        .arg("--listen")
        .arg("127.0.0.1:8383")
        .arg("--data-dir")
        .arg(dir.join("impostor"))
        .args(
            c.args(&etcd, "", &[])
                .iter()
                .map(|arg| if arg == "c" { "b" } else { arg }),
        )
        .env("NUBIS_OPERATOR_TOKEN", "impostor-operator-token-000")
        .stdin(Stdio::null())
        .output()
        .expect("run the impostor");
    let stderr = String::from_utf8_lossy(&impostor.stderr);
    assert!(!impostor.status.success(), "{stderr}");
    assert!(
        stderr.contains("host name 'b' belongs to another member"),
        "{stderr}"
    );

    // b stops for good: down, then forgotten, and listed nowhere.
    agents[1].as_mut().expect("b").kill();
    wait_for("b is down", || {
        let seen = view(0, &agents);
        let b_state = seen.iter().find(|h| h.name == "b").expect("b").state;
        (b_state == HostState::Down)
            .then_some(())
            .ok_or_else(|| host_states(&seen))
    });
    let forgotten =
        agents[0]
            .as_ref()
            .expect("a")
            .call("DELETE", "/v1/hosts/b", Some(&a.token), None);
    assert_eq!(forgotten.status, 204, "{forgotten:?}");
    let seen = view(2, &agents);
    assert_eq!(seen.len(), 2, "{}", host_states(&seen));
}

#[test]
fn hosts_reach_etcd_over_tls_with_client_certificates() {
    let dir = TestDir::new("cluster-tls");
    std::fs::create_dir_all(dir.join("images")).expect("images dir");
    let a = Host::new('t', "a", 44);
    let pki = Pki::new(&dir.join("pki"));
    let server = pki.issue("etcd", &[Ipv4Addr::LOCALHOST, a.gateway()]);
    let ctl = pki.issue("etcdctl", &[]);
    let agent_cert = pki.issue("host-a", &[]);
    let etcd = EtcdCluster::start(
        &dir.join("etcd"),
        1,
        Ipv4Addr::LOCALHOST,
        Some((
            ClientTls {
                ca: pki.ca(),
                server,
            },
            ctl,
        )),
    );

    // Without a client certificate the agent cannot join.
    let refused = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", a.netns.name))
        .arg("--")
        .arg(nubis_tests::workspace_binary("nubis-agent"))
        .arg("--listen")
        .arg("127.0.0.1:8383")
        .arg("--data-dir")
        .arg(dir.join("no-cert"))
        .args(a.args(&etcd, "", &[]))
        .env("NUBIS_OPERATOR_TOKEN", "no-cert-operator-token-0000")
        .stdin(Stdio::null())
        .output()
        .expect("run an agent without a certificate");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("cannot join the cluster as a"), "{stderr}");

    // With one it joins, leads, and its record is in etcd under the prefix.
    let tls_args = vec![
        "--etcd-ca".to_string(),
        pki.ca().display().to_string(),
        "--etcd-cert".to_string(),
        agent_cert.cert.display().to_string(),
        "--etcd-key".to_string(),
        agent_cert.key.display().to_string(),
    ];
    let agent = a.join_with(&dir, &etcd, "zone=cloud", &tls_args);
    wait_for("a is up and the controller", || {
        let seen = a.hosts(&agent);
        (seen.len() == 1 && seen[0].state == HostState::Up && seen[0].controller)
            .then_some(())
            .ok_or_else(|| host_states(&seen))
    });
    let endpoints = etcd
        .cluster_arg(Ipv4Addr::LOCALHOST)
        .trim_start_matches("etcd=")
        .to_string();
    let keys = etcd
        .etcdctl(&endpoints, &["get", "--prefix", "--keys-only", "/nubis/"])
        .expect("etcdctl over TLS");
    for key in [
        "/nubis/members/a",
        "/nubis/alive/a",
        "/nubis/election/controller/",
    ] {
        assert!(keys.contains(key), "{key} missing from:\n{keys}");
    }
}
