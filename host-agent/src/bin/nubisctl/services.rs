//! `nubisctl service`: services (cluster mode). The API has no watch, so
//! `scale --wait`, `upgrade` and `rollback` follow the controller by
//! reading the service once a second.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use nubis_api::{
    FaultDomainSpread, InstanceHealth, Probe, ProbeProtocol, RestartPolicy, Role, RoleRollback,
    RoleScale, RoleSpec, RoleUpgrade, RolloutState, Service, ServiceCreate, ServiceEndpoint,
};
use serde_json::Value;

use crate::client::{Client, ClientError};
use crate::output::Output;
use crate::usage;

/// How often a followed service is read again.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Defines a service of one role from the flags, or of several from
    /// --file; the controller then makes its instances.
    Create(CreateFlags),
    /// Every service: each role's healthy/wanted instances and its last
    /// rollout.
    List,
    /// A service, then each role: spec, revision, rollout and instances.
    Show {
        /// The service's name or id.
        service: String,
    },
    /// Deletes a service; the controller retires its instances.
    Delete {
        /// The service's name or id.
        service: String,
    },
    /// Sets how many instances a role keeps.
    Scale {
        /// The service's name or id.
        service: String,
        /// The role's name.
        #[arg(long)]
        role: String,
        /// 0 to 64.
        #[arg(long, value_name = "N")]
        instances: u32,
        /// Wait until the role has that many instances, all healthy,
        /// showing how it goes.
        #[arg(long)]
        wait: bool,
    },
    /// Changes a role (at least one of the flags); its instances are
    /// replaced one update domain at a time. Follows the rollout: exits 0
    /// when it is done, non-zero when it failed.
    Upgrade(UpgradeFlags),
    /// Takes a role back to its revision before, one update domain at a
    /// time. Follows the rollout like `upgrade`.
    Rollback {
        /// The service's name or id.
        service: String,
        /// The role's name.
        #[arg(long)]
        role: String,
        /// Return once the rollback started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateFlags {
    /// The service's name (with --file: instead of the file's).
    #[arg(required_unless_present = "file")]
    name: Option<String>,
    /// A whole service definition (ServiceCreate JSON, any number of
    /// roles) instead of the role flags.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["role_flags", "probe_flags"])]
    file: Option<PathBuf>,
    #[command(flatten)]
    role: RoleFlags,
    // Beside the role flags, not in them: clap leaves the group of a
    // struct with a flattened field empty, and --file conflicts with both.
    #[command(flatten)]
    probe: ProbeFlags,
}

/// One role of `service create`, from flags; unset flags take the API's
/// defaults.
#[derive(Debug, Args)]
#[group(id = "role_flags", multiple = true)]
struct RoleFlags {
    /// The role's name.
    #[arg(long, value_name = "ROLE", required_unless_present = "file")]
    role: Option<String>,
    /// The image's name or id.
    #[arg(long, required_unless_present = "file")]
    image: Option<String>,
    /// How many instances to keep (0 to 64).
    #[arg(long, value_name = "N", required_unless_present = "file")]
    instances: Option<u32>,
    /// vCPUs of each instance (1 by default).
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Memory of each instance in MiB (128 by default).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Appended to each instance's kernel command line.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kernel_args: Option<String>,
    /// A network (name or id) each instance has a NIC on, in this order
    /// (repeatable; none: the tenant's default bridge).
    #[arg(long = "network", value_name = "NET")]
    networks: Vec<String>,
    /// Update domains an upgrade takes one at a time (1 to 20; 2 by
    /// default).
    #[arg(long, value_name = "N")]
    update_domains: Option<u32>,
    /// How instances spread over fault domains (preferred by default).
    #[arg(long, value_enum, value_name = "SPREAD")]
    fault_domains: Option<FaultDomains>,
    /// Labels the instances' hosts must have.
    #[arg(long, value_name = "K=V,...", value_parser = nubis_placement::parse_labels)]
    require: Option<BTreeMap<String, String>>,
    /// Whether failed and lost instances are replaced (always by default).
    #[arg(long, value_enum, value_name = "POLICY")]
    restart: Option<Restart>,
    /// A port balanced over the healthy instances at the role's virtual
    /// address (on its first network): tcp:PORT or udp:PORT, then
    /// optionally :TARGET (the instances' port) and @HOSTPORT (open on
    /// every host), e.g. tcp:80:8080@30080 (repeatable).
    #[arg(long = "endpoint", value_name = "ENDPOINT", value_parser = parse_endpoint)]
    endpoints: Vec<ServiceEndpoint>,
}

