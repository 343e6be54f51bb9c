//! Running a real `nubis-agent` for the tests, and a small HTTP/1.1 client
//! for its API (one request per connection, JSON in and out). Request
//! bodies are nubis-api's types ([`Agent::send`], [`Agent::create`]); a test
//! that sends what those types cannot express (an unknown field, a wrong
//! type) passes a raw `serde_json::Value` to [`Agent::call`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nubis_api::{
    HostIdentity, Image, ImageCreate, Migration, MigrationCreate, Peer, PeerCreate, Quota, Tenant,
    TenantCreate, TokenCreated, Vm, VmCreate, VmNicCreate,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// An agent owns its host's tenant bridges (`nbn*`, `nbr*`), its nftables
/// tables and DHCP port: two agents in one network namespace would take
/// the same bridge names and replace each other's rules. Every test that
/// starts an agent holds this for its whole run (one agent per host, as in
/// production); tests in other network namespaces are separate hosts.
static HOST_NETWORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held by a test while its agent runs in this network namespace: the
/// mutex for tests of this process, and an exclusive `flock` on
/// `/run/nubis-agent-tests.lock` for tests of other processes (two test
/// binaries run by hand at once wait for each other instead of replacing
/// each other's rules).
pub struct HostNetwork {
    _file: std::fs::File,
    _guard: std::sync::MutexGuard<'static, ()>,
}

pub fn one_agent_per_host() -> HostNetwork {
    // A test that failed while holding it leaves it poisoned, not wrong.
    let guard = HOST_NETWORK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/nubis-agent-tests.lock")
        .expect("open /run/nubis-agent-tests.lock");
    // SAFETY: flock on a descriptor this function owns; it blocks until
    // the lock is free and is released when the file is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock /run/nubis-agent-tests.lock: {}",
        std::io::Error::last_os_error()
    );
    HostNetwork {
        _file: file,
        _guard: guard,
    }
}

/// The operator token the tests' agents run with.
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";

/// A free TCP port on localhost for an agent's API: below the agent's
/// default port forward and migration ranges (30000-40999), which it
/// refuses to listen in, and below the kernel's ephemeral ports.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Where the next search for free ports starts, so that tests of one
/// process running at once never get the same port (a port is free when
/// found, and taken only when its server starts).
static NEXT_PORT_STEP: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// `count` distinct ports in 20000-28999 that are free now and that no
/// other caller in this process was given.
pub fn free_ports(count: usize) -> Vec<u16> {
    use std::sync::atomic::Ordering;
    let base = (std::process::id() % 9000) as u16;
    let mut ports = Vec::with_capacity(count);
    while ports.len() < count {
        let step = NEXT_PORT_STEP.fetch_add(1, Ordering::SeqCst);
        assert!(step < 9000, "no free port left in 20000-28999");
        let port = 20000 + (base + step) % 9000;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// An API response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The error code of an error reply.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// The request field an error reply names.
    pub fn field(&self) -> Option<&str> {
        self.body["error"]["field"].as_str()
    }
}

/// `reply` is a 400 `invalid_input` that names `field`.
pub fn assert_invalid(reply: &Reply, field: &str) {
    assert_eq!(
        (reply.status, reply.code(), reply.field()),
        (400, "invalid_input", Some(field)),
        "expected 400 for {field}: {reply:?}"
    );
}

/// `reply` is a 422 `unprocessable` that names `field`: valid by the API's
/// document, but naming what the tenant does not have or this host does
/// not allow.
pub fn assert_unprocessable(reply: &Reply, field: &str) {
    assert_eq!(
        (reply.status, reply.code(), reply.field()),
        (422, "unprocessable", Some(field)),
        "expected 422 for {field}: {reply:?}"
    );
}

/// One HTTP request to `address`.
pub fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    try_http(address, method, path, token, body).unwrap_or_else(|| {
        panic!("{method} {path}: the agent closed the connection without a reply")
    })
}

