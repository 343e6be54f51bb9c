//! Health probes of the service instances this host runs: a TCP connect,
//! or an HTTP GET answered 2xx or 3xx, to the instance's first address
//! from the host (each host is the gateway of its VMs' networks, so the
//! check never leaves the host). The host reports each instance's health
//! with its state (`status/{vm}`); the controller replaces the unhealthy
//! and gates rollouts on it.
//!
//! What the guest answers is untrusted: a check reads at most one status
//! line of [`MAX_STATUS_LINE`] bytes, within the probe's timeout.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nubis_api::{InstanceHealth, Probe, ProbeProtocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most of an HTTP answer a check reads.
const MAX_STATUS_LINE: usize = 1024;
/// How often due checks are looked for.
const TICK: Duration = Duration::from_millis(250);

/// Where and how to check one instance, as the host's VMs say now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub probe: Probe,
    pub address: Ipv4Addr,
    /// The VMM process running it: a new one starts the checks afresh.
    pub pid: u32,
}

/// A probe's verdicts over time: pure, so the rules are tested alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    threshold: u32,
    grace: Duration,
    started: Instant,
    failures: u32,
    passed_once: bool,
    health: InstanceHealth,
}

impl Tracker {
    pub fn new(probe: &Probe, started: Instant) -> Self {
        Tracker {
            threshold: probe.threshold.max(1),
            grace: Duration::from_secs(u64::from(probe.start_grace_s)),
            started,
            failures: 0,
            passed_once: false,
            health: InstanceHealth::Starting,
        }
    }

    /// A check's result at `now`: one pass makes the instance healthy;
    /// `threshold` failures in a row make a healthy one unhealthy; one
    /// that never passed is unhealthy once its start grace is over.
    pub fn observe(&mut self, passed: bool, now: Instant) -> InstanceHealth {
        if passed {
            self.failures = 0;
            self.passed_once = true;
            self.health = InstanceHealth::Healthy;
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.passed_once && self.failures >= self.threshold {
                self.health = InstanceHealth::Unhealthy;
            }
        }
        self.tick(now)
    }

    /// The health at `now` without a new result (the grace may end).
    pub fn tick(&mut self, now: Instant) -> InstanceHealth {
        if !self.passed_once && now.saturating_duration_since(self.started) >= self.grace {
            self.health = InstanceHealth::Unhealthy;
        }
        self.health
    }

    pub fn health(&self) -> InstanceHealth {
        self.health
    }
}

struct Probed {
    target: Target,
    tracker: Tracker,
    next_check: Instant,
    in_flight: bool,
}

/// The probes of this host's instances and what they found.
#[derive(Default)]
pub struct Probes {
    probed: Mutex<HashMap<String, Probed>>,
}

impl Probes {
    /// The instances to check now, by VM id: new ones start afresh,
    /// changed ones (another address, process or probe) too, and those no
    /// longer listed are forgotten.
    pub fn set_targets(&self, targets: HashMap<String, Target>) {
        let now = Instant::now();
        let mut probed = lock(&self.probed);
        probed.retain(|id, probed| targets.get(id) == Some(&probed.target));
        for (id, target) in targets {
            probed.entry(id).or_insert_with(|| Probed {
                tracker: Tracker::new(&target.probe, now),
                next_check: now,
                in_flight: false,
                target,
            });
        }
    }

    /// What the probe of VM `id` says, if it is checked here.
    pub fn health(&self, id: &str) -> Option<InstanceHealth> {
        lock(&self.probed)
            .get(id)
            .map(|probed| probed.tracker.health())
    }

    /// The checks due now, marked in flight.
    fn due(&self) -> Vec<(String, Target)> {
        let now = Instant::now();
        let mut probed = lock(&self.probed);
        probed
            .iter_mut()
            .filter(|(_, probed)| !probed.in_flight && probed.next_check <= now)
            .map(|(id, probed)| {
                probed.in_flight = true;
                probed.tracker.tick(now);
                (id.clone(), probed.target.clone())
            })
            .collect()
    }

