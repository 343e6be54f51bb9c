//! `nubisctl host rollout`: restarts the cluster's agents one update
//! domain at a time, e.g. to upgrade the agent's binary. VMs run on across
//! an agent restart (the new agent adopts its VMMs), so tenants see no
//! downtime as long as each domain is healthy again (agents back, their
//! VMs running, services as healthy as before) before the next one is
//! restarted: the health gate. The API has no watch, so the gate is read
//! once a second.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use nubis_api::{ClusterHost, HostState, Service, Vm, VmState};
use serde::de::DeserializeOwned;

use crate::client::{Client, ClientError};
use crate::output::Output;
use crate::usage;

/// How often the health gate is read again.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct RolloutFlags {
    /// The command (run by `sh -c`) that restarts one host's agent, with
    /// the host's name in NUBIS_HOST, e.g. --restart-command 'ssh
    /// "$NUBIS_HOST" systemctl restart nubis-agent'. Its output goes to
    /// stderr; a non-zero exit stops the rollout.
    #[arg(long, value_name = "CMD")]
    restart_command: String,
    /// The host label whose value is a host's update domain (a host
    /// without it is a domain of its own). Domains go in the order of
    /// their values: numeric when all are numbers.
    #[arg(long, value_name = "LABEL", default_value = "update-domain")]
    domain_label: String,
    /// Seconds a domain may take to be healthy again after its restart:
    /// its agents back (up, restarted), the VMs that ran on them running,
    /// every service role as healthy as before.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    gate_timeout: u64,
    /// Seconds to wait after a domain is healthy before the next one.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    settle: u64,
    /// Print the plan (each update domain and its hosts) and exit.
    #[arg(long)]
    dry_run: bool,
}

/// An update domain: hosts whose agents restart together.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Domain {
    pub name: String,
    /// By name.
    pub hosts: Vec<String>,
}

/// Groups `hosts` into update domains by their `label` (a host without it
/// is a domain of its own, named after it), in the order of the domains'
/// names: numeric when all are numbers, else as strings.
pub fn plan(hosts: &[ClusterHost], label: &str) -> Vec<Domain> {
    let mut labelled: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut domains = Vec::new();
    for host in hosts {
        match host.labels.get(label) {
            Some(value) => labelled.entry(value).or_default().push(host.name.clone()),
            None => domains.push(Domain {
                name: host.name.clone(),
                hosts: vec![host.name.clone()],
            }),
        }
    }
    domains.extend(labelled.into_iter().map(|(name, hosts)| Domain {
        name: name.to_string(),
        hosts,
    }));
    for domain in &mut domains {
        domain.hosts.sort();
    }
    let numeric = domains
        .iter()
        .all(|domain| domain.name.parse::<u64>().is_ok());
    domains.sort_by(|a, b| {
        let by_number = if numeric {
            let number = |domain: &Domain| domain.name.parse::<u64>().ok();
            number(a).cmp(&number(b))
        } else {
            std::cmp::Ordering::Equal
        };
        by_number
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.hosts.cmp(&b.hosts))
    });
    domains
}

/// Err naming the hosts that are down: a rollout must not restart agents
/// while the cluster is degraded already.
pub fn refuse_degraded(hosts: &[ClusterHost]) -> Result<(), String> {
    let down: Vec<&str> = hosts
        .iter()
        .filter(|host| host.state == HostState::Down)
        .map(|host| host.name.as_str())
        .collect();
    if down.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} {} down: no rollout on a degraded cluster (bring {} back, or forget {} if {} gone for good)",
        plural(down.len(), "host", "hosts"),
        down.join(", "),
        if down.len() == 1 { "it" } else { "them" },
        if down.len() == 1 { "it" } else { "them" },
        if down.len() == 1 { "it is" } else { "they are" },
    ))
}

/// The cluster as the gate sees it.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub hosts: Vec<ClusterHost>,
    pub vms: Vec<Vm>,
    pub services: Vec<Service>,
}