/// One HTTP request to `address`; None when the connection closes with no
/// reply (an agent that died meanwhile).
pub fn try_http(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Option<Reply> {
    let payload = body.map(Value::to_string);
    send(
        address,
        method,
        path,
        token,
        payload
            .as_deref()
            .map(|payload| ("application/json", payload.as_bytes())),
    )
}

/// One HTTP request with a raw `body` (an upload).
pub fn http_raw(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Reply {
    send(
        address,
        method,
        path,
        token,
        Some(("application/octet-stream", body)),
    )
    .unwrap_or_else(|| panic!("{method} {path}: the agent closed the connection without a reply"))
}

fn send(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> Option<Reply> {
    let mut stream = TcpStream::connect(address)
        .unwrap_or_else(|err| panic!("connect to the agent at {address}: {err}"));
    stream.set_read_timeout(Some(Duration::from_secs(300))).ok();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let payload = match body {
        Some((content_type, payload)) => {
            request.push_str(&format!("Content-Type: {content_type}\r\n"));
            payload
        }
        None => &[][..],
    };
    request.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    // The agent may answer (and close) before it has read a refused body.
    let _ = stream.write_all(payload);
    let mut raw = Vec::new();
    if stream.read_to_end(&mut raw).is_err() || raw.is_empty() {
        return None;
    }
    Some(parse_reply(&raw))
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("an HTTP reply with headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(key, value)| {
        key.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    let text = String::from_utf8_lossy(&body).to_string();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        body,
        text,
        headers,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// A running agent, killed (SIGKILL, as a crash would) on drop.
pub struct Agent {
    /// Where the tests reach its API.
    pub address: SocketAddr,
    pub data_dir: PathBuf,
    pub operator_token: String,
    child: Option<Child>,
    log: PathBuf,
}

/// An agent on another simulated host: inside network namespace `netns`,
/// serving on every address of it at `port` (the tests reach it at
/// `reach`), with its own operator token and underlay address.
pub struct RemoteHost<'a> {
    pub netns: &'a str,
    pub port: u16,
    pub reach: std::net::Ipv4Addr,
    pub operator_token: &'a str,
    pub underlay: std::net::Ipv4Addr,
}

impl Agent {
    /// Starts an agent on a free port with `data_dir`, allowed to use
    /// images from `image_dir`.
    pub fn start(data_dir: &Path, image_dir: &Path) -> Self {
        Self::start_with(data_dir, image_dir, &Value::Null)
    }

    /// [`Agent::start`] with `settings` (a JSON object) added to its
    /// config file.
    pub fn start_with(data_dir: &Path, image_dir: &Path, settings: &Value) -> Self {
        Self::start_local(data_dir, image_dir, settings, None)
    }

    /// [`Agent::start_with`] with `NUBIS_AGENT_CRASH_AT=step` (see
    /// host-agent/src/crash.rs, debug builds): it kills itself with
    /// SIGKILL when it reaches that step.
    pub fn start_crashing(data_dir: &Path, image_dir: &Path, settings: &Value, step: &str) -> Self {
        Self::start_local(data_dir, image_dir, settings, Some(step))
    }

    /// An agent on loopback, on a free port.
    fn start_local(
        data_dir: &Path,
        image_dir: &Path,
        settings: &Value,
        crash_at: Option<&str>,
    ) -> Self {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::launch(
            data_dir,
            image_dir,
            None,
            address,
            address,
            OPERATOR_TOKEN,
            None,
            settings,
            crash_at,
            &[],
        )
    }

    /// A request that is expected to crash the agent (see
    /// [`Agent::start_crashing`]); its reply if it answered anyway.
    pub fn call_crashing(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Option<Reply> {
        try_http(self.address, method, path, token, body)
    }

    /// Waits for the agent to have died (its crash hook, or a kill) and
    /// lets it go without killing the VMMs it started, which its restarted
    /// self must find: (how it exited, its log).
    pub fn crashed(mut self) -> (Option<std::process::ExitStatus>, String) {
        let status = self.child.take().and_then(|mut child| child.wait().ok());
        let log = self.log();
        // Its Drop would kill the VMMs and remove their cgroups.
        std::mem::forget(self);
        (status, log)
    }

    /// Stops the agent as a service manager does (SIGTERM, then waits for
    /// it to exit), leaving the VMMs it started running for its next start
    /// to adopt: (how it exited, its log).
    pub fn stop_gracefully(self) -> (Option<std::process::ExitStatus>, String) {
        if let Some(child) = &self.child {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill with the pid of our own child (not yet
                // waited for, so not reused) and a fixed signal.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        self.crashed()
    }

    /// Starts an agent as another host (see [`RemoteHost`]).
    pub fn start_remote(data_dir: &Path, image_dir: &Path, host: &RemoteHost) -> Self {
        Self::launch_remote(data_dir, image_dir, host, None)
    }

    /// [`Agent::start_remote`] with a crash hook (see
    /// [`Agent::start_crashing`]).
    pub fn start_remote_crashing(
        data_dir: &Path,
        image_dir: &Path,
        host: &RemoteHost,
        step: &str,
    ) -> Self {
        Self::launch_remote(data_dir, image_dir, host, Some(step))
    }

    fn launch_remote(
        data_dir: &Path,
        image_dir: &Path,
        host: &RemoteHost,
        crash_at: Option<&str>,
    ) -> Self {
        Self::launch(
            data_dir,
            image_dir,
            Some(host.netns),
            SocketAddr::from(([0, 0, 0, 0], host.port)),
            SocketAddr::from((host.reach, host.port)),
            host.operator_token,
            Some(host.underlay),
            &Value::Null,
            crash_at,
            &[],
        )
    }

    /// Starts an agent as another host (see [`RemoteHost`]) that joins a
    /// cluster: `args` are its cluster flags (`--cluster`, `--host-name`,
    /// ...), `settings` more of its config file.
    pub fn start_member(
        data_dir: &Path,
        image_dir: &Path,
        host: &RemoteHost,
        settings: &Value,
        args: &[String],
    ) -> Self {
        Self::launch(
            data_dir,
            image_dir,
            Some(host.netns),
            SocketAddr::from(([0, 0, 0, 0], host.port)),
            SocketAddr::from((host.reach, host.port)),
            host.operator_token,
            Some(host.underlay),
            settings,
            None,
            args,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        data_dir: &Path,
        image_dir: &Path,
        netns: Option<&str>,
        listen: SocketAddr,
        address: SocketAddr,
        operator_token: &str,
        underlay: Option<std::net::Ipv4Addr>,
        settings: &Value,
        crash_at: Option<&str>,
        args: &[String],
    ) -> Self {
        std::fs::create_dir_all(data_dir).expect("create the data dir");
        let config = data_dir.join("agent.json");
        // The agent's config file: host-agent's type, not the API's.
        let mut document = serde_json::json!({
            "vmm_binary": crate::vmm_binary(),
            "parent_cgroup": parent_cgroup(data_dir),
            "image_dirs": [image_dir],
            "stop_timeout_s": 60,
        });
        if let (Some(document), Some(settings)) = (document.as_object_mut(), settings.as_object()) {
            document.extend(settings.clone());
        }
        std::fs::write(&config, document.to_string()).expect("write the agent config");
        // Appended to: a restarted agent's log follows the crashed one's.
        let log = data_dir.join("agent.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("create the agent log");
        let agent_binary = crate::workspace_binary("nubis-agent");
        let mut command = match netns {
            Some(netns) => {
                // Only the network namespace changes, as on a real host: `ip
                // netns exec` would also remount /sys and so hide the
                // cgroup hierarchies that the agent jails its VMMs in.
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg("--")
                    .arg(agent_binary);
                command
            }
            None => Command::new(agent_binary),
        };
        if let Some(underlay) = underlay {
            command.arg("--underlay-address").arg(underlay.to_string());
        }
        if let Some(step) = crash_at {
            command.env("NUBIS_AGENT_CRASH_AT", step);
        }
        let child = command
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("NUBIS_OPERATOR_TOKEN", operator_token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start nubis-agent");
        let agent = Self {
            address,
            data_dir: data_dir.to_path_buf(),
            operator_token: operator_token.to_string(),
            child: Some(child),
            log,
        };
        let start = Instant::now();
        while TcpStream::connect(address).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the agent did not listen on {address}:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A request with no body, or with a raw JSON one: a test's
    /// deliberately untyped body (see [`Agent::send`] for the others).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        http(self.address, method, path, token, body)
    }

    /// A request with `body`, one of nubis-api's request types, as JSON.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &impl Serialize,
    ) -> Reply {
        self.call(method, path, token, Some(&json_body(body)))
    }

    /// `POST path` of `body` as `token`, which must create (201): what it
    /// created.
    pub fn create<T: DeserializeOwned>(&self, path: &str, token: &str, body: &impl Serialize) -> T {
        expect_as(&self.send("POST", path, Some(token), body), 201)
    }

    /// `GET path` as `token`, which must answer 200.
    pub fn get<T: DeserializeOwned>(&self, path: &str, token: &str) -> T {
        expect_as(&self.call("GET", path, Some(token), None), 200)
    }

    /// Kills the agent with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// The cgroup that the VMs of the agent with data directory `data_dir` are
/// jailed under: one per test agent (the same after its restart), so that
/// tests find their own VMMs and leave nothing behind.
pub fn parent_cgroup(data_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut hasher);
    format!("nubis-test-{:016x}", hasher.finish())
}

/// Pids of the processes in the cgroups under `parent` (only VM `vm`'s
/// when given), read from every process's `/proc/PID/cgroup`.
pub fn jailed_pids(parent: &str, vm: Option<&str>) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let wanted = match vm {
        Some(vm) => format!("/{parent}/{vm}"),
        None => format!("/{parent}/"),
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_string_lossy().parse().ok()?;
            let cgroups = std::fs::read_to_string(entry.path().join("cgroup")).ok()?;
            cgroups
                .lines()
                .any(|line| match vm {
                    Some(_) => line.ends_with(&wanted),
                    None => line.contains(&wanted),
                })
                .then_some(pid)
        })
        .collect()
}

/// The pid of VM `vm`'s VMM, started by the agent with data directory
/// `data_dir`, while it runs.
pub fn vmm_pid(data_dir: &Path, vm: &str) -> Option<i32> {
    jailed_pids(&parent_cgroup(data_dir), Some(vm))
        .into_iter()
        .next()
}

/// Removes the (empty) cgroups under `parent`, in every hierarchy.
fn remove_cgroups(parent: &str) {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|entry| entry.path()));
    }
    for root in roots {
        let dir = root.join(parent);
        let Ok(children) = std::fs::read_dir(&dir) else {
            continue;
        };
        let children: Vec<PathBuf> = children
            .flatten()
            .map(|child| child.path())
            .filter(|child| child.is_dir())
            .collect();
        // A cgroup stays busy for a moment after its last process exited.
        let deadline = Instant::now() + Duration::from_secs(5);
        for path in children.iter().chain(std::iter::once(&dir)) {
            while std::fs::remove_dir(path)
                .is_err_and(|err| err.raw_os_error() == Some(libc::EBUSY))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Pids of the processes whose command line mentions a path under `dir`.
fn processes_under(dir: &Path) -> Vec<i32> {
    let wanted = dir.as_os_str().as_encoded_bytes().to_vec();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|byte| *byte == 0)
                .any(|arg| arg.starts_with(&wanted))
                .then_some(pid)
        })
        .collect()
}

impl Drop for Agent {
    /// The agent, and the VMMs it started (they outlive an agent by
    /// design) with their cgroups: a test that fails midway leaves no
    /// guest running.
    fn drop(&mut self) {
        self.kill();
        let parent = parent_cgroup(&self.data_dir);
        for pid in processes_under(&self.data_dir)
            .into_iter()
            .chain(jailed_pids(&parent, None))
        {
            // SAFETY: kill with a pid read from /proc and a fixed signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Killed processes leave their cgroups a moment later.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !jailed_pids(&parent, None).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        remove_cgroups(&parent);
    }
}

/// Hang guard for a Linux boot through the agent (and a guest's script
/// after it), not a timing assertion: three guests booting at once on two
/// emulated cores reach user space after three minutes or more (one
/// guest's boot has taken from 27 s to 90 s on this kind of shared machine).
pub const BOOT_GUARD: Duration = Duration::from_secs(900);

/// The body of `reply`, which must have `status`.
pub fn expect(reply: &Reply, status: u16) -> &Value {
    assert_eq!(reply.status, status, "{reply:?}");
    &reply.body
}

/// The body of `reply`, which must have `status`, as `T` (one of
/// nubis-api's response types).
pub fn expect_as<T: DeserializeOwned>(reply: &Reply, status: u16) -> T {
    serde_json::from_value(expect(reply, status).clone()).unwrap_or_else(|err| {
        panic!(
            "the body is not a {}: {err}: {reply:?}",
            std::any::type_name::<T>()
        )
    })
}

/// One of nubis-api's request types as the JSON body that [`Agent::call`]
/// takes: for a test that picks among bodies of different types.
pub fn json_body(request: &impl Serialize) -> Value {
    serde_json::to_value(request).expect("a request body serializes")
}

/// A host path as an API request names it.
pub fn host_path(path: &Path) -> String {
    path.to_str().expect("a UTF-8 test path").to_string()
}

/// A new tenant `name` with the default quota and a token of its: (tenant
/// id, token).
pub fn tenant(agent: &Agent, name: &str) -> (String, String) {
    new_tenant(agent, name, None)
}

/// A new tenant `name` with `quota` and a token of its: (tenant id, token).
pub fn tenant_with_quota(agent: &Agent, name: &str, quota: Quota) -> (String, String) {
    new_tenant(agent, name, Some(quota))
}

fn new_tenant(agent: &Agent, name: &str, quota: Option<Quota>) -> (String, String) {
    let body = TenantCreate {
        name: name.to_string(),
        quota,
    };
    let tenant: Tenant = agent.create("/v1/tenants", &agent.operator_token, &body);
    let token = tenant_token(agent, &tenant.id);
    (tenant.id, token)
}

/// A new token of tenant `id`.
pub fn tenant_token(agent: &Agent, id: &str) -> String {
    let operator = Some(agent.operator_token.as_str());
    let token = agent.call("POST", &format!("/v1/tenants/{id}/tokens"), operator, None);
    expect_as::<TokenCreated>(&token, 201).token
}

/// Registers `peer` (an agent at underlay `address`) with `agent` as
/// host `name`, by the fingerprint `peer` shows for itself.
pub fn register_peer(agent: &Agent, name: &str, address: std::net::Ipv4Addr, peer: &Agent) -> Peer {
    let identity: HostIdentity = peer.get("/v1/host-identity", &peer.operator_token);
    let body = PeerCreate {
        name: name.to_string(),
        address: address.to_string(),
        fingerprint: identity.fingerprint,
        peer_port: None,
    };
    agent.create("/v1/peers", &agent.operator_token, &body)
}

/// Registers the test guest image as "busybox" for `token`'s tenant, with
/// a writable root (guests write their test files to it).
pub fn busybox_image(agent: &Agent, token: &str, images: &crate::GuestImages) -> Image {
    let body = ImageCreate {
        name: "busybox".to_string(),
        kernel: host_path(&images.vmlinux),
        rootfs: host_path(&images.rootfs),
        initrd: None,
        cmdline: format!("{} root=/dev/vda rw", images.cmdline),
    };
    agent.create("/v1/images", token, &body)
}

/// Defines VM `name` of the busybox image (see [`busybox_image`]) with one
/// NIC on `network`, running `script` as its init's command.
pub fn network_vm(agent: &Agent, token: &str, name: &str, network: &str, script: &str) -> Vm {
    let body = VmCreate {
        memory_mib: 128,
        kernel_args: format!("nubis_cmd=\"{script}\""),
        nics: vec![VmNicCreate::on_network(network)],
        ..VmCreate::new(name, "busybox")
    };
    agent.create("/v1/vms", token, &body)
}

/// Moves VM `vm` of `token`'s tenant from `agent` to peer host `host`
/// (see [`register_peer`]) and waits for the move to end, for at most
/// `guard`: its last progress, whether it completed or not.
pub fn migrate(agent: &Agent, token: &str, vm: &str, host: &str, guard: Duration) -> Migration {
    let started = agent.send(
        "POST",
        &format!("/v1/vms/{vm}/migration"),
        Some(token),
        &MigrationCreate::new(host),
    );
    assert_eq!(started.status, 202, "{started:?}");
    wait_for_migration(agent, token, vm, guard)
}

/// Waits, for at most `guard`, until the migration of `vm` from `agent`
/// has ended: its last progress.
pub fn wait_for_migration(agent: &Agent, token: &str, vm: &str, guard: Duration) -> Migration {
    let start = Instant::now();
    loop {
        let progress: Migration = agent.get(&format!("/v1/vms/{vm}/migration"), token);
        if progress.is_over() {
            return progress;
        }
        assert!(
            start.elapsed() < guard,
            "the migration never ended: {progress:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value after `key ` on the console's line that starts with `key`.
pub fn console_value<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key} ")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} line on the console:\n{console}"))
}

/// Polls `vm`'s console until it contains `needle`; returns the console.
pub fn wait_for_console(agent: &Agent, token: &str, vm: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let reply = agent.call("GET", &format!("/v1/vms/{vm}/console"), Some(token), None);
        assert_eq!(reply.status, 200, "{reply:?}");
        if reply.text.contains(needle) {
            return reply.text;
        }
        assert!(
            start.elapsed() < BOOT_GUARD,
            "{needle} never appeared on {vm}'s console:\n{}\nagent log:\n{}",
            reply.text,
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An image directory holding the counting test guest as a kernel
/// ([`crate::guest::Program::count`]) and a zeroed 1 MiB root disk: the
/// agent tests' VM in milliseconds.
pub struct CounterImages {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

impl CounterImages {
    /// Writes them into `DIR/images`.
    pub fn new(dir: &crate::TestDir) -> Self {
        let images = dir.join("images");
        std::fs::create_dir_all(&images).expect("create the image directory");
        let kernel = images.join("count.elf");
        crate::guest::Program::new().count(20_000).write(&kernel);
        let rootfs = images.join("root.img");
        std::fs::write(&rootfs, vec![0u8; 1 << 20]).expect("write the root disk");
        Self {
            dir: images,
            kernel,
            rootfs,
        }
    }

    /// Registers image `name` (`kernel` or the counter's) with the tenant
    /// of `token`.
    pub fn register(&self, agent: &Agent, token: &str, name: &str, kernel: Option<&Path>) -> Image {
        let body = ImageCreate {
            name: name.to_string(),
            kernel: host_path(kernel.unwrap_or(&self.kernel)),
            rootfs: host_path(&self.rootfs),
            initrd: None,
            cmdline: String::new(),
        };
        agent.create("/v1/images", token, &body)
    }

    /// A new tenant `name` with the counter registered as its image
    /// "counter" (see [`counter_vm`]): (tenant id, token).
    pub fn tenant(&self, agent: &Agent, name: &str) -> (String, String) {
        let (id, token) = tenant(agent, name);
        self.register(agent, &token, "counter", None);
        (id, token)
    }
}

/// A request for VM `name` of the image "counter" (see
/// [`CounterImages::tenant`]), with 32 MiB.
pub fn counter_vm(name: &str) -> VmCreate {
    VmCreate {
        memory_mib: 32,
        ..VmCreate::new(name, "counter")
    }
}

/// A well-formed ed25519 public key line (its key bytes made up).
pub const TEST_SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g alice@laptop";

/// Registers [`TEST_SSH_KEY`] as `name` for the tenant of `token`.
pub fn ssh_key(agent: &Agent, token: &str, name: &str) -> nubis_api::SshKey {
    agent.create(
        "/v1/ssh-keys",
        token,
        &nubis_api::SshKeyCreate {
            name: name.into(),
            public_key: TEST_SSH_KEY.into(),
        },
    )
}

/// Runs `command` in running VM `vm` through its guest agent
/// (`POST /v1/vms/{id}/exec`): its stdout, once it exited 0.
pub fn exec_stdout(agent: &Agent, token: &str, vm: &str, command: &str) -> String {
    let reply = agent.send(
        "POST",
        &format!("/v1/vms/{vm}/exec"),
        Some(token),
        &nubis_api::VmExec {
            command: command.into(),
            timeout_s: Some(120),
        },
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let mut stdout = String::new();
    for line in reply.text.lines() {
        match serde_json::from_str::<nubis_api::ExecEvent>(line) {
            Ok(nubis_api::ExecEvent::Stdout { data }) => stdout.push_str(&data),
            Ok(nubis_api::ExecEvent::Exit { code: 0 }) => return stdout,
            Ok(nubis_api::ExecEvent::Stderr { .. }) => {}
            other => panic!("{vm}: {other:?} in {}", reply.text),
        }
    }
    panic!("{vm}: no exit in {}", reply.text)
}

/// The value of the line of `output` starting with `key=`.
pub fn keyed_value<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in:\n{output}"))
}
