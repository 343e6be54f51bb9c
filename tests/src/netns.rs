//! Network namespaces as the tests' other hosts: an "outside" host joined to
//! this one by a veth pair (the uplink that NAT egress and port forwards
//! use), and commands run inside it. Removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace, deleted (with what is inside) on drop.
pub struct NetNs {
    pub name: String,
    /// The host end of the veth pair, if any.
    host_link: Option<String>,
}

impl NetNs {
    /// Creates namespace `name` with its loopback up.
    pub fn create(name: &str) -> Self {
        Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status()
            .ok();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Self {
            name: name.to_string(),
            host_link: None,
        }
    }

    /// Runs `work` on a thread that has entered this namespace's network
    /// (see [`enter`]): sockets it opens are the namespace's.
    pub fn within<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name);
            work()
        })
        .join()
        .expect("the thread in the namespace")
    }

    /// Joins the namespace to this host with a veth pair: `host_link` with
    /// `host_cidr` here, `inner_cidr` on `eth0` inside.
    pub fn link_to_host(&mut self, host_link: &str, host_cidr: &str, inner_cidr: &str) {
        Command::new("ip")
            .args(["link", "del", host_link])
            .stderr(Stdio::null())
            .status()
            .ok();
        ip(&[
            "link", "add", host_link, "type", "veth", "peer", "name", "eth0", "netns", &self.name,
        ]);
        self.host_link = Some(host_link.to_string());
        ip(&["addr", "add", host_cidr, "dev", host_link]);
        ip(&["link", "set", host_link, "up"]);
        ip(&["-n", &self.name, "addr", "add", inner_cidr, "dev", "eth0"]);
        ip(&["-n", &self.name, "link", "set", "eth0", "up"]);
    }

    /// Joins this namespace to `other` with a veth pair: `here` with
    /// `here_cidr` in this one, `there` with `there_cidr` in the other (the
    /// pair goes with the namespaces).
    pub fn link_to(
        &self,
        other: &NetNs,
        here: &str,
        here_cidr: &str,
        there: &str,
        there_cidr: &str,
    ) {
        ip(&[
            "-n",
            &self.name,
            "link",
            "add",
            here,
            "type",
            "veth",
            "peer",
            "name",
            there,
            "netns",
            &other.name,
        ]);
        ip(&["-n", &self.name, "addr", "add", here_cidr, "dev", here]);
        ip(&["-n", &self.name, "link", "set", here, "up"]);
        ip(&["-n", &other.name, "addr", "add", there_cidr, "dev", there]);
        ip(&["-n", &other.name, "link", "set", there, "up"]);
    }

    /// Cuts the veth pair to this host (as a pulled cable would), or
    /// restores it.
    pub fn set_host_link_up(&self, up: bool) {
        let link = self
            .host_link
            .as_deref()
            .expect("a namespace linked to the host");
        ip(&["link", "set", link, if up { "up" } else { "down" }]);
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `program args` inside and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("run {program} in {}: {err}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Some(link) = &self.host_link {
            Command::new("ip")
                .args(["link", "del", link])
                .stderr(Stdio::null())
                .status()
                .ok();
        }
        Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status()
            .ok();
    }
}

/// Moves the calling thread (only it: setns acts per thread) into the
/// network of namespace `name`; sockets it opens then are the
/// namespace's.
pub fn enter(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path).unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
    // SAFETY: setns on a descriptor of a network namespace file moves only
    // the calling thread into it; the descriptor is open for the call.
    let entered =
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    assert_eq!(
        entered,
        0,
        "setns into {path}: {}",
        std::io::Error::last_os_error()
    );
}

/// A simulated host: namespace `name` (made unique per test process) with
/// a management link to this namespace, 10.97.`subnet`.1/30 here and .2 in
/// it, over which the tests reach its agent.
pub fn simulated_host(name: &str, subnet: u8) -> NetNs {
    let mut netns = NetNs::create(&crate::net::interface_name(name));
    netns.link_to_host(
        &crate::net::interface_name(&format!("{name}m")),
        &format!("10.97.{subnet}.1/30"),
        &format!("10.97.{subnet}.2/30"),
    );
    netns
}

/// An HTTP server on port `port` inside a namespace (python3's
/// http.server): `GET /whoami` answers the client's address as the server
/// sees it (to check NAT), `GET /go` answers "go" once `flag` exists and
/// "wait" before (to release guests that wait for the test), `GET
/// /go-NAME` the same for `flag` with `-NAME` appended (a later step).
pub struct OutsideServer {
    child: Child,
    pub flag: PathBuf,
}

impl OutsideServer {
    pub fn start(netns: &NetNs, port: u16, flag: PathBuf) -> Self {
        let script = format!(
            r#"
import http.server, os, re
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/whoami":
            body = self.client_address[0]
        elif re.fullmatch(r"/go(-[a-z0-9]+)?", self.path):
            body = "go" if os.path.exists({flag:?} + self.path[3:]) else "wait"
        else:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", {port}), Handler).serve_forever()
"#,
            flag = flag.display().to_string(),
        );
        let child = netns
            .command("python3")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the outside HTTP server");
        Self { child, flag }
    }

    /// Lets waiting guests go on.
    pub fn release(&self) {
        std::fs::write(&self.flag, b"go").expect("write the go flag");
    }

    /// Lets guests waiting on `/go-NAME` go on.
    pub fn release_named(&self, name: &str) {
        let mut flag = self.flag.clone().into_os_string();
        flag.push(format!("-{name}"));
        std::fs::write(flag, b"go").expect("write the go flag");
    }
}

impl Drop for OutsideServer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
