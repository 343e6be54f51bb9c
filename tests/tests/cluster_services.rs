//! Services on a cluster of three simulated hosts (issue #17), with real
//! etcd, agents and KVM guests that answer HTTP: a service's role of
//! three instances spreads over the three fault domains and every
//! instance passes its HTTP probe; an instance whose server dies is
//! replaced; scaling up and down adds and retires instances; a rolling
//! upgrade replaces one update domain at a time while the others answer;
//! an upgrade whose instances never pass their probe stops at its first
//! domain and a rollback brings the old revision back, replacing only the
//! bad instances; deleting the service retires its instances.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nubis_api::{
    Image, InstanceHealth, Network, NetworkCreate, Probe, ProbeProtocol, Quota, RoleRollback,
    RoleScale, RoleSpec, RolloutState, Service, ServiceCreate, ServiceEndpoint, ServiceInstance,
    Vm,
};
use nubis_tests::agent::{busybox_image, expect_as, tenant_with_quota};
use nubis_tests::cluster::{Cluster, Host, Layout, Member, Underlay, COMPUTE, MAY_LEAD, SETTLE};
use nubis_tests::etcd::EtcdCluster;
use nubis_tests::{guest_images, require_kvm, TestDir};

const LAYOUT: Layout = Layout {
    prefix: "nbs",
    underlay_octet: 49,
    port: 8283,
    lease_ttl_s: 3,
};
/// The tenant network the instances are on.
const LAN: &str = "10.71.0.0/24";
/// How long instances may take to boot and pass their probe on a
/// machine booting several guests at once. A hang guard.
const BOOTS: Duration = Duration::from_secs(240);

/// The guests' program: serve `version` and the instance's address over
/// HTTP on port 80 (busybox httpd), and `/health`; a connection to port
/// 82 removes `/health` (the instance fails its probe but still serves),
/// one to port 81 kills the server (an application that dies).
fn serving(version: &str) -> String {
    format!(
        "nubis_cmd=\"mkdir -p /w; set -- $(ip -o -4 addr show dev eth0); \
         echo {version} $4 > /w/index.html; echo ok > /w/health; httpd -p 80 -h /w; \
         echo SERVING; (nc -l -p 82 >/dev/null; rm /w/health; echo SICK) & \
         nc -l -p 81 >/dev/null; killall httpd; echo KILLED; read wait_forever\""
    )
}

/// A guest that boots and never serves.
fn not_serving() -> String {
    "nubis_cmd=\"echo NOT SERVING; read wait_forever\"".to_string()
}

/// An HTTP probe. Each request costs the guest a fork of httpd, which
/// takes a second or more under nested KVM: a generous timeout.
fn probe(grace_s: u32) -> Probe {
    Probe {
        path: Some("/health".into()),
        interval_s: 2,
        timeout_ms: 10_000,
        threshold: 4,
        start_grace_s: grace_s,
        ..Probe::new(ProbeProtocol::Http, 80)
    }
}

/// The endpoint's port on every host.
const HOST_PORT: u16 = 30080;

/// One HTTP GET of `/` at `address`: the body.
fn get(address: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(10))
        .map_err(|err| format!("connect {address}: {err}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|err| err.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .map_err(|err| format!("send to {address}: {err}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|err| format!("read from {address}: {err}"))?;
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .ok_or_else(|| format!("no body from {address} in {answer:?}"))?;
    Ok(body.trim().to_string())
}

/// A client that opens one connection after the other until told to
/// stop: what each answered (or why it failed).
struct Client {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answers: std::sync::Arc<std::sync::Mutex<Vec<Result<String, String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Seconds since the first call: when things happened, for a failure's
/// message.
fn clock() -> f64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs_f64()
}