/// `--endpoint`: PROTOCOL:PORT[:TARGET][@HOSTPORT].
fn parse_endpoint(text: &str) -> Result<ServiceEndpoint, String> {
    let bad =
        || format!("'{text}': expected tcp:PORT or udp:PORT, then :TARGET and @HOSTPORT if wanted");
    let (ports, host_port) = match text.split_once('@') {
        Some((ports, host)) => (ports, Some(host)),
        None => (text, None),
    };
    let port = |text: &str| {
        Some(text)
            .filter(|text| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
            .and_then(|text| text.parse::<u16>().ok())
            .filter(|port| *port != 0)
    };
    let mut parts = ports.split(':');
    let protocol = match parts.next() {
        Some("tcp") => nubis_api::Protocol::Tcp,
        Some("udp") => nubis_api::Protocol::Udp,
        _ => return Err(bad()),
    };
    let front = parts.next().and_then(port).ok_or_else(bad)?;
    let target = match parts.next() {
        Some(target) => Some(port(target).ok_or_else(bad)?),
        None => None,
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    let host_port = match host_port {
        Some(host) => Some(port(host).ok_or_else(bad)?),
        None => None,
    };
    Ok(ServiceEndpoint {
        protocol,
        port: front,
        target_port: target,
        host_port,
    })
}

/// A health probe: `--probe` and its tuning (the API's defaults for what
/// is not given).
#[derive(Debug, Args)]
#[group(id = "probe_flags", multiple = true)]
struct ProbeFlags {
    /// Health probe: tcp:PORT, http:PORT or http:PORT/PATH (without one an
    /// instance is healthy while it runs).
    #[arg(long, value_name = "PROBE", value_parser = parse_probe)]
    probe: Option<Probe>,
    /// Seconds between checks (1 to 60; 2 by default).
    #[arg(long, value_name = "S", requires = "probe")]
    probe_interval: Option<u32>,
    /// Failures in a row that make an instance unhealthy (1 to 10; 3 by
    /// default).
    #[arg(long, value_name = "N", requires = "probe")]
    probe_threshold: Option<u32>,
    /// Seconds a started instance has to pass its first check (0 to 600;
    /// 120 by default).
    #[arg(long, value_name = "S", requires = "probe")]
    probe_grace: Option<u32>,
    /// Milliseconds a check may take (100 to 10000; 1000 by default).
    #[arg(long, value_name = "MS", requires = "probe")]
    probe_timeout: Option<u32>,
}

#[derive(Debug, Args)]
pub struct UpgradeFlags {
    /// The service's name or id.
    service: String,
    /// The role's name.
    #[arg(long)]
    role: String,
    /// The new image (name or id).
    #[arg(long)]
    image: Option<String>,
    /// vCPUs of each instance.
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Memory of each instance in MiB.
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Appended to each instance's kernel command line (instead of the
    /// role's).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kernel_args: Option<String>,
    #[command(flatten)]
    probe: ProbeFlags,
    /// Return once the upgrade started instead of following it.
    #[arg(long)]
    no_wait: bool,
}

/// `--fault-domains`: [`FaultDomainSpread`] on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FaultDomains {
    /// As evenly as the hosts allow.
    Preferred,
    /// Never two in one domain (an instance may stay pending).
    Required,
}

impl From<FaultDomains> for FaultDomainSpread {
    fn from(value: FaultDomains) -> Self {
        match value {
            FaultDomains::Preferred => FaultDomainSpread::Preferred,
            FaultDomains::Required => FaultDomainSpread::Required,
        }
    }
}

/// `--restart`: [`RestartPolicy`] on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Restart {
    /// Failed and lost instances are replaced.
    Always,
    /// Failed instances stay as they are, for a look.
    Never,
}

