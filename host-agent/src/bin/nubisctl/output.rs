//! Human and JSON output, and a spinner on stderr for long waits (only on
//! a terminal, never in `--json` mode).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nubis_api::{
    ClusterHost, Probe, ProbeProtocol, Role, Rollout, RolloutState, Service, ServiceInstance,
};
use serde_json::Value;

pub struct Output {
    pub json: bool,
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| format!("{key}={}", cell(value)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// "used/capacity", or "-" while the host is down.
fn used_of(usage: Option<u64>, capacity: Option<u64>) -> String {
    match (usage, capacity) {
        (Some(used), Some(capacity)) => format!("{used}/{capacity}"),
        _ => "-".into(),
    }
}

const HOST_COLUMNS: [&str; 9] = [
    "name",
    "state",
    "controller",
    "roles",
    "vcpus",
    "memory_mib",
    "disk_mib",
    "vms",
    "labels",
];

/// One host's line under [`HOST_COLUMNS`].
fn host_row(host: &ClusterHost) -> Vec<String> {
    let (usage, capacity) = (host.usage, host.capacity);
    vec![
        host.name.clone(),
        host.state.as_str().to_string(),
        if host.controller { "*" } else { "" }.to_string(),
        host.roles.join(","),
        used_of(
            usage.map(|u| u64::from(u.vcpus)),
            capacity.map(|c| u64::from(c.vcpus)),
        ),
        used_of(usage.map(|u| u.memory_mib), capacity.map(|c| c.memory_mib)),
        used_of(usage.map(|u| u.disk_mib), capacity.map(|c| c.disk_mib)),
        host.vms.map_or_else(|| "-".into(), |vms| vms.to_string()),
        host.labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(","),
    ]
}

const SERVICE_COLUMNS: [&str; 4] = ["name", "id", "roles", "rollout"];

/// One service's line under [`SERVICE_COLUMNS`]: each role as
/// `role=healthy/wanted`, and the roles' last rollouts.
fn service_row(service: &Service) -> Vec<String> {
    let roles = service
        .roles
        .iter()
        .map(|role| {
            format!(
                "{}={}/{}",
                role.spec.name, role.healthy, role.spec.instances
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let rollouts = service
        .roles
        .iter()
        .filter_map(|role| {
            let rollout = role.rollout.as_ref()?;
            let moved = format!(
                "{} {}{}->{}",
                role.spec.name,
                if rollout.rollback { "rollback " } else { "" },
                rollout.from_revision,
                rollout.to_revision
            );
            Some(match rollout.state {
                RolloutState::InProgress => format!(
                    "{moved} (domain {}/{})",
                    shown_domain(rollout),
                    rollout.domains
                ),
                state => format!("{moved} {}", state.as_str()),
            })
        })
        .collect::<Vec<_>>();
    vec![
        service.name.clone(),
        service.id.clone(),
        roles,
        if rollouts.is_empty() {
            "-".to_string()
        } else {
            rollouts.join(", ")
        },
    ]
}

/// The rollout's update domain counted from 1 (as in its messages).
fn shown_domain(rollout: &Rollout) -> u32 {
    (rollout.domain + 1).min(rollout.domains)
}

/// A probe as `--probe` takes it: `tcp:80`, `http:8080/healthz`.
pub fn probe_flag(probe: &Probe) -> String {
    let protocol = match probe.protocol {
        ProbeProtocol::Tcp => "tcp",
        ProbeProtocol::Http => "http",
    };
    format!(
        "{protocol}:{}{}",
        probe.port,
        probe.path.as_deref().unwrap_or("")
    )
}

/// A role's heading in `service show`: revision and health, spec,
/// placement, probe and rollout.
fn role_lines(role: &Role) -> Vec<String> {
    let spec = &role.spec;
    let mut lines = vec![
        format!(
            "role {}: revision {}, {}/{} healthy{}",
            spec.name,
            role.revision,
            role.healthy,
            spec.instances,
            if role.can_roll_back {
                ", can roll back"
            } else {
                ""
            }
        ),
        format!(
            "  image {}, {} vCPU, {} MiB, {} update domains, fault domains {}, restart {}",
            spec.image,
            spec.vcpus,
            spec.memory_mib,
            spec.update_domains,
            serde_name(&spec.fault_domains),
            serde_name(&spec.restart)
        ),
    ];
    if !spec.kernel_args.is_empty() {
        lines.push(format!("  kernel args: {}", spec.kernel_args));
    }
    if !spec.networks.is_empty() {
        lines.push(format!("  networks: {}", spec.networks.join(", ")));
    }
    if !spec.require.is_empty() {
        let labels: Vec<String> = spec
            .require
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        lines.push(format!("  requires: {}", labels.join(",")));
    }
    lines.push(match &spec.probe {
        Some(probe) => format!(
            "  probe: {} every {} s, timeout {} ms, unhealthy after {} failures, {} s start grace",
            probe_flag(probe),
            probe.interval_s,
            probe.timeout_ms,
            probe.threshold,
            probe.start_grace_s
        ),
        None => "  probe: none (healthy while running)".to_string(),
    });
    if let Some(rollout) = &role.rollout {
        lines.push(format!(
            "  rollout: {} {} -> {} {} at update domain {}/{}: {}",
            if rollout.rollback {
                "rollback"
            } else {
                "upgrade"
            },
            rollout.from_revision,
            rollout.to_revision,
            rollout.state.as_str(),
            shown_domain(rollout),
            rollout.domains,
            rollout.message
        ));
    }
    lines
}

/// A unit enum's API name (`preferred`, `always`).
fn serde_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|value| value.as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

const INSTANCE_COLUMNS: [&str; 10] = [
    "name",
    "index",
    "ud",
    "rev",
    "host",
    "fault-domain",
    "address",
    "state",
    "health",
    "retiring",
];

/// One instance's line under [`INSTANCE_COLUMNS`].
fn instance_row(instance: &ServiceInstance) -> Vec<String> {
    let or_dash = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".into());
    vec![
        instance.name.clone(),
        instance.index.to_string(),
        instance.update_domain.to_string(),
        instance.revision.to_string(),
        or_dash(&instance.host),
        or_dash(&instance.fault_domain),
        or_dash(&instance.address),
        instance.state.as_str().to_string(),
        instance.health.as_str().to_string(),
        if instance.retiring { "yes" } else { "" }.to_string(),
    ]
}

impl Output {
    /// The cluster's hosts: one line each, the controller marked with '*'.
    pub fn hosts(&self, value: &Value) -> Result<(), serde_json::Error> {
        if self.json {
            println!("{value}");
            return Ok(());
        }
        let hosts: Vec<ClusterHost> = serde_json::from_value(value.clone())?;
        let rows = hosts.iter().map(host_row).collect();
        self.rows(&HOST_COLUMNS, rows);
        Ok(())
    }

    /// Services: one line each, every role as `role=healthy/wanted`.
    pub fn services(&self, value: &Value) -> Result<(), serde_json::Error> {
        if self.json {
            println!("{value}");
            return Ok(());
        }
        let services: Vec<Service> = serde_json::from_value(value.clone())?;
        self.rows(&SERVICE_COLUMNS, services.iter().map(service_row).collect());
        Ok(())
    }

    /// One service: its fields, then each role's heading and instances.
    pub fn service(&self, value: &Value) -> Result<(), serde_json::Error> {
        if self.json {
            println!("{value}");
            return Ok(());
        }
        let service: Service = serde_json::from_value(value.clone())?;
        println!("name        {}", service.name);
        println!("id          {}", service.id);
        println!("tenant_id   {}", service.tenant_id);
        println!("created_at  {}", service.created_at);
        for role in &service.roles {
            println!();
            for line in role_lines(role) {
                println!("{line}");
            }
            self.rows(
                &INSTANCE_COLUMNS,
                role.instances.iter().map(instance_row).collect(),
            );
        }
        Ok(())
    }

    /// One object: `key: value` lines, or its JSON.
    pub fn object(&self, value: &Value) {
        if self.json {
            println!("{value}");
            return;
        }
        match value.as_object() {
            Some(map) => {
                let width = map.keys().map(String::len).max().unwrap_or(0);
                for (key, value) in map {
                    println!("{key:width$}  {}", cell(value));
                }
            }
            None => println!("{}", cell(value)),
        }
    }

    /// A list as a table of `columns`, or its JSON.
    pub fn table(&self, value: &Value, columns: &[&str]) {
        if self.json {
            println!("{value}");
            return;
        }
        let rows: Vec<Vec<String>> = value
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|item| columns.iter().map(|column| cell(&item[*column])).collect())
                    .collect()
            })
            .unwrap_or_default();
        self.rows(columns, rows);
    }

    /// Rows of cells under `columns`' names, aligned.
    fn rows(&self, columns: &[&str], rows: Vec<Vec<String>>) {
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(index, column)| {
                rows.iter()
                    .map(|row| row[index].len())
                    .chain([column.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        println!(
            "{}",
            line(columns.iter().map(|c| c.to_uppercase()).collect())
        );
        for row in rows {
            println!("{}", line(row));
        }
    }

    /// A request with no body: a confirmation line (nothing in JSON mode).
    pub fn done(&self, value: &Value, message: &str) {
        if self.json {
            if !value.is_null() {
                println!("{value}");
            }
        } else {
            println!("{message}");
        }
    }

    pub fn note(&self, message: &str) {
        if !self.json {
            eprintln!("{message}");
        }
    }

    /// Rewrites one status line on stderr (terminals only).
    pub fn progress(&self, line: &str) {
        if !self.json && std::io::stderr().is_terminal() {
            eprint!("\r{line}\x1b[K");
            let _ = std::io::stderr().flush();
        }
    }

    /// Ends a [`Output::progress`] line.
    pub fn progress_done(&self) {
        if !self.json && std::io::stderr().is_terminal() {
            eprintln!();
        }
    }

    /// A spinner with `message` on stderr until [`Spinner::finish`].
    pub fn spinner(&self, message: &str) -> Spinner {
        let stop = Arc::new(AtomicBool::new(false));
        if self.json || !std::io::stderr().is_terminal() {
            return Spinner { stop, thread: None };
        }
        let (flag, message) = (stop.clone(), message.to_string());
        let thread = std::thread::spawn(move || {
            let frames = ['|', '/', '-', '\\'];
            let mut index = 0;
            while !flag.load(Ordering::SeqCst) {
                eprint!("\r{} {message}", frames[index % frames.len()]);
                let _ = std::io::stderr().flush();
                index += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            eprint!("\r{}\r", " ".repeat(message.len() + 2));
        });
        Spinner {
            stop,
            thread: Some(thread),
        }
    }
}

pub struct Spinner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::{HostResources, HostState, InstanceHealth, RoleSpec, VmState};

    fn host(name: &str, up: bool) -> ClusterHost {
        ClusterHost {
            name: name.into(),
            state: if up { HostState::Up } else { HostState::Down },
            cordoned: false,
            controller: up,
            roles: vec!["compute".into(), "controller".into()],
            labels: [("zone".to_string(), "cloud".to_string())].into(),
            fingerprint: "f".repeat(64),
            api_address: None,
            underlay_address: None,
            capacity: up.then_some(HostResources {
                vcpus: 8,
                memory_mib: 4096,
                disk_mib: 100,
            }),
            usage: up.then_some(HostResources {
                vcpus: 2,
                memory_mib: 512,
                disk_mib: 10,
            }),
            vms: up.then_some(1),
            agent_version: None,
            started_at: None,
            drain: None,
            joined_at: 0,
        }
    }

    #[test]
    fn a_host_line_shows_use_of_capacity_and_marks_the_controller() {
        assert_eq!(
            host_row(&host("a", true)),
            [
                "a",
                "up",
                "*",
                "compute,controller",
                "2/8",
                "512/4096",
                "10/100",
                "1",
                "zone=cloud"
            ]
        );
        assert_eq!(
            host_row(&host("b", false)),
            [
                "b",
                "down",
                "",
                "compute,controller",
                "-",
                "-",
                "-",
                "-",
                "zone=cloud"
            ]
        );
        assert_eq!(HOST_COLUMNS.len(), host_row(&host("a", true)).len());
    }

    fn web_role() -> Role {
        let mut spec = RoleSpec::new("web", "img-1", 2);
        spec.probe = Some(Probe {
            path: Some("/healthz".into()),
            ..Probe::new(ProbeProtocol::Http, 8080)
        });
        let instance = ServiceInstance {
            vm_id: "vm-1".into(),
            name: "shop-web-0-abcd".into(),
            index: 0,
            update_domain: 0,
            revision: 2,
            host: Some("host-a".into()),
            fault_domain: None,
            address: Some("10.0.0.2".into()),
            state: VmState::Running,
            health: InstanceHealth::Healthy,
            retiring: true,
        };
        Role {
            spec,
            revision: 2,
            instances: vec![instance],
            healthy: 1,
            rollout: Some(Rollout {
                from_revision: 1,
                to_revision: 2,
                rollback: false,
                state: RolloutState::InProgress,
                domain: 1,
                domains: 2,
                message: "update domain 2 of 2: 0 of 1 instances of revision 2 healthy".into(),
                started_at: 0,
                ended_at: None,
            }),
            can_roll_back: true,
            virtual_address: None,
        }
    }

    #[test]
    fn a_service_line_shows_each_roles_health_and_rollout() {
        let mut service = Service {
            id: "svc-1".into(),
            tenant_id: "t-1".into(),
            name: "shop".into(),
            roles: vec![web_role()],
            created_at: 0,
            events: Vec::new(),
        };
        let mut db = web_role();
        db.spec.name = "db".into();
        db.spec.instances = 1;
        db.healthy = 0;
        db.rollout = None;
        service.roles.push(db);
        assert_eq!(
            service_row(&service),
            ["shop", "svc-1", "web=1/2,db=0/1", "web 1->2 (domain 2/2)"]
        );
        service.roles.truncate(1);
        if let Some(rollout) = service.roles[0].rollout.as_mut() {
            rollout.state = RolloutState::Failed;
            rollout.rollback = true;
        }
        assert_eq!(service_row(&service)[3], "web rollback 1->2 failed");
        service.roles[0].rollout = None;
        assert_eq!(service_row(&service)[3], "-");
    }

    #[test]
    fn a_role_shows_its_spec_rollout_and_instances() {
        let role = web_role();
        let lines = role_lines(&role);
        assert_eq!(lines[0], "role web: revision 2, 1/2 healthy, can roll back");
        assert_eq!(
            lines[1],
            "  image img-1, 1 vCPU, 128 MiB, 2 update domains, fault domains preferred, restart always"
        );
        assert!(
            lines[2].starts_with("  probe: http:8080/healthz every 2 s"),
            "{lines:?}"
        );
        assert!(
            lines[3].starts_with("  rollout: upgrade 1 -> 2 in_progress at update domain 2/2: "),
            "{lines:?}"
        );
        assert_eq!(
            instance_row(&role.instances[0]),
            [
                "shop-web-0-abcd",
                "0",
                "0",
                "2",
                "host-a",
                "-",
                "10.0.0.2",
                "running",
                "healthy",
                "yes"
            ]
        );
        assert_eq!(
            INSTANCE_COLUMNS.len(),
            instance_row(&role.instances[0]).len()
        );
    }
}