/// What the cluster was before the rollout: what each domain must get
/// back to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baseline {
    /// Hosts cordoned already (they may come back cordoned).
    cordoned: BTreeSet<String>,
    /// The running VMs of each host: id -> name.
    running: BTreeMap<String, BTreeMap<String, String>>,
    /// The healthy instances of each role, by (service id, role name).
    healthy: BTreeMap<(String, String), u32>,
}

impl Baseline {
    pub fn new(cluster: &Cluster) -> Self {
        let mut running: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for vm in &cluster.vms {
            if let (VmState::Running, Some(host)) = (vm.state, &vm.host) {
                running
                    .entry(host.clone())
                    .or_default()
                    .insert(vm.id.clone(), vm.name.clone());
            }
        }
        Self {
            cordoned: cluster
                .hosts
                .iter()
                .filter(|host| host.cordoned || host.state == HostState::Cordoned)
                .map(|host| host.name.clone())
                .collect(),
            running,
            healthy: cluster
                .services
                .iter()
                .flat_map(|service| {
                    service
                        .roles
                        .iter()
                        .map(|role| ((service.id.clone(), role.spec.name.clone()), role.healthy))
                })
                .collect(),
        }
    }
}

/// When each host's agent started, as the cluster shows it now.
pub fn agent_starts(hosts: &[ClusterHost]) -> BTreeMap<String, Option<u64>> {
    hosts
        .iter()
        .map(|host| (host.name.clone(), host.started_at))
        .collect()
}

/// A condition of the health gate that does not hold yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmet {
    /// The host is not up with an agent started after the restart.
    AgentNotBack { host: String, why: &'static str },
    /// The host is back but cordoned (it was not before the rollout).
    Cordoned(String),
    /// A VM that ran on the domain's hosts before the rollout and does
    /// not run now (state: None when it is gone).
    VmNotRunning {
        id: String,
        name: String,
        state: Option<VmState>,
    },
    /// A role with fewer healthy instances than it had (or than it wants
    /// now, if that is fewer).
    RoleDegraded {
        service: String,
        role: String,
        healthy: u32,
        wanted: u32,
    },
    /// The API did not answer (its agent restarting, say).
    Unreachable(String),
}

/// Whether `domain` is healthy again in `now`: every host of it up (or
/// cordoned if it was before) with an agent started later than `before`
/// says; every VM that ran on them in `baseline` running (anywhere);
/// every role of `baseline` with at least min(healthy then, instances
/// wanted now) healthy instances. Err lists what does not hold.
pub fn gate(
    baseline: &Baseline,
    domain: &Domain,
    before: &BTreeMap<String, Option<u64>>,
    now: &Cluster,
) -> Result<(), Vec<Unmet>> {
    let mut unmet = Vec::new();
    for name in &domain.hosts {
        let host = now.hosts.iter().find(|host| &host.name == name);
        let not_back = |why| Unmet::AgentNotBack {
            host: name.clone(),
            why,
        };
        let Some(host) = host else {
            unmet.push(not_back("not a member"));
            continue;
        };
        if host.state == HostState::Down {
            unmet.push(not_back("down"));
            continue;
        }
        let restarted = match (before.get(name).copied().flatten(), host.started_at) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(then), Some(now)) => now > then,
        };
        if !restarted {
            unmet.push(not_back("its agent has not restarted yet"));
            continue;
        }
        if host.state == HostState::Cordoned && !baseline.cordoned.contains(name) {
            unmet.push(Unmet::Cordoned(name.clone()));
        }
    }
    for name in &domain.hosts {
        for (id, vm_name) in baseline.running.get(name).into_iter().flatten() {
            let state = now.vms.iter().find(|vm| &vm.id == id).map(|vm| vm.state);
            if state != Some(VmState::Running) {
                unmet.push(Unmet::VmNotRunning {
                    id: id.clone(),
                    name: vm_name.clone(),
                    state,
                });
            }
        }
    }
    for service in &now.services {
        for role in &service.roles {
            let key = (service.id.clone(), role.spec.name.clone());
            let Some(then) = baseline.healthy.get(&key) else {
                continue;
            };
            let wanted = (*then).min(role.spec.instances);
            if role.healthy < wanted {
                unmet.push(Unmet::RoleDegraded {
                    service: service.name.clone(),
                    role: role.spec.name.clone(),
                    healthy: role.healthy,
                    wanted,
                });
            }
        }
    }
    if unmet.is_empty() {
        Ok(())
    } else {
        Err(unmet)
    }
}