impl From<Restart> for RestartPolicy {
    fn from(value: Restart) -> Self {
        match value {
            Restart::Always => RestartPolicy::Always,
            Restart::Never => RestartPolicy::Never,
        }
    }
}

/// A `--probe` that is not `tcp:PORT`, `http:PORT` or `http:PORT/PATH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFlagError {
    #[error("expected tcp:PORT, http:PORT or http:PORT/PATH")]
    NoProtocol,
    #[error("unknown protocol '{0}' (tcp or http)")]
    Protocol(String),
    #[error("'{0}' is not a port (1 to 65535)")]
    Port(String),
    #[error("a tcp probe has no path (http:PORT/PATH probes a path)")]
    TcpPath,
}

/// Parses `tcp:PORT`, `http:PORT` or `http:PORT/PATH` into a probe with
/// the API's default timing.
fn parse_probe(text: &str) -> Result<Probe, ProbeFlagError> {
    let (protocol, rest) = text.split_once(':').ok_or(ProbeFlagError::NoProtocol)?;
    let protocol = match protocol {
        "tcp" => ProbeProtocol::Tcp,
        "http" => ProbeProtocol::Http,
        other => return Err(ProbeFlagError::Protocol(other.to_string())),
    };
    let (port, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], Some(&rest[slash..])),
        None => (rest, None),
    };
    let port = Some(port)
        .filter(|port| !port.is_empty() && port.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(|port| port.parse::<u16>().ok())
        .filter(|port| *port != 0)
        .ok_or_else(|| ProbeFlagError::Port(port.to_string()))?;
    if path.is_some() && protocol == ProbeProtocol::Tcp {
        return Err(ProbeFlagError::TcpPath);
    }
    let mut probe = Probe::new(protocol, port);
    probe.path = path.map(str::to_string);
    Ok(probe)
}

impl ProbeFlags {
    /// The probe asked for, with its tuning flags applied.
    fn probe(&self) -> Option<Probe> {
        let mut probe = self.probe.clone()?;
        if let Some(interval) = self.probe_interval {
            probe.interval_s = interval;
        }
        if let Some(threshold) = self.probe_threshold {
            probe.threshold = threshold;
        }
        if let Some(grace) = self.probe_grace {
            probe.start_grace_s = grace;
        }
        if let Some(timeout) = self.probe_timeout {
            probe.timeout_ms = timeout;
        }
        Some(probe)
    }
}

impl RoleFlags {
    /// The role the flags describe, probed as `probe` says.
    fn role_spec(&self, probe: &ProbeFlags) -> Result<RoleSpec, String> {
        let (Some(name), Some(image), Some(instances)) = (&self.role, &self.image, self.instances)
        else {
            return Err("--role, --image and --instances are needed (or --file)".to_string());
        };
        let mut spec = RoleSpec::new(name, image, instances);
        if let Some(vcpus) = self.vcpus {
            spec.vcpus = vcpus;
        }
        if let Some(memory) = self.memory {
            spec.memory_mib = memory;
        }
        if let Some(kernel_args) = &self.kernel_args {
            spec.kernel_args.clone_from(kernel_args);
        }
        spec.networks.clone_from(&self.networks);
        if let Some(domains) = self.update_domains {
            spec.update_domains = domains;
        }
        if let Some(spread) = self.fault_domains {
            spec.fault_domains = spread.into();
        }
        if let Some(require) = &self.require {
            spec.require.clone_from(require);
        }
        if let Some(restart) = self.restart {
            spec.restart = restart.into();
        }
        spec.probe = probe.probe();
        spec.endpoints.clone_from(&self.endpoints);
        Ok(spec)
    }
}

impl CreateFlags {
    /// The request: the file's, renamed to NAME if given, or one role from
    /// the flags.
    fn service_create(&self) -> Result<ServiceCreate, String> {
        match &self.file {
            Some(path) => {
                let mut service = read_service_file(path)?;
                if let Some(name) = &self.name {
                    service.name.clone_from(name);
                }
                Ok(service)
            }
            None => Ok(ServiceCreate {
                name: self.name.clone().ok_or("a service NAME is needed")?,
                roles: vec![self.role.role_spec(&self.probe)?],
            }),
        }
    }
}

