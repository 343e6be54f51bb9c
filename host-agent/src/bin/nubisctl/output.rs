//! Human and JSON output, and a spinner on stderr for long waits (only on
//! a terminal, never in `--json` mode).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nubis_api::ClusterHost;
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
    use nubis_api::{HostResources, HostState};

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
}