fn plural(count: usize, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

/// One line on what `domain`'s gate waits for, e.g. `update domain 1:
/// waiting for b (agent not back), 2 VMs not running yet`.
pub fn progress_line(domain: &str, unmet: &[Unmet]) -> String {
    let mut waiting = Vec::new();
    let mut parts = Vec::new();
    let mut vms = 0;
    for condition in unmet {
        match condition {
            Unmet::AgentNotBack { host, .. } => waiting.push(format!("{host} (agent not back)")),
            Unmet::Cordoned(host) => waiting.push(format!("{host} (cordoned)")),
            Unmet::Unreachable(_) => waiting.push("the API (no answer)".to_string()),
            Unmet::VmNotRunning { .. } => vms += 1,
            Unmet::RoleDegraded {
                service,
                role,
                healthy,
                wanted,
            } => parts.push(format!("{service}/{role} {healthy}/{wanted} healthy")),
        }
    }
    if vms > 0 {
        parts.insert(0, format!("{} not running yet", plural(vms, "VM", "VMs")));
    }
    if !waiting.is_empty() {
        parts.insert(0, format!("waiting for {}", waiting.join(", ")));
    }
    format!("update domain {domain}: {}", parts.join(", "))
}

/// Why `domain`'s gate did not hold within `timeout`: every condition
/// not met, with the names and ids.
pub fn gate_failure(domain: &str, timeout: u64, unmet: &[Unmet]) -> String {
    let details: Vec<String> = unmet
        .iter()
        .map(|condition| match condition {
            Unmet::AgentNotBack { host, why } => format!("host {host} is not back ({why})"),
            Unmet::Cordoned(host) => {
                format!("host {host} came back cordoned (it was not before the rollout)")
            }
            Unmet::VmNotRunning { id, name, state } => format!(
                "VM {name} ({id}) is not running ({})",
                state.map_or("gone", VmState::as_str)
            ),
            Unmet::RoleDegraded {
                service,
                role,
                healthy,
                wanted,
            } => format!("role {service}/{role}: {healthy} of {wanted} instances healthy"),
            Unmet::Unreachable(error) => format!("the API does not answer: {error}"),
        })
        .collect();
    format!(
        "update domain {domain} not healthy after {timeout} s: {}; the rollout stopped",
        details.join("; ")
    )
}

/// Runs `command` by `sh -c` with NUBIS_HOST=`host`; its output goes to
/// stderr (stdout stays this command's).
pub fn restart(command: &str, host: &str) -> Result<(), String> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("NUBIS_HOST", host)
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .map_err(|err| format!("cannot run the restart command for host {host}: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "the restart command failed for host {host} ({status}); the rollout stopped"
        ))
    }
}

/// GET `path` as `T`.
fn get<T: DeserializeOwned>(client: &Client, path: &str) -> Result<T, ClientError> {
    serde_json::from_value(client.call("GET", path, None)?).map_err(|err| {
        usage(format!(
            "cannot read the agent's answer to GET {path}: {err}"
        ))
    })
}

fn read_cluster(client: &Client) -> Result<Cluster, ClientError> {
    Ok(Cluster {
        hosts: get(client, "/v1/hosts")?,
        vms: get(client, "/v1/vms")?,
        services: get(client, "/v1/services")?,
    })
}