/// A service definition from a JSON file.
fn read_service_file(path: &Path) -> Result<ServiceCreate, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|err| format!("{} is not a service definition: {err}", path.display()))
}

impl UpgradeFlags {
    /// The request; refused when it changes nothing.
    fn role_upgrade(&self) -> Result<RoleUpgrade, String> {
        let upgrade = RoleUpgrade {
            role: self.role.clone(),
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory,
            kernel_args: self.kernel_args.clone(),
            probe: self.probe.probe(),
        };
        if upgrade
            == (RoleUpgrade {
                role: self.role.clone(),
                ..RoleUpgrade::default()
            })
        {
            return Err(
                "nothing to upgrade: give --image, --vcpus, --memory, --kernel-args or --probe"
                    .to_string(),
            );
        }
        Ok(upgrade)
    }
}

fn service_path(service: &str) -> String {
    format!("/v1/services/{service}")
}

/// An answer that is not the service it should be.
fn unreadable(err: serde_json::Error) -> ClientError {
    usage(format!("cannot read the agent's answer: {err}"))
}

fn role_of<'a>(service: &'a Service, role: &str) -> Result<&'a Role, ClientError> {
    service
        .roles
        .iter()
        .find(|candidate| candidate.spec.name == role)
        .ok_or_else(|| usage(format!("service {} has no role {role}", service.name)))
}

pub fn run(client: &Client, out: &Output, command: ServiceCommand) -> Result<(), ClientError> {
    match command {
        ServiceCommand::Create(flags) => {
            let body = flags.service_create().map_err(usage)?;
            let created = client.send_json("POST", "/v1/services", &body)?;
            out.service(&created).map_err(unreadable)
        }
        ServiceCommand::List => out
            .services(&client.call("GET", "/v1/services", None)?)
            .map_err(unreadable),
        ServiceCommand::Show { service } => out
            .service(&client.call("GET", &service_path(&service), None)?)
            .map_err(unreadable),
        ServiceCommand::Delete { service } => {
            out.done(
                &client.call("DELETE", &service_path(&service), None)?,
                &format!("service {service} deleted; its instances are being retired"),
            );
            Ok(())
        }
        ServiceCommand::Scale {
            service,
            role,
            instances,
            wait,
        } => {
            let path = format!("{}/scale", service_path(&service));
            let body = RoleScale {
                role: role.clone(),
                instances,
            };
            let scaled = client.send_json("POST", &path, &body)?;
            if wait {
                wait_for_scale(client, out, scaled, &role, instances)
            } else {
                out.service(&scaled).map_err(unreadable)
            }
        }
        ServiceCommand::Upgrade(flags) => {
            let body = flags.role_upgrade().map_err(usage)?;
            let path = format!("{}/upgrade", service_path(&flags.service));
            let started = client.send_json("POST", &path, &body)?;
            if flags.no_wait {
                out.service(&started).map_err(unreadable)
            } else {
                follow_rollout(client, out, started, &body.role)
            }
        }
        ServiceCommand::Rollback {
            service,
            role,
            no_wait,
        } => {
            let path = format!("{}/rollback", service_path(&service));
            let started = client.send_json("POST", &path, &RoleRollback { role: role.clone() })?;
            if no_wait {
                out.service(&started).map_err(unreadable)
            } else {
                follow_rollout(client, out, started, &role)
            }
        }
    }
}

/// Where a followed rollout is.
#[derive(Debug, PartialEq, Eq)]
enum RolloutProgress {
    /// Going on: a line on the domain being replaced.
    Running(String),
    Done(String),
    Failed(String),
    /// Another upgrade or rollback replaced the one followed.
    Superseded(String),
}

