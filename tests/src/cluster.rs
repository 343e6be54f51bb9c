//! A simulated cluster for the end-to-end tests: hosts are network
//! namespaces, each running its own agent, joined by an underlay switch
//! (a bridge in a namespace of its own) for the peer channel and VXLAN,
//! all in one etcd cluster started by the test. Shared by the cluster
//! tests so that each reads as what it checks.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nubis_api::{ClusterHost, HostState, Vm, VmCreate};
use serde::Serialize;

use crate::agent::{expect_as, Agent, RemoteHost, Reply};
use crate::etcd::EtcdCluster;
use crate::net::interface_name;
use crate::netns::{simulated_host, NetNs};
use crate::TestDir;

/// How long a change may take to show (a placement, a report, a lease
/// expiring, an election) on a machine busy booting guests. A hang
/// guard, not a timing assertion.
pub const SETTLE: Duration = Duration::from_secs(60);
/// The roles of a host that runs VMs and may be the controller.
pub const MAY_LEAD: &str = "compute,controller";
/// The roles of a host that only runs VMs.
pub const COMPUTE: &str = "compute";

/// What sets one test's cluster apart from another's that may run at the
/// same time: its namespaces' prefix, its underlay subnet (10.98.`x`.0/24),
/// the agents' API port, their lease.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub prefix: &'static str,
    pub underlay_octet: u8,
    pub port: u16,
    /// Seconds of a host's lease: short, so that a dead controller is
    /// replaced quickly.
    pub lease_ttl_s: u64,
}

pub fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The network between the hosts (their peer channel): a bridge in a
/// namespace of its own, each host plugged into it by a veth pair.
pub struct Underlay {
    pub netns: NetNs,
    layout: Layout,
}

impl Underlay {
    pub fn new(layout: Layout) -> Self {
        let netns = NetNs::create(&interface_name(&format!("{}s", layout.prefix)));
        ip(&["-n", &netns.name, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &netns.name, "link", "set", "br0", "up"]);
        Self { netns, layout }
    }

    /// Plugs `host` in: `under` with `address`/24 there, `port` on the
    /// bridge here.
    pub fn plug(&self, host: &NetNs, port: &str, address: Ipv4Addr) {
        ip(&[
            "-n",
            &host.name,
            "link",
            "add",
            "under",
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            &self.netns.name,
        ]);
        let cidr = format!("{address}/24");
        ip(&["-n", &host.name, "addr", "add", &cidr, "dev", "under"]);
        ip(&["-n", &host.name, "link", "set", "under", "up"]);
        ip(&[
            "-n",
            &self.netns.name,
            "link",
            "set",
            port,
            "master",
            "br0",
            "up",
        ]);
    }
}

/// A simulated host: its namespace, how the test reaches it and how it
/// joins the cluster.
pub struct Host {
    pub name: &'static str,
    pub netns: NetNs,
    pub token: String,
    pub reach: Ipv4Addr,
    pub underlay: Ipv4Addr,
    pub labels: &'static str,
    pub roles: &'static str,
    /// vCPUs and memory (MiB) it offers VMs.
    pub capacity: (u32, u64),
    layout: Layout,
}

impl Host {
    /// Host `name` in namespace `{prefix}{name}`, reached over
    /// 10.97.`subnet`.x, plugged into `underlay` as
    /// 10.98.`underlay_octet`.`index + 1`.
    pub fn new(
        underlay: &Underlay,
        index: u8,
        name: &'static str,
        subnet: u8,
        labels: &'static str,
        roles: &'static str,
        capacity: (u32, u64),
    ) -> Self {
        let layout = underlay.layout;
        let netns = simulated_host(&format!("{}{name}", layout.prefix), subnet);
        let address = Ipv4Addr::new(10, 98, layout.underlay_octet, index + 1);
        underlay.plug(&netns, &format!("p{name}"), address);
        Host {
            name,
            netns,
            token: format!("{}-{name}-operator-token", layout.prefix),
            reach: Ipv4Addr::new(10, 97, subnet, 2),
            underlay: address,
            labels,
            roles,
            capacity,
            layout,
        }
    }

    /// Where this host reaches the test's namespace (and etcd).
    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.reach.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    pub fn data_dir(&self, dir: &TestDir) -> PathBuf {
        dir.join(&format!("agent-{}", self.name))
    }

    /// Starts this host's agent (again, with the same data directory).
    pub fn join(&self, dir: &TestDir, images: &Path, etcd: &EtcdCluster) -> Agent {
        let (vcpus, memory_mib) = self.capacity;
        let settings = serde_json::json!({
            "capacity": {"vcpus": vcpus, "memory_mib": memory_mib, "disk_mib": 10240}
        });
        let args: Vec<String> = [
            "--cluster",
            &etcd.cluster_arg(self.gateway()),
            "--host-name",
            self.name,
            "--labels",
            self.labels,
            "--roles",
            self.roles,
            "--lease-ttl",
            &self.layout.lease_ttl_s.to_string(),
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        let remote = RemoteHost {
            netns: &self.netns.name,
            port: self.layout.port,
            reach: self.reach,
            operator_token: &self.token,
            underlay: self.underlay,
        };
        Agent::start_member(&self.data_dir(dir), images, &remote, &settings, &args)
    }
}

/// A host and its agent (stopped: None); the agent goes first on drop,
/// with its VMMs, then the namespace.
pub struct Member {
    pub agent: Option<Agent>,
    pub host: Host,
}

impl Member {
    pub fn name(&self) -> &'static str {
        self.host.name
    }