/// Reads the cluster once a second until `domain`'s gate holds (Ok: how
/// long it took) or `timeout` passed, a line each time what it waits for
/// changes. A request that fails counts as a condition not met: the
/// agent behind the URL may be one being restarted.
fn wait_for_gate(
    client: &Client,
    out: &Output,
    baseline: &Baseline,
    domain: &Domain,
    before: &BTreeMap<String, Option<u64>>,
    timeout: u64,
) -> Result<Duration, ClientError> {
    let start = Instant::now();
    let mut last_line = String::new();
    loop {
        let unmet = match read_cluster(client) {
            Ok(now) => match gate(baseline, domain, before, &now) {
                Ok(()) => return Ok(start.elapsed()),
                Err(unmet) => unmet,
            },
            Err(err) => vec![Unmet::Unreachable(err.to_string())],
        };
        let line = progress_line(&domain.name, &unmet);
        if line != last_line {
            out.note(&line);
            last_line = line;
        }
        if start.elapsed() >= Duration::from_secs(timeout) {
            return Err(usage(gate_failure(&domain.name, timeout, &unmet)));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// What `--json` prints at the end of a rollout.
#[derive(Debug, serde::Serialize)]
struct RolloutDone {
    hosts: usize,
    update_domains: usize,
    seconds: u64,
}

pub fn run(client: &Client, out: &Output, flags: RolloutFlags) -> Result<(), ClientError> {
    let start = Instant::now();
    let hosts: Vec<ClusterHost> = get(client, "/v1/hosts")?;
    refuse_degraded(&hosts).map_err(usage)?;
    let domains = plan(&hosts, &flags.domain_label);
    if flags.dry_run {
        if out.json {
            let plan = serde_json::to_string(&domains)
                .map_err(|err| usage(format!("cannot print the plan: {err}")))?;
            println!("{plan}");
        } else {
            for domain in &domains {
                println!("update domain {}: {}", domain.name, domain.hosts.join(", "));
            }
        }
        return Ok(());
    }
    let baseline = Baseline::new(&Cluster {
        hosts,
        vms: get(client, "/v1/vms")?,
        services: get(client, "/v1/services")?,
    });
    for (index, domain) in domains.iter().enumerate() {
        if index > 0 {
            std::thread::sleep(Duration::from_secs(flags.settle));
        }
        // Afresh: a host that went down since must stop the rollout, and
        // the gate needs each agent's start just before its restart.
        let hosts: Vec<ClusterHost> = get(client, "/v1/hosts")?;
        refuse_degraded(&hosts)
            .map_err(|err| usage(format!("before update domain {}: {err}", domain.name)))?;
        let before = agent_starts(&hosts);
        out.note(&format!(
            "update domain {}: restarting {}",
            domain.name,
            domain.hosts.join(", ")
        ));
        for host in &domain.hosts {
            restart(&flags.restart_command, host).map_err(usage)?;
        }
        let took = wait_for_gate(client, out, &baseline, domain, &before, flags.gate_timeout)?;
        out.note(&format!(
            "update domain {}: healthy after {} s",
            domain.name,
            took.as_secs()
        ));
    }
    let hosts: usize = domains.iter().map(|domain| domain.hosts.len()).sum();
    let seconds = start.elapsed().as_secs();
    out.done(
        &serde_json::to_value(RolloutDone {
            hosts,
            update_domains: domains.len(),
            seconds,
        })
        .unwrap_or_default(),
        &format!(
            "rollout done: {} in {} in {seconds} s",
            plural(hosts, "host", "hosts"),
            plural(domains.len(), "update domain", "update domains")
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use clap::Parser;
    use serde_json::Value;

    /// `nubisctl host rollout ...` alone.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        flags: RolloutFlags,
    }

    fn host(name: &str, domain: Option<&str>, state: &str, started_at: Option<u64>) -> ClusterHost {
        let mut value = json!({
            "name": name, "state": state, "cordoned": state == "cordoned",
            "controller": false, "roles": ["compute"], "labels": {},
            "fingerprint": "ab", "joined_at": 1,
        });
        if let Some(domain) = domain {
            value["labels"]["update-domain"] = domain.into();
        }
        if let Some(started_at) = started_at {
            value["started_at"] = started_at.into();
        }
        serde_json::from_value(value).unwrap()
    }

    fn vm(id: &str, host: &str, state: &str) -> Vm {
        serde_json::from_value(json!({
            "id": id, "tenant_id": "t-1", "name": format!("{id}-name"), "image_id": "img-1",
            "state": state, "vcpus": 1, "memory_mib": 128, "kernel_args": "",
            "root_rate_limit": {}, "disks": [], "nics": [], "created_at": 1, "host": host,
        }))
        .unwrap()
    }

    fn service(id: &str, roles: &[(&str, u32, u32)]) -> Service {
        let roles: Vec<Value> = roles
            .iter()
            .map(|(name, instances, healthy)| {
                json!({
                    "spec": {"name": name, "image": "img-1", "instances": instances},
                    "revision": 1, "instances": [], "healthy": healthy, "can_roll_back": false,
                })
            })
            .collect();
        serde_json::from_value(json!({
            "id": id, "tenant_id": "t-1", "name": "shop", "roles": roles,
            "created_at": 1, "events": [],
        }))
        .unwrap()
    }

    fn names(domains: &[Domain]) -> Vec<(String, Vec<String>)> {
        domains
            .iter()
            .map(|domain| (domain.name.clone(), domain.hosts.clone()))
            .collect()
    }

    fn domain(name: &str, hosts: &[&str]) -> (String, Vec<String>) {
        (
            name.to_string(),
            hosts.iter().map(|host| host.to_string()).collect(),
        )
    }

    #[test]
    fn the_flags_are_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["rollout", "--restart-command", "true"]).unwrap();
        assert_eq!(cli.flags.domain_label, "update-domain");
        assert_eq!((cli.flags.gate_timeout, cli.flags.settle), (300, 5));
        assert!(!cli.flags.dry_run);
        assert!(Cli::try_parse_from(["rollout", "--dry-run"]).is_err());
    }

    #[test]
    fn numeric_domains_go_in_numeric_order_hosts_by_name() {
        let hosts = [
            host("d", Some("10"), "up", Some(1)),
            host("c", Some("2"), "up", Some(1)),
            host("b", Some("1"), "up", Some(1)),
            host("a", Some("2"), "up", Some(1)),
        ];
        assert_eq!(
            names(&plan(&hosts, "update-domain")),
            [
                domain("1", &["b"]),
                domain("2", &["a", "c"]),
                domain("10", &["d"])
            ]
        );
    }

    #[test]
    fn other_domains_go_in_string_order_and_unlabelled_hosts_alone() {
        let hosts = [
            host("x", None, "up", Some(1)),
            host("c", Some("10"), "up", Some(1)),
            host("b", Some("2"), "up", Some(1)),
            host("a", None, "up", Some(1)),
        ];
        // "a" and "x" are no numbers: string order for all.
        assert_eq!(
            names(&plan(&hosts, "update-domain")),
            [
                domain("10", &["c"]),
                domain("2", &["b"]),
                domain("a", &["a"]),
                domain("x", &["x"])
            ]
        );
        // Another label: every host is a domain of its own.
        assert_eq!(
            names(&plan(&hosts, "rack")),
            [
                domain("a", &["a"]),
                domain("b", &["b"]),
                domain("c", &["c"]),
                domain("x", &["x"])
            ]
        );
        assert!(plan(&[], "update-domain").is_empty());
    }

    #[test]
    fn a_degraded_cluster_is_refused() {
        let up = [
            host("a", None, "up", Some(1)),
            host("b", None, "cordoned", Some(1)),
        ];
        assert_eq!(refuse_degraded(&up), Ok(()));
        let err = refuse_degraded(&[
            host("a", None, "up", Some(1)),
            host("b", None, "down", None),
        ])
        .unwrap_err();
        assert!(err.starts_with("1 host b down: no rollout"), "{err}");
        let err = refuse_degraded(&[host("a", None, "down", None), host("b", None, "down", None)])
            .unwrap_err();
        assert!(err.starts_with("2 hosts a, b down"), "{err}");
    }

    /// Hosts a, b (domain 1) and c (domain 2); vm-1 runs on a, vm-2 on b,
    /// vm-3 on c; vm-4 is stopped on a; shop/web has 2 of 3 healthy.
    fn before() -> Cluster {
        Cluster {
            hosts: vec![
                host("a", Some("1"), "up", Some(10)),
                host("b", Some("1"), "up", Some(10)),
                host("c", Some("2"), "up", Some(10)),
            ],
            vms: vec![
                vm("vm-1", "a", "running"),
                vm("vm-2", "b", "running"),
                vm("vm-3", "c", "running"),
                vm("vm-4", "a", "stopped"),
            ],
            services: vec![service("svc-1", &[("web", 3, 2), ("db", 1, 1)])],
        }
    }

    /// `before` with a and b restarted (started at 20).
    fn after() -> Cluster {
        let mut cluster = before();
        cluster.hosts[0].started_at = Some(20);
        cluster.hosts[1].started_at = Some(20);
        cluster
    }

    fn domain_one() -> Domain {
        Domain {
            name: "1".into(),
            hosts: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn the_gate_holds_once_agents_vms_and_roles_are_back() {
        let baseline = Baseline::new(&before());
        let starts = agent_starts(&before().hosts);
        assert_eq!(gate(&baseline, &domain_one(), &starts, &after()), Ok(()));
        // A VM back on another host counts; domain 2's hosts do not.
        let mut now = after();
        now.vms[0].host = Some("c".into());
        now.vms[2].state = VmState::Stopped;
        now.hosts[2].state = HostState::Down;
        assert_eq!(gate(&baseline, &domain_one(), &starts, &now), Ok(()));
        // An agent that did not report its start before counts once it does.
        let starts = BTreeMap::from([("a".to_string(), None), ("b".to_string(), Some(10))]);
        assert_eq!(gate(&baseline, &domain_one(), &starts, &after()), Ok(()));
    }

    #[test]
    fn the_gate_waits_for_agents_that_are_not_back() {
        let baseline = Baseline::new(&before());
        let starts = agent_starts(&before().hosts);
        let mut now = after();
        now.hosts[0].state = HostState::Down;
        now.hosts[1].started_at = Some(10);
        assert_eq!(
            gate(&baseline, &domain_one(), &starts, &now),
            Err(vec![
                Unmet::AgentNotBack {
                    host: "a".into(),
                    why: "down"
                },
                Unmet::AgentNotBack {
                    host: "b".into(),
                    why: "its agent has not restarted yet"
                },
            ])
        );
        now.hosts.remove(0);
        now.hosts[0].started_at = None;
        let unmet = gate(&baseline, &domain_one(), &starts, &now).unwrap_err();
        assert_eq!(unmet.len(), 2);
        assert!(matches!(
            &unmet[0],
            Unmet::AgentNotBack {
                why: "not a member",
                ..
            }
        ));
    }

    #[test]
    fn a_host_back_cordoned_holds_the_gate_unless_it_was_cordoned_before() {
        let mut now = after();
        now.hosts[1].state = HostState::Cordoned;
        now.hosts[1].cordoned = true;
        let starts = agent_starts(&before().hosts);
        assert_eq!(
            gate(&Baseline::new(&before()), &domain_one(), &starts, &now),
            Err(vec![Unmet::Cordoned("b".into())])
        );
        let mut cordoned = before();
        cordoned.hosts[1].state = HostState::Cordoned;
        cordoned.hosts[1].cordoned = true;
        assert_eq!(
            gate(&Baseline::new(&cordoned), &domain_one(), &starts, &now),
            Ok(())
        );
    }

    #[test]
    fn the_gate_waits_for_the_vms_that_ran_on_the_domain() {
        let baseline = Baseline::new(&before());
        let starts = agent_starts(&before().hosts);
        let mut now = after();
        now.vms[0].state = VmState::Starting;
        now.vms.remove(1);
        assert_eq!(
            gate(&baseline, &domain_one(), &starts, &now),
            Err(vec![
                Unmet::VmNotRunning {
                    id: "vm-1".into(),
                    name: "vm-1-name".into(),
                    state: Some(VmState::Starting)
                },
                Unmet::VmNotRunning {
                    id: "vm-2".into(),
                    name: "vm-2-name".into(),
                    state: None
                },
            ])
        );
    }

    #[test]
    fn roles_must_be_as_healthy_as_before_or_as_wanted_now() {
        let baseline = Baseline::new(&before());
        let starts = agent_starts(&before().hosts);
        let mut now = after();
        now.services = vec![service("svc-1", &[("web", 3, 1), ("db", 1, 1)])];
        assert_eq!(
            gate(&baseline, &domain_one(), &starts, &now),
            Err(vec![Unmet::RoleDegraded {
                service: "shop".into(),
                role: "web".into(),
                healthy: 1,
                wanted: 2
            }])
        );
        // Scaled down to 1 meanwhile: 1 healthy is enough.
        now.services = vec![service("svc-1", &[("web", 1, 1), ("db", 1, 1)])];
        assert_eq!(gate(&baseline, &domain_one(), &starts, &now), Ok(()));
        // More healthy than before, new roles and services: fine.
        now.services = vec![
            service("svc-1", &[("web", 3, 3), ("db", 1, 1), ("cache", 2, 0)]),
            service("svc-2", &[("web", 2, 0)]),
        ];
        assert_eq!(gate(&baseline, &domain_one(), &starts, &now), Ok(()));
    }

    #[test]
    fn the_progress_line_says_what_the_gate_waits_for() {
        let vm = |id: &str| Unmet::VmNotRunning {
            id: id.into(),
            name: id.into(),
            state: Some(VmState::Stopped),
        };
        let unmet = [
            Unmet::AgentNotBack {
                host: "b".into(),
                why: "down",
            },
            vm("vm-1"),
            vm("vm-2"),
        ];
        assert_eq!(
            progress_line("1", &unmet),
            "update domain 1: waiting for b (agent not back), 2 VMs not running yet"
        );
        let unmet = [
            Unmet::Cordoned("a".into()),
            vm("vm-1"),
            Unmet::RoleDegraded {
                service: "shop".into(),
                role: "web".into(),
                healthy: 1,
                wanted: 2,
            },
        ];
        assert_eq!(
            progress_line("rack-2", &unmet),
            "update domain rack-2: waiting for a (cordoned), 1 VM not running yet, shop/web 1/2 healthy"
        );
        assert_eq!(
            progress_line("1", &[Unmet::Unreachable("connection refused".into())]),
            "update domain 1: waiting for the API (no answer)"
        );
    }

    #[test]
    fn a_gate_timeout_names_every_condition_not_met() {
        let message = gate_failure(
            "2",
            300,
            &[
                Unmet::AgentNotBack {
                    host: "c".into(),
                    why: "its agent has not restarted yet",
                },
                Unmet::VmNotRunning {
                    id: "vm-3".into(),
                    name: "web-3".into(),
                    state: None,
                },
                Unmet::RoleDegraded {
                    service: "shop".into(),
                    role: "web".into(),
                    healthy: 1,
                    wanted: 2,
                },
            ],
        );
        assert_eq!(
            message,
            "update domain 2 not healthy after 300 s: host c is not back (its agent has not restarted yet); \
             VM web-3 (vm-3) is not running (gone); role shop/web: 1 of 2 instances healthy; \
             the rollout stopped"
        );
    }

    #[test]
    fn the_restart_command_gets_the_host_and_its_failure_names_it() {
        assert_eq!(restart(r#"test "$NUBIS_HOST" = host-b"#, "host-b"), Ok(()));
        let err = restart("exit 3", "host-b").unwrap_err();
        assert!(
            err.starts_with("the restart command failed for host host-b"),
            "{err}"
        );
    }
}