/// Where `role`'s rollout to revision `target` is.
fn rollout_progress(role: &Role, target: u64) -> RolloutProgress {
    let name = &role.spec.name;
    let Some(rollout) = &role.rollout else {
        return RolloutProgress::Running(format!(
            "{name}: waiting for the rollout to revision {target}"
        ));
    };
    if rollout.to_revision != target {
        return RolloutProgress::Superseded(format!(
            "{name}: a rollout to revision {} replaced the one to revision {target} (another upgrade or rollback); stopped following",
            rollout.to_revision
        ));
    }
    let what = if rollout.rollback {
        "rollback"
    } else {
        "upgrade"
    };
    match rollout.state {
        RolloutState::Done => RolloutProgress::Done(format!(
            "{name}: {what} to revision {target} done: {}",
            rollout.message
        )),
        RolloutState::Failed => RolloutProgress::Failed(format!(
            "{name}: {what} to revision {target} failed: {}",
            rollout.message
        )),
        RolloutState::InProgress => {
            let domain = rollout.domain;
            let slots = (0..role.spec.instances)
                .filter(|index| role.spec.update_domain(*index) == domain)
                .count();
            let healthy = role
                .instances
                .iter()
                .filter(|instance| {
                    !instance.retiring
                        && instance.update_domain == domain
                        && instance.revision == target
                        && instance.health == InstanceHealth::Healthy
                })
                .count();
            RolloutProgress::Running(format!(
                "{name}: update domain {}/{}: {healthy} of {slots} instances of revision {target} healthy",
                (domain + 1).min(rollout.domains),
                rollout.domains
            ))
        }
    }
}

/// Reads the service once a second, a line on stderr each time the
/// rollout moves, until it is done (Ok) or failed (Err).
fn follow_rollout(
    client: &Client,
    out: &Output,
    started: Value,
    role_name: &str,
) -> Result<(), ClientError> {
    let mut service: Service = serde_json::from_value(started.clone()).map_err(unreadable)?;
    let role = role_of(&service, role_name)?;
    let target = role
        .rollout
        .as_ref()
        .map_or(role.revision, |rollout| rollout.to_revision);
    let path = service_path(&service.id);
    let mut current = started;
    let mut last_line = String::new();
    loop {
        match rollout_progress(role_of(&service, role_name)?, target) {
            RolloutProgress::Running(line) => {
                if line != last_line {
                    out.note(&line);
                    last_line = line;
                }
            }
            RolloutProgress::Done(line) => {
                out.done(&current, &line);
                return Ok(());
            }
            RolloutProgress::Failed(message) | RolloutProgress::Superseded(message) => {
                return Err(usage(message));
            }
        }
        std::thread::sleep(POLL_INTERVAL);
        current = client.call("GET", &path, None)?;
        service = serde_json::from_value(current.clone()).map_err(unreadable)?;
    }
}

/// Where a role being scaled to `target` is.
#[derive(Debug, PartialEq, Eq)]
enum ScaleProgress {
    /// A line: healthy of wanted, and what the others are doing.
    Waiting(String),
    Done(String),
    /// It cannot get there by itself (or someone else scaled it).
    Stuck(String),
}

/// Where `role` is on its way to `target` healthy instances (retiring
/// ones do not count).
fn scale_progress(role: &Role, target: u32) -> ScaleProgress {
    let name = &role.spec.name;
    if role.spec.instances != target {
        return ScaleProgress::Stuck(format!(
            "{name} was scaled to {} meanwhile; stopped waiting",
            role.spec.instances
        ));
    }
    let kept: Vec<_> = role
        .instances
        .iter()
        .filter(|instance| !instance.retiring)
        .collect();
    let count = |health| {
        kept.iter()
            .filter(|instance| instance.health == health)
            .count()
    };
    let healthy = count(InstanceHealth::Healthy);
    let mut line = format!("{name}: {healthy}/{target} healthy");
    let others = [
        (count(InstanceHealth::Starting), "starting"),
        (count(InstanceHealth::Unhealthy), "unhealthy"),
        (
            usize::try_from(target)
                .unwrap_or(usize::MAX)
                .saturating_sub(kept.len()),
            "to create",
        ),
        (role.instances.len() - kept.len(), "retiring"),
    ];
    for (number, what) in others {
        if number > 0 {
            line.push_str(&format!(", {number} {what}"));
        }
    }
    let wanted = usize::try_from(target).unwrap_or(usize::MAX);
    if kept.len() == wanted && healthy == wanted {
        return ScaleProgress::Done(line);
    }
    let failed = kept
        .iter()
        .find(|instance| instance.health == InstanceHealth::Unhealthy);
    if let (RestartPolicy::Never, Some(instance)) = (role.spec.restart, failed) {
        return ScaleProgress::Stuck(format!(
            "{line}: instance {} is unhealthy and the role's restart policy is never (it is not replaced); stopped waiting",
            instance.name
        ));
    }
    ScaleProgress::Waiting(line)
}