impl Client {
    /// Connects to `address`, from namespace `netns` (this one: None).
    fn start(address: SocketAddr, netns: Option<&nubis_tests::netns::NetNs>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (flag, log) = (stop.clone(), answers.clone());
        let work = move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let started = clock();
                let answer = get(address).map_err(|err| format!("at {started:.1} s: {err}"));
                log.lock().expect("the answers").push(answer);
                // Paced: each request costs a guest a fork of httpd, which
                // takes a second or more under nested KVM; a client that
                // saturated the guests would fail their probes.
                std::thread::sleep(Duration::from_millis(500));
            }
        };
        let thread = match netns {
            Some(netns) => {
                let name = netns.name.clone();
                std::thread::spawn(move || {
                    nubis_tests::netns::enter(&name);
                    work()
                })
            }
            None => std::thread::spawn(work),
        };
        Client {
            stop,
            answers,
            thread: Some(thread),
        }
    }

    fn answers(&self) -> Vec<Result<String, String>> {
        self.answers.lock().expect("the answers").clone()
    }

    /// How many times each answer (or failure) came, for a message.
    fn tally(&self) -> String {
        let mut counts = std::collections::BTreeMap::new();
        for answer in self.answers() {
            let key = match answer {
                Ok(body) => body,
                Err(err) => format!("error: {err}"),
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        format!("{counts:?}")
    }

    /// Stops it: every answer.
    fn stop(mut self) -> Vec<Result<String, String>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the client");
        }
        self.answers()
    }
}

/// The live (not retiring) instances of the service's only role.
fn live(service: &Service) -> Vec<&ServiceInstance> {
    service.roles[0]
        .instances
        .iter()
        .filter(|instance| !instance.retiring)
        .collect()
}

fn healthy(service: &Service) -> usize {
    live(service)
        .iter()
        .filter(|instance| instance.health == InstanceHealth::Healthy)
        .count()
}

/// A summary of the role for failure messages.
fn summary(service: &Service) -> String {
    let role = &service.roles[0];
    let instances: Vec<String> = role
        .instances
        .iter()
        .map(|instance| {
            format!(
                "{}[{} ud{} r{} {} {} {}{}]",
                instance.name,
                instance.index,
                instance.update_domain,
                instance.revision,
                instance.host.as_deref().unwrap_or("-"),
                instance.state.as_str(),
                instance.health.as_str(),
                if instance.retiring { " retiring" } else { "" }
            )
        })
        .collect();
    format!(
        "revision {} rollout {:?}: {}",
        role.revision,
        role.rollout.as_ref().map(|rollout| (
            rollout.state,
            rollout.domain,
            rollout.message.clone()
        )),
        instances.join(" ")
    )
}

/// The body an instance serves on port 80, fetched from inside its
/// host's namespace (the host is the gateway of its network there).
fn fetch(cluster: &Cluster, instance: &ServiceInstance) -> Result<String, String> {
    let host = instance.host.as_deref().ok_or("not placed")?;
    let address = instance_address(instance)?;
    cluster
        .member(host)
        .host
        .netns
        .within(move || get(SocketAddr::from((address, 80))))
}

/// Opens and closes a connection to `port` of `instance`, from its
/// host: its guest listens on 81 (kills the server) and 82 (removes
/// `/health`).
fn poke(cluster: &Cluster, instance: &ServiceInstance, port: u16) {
    let host = instance.host.clone().expect("a placed instance");
    let address = instance_address(instance).expect("an address");
    cluster.member(&host).host.netns.within(move || {
        let stream =
            TcpStream::connect_timeout(&SocketAddr::from((address, port)), Duration::from_secs(5))
                .unwrap_or_else(|err| panic!("connect {address}:{port}: {err}"));
        drop(stream);
    });
}

fn instance_address(instance: &ServiceInstance) -> Result<Ipv4Addr, String> {
    instance
        .address
        .as_deref()
        .and_then(|address| address.split('/').next())
        .and_then(|address| address.parse().ok())
        .ok_or_else(|| format!("{} has no address", instance.name))
}