    /// Records a check of VM `id` against `target` (ignored if the target
    /// changed meanwhile).
    fn record(&self, id: &str, target: &Target, passed: bool) {
        let now = Instant::now();
        let mut probed = lock(&self.probed);
        let Some(probed) = probed.get_mut(id).filter(|probed| probed.target == *target) else {
            return;
        };
        probed.in_flight = false;
        probed.next_check = now + Duration::from_secs(u64::from(target.probe.interval_s.max(1)));
        let before = probed.tracker.health();
        let after = probed.tracker.observe(passed, now);
        if before != after {
            tracing::info!(vm = id, "service instance is {}", after.as_str());
        }
    }
}

/// Runs the due checks for as long as the agent runs.
pub async fn run(probes: std::sync::Arc<Probes>) {
    loop {
        for (id, target) in probes.due() {
            let probes = probes.clone();
            tokio::spawn(async move {
                let passed = check(&target).await;
                probes.record(&id, &target, passed);
            });
        }
        tokio::time::sleep(TICK).await;
    }
}

/// One check of `target`, within its timeout.
pub async fn check(target: &Target) -> bool {
    let probe = &target.probe;
    let timeout = Duration::from_millis(u64::from(probe.timeout_ms.max(1)));
    let address = SocketAddr::from((target.address, probe.port));
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        match probe.protocol {
            ProbeProtocol::Tcp => Some(true),
            ProbeProtocol::Http => {
                let path = probe.path.as_deref().unwrap_or("/");
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: nubis-probe\r\nConnection: close\r\n\r\n",
                    target.address
                );
                stream.write_all(request.as_bytes()).await.ok()?;
                let mut answer = Vec::with_capacity(MAX_STATUS_LINE);
                let mut chunk = [0u8; 256];
                while answer.len() < MAX_STATUS_LINE && !answer.contains(&b'\n') {
                    let read = stream.read(&mut chunk).await.ok()?;
                    if read == 0 {
                        break;
                    }
                    let room = MAX_STATUS_LINE - answer.len();
                    answer.extend_from_slice(&chunk[..read.min(room)]);
                }
                Some(http_status_passes(&answer))
            }
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Whether an HTTP answer's status line says 2xx or 3xx.
pub fn http_status_passes(answer: &[u8]) -> bool {
    let line = answer
        .split(|byte| *byte == b'\n')
        .next()
        .unwrap_or_default();
    let mut words = line.split(|byte| *byte == b' ');
    let version = words.next().unwrap_or_default();
    let status = words.next().unwrap_or_default();
    version.starts_with(b"HTTP/1.")
        && status.len() == 3
        && matches!(status.first(), Some(b'2' | b'3'))
        && status.iter().all(u8::is_ascii_digit)
}

/// Checks a probe's fields: the ranges the API documents; an HTTP path
/// that goes on the request line as it is (printable, no spaces).
pub fn validate(field: &str, probe: &Probe) -> Result<(), super::ServiceError> {
    let invalid = |what: &str, message: String| {
        Err(super::ServiceError::invalid(
            format!("{field}.{what}"),
            message,
        ))
    };
    if probe.port == 0 {
        return invalid("port", "1 to 65535".into());
    }
    if !(1..=60).contains(&probe.interval_s) {
        return invalid("interval_s", format!("{} is not 1 to 60", probe.interval_s));
    }
    if !(100..=10_000).contains(&probe.timeout_ms) {
        return invalid(
            "timeout_ms",
            format!("{} is not 100 to 10000", probe.timeout_ms),
        );
    }
    if !(1..=10).contains(&probe.threshold) {
        return invalid("threshold", format!("{} is not 1 to 10", probe.threshold));
    }
    if probe.start_grace_s > 600 {
        return invalid(
            "start_grace_s",
            format!("{} is over 600", probe.start_grace_s),
        );
    }
    match (&probe.path, probe.protocol) {
        (Some(_), ProbeProtocol::Tcp) => invalid("path", "only an HTTP probe has a path".into()),
        (Some(path), ProbeProtocol::Http)
            if !path.starts_with('/')
                || path.len() > 256
                || !path.bytes().all(|byte| byte.is_ascii_graphic()) =>
        {
            invalid(
                "path",
                "'/' then up to 255 printable ASCII characters without spaces".into(),
            )
        }
        _ => Ok(()),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(threshold: u32, grace_s: u32) -> Probe {
        Probe {
            threshold,
            start_grace_s: grace_s,
            ..Probe::new(ProbeProtocol::Tcp, 80)
        }
    }

    #[test]
    fn one_pass_makes_healthy_and_threshold_failures_unhealthy() {
        let start = Instant::now();
        let mut tracker = Tracker::new(&probe(3, 60), start);
        assert_eq!(tracker.health(), InstanceHealth::Starting);
        assert_eq!(tracker.observe(false, start), InstanceHealth::Starting);
        assert_eq!(tracker.observe(true, start), InstanceHealth::Healthy);
        assert_eq!(tracker.observe(false, start), InstanceHealth::Healthy);
        assert_eq!(tracker.observe(false, start), InstanceHealth::Healthy);
        assert_eq!(tracker.observe(false, start), InstanceHealth::Unhealthy);
        // A pass in between starts the count again; a pass heals.
        assert_eq!(tracker.observe(true, start), InstanceHealth::Healthy);
        assert_eq!(tracker.observe(false, start), InstanceHealth::Healthy);
    }

    #[test]
    fn an_instance_that_never_passes_is_unhealthy_after_its_grace() {
        let start = Instant::now();
        let mut tracker = Tracker::new(&probe(3, 10), start);
        for _ in 0..20 {
            assert_eq!(tracker.observe(false, start), InstanceHealth::Starting);
        }
        let later = start + Duration::from_secs(10);
        assert_eq!(tracker.tick(later), InstanceHealth::Unhealthy);
        // Passing later still heals it.
        assert_eq!(tracker.observe(true, later), InstanceHealth::Healthy);
    }

    #[test]
    fn http_answers_pass_on_2xx_and_3xx_only() {
        for (answer, passes) in [
            (&b"HTTP/1.1 200 OK\r\n"[..], true),
            (b"HTTP/1.0 302 Found\r\nLocation: /\r\n", true),
            (b"HTTP/1.1 404 Not Found\r\n", false),
            (b"HTTP/1.1 500 Oops\r\n", false),
            (b"HTTP/1.1 2000 OK\r\n", false),
            (b"HTTP/1.1 2x0 OK\r\n", false),
            (b"SSH-2.0-OpenSSH\r\n", false),
            (b"", false),
            (b"HTTP/1.1 200", true),
        ] {
            assert_eq!(http_status_passes(answer), passes, "{answer:?}");
        }
    }

    #[test]
    fn probes_are_checked_against_their_ranges() {
        assert!(validate("probe", &Probe::new(ProbeProtocol::Http, 80)).is_ok());
        let bad = [
            Probe::new(ProbeProtocol::Tcp, 0),
            Probe {
                interval_s: 0,
                ..Probe::new(ProbeProtocol::Tcp, 80)
            },
            Probe {
                timeout_ms: 20_000,
                ..Probe::new(ProbeProtocol::Tcp, 80)
            },
            Probe {
                threshold: 11,
                ..Probe::new(ProbeProtocol::Tcp, 80)
            },
            Probe {
                path: Some("/x".into()),
                ..Probe::new(ProbeProtocol::Tcp, 80)
            },
            Probe {
                path: Some("/a b".into()),
                ..Probe::new(ProbeProtocol::Http, 80)
            },
            Probe {
                path: Some("x\r\nHost: evil".into()),
                ..Probe::new(ProbeProtocol::Http, 80)
            },
        ];
        for probe in bad {
            assert!(validate("probe", &probe).is_err(), "{probe:?}");
        }
    }

    #[tokio::test]
    async fn checks_pass_against_a_listener_and_fail_without() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            }
        });
        let target = |protocol| Target {
            probe: Probe::new(protocol, port),
            address: Ipv4Addr::LOCALHOST,
            pid: 1,
        };
        assert!(check(&target(ProbeProtocol::Tcp)).await);
        assert!(check(&target(ProbeProtocol::Http)).await);
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let free = closed.local_addr().unwrap().port();
        drop(closed);
        let mut gone = target(ProbeProtocol::Tcp);
        gone.probe.port = free;
        assert!(!check(&gone).await);
    }
}