/// Reads the service once a second, a line on stderr each time the
/// counts change, until the role has `target` healthy instances.
fn wait_for_scale(
    client: &Client,
    out: &Output,
    scaled: Value,
    role_name: &str,
    target: u32,
) -> Result<(), ClientError> {
    let mut service: Service = serde_json::from_value(scaled.clone()).map_err(unreadable)?;
    let path = service_path(&service.id);
    let mut current = scaled;
    let mut last_line = String::new();
    loop {
        match scale_progress(role_of(&service, role_name)?, target) {
            ScaleProgress::Waiting(line) => {
                if line != last_line {
                    out.note(&line);
                    last_line = line;
                }
            }
            ScaleProgress::Done(line) => {
                out.note(&line);
                return out.service(&current).map_err(unreadable);
            }
            ScaleProgress::Stuck(message) => return Err(usage(message)),
        }
        std::thread::sleep(POLL_INTERVAL);
        current = client.call("GET", &path, None)?;
        service = serde_json::from_value(current.clone()).map_err(unreadable)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_from_the_command_line() {
        assert_eq!(parse_endpoint("tcp:80"), Ok(ServiceEndpoint::tcp(80)));
        assert_eq!(
            parse_endpoint("udp:53:5353@30053"),
            Ok(ServiceEndpoint {
                protocol: nubis_api::Protocol::Udp,
                port: 53,
                target_port: Some(5353),
                host_port: Some(30053),
            })
        );
        assert_eq!(
            parse_endpoint("tcp:80@30080").map(|e| (e.target_port, e.host_port)),
            Ok((None, Some(30080)))
        );
        for bad in [
            "",
            "tcp",
            "sctp:80",
            "tcp:0",
            "tcp:80:",
            "tcp:80:81:82",
            "tcp:80@",
            "tcp:x",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
    use clap::Parser;
    use nubis_api::{Rollout, ServiceInstance, VmState};

    /// `nubisctl service ...` alone.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: ServiceCommand,
    }

    fn parse(line: &str) -> Result<ServiceCommand, clap::Error> {
        Cli::try_parse_from(["nubisctl"].into_iter().chain(line.split_whitespace()))
            .map(|cli| cli.command)
    }

    fn instance(index: u32, revision: u64, health: InstanceHealth) -> ServiceInstance {
        ServiceInstance {
            vm_id: format!("vm-{index}-{revision}"),
            name: format!("shop-web-{index}-x"),
            index,
            update_domain: index % 2,
            revision,
            host: Some("host-a".into()),
            fault_domain: Some("1".into()),
            address: Some("10.0.0.2".into()),
            state: VmState::Running,
            health,
            retiring: false,
        }
    }

    fn role(instances: Vec<ServiceInstance>, wanted: u32) -> Role {
        Role {
            spec: RoleSpec::new("web", "img-1", wanted),
            revision: 2,
            healthy: 0,
            instances,
            rollout: None,
            can_roll_back: true,
            virtual_address: None,
        }
    }

    fn rollout(state: RolloutState, domain: u32, message: &str) -> Rollout {
        Rollout {
            from_revision: 1,
            to_revision: 2,
            rollback: false,
            state,
            domain,
            domains: 2,
            message: message.into(),
            started_at: 0,
            ended_at: None,
        }
    }

    #[test]
    fn the_commands_are_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn probes_are_parsed() {
        assert_eq!(
            parse_probe("tcp:80"),
            Ok(Probe::new(ProbeProtocol::Tcp, 80))
        );
        assert_eq!(
            parse_probe("http:8080"),
            Ok(Probe::new(ProbeProtocol::Http, 8080))
        );
        let with_path = parse_probe("http:8080/healthz/ready").unwrap();
        assert_eq!(
            (with_path.port, with_path.path.as_deref()),
            (8080, Some("/healthz/ready"))
        );
    }

    #[test]
    fn malformed_probes_are_refused_with_the_reason() {
        for (bad, error) in [
            ("80", ProbeFlagError::NoProtocol),
            ("", ProbeFlagError::NoProtocol),
            ("udp:53", ProbeFlagError::Protocol("udp".into())),
            ("HTTP:80", ProbeFlagError::Protocol("HTTP".into())),
            ("tcp:", ProbeFlagError::Port("".into())),
            ("tcp:0", ProbeFlagError::Port("0".into())),
            ("tcp:65536", ProbeFlagError::Port("65536".into())),
            ("tcp:+80", ProbeFlagError::Port("+80".into())),
            ("http:web/healthz", ProbeFlagError::Port("web".into())),
            ("http:/healthz", ProbeFlagError::Port("".into())),
            ("tcp:80/healthz", ProbeFlagError::TcpPath),
        ] {
            assert_eq!(parse_probe(bad), Err(error), "{bad}");
        }
        let message = parse("create shop --role web --image i --instances 1 --probe tcp")
            .unwrap_err()
            .to_string();
        assert!(message.contains("expected tcp:PORT"), "{message}");
    }

    #[test]
    fn create_flags_make_one_role() {
        let Ok(ServiceCommand::Create(flags)) = parse(
            "create shop --role web --image debian --instances 3 --vcpus 2 --memory 256 \
             --network lan --network back --update-domains 3 --fault-domains required \
             --require zone=cloud,disk=ssd --restart never --probe http:8080/healthz \
             --probe-interval 5 --probe-threshold 2 --probe-grace 30",
        ) else {
            panic!("not parsed");
        };
        let body = flags.service_create().unwrap();
        assert_eq!(body.name, "shop");
        let mut probe = Probe::new(ProbeProtocol::Http, 8080);
        probe.path = Some("/healthz".into());
        probe.interval_s = 5;
        probe.threshold = 2;
        probe.start_grace_s = 30;
        let mut expected = RoleSpec::new("web", "debian", 3);
        expected.vcpus = 2;
        expected.memory_mib = 256;
        expected.networks = vec!["lan".into(), "back".into()];
        expected.update_domains = 3;
        expected.fault_domains = FaultDomainSpread::Required;
        expected.require = [
            ("disk".to_string(), "ssd".to_string()),
            ("zone".to_string(), "cloud".to_string()),
        ]
        .into();
        expected.restart = RestartPolicy::Never;
        expected.probe = Some(probe);
        assert_eq!(body.roles, [expected]);

        let Ok(ServiceCommand::Create(minimal)) =
            parse("create shop --role web --image i --instances 1")
        else {
            panic!("not parsed");
        };
        assert_eq!(
            minimal.service_create().unwrap().roles,
            [RoleSpec::new("web", "i", 1)]
        );
    }

    #[test]
    fn create_takes_either_a_file_or_role_flags() {
        for refused in [
            "create shop",
            "create shop --role web --image i",
            "create --file s.json --role web",
            "create --file s.json --vcpus 2",
            "create --file s.json --network lan",
            "create --file s.json --probe tcp:80",
            "create shop --role web --image i --instances 1 --probe-interval 3",
            "create shop --role web --image i --instances 1 --require zone",
            "create shop --role web --image i --instances 1 --restart sometimes",
        ] {
            assert!(parse(refused).is_err(), "{refused}");
        }
        assert!(parse("create --file s.json").is_ok());
        assert!(parse("create other --file s.json").is_ok());
    }

    #[test]
    fn a_service_file_is_read_and_renamed_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.json");
        std::fs::write(
            &path,
            r#"{"name": "shop", "roles": [
                {"name": "web", "image": "i", "instances": 2},
                {"name": "db", "image": "i", "instances": 1}]}"#,
        )
        .unwrap();
        let file = path.display().to_string();
        let Ok(ServiceCommand::Create(flags)) = parse(&format!("create --file {file}")) else {
            panic!("not parsed");
        };
        let body = flags.service_create().unwrap();
        assert_eq!((body.name.as_str(), body.roles.len()), ("shop", 2));
        let Ok(ServiceCommand::Create(renamed)) = parse(&format!("create shop2 --file {file}"))
        else {
            panic!("not parsed");
        };
        assert_eq!(renamed.service_create().unwrap().name, "shop2");

        std::fs::write(&path, r#"{"name": "shop", "roles": [], "id": "x"}"#).unwrap();
        let error = flags.service_create().unwrap_err();
        assert!(error.contains("is not a service definition"), "{error}");
        let missing = dir.path().join("missing.json").display().to_string();
        let Ok(ServiceCommand::Create(flags)) = parse(&format!("create --file {missing}")) else {
            panic!("not parsed");
        };
        assert!(flags
            .service_create()
            .unwrap_err()
            .starts_with("cannot read"));
    }

    #[test]
    fn an_upgrade_must_change_something() {
        let Ok(ServiceCommand::Upgrade(nothing)) = parse("upgrade shop --role web") else {
            panic!("not parsed");
        };
        assert!(nothing
            .role_upgrade()
            .unwrap_err()
            .starts_with("nothing to upgrade"));
        let Ok(ServiceCommand::Upgrade(flags)) =
            parse("upgrade shop --role web --image v2 --memory 512 --probe tcp:22")
        else {
            panic!("not parsed");
        };
        assert_eq!(
            flags.role_upgrade().unwrap(),
            RoleUpgrade {
                role: "web".into(),
                image: Some("v2".into()),
                memory_mib: Some(512),
                probe: Some(Probe::new(ProbeProtocol::Tcp, 22)),
                ..RoleUpgrade::default()
            }
        );
    }

    #[test]
    fn a_rollout_in_progress_counts_the_domain_being_replaced() {
        let mut web = role(
            vec![
                instance(0, 2, InstanceHealth::Healthy),
                instance(1, 1, InstanceHealth::Healthy),
                instance(2, 2, InstanceHealth::Starting),
            ],
            3,
        );
        web.rollout = Some(rollout(RolloutState::InProgress, 0, "update domain 1 of 2"));
        assert_eq!(
            rollout_progress(&web, 2),
            RolloutProgress::Running(
                "web: update domain 1/2: 1 of 2 instances of revision 2 healthy".into()
            )
        );
        assert!(matches!(
            rollout_progress(&web, 1),
            RolloutProgress::Superseded(line) if line.contains("revision 2 replaced")
        ));
        web.rollout = Some(rollout(
            RolloutState::Done,
            2,
            "all 2 update domains at revision 2",
        ));
        assert_eq!(
            rollout_progress(&web, 2),
            RolloutProgress::Done(
                "web: upgrade to revision 2 done: all 2 update domains at revision 2".into()
            )
        );
        web.rollout = Some(Rollout {
            rollback: true,
            ..rollout(RolloutState::Failed, 0, "instance x is unhealthy")
        });
        assert_eq!(
            rollout_progress(&web, 2),
            RolloutProgress::Failed(
                "web: rollback to revision 2 failed: instance x is unhealthy".into()
            )
        );
    }

    #[test]
    fn scaling_waits_for_every_instance_to_be_healthy() {
        let mut retiring = instance(3, 2, InstanceHealth::Healthy);
        retiring.retiring = true;
        let mut web = role(
            vec![
                instance(0, 2, InstanceHealth::Healthy),
                instance(1, 2, InstanceHealth::Healthy),
                instance(2, 2, InstanceHealth::Starting),
                retiring,
            ],
            3,
        );
        assert_eq!(
            scale_progress(&web, 3),
            ScaleProgress::Waiting("web: 2/3 healthy, 1 starting, 1 retiring".into())
        );
        web.instances[2].health = InstanceHealth::Healthy;
        assert_eq!(
            scale_progress(&web, 3),
            ScaleProgress::Done("web: 3/3 healthy, 1 retiring".into())
        );
        web.instances.truncate(1);
        assert_eq!(
            scale_progress(&web, 3),
            ScaleProgress::Waiting("web: 1/3 healthy, 2 to create".into())
        );
        web.instances[0].health = InstanceHealth::Unhealthy;
        web.spec.restart = RestartPolicy::Never;
        assert!(matches!(scale_progress(&web, 3), ScaleProgress::Stuck(_)));
        assert!(matches!(
            scale_progress(&web, 5),
            ScaleProgress::Stuck(line) if line.contains("scaled to 3 meanwhile")
        ));
    }
}