/// Runs nubisctl against host `via` as `token` on a thread: whether it
/// succeeded, its stdout and stderr.
fn nubisctl(
    cluster: &Cluster,
    via: &str,
    token: &str,
    args: &[&str],
) -> std::thread::JoinHandle<(bool, String, String)> {
    let mut command = std::process::Command::new(nubis_tests::workspace_binary("nubisctl"));
    command
        .args([
            "--url",
            &format!("http://{}", cluster.member(via).agent().address),
            "--token",
            token,
        ])
        .args(args);
    std::thread::spawn(move || {
        let output = command.output().expect("run nubisctl");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
}

struct Shop<'a> {
    cluster: &'a Cluster,
    token: String,
    id: String,
}

impl Shop<'_> {
    fn get(&self, via: &str) -> Result<Service, String> {
        self.cluster
            .member(via)
            .get(&format!("/v1/services/{}", self.id), &self.token)
    }

    /// Waits until `check` holds for the service as host `a` shows it;
    /// a failure shows the role and the consoles of its instances that
    /// are not healthy.
    fn wait_until<T>(
        &self,
        what: &str,
        guard: Duration,
        mut check: impl FnMut(&Service) -> Option<T>,
    ) -> T {
        let started = Instant::now();
        self.cluster.wait_for(what, guard, || {
            let service = self.get("a")?;
            match check(&service) {
                Some(done) => Ok(done),
                None if started.elapsed() + Duration::from_secs(1) >= guard => Err(format!(
                    "{}\n{}",
                    summary(&service),
                    self.consoles(&service)
                )),
                None => Err(summary(&service)),
            }
        })
    }

    /// The end of the console of each instance that is not healthy.
    fn consoles(&self, service: &Service) -> String {
        service.roles[0]
            .instances
            .iter()
            .filter(|instance| instance.health != InstanceHealth::Healthy)
            .map(|instance| {
                let reply = self.cluster.member("a").call(
                    "GET",
                    &format!("/v1/vms/{}/console", instance.vm_id),
                    &self.token,
                    None,
                );
                format!(
                    "--- {}'s console ---\n{}",
                    instance.name,
                    nubis_tests::cluster::tail(&reply.text, 15)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the role has `count` live instances, all healthy and
    /// of `revision`, none retiring left: them.
    fn settled(&self, count: usize, revision: u64) -> Vec<ServiceInstance> {
        self.wait_until(
            &format!("{count} healthy instances of revision {revision}"),
            BOOTS,
            |service| {
                let all = &service.roles[0].instances;
                let ready = all.len() == count
                    && all.iter().all(|instance| {
                        !instance.retiring
                            && instance.revision == revision
                            && instance.health == InstanceHealth::Healthy
                    });
                ready.then(|| all.clone())
            },
        )
    }

    fn post<B: serde::Serialize>(&self, via: &str, action: &str, body: &B) -> Service {
        let reply = self.cluster.member(via).send(
            "POST",
            &format!("/v1/services/{}/{action}", self.id),
            &self.token,
            body,
        );
        assert_eq!(reply.status, 202, "{action}: {reply:?}");
        expect_as(&reply, 202)
    }

    /// Every instance answers `version` and its own address.
    fn answer(&self, instances: &[ServiceInstance], version: &str) {
        for instance in instances {
            let started = Instant::now();
            let body = self
                .cluster
                .wait_for(&format!("{} answers", instance.name), SETTLE, || {
                    fetch(self.cluster, instance).map_err(|err| {
                        if started.elapsed() + Duration::from_secs(2) < SETTLE {
                            return err;
                        }
                        // What the guest and its host say, for the failure.
                        let console = self.cluster.member("a").call(
                            "GET",
                            &format!("/v1/vms/{}/console", instance.vm_id),
                            &self.token,
                            None,
                        );
                        let host = instance.host.as_deref().unwrap_or("a");
                        let netns = &self.cluster.member(host).host.netns;
                        let mut seen = format!(
                            "{err}\n--- its console ---\n{}",
                            nubis_tests::cluster::tail(&console.text, 25)
                        );
                        for args in [
                            &["ip", "neigh"][..],
                            &["ip", "-o", "-4", "addr"],
                            &["ip", "route"],
                            &["bridge", "fdb", "show"],
                            &["nft", "list", "ruleset"],
                        ] {
                            let output = netns.run(args[0], &args[1..]);
                            seen.push_str(&format!(
                                "\n--- {host}: {} ---\n{}{}",
                                args.join(" "),
                                String::from_utf8_lossy(&output.stdout),
                                String::from_utf8_lossy(&output.stderr)
                            ));
                        }
                        seen
                    })
                });
            let address = instance.address.as_deref().unwrap_or_default();
            assert_eq!(body, format!("{version} {address}"), "{}", instance.name);
        }
    }
}

#[test]
fn services_keep_their_instances_through_failures_scaling_and_upgrades() {
    require_kvm();
    let started = Instant::now();
    let phase = |what: &str| {
        eprintln!(
            "cluster_services: {what} ({} s)",
            started.elapsed().as_secs()
        )
    };
    let dir = TestDir::new("cluster-services");
    let images = guest_images();
    let image_dir = images
        .vmlinux
        .parent()
        .expect("the guest images' directory")
        .to_path_buf();
    let underlay = Underlay::new(LAYOUT);
    let etcd = EtcdCluster::start(&dir.join("etcd"), 1, Ipv4Addr::LOCALHOST, None);
    let mut cluster = Cluster {
        members: [
            (0, "a", 60, "fault-domain=1,update-domain=1", MAY_LEAD),
            (1, "b", 61, "fault-domain=2,update-domain=2", MAY_LEAD),
            (2, "c", 62, "fault-domain=3,update-domain=1", COMPUTE),
        ]
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

    let quota = Quota {
        max_vcpus: 16,
        max_memory_mib: 4096,
        max_vms: 16,
        ..Quota::default()
    };
    let (tenant_id, token) = tenant_with_quota(cluster.member("a").agent(), "shopco", quota);
    let image = busybox_image(cluster.member("a").agent(), &token, &images);
    let _lan: Network =
        cluster
            .member("a")
            .agent()
            .create("/v1/networks", &token, &NetworkCreate::new("lan", LAN));
    cluster.wait_for("the image is listed on c", SETTLE, || {
        let listed: Vec<Image> = cluster.member("c").get("/v1/images", &token)?;
        listed
            .iter()
            .any(|listed| listed.id == image.id)
            .then_some(())
            .ok_or_else(|| format!("{listed:?}"))
    });

    // 1. Three instances, one per fault domain, each passing its probe.
    let mut web = RoleSpec::new("web", "busybox", 3);
    web.networks = vec!["lan".into()];
    web.endpoints = vec![ServiceEndpoint {
        host_port: Some(HOST_PORT),
        ..ServiceEndpoint::tcp(80)
    }];
    web.kernel_args = serving("v1");
    web.probe = Some(probe(180));
    let body = ServiceCreate {
        name: "shop".into(),
        roles: vec![web],
    };
    let reply = cluster
        .member("b")
        .send("POST", "/v1/services", &token, &body);
    assert_eq!(reply.status, 201, "{reply:?}");
    let created: Service = expect_as(&reply, 201);
    assert_eq!(created.roles[0].spec.image, image.id);
    assert_eq!(created.roles[0].revision, 1);
    let shop = Shop {
        cluster: &cluster,
        token: token.clone(),
        id: created.id.clone(),
    };
    let first = shop.settled(3, 1);
    let mut domains: Vec<&str> = first
        .iter()
        .map(|instance| instance.fault_domain.as_deref().unwrap_or("-"))
        .collect();
    domains.sort();
    assert_eq!(domains, ["1", "2", "3"], "{first:?}");
    shop.answer(&first, "v1");
    // Another tenant does not see it.
    let (_, other) = tenant_with_quota(cluster.member("a").agent(), "other", Quota::default());
    let reply = cluster
        .member("c")
        .call("GET", &format!("/v1/services/{}", shop.id), &other, None);
    assert_eq!(reply.status, 404, "{reply:?}");
    phase("three instances healthy, one per fault domain, answering");

    // 2. The endpoint: clients keep connecting to the virtual address
    // (from host a) and to the host port (of host b, from outside) while
    // host c is drained (its instance live-migrates) and another instance
    // fails its probe (it is taken out, then replaced); every connection
    // is answered, by every healthy instance.
    endpoint_through_drain_and_probe_failure(&cluster, &shop, &first);
    phase("the endpoint answered every connection through a drain and a failed probe");

    // 3. The agents restarted (as for an upgrade of their binary) one
    // update domain at a time by `nubisctl host rollout`: every VM runs on
    // in the same VMM, every connection to the endpoint is answered.
    let id = shop.id.clone();
    drop(shop);
    agents_restarted_by_update_domain(&mut cluster, &dir, &image_dir, &etcd, &token);
    let shop = Shop {
        cluster: &cluster,
        token: token.clone(),
        id,
    };
    phase("agents restarted one update domain at a time, the endpoint answering");
    let first = shop.settled(3, 1);

    // 4. An instance whose server dies is replaced in its slot.
    let victim = first
        .iter()
        .find(|instance| instance.index == 1)
        .expect("slot 1")
        .clone();
    poke(&cluster, &victim, 81);
    let replaced = shop.wait_until("slot 1 replaced by a healthy instance", BOOTS, |service| {
        live(service)
            .into_iter()
            .find(|instance| {
                instance.index == 1
                    && instance.vm_id != victim.vm_id
                    && instance.health == InstanceHealth::Healthy
            })
            .cloned()
    });
    let service = shop.get("c").expect("the service");
    assert!(
        service
            .events
            .iter()
            .any(|event| event.kind == "replaced" && event.message.contains(&victim.name)),
        "{:?}",
        service.events
    );
    cluster.wait_for("the failed instance is gone", SETTLE, || {
        let vms: Vec<Vm> = cluster.member("a").get("/v1/vms", &token)?;
        (!vms.iter().any(|vm| vm.id == victim.vm_id))
            .then_some(())
            .ok_or_else(|| format!("{vms:?}"))
    });
    shop.answer(&[replaced], "v1");
    phase("an instance whose server died was replaced");

    // 5. Scaling: up to 4, down to 2 (slots 2 and 3 retire).
    shop.post(
        "c",
        "scale",
        &RoleScale {
            role: "web".into(),
            instances: 4,
        },
    );
    shop.settled(4, 1);
    shop.post(
        "a",
        "scale",
        &RoleScale {
            role: "web".into(),
            instances: 2,
        },
    );
    let two = shop.settled(2, 1);
    let mut slots: Vec<u32> = two.iter().map(|instance| instance.index).collect();
    slots.sort();
    assert_eq!(slots, [0, 1]);
    phase("scaled to 4, then to 2");

    // 6. A rolling upgrade, by nubisctl (which follows it): update
    // domain 0 (slot 0), then 1 (slot 1); one instance answers all along.
    let upgrade = nubisctl(
        &cluster,
        "b",
        &token,
        &[
            "service",
            "upgrade",
            "shop",
            "--role",
            "web",
            "--kernel-args",
            &serving("v2"),
        ],
    );
    let mut domains_seen = Vec::new();
    let mut fewest_healthy = usize::MAX;
    let v2 = shop.wait_until("the rollout to revision 2 is done", BOOTS * 2, |service| {
        let rollout = service.roles[0].rollout.clone()?;
        if domains_seen.last() != Some(&rollout.domain) {
            domains_seen.push(rollout.domain);
        }
        fewest_healthy = fewest_healthy.min(healthy(service));
        (rollout.state == RolloutState::Done).then(|| service.clone())
    });
    assert_eq!(domains_seen.first(), Some(&0), "{domains_seen:?}");
    assert!(
        domains_seen.windows(2).all(|pair| pair[0] < pair[1]),
        "{domains_seen:?}"
    );
    assert!(fewest_healthy >= 1, "no instance was healthy at some point");
    let (status, stdout, stderr) = upgrade.join().expect("nubisctl");
    assert!(status, "nubisctl service upgrade: {stdout}\n{stderr}");
    let said = format!("{stdout}{stderr}");
    assert!(
        said.contains("update domain 1/2") && said.contains("done"),
        "nubisctl's progress: {said}"
    );
    let v2_instances = shop.settled(2, 2);
    shop.answer(&v2_instances, "v2");
    assert!(
        v2.events.iter().any(|event| event.kind == "rollout"),
        "{:?}",
        v2.events
    );
    phase("rolled out revision 2, one update domain at a time");

    // 7. An upgrade whose instances never serve stops at domain 0; the
    // other domain keeps revision 2 and answers.
    let failing = nubisctl(
        &cluster,
        "a",
        &token,
        &[
            "service",
            "upgrade",
            "shop",
            "--role",
            "web",
            "--kernel-args",
            &not_serving(),
            "--probe",
            "http:80",
            "--probe-interval",
            "2",
            "--probe-timeout",
            "10000",
            "--probe-grace",
            "40",
        ],
    );
    let failed = shop.wait_until("the rollout to revision 3 fails", BOOTS * 2, |service| {
        let rollout = service.roles[0].rollout.as_ref()?;
        (rollout.state == RolloutState::Failed).then(|| service.clone())
    });
    let rollout = failed.roles[0].rollout.clone().expect("the rollout");
    assert_eq!((rollout.to_revision, rollout.domain), (3, 0), "{rollout:?}");
    assert!(rollout.message.contains("unhealthy"), "{rollout:?}");
    let survivor = live(&failed)
        .into_iter()
        .find(|instance| instance.index == 1)
        .expect("slot 1")
        .clone();
    assert_eq!(survivor.revision, 2, "{}", summary(&failed));
    assert!(
        v2_instances
            .iter()
            .any(|instance| instance.vm_id == survivor.vm_id),
        "slot 1 was not touched: {}",
        summary(&failed)
    );
    shop.answer(std::slice::from_ref(&survivor), "v2");
    let (status, stdout, stderr) = failing.join().expect("nubisctl");
    assert!(
        !status && format!("{stdout}{stderr}").contains("unhealthy"),
        "nubisctl follows the failed rollout and fails: {stdout}\n{stderr}"
    );
    phase("a failing upgrade stopped at update domain 0; domain 1 serves on");

    // 8. Rollback: revision 2 again; only the bad instance is replaced.
    let back = shop.post("c", "rollback", &RoleRollback { role: "web".into() });
    assert_eq!(back.roles[0].revision, 2);
    let after = shop.wait_until("the rollback is done", BOOTS, |service| {
        let rollout = service.roles[0].rollout.as_ref()?;
        (rollout.state == RolloutState::Done && rollout.rollback).then(|| service.clone())
    });
    let restored = shop.settled(2, 2);
    assert!(
        restored
            .iter()
            .any(|instance| instance.vm_id == survivor.vm_id),
        "the good instance was kept: {}",
        summary(&after)
    );
    shop.answer(&restored, "v2");
    phase("rolled back to revision 2");

    // 9. Deleting the service retires its instances; the tenant can go.
    let reply =
        cluster
            .member("b")
            .call("DELETE", &format!("/v1/services/{}", shop.id), &token, None);
    assert_eq!(reply.status, 204, "{reply:?}");
    cluster.wait_for("the instances are gone", SETTLE, || {
        let vms: Vec<Vm> = cluster.member("a").get("/v1/vms", &token)?;
        vms.is_empty()
            .then_some(())
            .ok_or_else(|| format!("{vms:?}"))
    });
    phase("service deleted, its instances gone");
    let _ = tenant_id;
}

/// Step 2 of the test (see there).
fn endpoint_through_drain_and_probe_failure(
    cluster: &Cluster,
    shop: &Shop<'_>,
    first: &[ServiceInstance],
) {
    let service = shop.get("a").expect("the service");
    let virtual_address: Ipv4Addr = service.roles[0]
        .virtual_address
        .as_deref()
        .and_then(|address| address.parse().ok())
        .expect("a virtual address");
    let on = |host: &str| {
        first
            .iter()
            .find(|instance| instance.host.as_deref() == Some(host))
            .unwrap_or_else(|| panic!("no instance on {host}: {first:?}"))
            .clone()
    };
    let (moved, sick) = (on("c"), on("b"));
    let inside = Client::start(
        SocketAddr::from((virtual_address, 80)),
        Some(&cluster.member("a").host.netns),
    );
    let outside = Client::start(
        SocketAddr::from((cluster.member("b").host.reach, HOST_PORT)),
        None,
    );
    let answered_by_all = |client: &Client, instances: &[&ServiceInstance]| {
        let answers = client.answers();
        instances.iter().all(|instance| {
            let address = instance.address.as_deref().unwrap_or_default();
            answers
                .iter()
                .any(|answer| answer.as_deref() == Ok(&format!("v1 {address}")))
        })
    };
    let all: Vec<&ServiceInstance> = first.iter().collect();
    let placed: Vec<String> = first
        .iter()
        .map(|instance| format!("{:?} on {:?}", instance.address, instance.host))
        .collect();
    let started = Instant::now();
    cluster.wait_for("both clients answered by all three", SETTLE * 2, || {
        if answered_by_all(&inside, &all) && answered_by_all(&outside, &all) {
            return Ok(());
        }
        let mut message = format!(
            "instances {placed:?}\ninside {}\noutside {}",
            inside.tally(),
            outside.tally()
        );
        if started.elapsed() + Duration::from_secs(2) > SETTLE * 2 {
            for name in ["a", "b", "c"] {
                let netns = &cluster.member(name).host.netns.name;
                for args in [
                    &["nft", "list", "table", "ip", "nubis_lb"][..],
                    &["ip", "route", "show", "table", "20044"],
                    &["ip", "rule"],
                    &["ip", "-o", "-4", "addr"],
                    &["bridge", "fdb"],
                    &["conntrack", "-L"],
                ] {
                    let output = std::process::Command::new("ip")
                        .args(["netns", "exec", netns])
                        .args(args)
                        .output()
                        .expect("run a diagnostic");
                    message.push_str(&format!(
                        "\n--- {name}: {} ---\n{}{}",
                        args.join(" "),
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    ));
                }
            }
        }
        Err(message)
    });

    // Drain c: its instance moves by live migration, keeping its address.
    eprintln!("cluster_services: drain of c at {:.1} s", clock());
    let operator = &cluster.member("a").host.token;
    let reply = cluster.member("a").send(
        "POST",
        "/v1/hosts/c/drain",
        operator,
        &nubis_api::HostDrain { max_parallel: None },
    );
    assert_eq!(reply.status, 202, "{reply:?}");
    cluster.wait_for("host c drained", SETTLE, || {
        let host: nubis_api::ClusterHost = cluster.member("a").get("/v1/hosts/c", operator)?;
        let done = host.drain.as_ref().is_some_and(|drain| drain.done);
        done.then_some(()).ok_or_else(|| format!("{host:?}"))
    });
    let after_drain = shop.wait_until(
        &format!("{} runs healthy elsewhere", moved.name),
        SETTLE,
        |service| {
            live(service)
                .into_iter()
                .find(|instance| {
                    instance.vm_id == moved.vm_id
                        && instance.host.as_deref() != Some("c")
                        && instance.health == InstanceHealth::Healthy
                })
                .cloned()
        },
    );

    // b's instance fails its probe (it still serves): out, then replaced.
    eprintln!(
        "cluster_services: {} moved, {} made sick at {:.1} s",
        moved.name,
        sick.name,
        clock()
    );
    poke(cluster, &sick, 82);
    let replacement = shop.wait_until(
        &format!("{} replaced by a healthy instance", sick.name),
        BOOTS,
        |service| {
            live(service)
                .into_iter()
                .find(|instance| {
                    instance.index == sick.index
                        && instance.vm_id != sick.vm_id
                        && instance.health == InstanceHealth::Healthy
                })
                .cloned()
        },
    );
    eprintln!("cluster_services: replacement healthy at {:.1} s", clock());
    let healthy_now: Vec<&ServiceInstance> = first
        .iter()
        .filter(|instance| instance.vm_id != sick.vm_id && instance.vm_id != moved.vm_id)
        .chain([&after_drain, &replacement])
        .collect();
    let seen_before = (inside.answers().len(), outside.answers().len());
    cluster.wait_for(
        "both clients answered by the replacement too",
        SETTLE,
        || {
            let (inside_now, outside_now) = (inside.answers(), outside.answers());
            let fresh = |answers: &[Result<String, String>], from: usize| {
                let address = replacement.address.as_deref().unwrap_or_default();
                answers[from..]
                    .iter()
                    .any(|answer| answer.as_deref() == Ok(&format!("v1 {address}")))
            };
            (fresh(&inside_now, seen_before.0) && fresh(&outside_now, seen_before.1))
                .then_some(())
                .ok_or_else(|| format!("inside {}\noutside {}", inside.tally(), outside.tally()))
        },
    );
    let (inside, outside) = (inside.stop(), outside.stop());
    for (name, answers) in [("virtual address", &inside), ("host port", &outside)] {
        all_answered(cluster, name, answers);
        let by: std::collections::BTreeSet<&str> = answers
            .iter()
            .filter_map(|answer| answer.as_deref().ok())
            .collect();
        for instance in &healthy_now {
            let address = instance.address.as_deref().unwrap_or_default();
            assert!(
                by.contains(format!("v1 {address}").as_str()),
                "{name}: {by:?}"
            );
        }
        eprintln!(
            "cluster_services: {} connections to the {name}, all answered, by {} instances",
            answers.len(),
            by.len()
        );
    }
    let reply = cluster
        .member("a")
        .call("POST", "/v1/hosts/c/uncordon", operator, None);
    assert_eq!(reply.status, 200, "{reply:?}");
}

/// Asserts that every connection to `what` was answered.
fn all_answered(cluster: &Cluster, what: &str, answers: &[Result<String, String>]) {
    let failed: Vec<&String> = answers
        .iter()
        .filter_map(|answer| answer.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections to the {what} failed: {failed:?}\n{}",
        failed.len(),
        answers.len(),
        cluster.logs()
    );
    eprintln!(
        "cluster_services: {} connections to the {what}, all answered",
        answers.len()
    );
}

/// Step 3 of the test (see there). `nubisctl host rollout` restarts each
/// host's agent through a command that asks this test to do it (a file
/// per request, gone once done), as a service manager would: SIGTERM, then
/// the agent started again on the same data directory.
fn agents_restarted_by_update_domain(
    cluster: &mut Cluster,
    dir: &TestDir,
    image_dir: &std::path::Path,
    etcd: &EtcdCluster,
    token: &str,
) {
    let service: Vec<Service> = cluster
        .member("a")
        .get("/v1/services", token)
        .expect("services");
    let role = &service[0].roles[0];
    let virtual_address: Ipv4Addr = role
        .virtual_address
        .as_deref()
        .and_then(|address| address.parse().ok())
        .expect("a virtual address");
    let pids = |cluster: &Cluster| -> Vec<(String, Option<u32>, String)> {
        let mut vms: Vec<Vm> = cluster.member("b").get("/v1/vms", token).expect("the VMs");
        vms.sort_by(|a, b| a.id.cmp(&b.id));
        vms.into_iter()
            .map(|vm| (vm.id, vm.pid, vm.state.as_str().to_string()))
            .collect()
    };
    let before = pids(cluster);
    let requests = dir.join("restarts");
    std::fs::create_dir_all(&requests).expect("the restart requests' directory");
    let command = format!(
        "touch {0}/$NUBIS_HOST; while [ -e {0}/$NUBIS_HOST ]; do sleep 0.2; done",
        requests.display()
    );
    let inside = Client::start(
        SocketAddr::from((virtual_address, 80)),
        Some(&cluster.member("a").host.netns),
    );
    let outside = Client::start(
        SocketAddr::from((cluster.member("b").host.reach, HOST_PORT)),
        None,
    );
    let operator = cluster.member("b").host.token.clone();
    let rollout = nubisctl(
        cluster,
        "b",
        &operator,
        &[
            "host",
            "rollout",
            "--restart-command",
            &command,
            "--settle",
            "2",
            "--gate-timeout",
            "300",
        ],
    );
    let mut restarted = Vec::new();
    while !rollout.is_finished() {
        for member in cluster.members.iter_mut() {
            let request = requests.join(member.host.name);
            if !request.exists() {
                continue;
            }
            let agent = member.agent.take().expect("a running agent");
            let (status, _) = agent.stop_gracefully();
            eprintln!(
                "cluster_services: {}'s agent stopped ({status:?}), starting it again",
                member.host.name
            );
            member.agent = Some(member.host.join(dir, image_dir, etcd));
            std::fs::remove_file(&request).expect("the restart request");
            restarted.push(member.host.name);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, stdout, stderr) = rollout.join().expect("nubisctl");
    assert!(status, "nubisctl host rollout:\n{stdout}\n{stderr}");
    eprintln!("cluster_services: nubisctl host rollout said:\n{stdout}{stderr}");
    // Update domain 1 (a and c) before 2 (b).
    assert_eq!(restarted.len(), 3, "{restarted:?}");
    assert_eq!(restarted[2], "b", "{restarted:?}");
    let (inside, outside) = (inside.stop(), outside.stop());
    for (name, answers) in [("virtual address", &inside), ("host port", &outside)] {
        all_answered(cluster, &format!("{name} during the rollout"), answers);
    }
    assert_eq!(pids(cluster), before, "every VM runs on in the same VMM");
}