    pub fn agent(&self) -> &Agent {
        self.agent
            .as_ref()
            .unwrap_or_else(|| panic!("host {}'s agent is not running", self.name()))
    }

    pub fn call(&self, method: &str, path: &str, token: &str, body: Option<&VmCreate>) -> Reply {
        let body = body.map(crate::agent::json_body);
        match self
            .agent()
            .call_crashing(method, path, Some(token), body.as_ref())
        {
            Some(reply) => reply,
            None => panic!(
                "{method} {path}: host {}'s agent closed the connection; its log:\n{}",
                self.name(),
                tail(&self.agent().log(), 60)
            ),
        }
    }

    /// `method path` as `token` with a JSON `body`.
    pub fn send<B: Serialize>(&self, method: &str, path: &str, token: &str, body: &B) -> Reply {
        let body = crate::agent::json_body(body);
        match self
            .agent()
            .call_crashing(method, path, Some(token), Some(&body))
        {
            Some(reply) => reply,
            None => panic!(
                "{method} {path}: host {}'s agent closed the connection; its log:\n{}",
                self.name(),
                tail(&self.agent().log(), 60)
            ),
        }
    }

    /// `GET path` as `token`: the body if it answered 200.
    pub fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        token: &str,
    ) -> Result<T, String> {
        let reply = self.call("GET", path, token, None);
        if reply.status != 200 {
            return Err(format!(
                "GET {path} on host {}: {} {}",
                self.name(),
                reply.status,
                reply.text
            ));
        }
        serde_json::from_value(reply.body.clone())
            .map_err(|err| format!("GET {path} on host {}: {err}: {reply:?}", self.name()))
    }

    pub fn hosts(&self) -> Result<Vec<ClusterHost>, String> {
        self.get("/v1/hosts", &self.host.token)
    }
}

/// The simulated cluster: its members in the order a, b, c, d.
pub struct Cluster {
    pub members: Vec<Member>,
}

impl Cluster {
    pub fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|member| member.name() == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// The members whose agent runs.
    pub fn running(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|member| member.agent.is_some())
    }

    /// The end of every agent's log, for a failure's message.
    pub fn logs(&self) -> String {
        self.running()
            .map(|member| {
                format!(
                    "--- host {}'s agent log (end) ---\n{}",
                    member.name(),
                    tail(&member.agent().log(), 40)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls `check` until it holds; panics with `what`, the last view and
    /// the agents' logs after `guard`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        guard: Duration,
        mut check: impl FnMut() -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        loop {
            match check() {
                Ok(value) => return value,
                Err(last) if start.elapsed() > guard => {
                    panic!(
                        "{what} (not within {} s): {last}\n{}",
                        guard.as_secs(),
                        self.logs()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// `body` created through `via` as `token` (201): the VM, pending.
    pub fn create(&self, via: &str, token: &str, body: &VmCreate) -> Vm {
        let reply = self.member(via).call("POST", "/v1/vms", token, Some(body));
        if reply.status != 201 {
            panic!(
                "creating VM {} through host {via}: {} {}\n{}",
                body.name,
                reply.status,
                reply.text,
                self.logs()
            );
        }
        expect_as(&reply, 201)
    }

    /// VM `id` as host `via` shows it.
    pub fn vm(&self, via: &str, token: &str, id: &str) -> Result<Vm, String> {
        self.member(via).get(&format!("/v1/vms/{id}"), token)
    }

    /// Waits until VM `id`, seen through `via`, is placed on a host: that
    /// host.
    pub fn placed(&self, via: &str, token: &str, id: &str) -> String {
        self.wait_for(&format!("VM {id} is placed"), SETTLE, || {
            let vm = self.vm(via, token, id)?;
            vm.host.clone().ok_or_else(|| format!("{vm:?}"))
        })
    }

    /// Waits until one host is the controller and `up` hosts are up, as
    /// `via` sees it: the controller's name.
    pub fn controller(&self, via: &str, up: &[&str]) -> String {
        self.wait_for("the cluster's hosts and controller", SETTLE, || {
            let hosts = self.member(via).hosts()?;
            let controllers: Vec<&ClusterHost> = hosts.iter().filter(|h| h.controller).collect();
            let all_up = up.iter().all(|name| {
                hosts
                    .iter()
                    .any(|h| h.name == *name && h.state == HostState::Up)
            });
            match controllers.as_slice() {
                [one] if all_up => Ok(one.name.clone()),
                _ => Err(host_states(&hosts)),
            }
        })
    }
}

/// The last `lines` lines of `log`.
pub fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Each host's state, `*` marking the controller.
pub fn host_states(hosts: &[ClusterHost]) -> String {
    hosts
        .iter()
        .map(|host| {
            format!(
                "{}={}{}",
                host.name,
                host.state.as_str(),
                if host.controller { "*" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}
