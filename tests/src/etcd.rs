//! Real etcd clusters for the cluster tests: Debian's `etcd` binary, one
//! process per member, started by the test in its own directory and killed
//! on drop; optionally with TLS and client-certificate authentication,
//! from a CA the test makes.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::free_ports;

/// Panics with what to install when etcd is not on this machine.
pub fn require_etcd() {
    for (tool, version) in [("etcd", "--version"), ("etcdctl", "version")] {
        let found = Command::new(tool)
            .arg(version)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        assert!(
            found,
            "{tool} is not installed: run scripts/install-deps.sh (Debian's etcd-server and etcd-client)"
        );
    }
}

/// A CA and the certificates signed by it (PEM files in one directory).
pub struct Pki {
    pub dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// One certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A new CA in `dir` (`ca.pem`).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("create the PKI directory");
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "nubis test etcd CA");
        let key = rcgen::KeyPair::generate().expect("CA key");
        let ca = rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write the CA");
        Self {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate named `name` for `addresses` (server and client use).
    pub fn issue(&self, name: &str, addresses: &[Ipv4Addr]) -> CertFiles {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("certificate parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        for address in addresses {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress((*address).into()));
        }
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write the key");
        files
    }
}

/// How a cluster's members talk to clients.
pub struct ClientTls {
    pub ca: PathBuf,
    /// The members' own certificate (valid for their addresses).
    pub server: CertFiles,
}

struct Member {
    name: String,
    client_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

/// A running etcd cluster; its members die with it.
pub struct EtcdCluster {
    members: Vec<Member>,
    tls: bool,
    /// For `etcdctl`: the CA and a client certificate.
    ctl_tls: Option<(PathBuf, CertFiles)>,
}

impl EtcdCluster {
    /// Starts `size` members listening on every address (the simulated
    /// hosts reach them on their management links), advertising
    /// `advertise`, with data and logs in `dir`; waits until every member
    /// answers. With `tls`, clients must present a certificate of its CA.
    pub fn start(
        dir: &Path,
        size: usize,
        advertise: Ipv4Addr,
        tls: Option<(ClientTls, CertFiles)>,
    ) -> Self {
        require_etcd();
        let free = free_ports(2 * size);
        let ports: Vec<(u16, u16)> = free.chunks(2).map(|pair| (pair[0], pair[1])).collect();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(index, (_, peer))| format!("e{index}=http://{advertise}:{peer}"))
            .collect();
        let mut members = Vec::new();
        for (index, (client, peer)) in ports.iter().enumerate() {
            let name = format!("e{index}");
            let data = dir.join(format!("{name}.data"));
            let log = dir.join(format!("{name}.log"));
            std::fs::create_dir_all(dir).expect("create the etcd directory");
            let log_file = std::fs::File::create(&log).expect("create the etcd log");
            let mut command = Command::new("etcd");
            command
                .arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("{scheme}://0.0.0.0:{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("{scheme}://{advertise}:{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://{advertise}:{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{advertise}:{peer}"))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--heartbeat-interval")
                .arg("100")
                .arg("--election-timeout")
                .arg("1000");
            if let Some((client_tls, _)) = &tls {
                command
                    .arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&client_tls.ca)
                    .arg("--cert-file")
                    .arg(&client_tls.server.cert)
                    .arg("--key-file")
                    .arg(&client_tls.server.key);
            }
            let child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .expect("start etcd");
            members.push(Member {
                name,
                client_port: *client,
                child: Some(child),
                log,
            });
        }
        let cluster = Self {
            members,
            tls: tls.is_some(),
            ctl_tls: tls.map(|(client_tls, ctl)| (client_tls.ca, ctl)),
        };
        cluster.wait_healthy(advertise);
        cluster
    }

    /// `etcd=URL,...` for an agent that reaches the members at `reach`.
    pub fn cluster_arg(&self, reach: Ipv4Addr) -> String {
        let urls: Vec<String> = self
            .members
            .iter()
            .map(|member| self.url(reach, member.client_port))
            .collect();
        format!("etcd={}", urls.join(","))
    }

    fn url(&self, reach: Ipv4Addr, port: u16) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{reach}:{port}")
    }

    /// Waits until every member answers `etcdctl endpoint health`.
    fn wait_healthy(&self, reach: Ipv4Addr) {
        let start = Instant::now();
        let endpoints: Vec<String> = self
            .members
            .iter()
            .map(|member| self.url(reach, member.client_port))
            .collect();
        loop {
            let ready = self.members.iter().all(|member| {
                TcpStream::connect(SocketAddr::from((reach, member.client_port))).is_ok()
            }) && self
                .etcdctl(&endpoints.join(","), &["endpoint", "health"])
                .is_some();
            if ready {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "etcd did not become healthy:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `etcdctl args` against `endpoints`: its output when it succeeded.
    pub fn etcdctl(&self, endpoints: &str, args: &[&str]) -> Option<String> {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoints)
            .arg("--command-timeout=5s");
        if let Some((ca, client)) = &self.ctl_tls {
            command
                .arg("--cacert")
                .arg(ca)
                .arg("--cert")
                .arg(&client.cert)
                .arg("--key")
                .arg(&client.key);
        }
        let output = command.args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Kills member `index` with SIGKILL.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Every member's log, for a failed test's message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|member| {
                let log = std::fs::read_to_string(&member.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}", member.name, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}
