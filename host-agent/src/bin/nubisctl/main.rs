//! `nubisctl`: the host agent's CLI. Every endpoint, human output by
//! default and the API's JSON with `--json`; a spinner while it waits on
//! long operations (starting, stopping, waiting for a guest's console).

mod client;
mod output;
mod rollout;
mod services;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use nubis_api::{
    AntiAffinity, AntiAffinityScope, DrainPolicy, HostDrain, HostLossPolicy, ImageCreate,
    MigrationCreate, NetworkCreate, PlacementStrategy, PortForwardCreate, Protocol, Quota,
    RateLimit, SnapshotRestore, TenantCreate, VmDisk, VmNicCreate, VmPlacement,
};
use serde_json::Value;

use client::{Client, ClientError};

#[derive(Debug, Parser)]
#[command(name = "nubisctl", version, about = "Control a Nubis host agent")]
struct Cli {
    /// The agent's URL.
    #[arg(
        long,
        env = "NUBIS_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// Bearer token (the operator's or a tenant's).
    #[arg(long, env = "NUBIS_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The agent's health.
    Health,
    /// Tenants (operator).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API tokens of a tenant (operator).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// SSH public keys that VMs are created with (given to the guest by
    /// the metadata service).
    #[command(subcommand)]
    SshKey(SshKeyCommand),
    /// microVMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Files uploaded for images.
    #[command(subcommand)]
    Upload(UploadCommand),
    /// Virtual networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Host ports forwarded to VMs.
    #[command(subcommand)]
    PortForward(PortForwardCommand),
    /// Peer hosts that networks span (operator).
    #[command(subcommand)]
    Peer(PeerCommand),
    /// The cluster's hosts: state, capacity, labels, the controller
    /// (operator).
    #[command(subcommand)]
    Host(HostCommand),
    /// Snapshots of VMs.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Services: roles of identical VMs the controller keeps at their
    /// count, spread, health-checked and upgraded one update domain at a
    /// time (cluster).
    #[command(subcommand)]
    Service(services::ServiceCommand),
    /// The agent's Prometheus metrics (operator).
    Metrics,
    /// The agent's OpenAPI document.
    Openapi,
}

#[derive(Debug, Subcommand)]
enum UploadCommand {
    /// Uploads one local file under NAME.
    Put {
        name: String,
        file: std::path::PathBuf,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    Create {
        name: String,
        /// IPv4 CIDR, /16 to /29.
        #[arg(long)]
        cidr: String,
        /// NAT egress to the host's uplink.
        #[arg(long)]
        nat: bool,
        /// No DHCP: guests get their address from the kernel command line.
        #[arg(long)]
        no_dhcp: bool,
        /// A DNS server handed out by DHCP (repeatable; the host's by default).
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long)]
        mtu: Option<u16>,
        /// A peer host (see `nubisctl peer`) that carries the network too
        /// (repeatable): the network spans the hosts over VXLAN.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
    List,
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Snapshots a running or paused VM (it runs on).
    Create {
        vm: String,
    },
    List,
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
    /// A new VM that resumes from the snapshot when started.
    Restore {
        id: String,
        /// The new VM's name.
        #[arg(long)]
        name: String,
    },
    /// New VMs restored from the snapshot at once and started, each with
    /// its own MAC, address, hostname and RNG seed, their memory shared
    /// copy-on-write; named PREFIX-1 ... PREFIX-N.
    Clone {
        id: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, value_name = "PREFIX")]
        name_prefix: String,
    },
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Every member: state, roles, capacity and usage, labels, and which
    /// is the controller.
    List,
    Show {
        name: String,
    },
    /// No new VMs are placed on the host; its VMs run on.
    Cordon {
        name: String,
    },
    /// Takes the host back into service (ends its drain).
    Uncordon {
        name: String,
    },
    /// Cordons the host and moves its running VMs away, each as its
    /// --on-drain says; waits until nothing is left to move, showing how
    /// it goes.
    Drain {
        name: String,
        /// Moves from this host at once (1 to 16; 2 by default).
        #[arg(long)]
        max_parallel: Option<u32>,
        /// Return at once instead of waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Forgets a member that is down for good (its name is free again).
    Forget {
        name: String,
    },
    /// Restarts every host's agent, one update domain at a time, waiting
    /// after each until its agents, their VMs and the services are healthy
    /// again (to upgrade the agent; VMs run on across a restart). Refused
    /// while a host is down (operator).
    Rollout(rollout::RolloutFlags),
}

#[derive(Debug, Subcommand)]
enum PeerCommand {
    /// Registers a peer agent: its underlay address (where its VXLAN
    /// tunnels end and its peer API listens) and its certificate's
    /// fingerprint (`nubisctl peer identity` on that host).
    Add {
        name: String,
        /// The peer's underlay IPv4 address.
        #[arg(long)]
        address: String,
        /// The SHA-256 fingerprint of the peer's certificate.
        #[arg(long)]
        fingerprint: String,
        /// The peer API's port (7443 by default).
        #[arg(long)]
        peer_port: Option<u16>,
    },
    /// This host's fingerprint and peer address, for its peers' operators.
    Identity,
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum PortForwardCommand {
    /// Forwards HOST_PORT on the host's addresses to VM_PORT of a VM.
    Create {
        vm: String,
        #[arg(long)]
        host_port: u16,
        #[arg(long)]
        vm_port: u16,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// The VM's NIC, by index.
        #[arg(long, default_value_t = 0)]
        nic: usize,
    },
    List,
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    Create {
        name: String,
        #[arg(long)]
        max_vcpus: Option<u32>,
        #[arg(long)]
        max_memory_mib: Option<u64>,
        #[arg(long)]
        max_vms: Option<u32>,
    },
    List,
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Creates a token; the secret is printed once.
    Create {
        tenant: String,
    },
    List {
        tenant: String,
    },
    Delete {
        tenant: String,
        token: String,
    },
}

#[derive(Debug, Subcommand)]
enum SshKeyCommand {
    /// Registers a public key (an OpenSSH `.pub` file's line).
    Create {
        name: String,
        /// The public key file, e.g. ~/.ssh/id_ed25519.pub.
        #[arg(long, value_name = "FILE")]
        public_key_file: std::path::PathBuf,
    },
    List,
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Registers an image from files on the agent's host.
    Create {
        name: String,
        #[arg(long)]
        kernel: String,
        #[arg(long)]
        rootfs: String,
        #[arg(long)]
        initrd: Option<String>,
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        cmdline: String,
    },
    /// Uploads local files to the agent and registers an image from them.
    Upload {
        name: String,
        #[arg(long)]
        kernel: std::path::PathBuf,
        #[arg(long)]
        rootfs: std::path::PathBuf,
        #[arg(long)]
        initrd: Option<std::path::PathBuf>,
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        cmdline: String,
    },
    List,
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Args)]
struct VmCreate {
    name: String,
    #[arg(long)]
    image: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    kernel_args: String,
    /// A data disk: SIZE_MIB[,bw=BYTES_PER_S][,iops=N] (repeatable).
    #[arg(long)]
    disk: Vec<String>,
    /// A NIC: "" (the tenant's bridge) or
    /// [network=NAME][,bw=BYTES_PER_S][,pps=N] (repeatable).
    #[arg(long)]
    nic: Vec<String>,
    /// Cluster: labels the host must carry, KEY=VALUE[,KEY=VALUE...].
    #[arg(long, value_name = "LABELS")]
    require: Option<String>,
    /// Cluster: no two VMs of this group on one host.
    #[arg(long, value_name = "GROUP")]
    anti_affinity: Option<String>,
    /// Cluster: with --anti-affinity, no two in one fault domain instead.
    #[arg(long, requires = "anti_affinity")]
    per_fault_domain: bool,
    /// Cluster: with --anti-affinity, spread as far as the hosts allow
    /// but never stay pending for it.
    #[arg(long, requires = "anti_affinity")]
    anti_affinity_preferred: bool,
    /// Cluster: the member to run on.
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Cluster: fill the fullest host that fits instead of spreading.
    #[arg(long)]
    bin_pack: bool,
    /// Cluster: what draining its host does with it while it runs.
    #[arg(long, value_enum, default_value_t = OnDrain::LiveMigrate)]
    on_drain: OnDrain,
    /// Cluster: start it afresh on another host when its host is lost
    /// (instead of waiting for the host).
    #[arg(long)]
    restart_on_host_loss: bool,
    /// Start the VM once it is defined (on its host, in a cluster).
    #[arg(long)]
    start: bool,
    /// An SSH key (id or name, see `nubisctl ssh-key`) the guest is given
    /// (repeatable).
    #[arg(long, value_name = "KEY")]
    ssh_key: Vec<String>,
    /// A tag the guest can read, KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    tag: Vec<String>,
    /// A file the guest reads as its user data (a `#!` script runs at the
    /// first boot of the Nubis images), at most 64 KiB.
    #[arg(long, value_name = "FILE")]
    user_data_file: Option<std::path::PathBuf>,
}

/// `--on-drain`: [`DrainPolicy`] on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OnDrain {
    /// Moved by live migration, disks and all.
    LiveMigrate,
    /// Stopped, and started on another host from its image.
    Restart,
    /// Stopped where it is.
    Stop,
}

impl From<OnDrain> for DrainPolicy {
    fn from(value: OnDrain) -> Self {
        match value {
            OnDrain::LiveMigrate => DrainPolicy::LiveMigrate,
            OnDrain::Restart => DrainPolicy::Restart,
            OnDrain::Stop => DrainPolicy::Stop,
        }
    }
}

impl VmCreate {
    /// The placement the flags ask for.
    fn placement(&self) -> Result<VmPlacement, String> {
        let require = match &self.require {
            Some(text) => {
                nubis_placement::parse_labels(text).map_err(|err| format!("--require: {err}"))?
            }
            None => Default::default(),
        };
        Ok(VmPlacement {
            require,
            anti_affinity: self.anti_affinity.as_ref().map(|group| AntiAffinity {
                group: group.clone(),
                scope: if self.per_fault_domain {
                    AntiAffinityScope::FaultDomain
                } else {
                    AntiAffinityScope::Host
                },
                preferred: self.anti_affinity_preferred,
            }),
            host: self.host.clone(),
            strategy: if self.bin_pack {
                PlacementStrategy::BinPack
            } else {
                PlacementStrategy::Spread
            },
            on_drain: self.on_drain.into(),
            on_host_loss: if self.restart_on_host_loss {
                HostLossPolicy::Restart
            } else {
                HostLossPolicy::Wait
            },
        })
    }
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    Create(Box<VmCreate>),
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Starts a VM; with --wait-for, waits until a console line starts with
    /// TEXT (at a line's start, so that the kernel's echo of its command
    /// line does not count).
    Start {
        id: String,
        #[arg(long, value_name = "TEXT")]
        wait_for: Option<String>,
        /// Seconds to wait for TEXT.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Graceful stop (Ctrl-Alt-Del), forced after the agent's timeout.
    Stop {
        id: String,
    },
    ForceStop {
        id: String,
    },
    Reboot {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// The serial console log; --follow streams it until the VM stops.
    Console {
        id: String,
        #[arg(long)]
        follow: bool,
    },
    Events {
        id: String,
    },
    /// Runs a command in a running VM through its guest agent (the Nubis
    /// images' nubis-guest-agent, over vsock); its output is printed as it
    /// comes, and nubisctl exits with the command's status.
    Exec {
        id: String,
        /// Seconds the command may run.
        #[arg(long)]
        timeout: Option<u32>,
        /// The command and its arguments (run with the guest's /bin/sh -c).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Moves a running VM to another host while it runs; shows progress
    /// and, at the end, the pause the guest saw.
    Migrate {
        id: String,
        /// The destination (a host registered with `nubisctl peer add`).
        #[arg(long)]
        host: String,
        /// The pause the guest may see, in ms.
        #[arg(long)]
        downtime_ms: Option<u64>,
    },
}

/// One line of a migration's progress: phase, a bar of what went over
/// (against the last round's dirty pages), rounds and expected downtime.
/// How a host's drain goes, on one line.
fn drain_line(name: &str, host: &Value) -> String {
    let count = |field: &str| host["drain"][field].as_array().map_or(0, Vec::len);
    format!(
        "draining {name}: {} to move, {} moving, {} stuck",
        count("remaining"),
        count("moving"),
        count("stuck")
    )
}

fn migration_line(progress: &Value) -> String {
    let sent = progress["bytes_sent"].as_u64().unwrap_or(0);
    let dirty = progress["dirty_pages"].as_u64().unwrap_or(0);
    let rounds = progress["rounds"].as_u64().unwrap_or(0);
    let expected = progress["expected_downtime_ms"].as_u64().unwrap_or(0);
    let phase = progress["phase"].as_str().unwrap_or("?");
    let filled = match phase {
        "completed" => 20,
        "handing_over" => 19,
        "copying" => (rounds as usize * 4 + 4).min(18),
        _ => 0,
    };
    format!(
        "[{}{}] {phase:<12} {:>8.1} MiB sent, round {rounds}, {dirty} dirty pages, expected downtime {expected} ms",
        "#".repeat(filled),
        ".".repeat(20 - filled),
        sent as f64 / (1 << 20) as f64
    )
}

/// A disk or NIC flag: `VALUE[,key=value...]`.
#[derive(Debug, Default, PartialEq)]
struct DeviceFlag {
    size: Option<u64>,
    network: Option<String>,
    limit: RateLimit,
}

/// Parses `VALUE[,key=value...]`: a leading size (disks), `network=`
/// (NICs) and a rate limit.
fn parse_device(text: &str, first_is_size: bool) -> Result<DeviceFlag, String> {
    let mut size = None;
    let mut network = None;
    let mut limit = RateLimit::default();
    for (index, part) in text.split(',').filter(|part| !part.is_empty()).enumerate() {
        match part.split_once('=') {
            Some(("network", value)) if !first_is_size => network = Some(value.to_string()),
            Some(("bw", value)) => limit.bytes_per_s = Some(number(value)?),
            Some(("iops" | "pps", value)) => limit.ops_per_s = Some(number(value)?),
            None if index == 0 && first_is_size => size = Some(number(part)?),
            _ => return Err(format!("cannot parse '{part}' in '{text}'")),
        }
    }
    Ok(DeviceFlag {
        size,
        network,
        limit,
    })
}

fn number(text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not a number"))
}

fn run(cli: Cli) -> Result<(), ClientError> {
    let client = Client::new(&cli.url, cli.token.clone())?;
    let out = output::Output { json: cli.json };
    match cli.command {
        Command::Health => out.object(&client.call("GET", "/healthz", None)?),
        Command::Tenant(command) => match command {
            TenantCommand::Create {
                name,
                max_vcpus,
                max_memory_mib,
                max_vms,
            } => {
                let quota = (max_vcpus.is_some() || max_memory_mib.is_some() || max_vms.is_some())
                    .then(|| {
                        let default = Quota::default();
                        Quota {
                            max_vcpus: max_vcpus.unwrap_or(default.max_vcpus),
                            max_memory_mib: max_memory_mib.unwrap_or(default.max_memory_mib),
                            max_vms: max_vms.unwrap_or(default.max_vms),
                            ..default
                        }
                    });
                let body = TenantCreate { name, quota };
                out.object(&client.send_json("POST", "/v1/tenants", &body)?)
            }
            TenantCommand::List => out.table(
                &client.call("GET", "/v1/tenants", None)?,
                &["id", "name", "quota", "created_at"],
            ),
            TenantCommand::Show { id } => {
                out.object(&client.call("GET", &format!("/v1/tenants/{id}"), None)?)
            }
            TenantCommand::Delete { id } => out.done(
                &client.call("DELETE", &format!("/v1/tenants/{id}"), None)?,
                &format!("tenant {id} deleted"),
            ),
        },
        Command::Token(command) => match command {
            TokenCommand::Create { tenant } => {
                out.object(&client.call("POST", &format!("/v1/tenants/{tenant}/tokens"), None)?)
            }
            TokenCommand::List { tenant } => out.table(
                &client.call("GET", &format!("/v1/tenants/{tenant}/tokens"), None)?,
                &["id", "tenant_id", "created_at"],
            ),
            TokenCommand::Delete { tenant, token } => out.done(
                &client.call(
                    "DELETE",
                    &format!("/v1/tenants/{tenant}/tokens/{token}"),
                    None,
                )?,
                &format!("token {token} revoked"),
            ),
        },
        Command::Image(command) => match command {
            ImageCommand::Create {
                name,
                kernel,
                rootfs,
                initrd,
                cmdline,
            } => {
                let body = ImageCreate {
                    name,
                    kernel,
                    rootfs,
                    initrd,
                    cmdline,
                };
                out.object(&client.send_json("POST", "/v1/images", &body)?)
            }
            ImageCommand::Upload {
                name,
                kernel,
                rootfs,
                initrd,
                cmdline,
            } => {
                let mut stored = std::collections::HashMap::new();
                let files = [
                    ("kernel", Some(kernel)),
                    ("rootfs", Some(rootfs)),
                    ("initrd", initrd),
                ];
                for (role, local) in files {
                    let Some(local) = local else { continue };
                    let upload = format!("{name}.{role}");
                    let spinner =
                        out.spinner(&format!("uploading {} as {upload}", local.display()));
                    let result = client.upload(&format!("/v1/uploads/{upload}"), &local);
                    spinner.finish();
                    let reply = result?;
                    out.note(&format!(
                        "uploaded {} ({} bytes)",
                        local.display(),
                        reply["bytes"]
                    ));
                    let path = reply["path"].as_str().ok_or_else(|| {
                        usage(format!(
                            "the upload of {} returned no path",
                            local.display()
                        ))
                    })?;
                    stored.insert(role, path.to_string());
                }
                let mut path = |role| stored.remove(role).unwrap_or_default();
                let body = ImageCreate {
                    kernel: path("kernel"),
                    rootfs: path("rootfs"),
                    initrd: stored.remove("initrd"),
                    name,
                    cmdline,
                };
                out.object(&client.send_json("POST", "/v1/images", &body)?)
            }
            ImageCommand::List => out.table(
                &client.call("GET", "/v1/images", None)?,
                &["id", "name", "kernel", "rootfs", "rootfs_bytes"],
            ),
            ImageCommand::Show { id } => {
                out.object(&client.call("GET", &format!("/v1/images/{id}"), None)?)
            }
            ImageCommand::Delete { id } => out.done(
                &client.call("DELETE", &format!("/v1/images/{id}"), None)?,
                &format!("image {id} deleted"),
            ),
        },
        Command::SshKey(command) => match command {
            SshKeyCommand::Create {
                name,
                public_key_file,
            } => {
                let text = std::fs::read_to_string(&public_key_file).map_err(|err| {
                    usage(format!("cannot read {}: {err}", public_key_file.display()))
                })?;
                let body = nubis_api::SshKeyCreate {
                    name,
                    public_key: text.trim().to_string(),
                };
                out.object(&client.send_json("POST", "/v1/ssh-keys", &body)?)
            }
            SshKeyCommand::List => out.table(
                &client.call("GET", "/v1/ssh-keys", None)?,
                &["id", "name", "fingerprint"],
            ),
            SshKeyCommand::Show { id } => {
                out.object(&client.call("GET", &format!("/v1/ssh-keys/{id}"), None)?)
            }
            SshKeyCommand::Delete { id } => out.done(
                &client.call("DELETE", &format!("/v1/ssh-keys/{id}"), None)?,
                &format!("SSH key {id} deleted"),
            ),
        },
        Command::Vm(command) => vm(&client, &out, command)?,
        Command::Service(command) => services::run(&client, &out, command)?,
        Command::Upload(command) => match command {
            UploadCommand::Put { name, file } => {
                let spinner = out.spinner(&format!("uploading {}", file.display()));
                let result = client.upload(&format!("/v1/uploads/{name}"), &file);
                spinner.finish();
                out.object(&result?)
            }
            UploadCommand::List => out.table(
                &client.call("GET", "/v1/uploads", None)?,
                &["name", "bytes", "path"],
            ),
            UploadCommand::Delete { name } => out.done(
                &client.call("DELETE", &format!("/v1/uploads/{name}"), None)?,
                &format!("upload {name} deleted"),
            ),
        },
        Command::Network(command) => match command {
            NetworkCommand::Create {
                name,
                cidr,
                nat,
                no_dhcp,
                dns,
                mtu,
                hosts,
            } => {
                let body = NetworkCreate {
                    name,
                    cidr,
                    nat,
                    dhcp: !no_dhcp,
                    dns: (!dns.is_empty()).then_some(dns),
                    mtu,
                    hosts,
                };
                out.object(&client.send_json("POST", "/v1/networks", &body)?)
            }
            NetworkCommand::List => out.table(
                &client.call("GET", "/v1/networks", None)?,
                &[
                    "id", "name", "cidr", "gateway", "nat", "dhcp", "mtu", "bridge",
                ],
            ),
            NetworkCommand::Show { id } => {
                out.object(&client.call("GET", &format!("/v1/networks/{id}"), None)?)
            }
            NetworkCommand::Delete { id } => out.done(
                &client.call("DELETE", &format!("/v1/networks/{id}"), None)?,
                &format!("network {id} deleted"),
            ),
        },
        Command::Snapshot(command) => match command {
            SnapshotCommand::Create { vm } => {
                out.object(&client.call("POST", &format!("/v1/vms/{vm}/snapshots"), None)?)
            }
            SnapshotCommand::List => out.table(
                &client.call("GET", "/v1/snapshots", None)?,
                &["id", "vm_name", "vcpus", "memory_mib", "size_bytes"],
            ),
            SnapshotCommand::Show { id } => {
                out.object(&client.call("GET", &format!("/v1/snapshots/{id}"), None)?)
            }
            SnapshotCommand::Delete { id } => out.done(
                &client.call("DELETE", &format!("/v1/snapshots/{id}"), None)?,
                &format!("snapshot {id} deleted"),
            ),
            SnapshotCommand::Restore { id, name } => out.object(&client.send_json(
                "POST",
                &format!("/v1/snapshots/{id}/restore"),
                &SnapshotRestore { name },
            )?),
            SnapshotCommand::Clone {
                id,
                count,
                name_prefix,
            } => {
                let made = client.send_json(
                    "POST",
                    &format!("/v1/snapshots/{id}/clones"),
                    &nubis_api::SnapshotClones { count, name_prefix },
                )?;
                out.table(
                    &made["vms"],
                    &["id", "name", "state", "vcpus", "memory_mib", "pid"],
                );
            }
        },
        Command::Host(command) => match command {
            HostCommand::List => out.hosts(&client.call("GET", "/v1/hosts", None)?)?,
            HostCommand::Show { name } => {
                out.object(&client.call("GET", &format!("/v1/hosts/{name}"), None)?)
            }
            HostCommand::Cordon { name } => {
                out.object(&client.call("POST", &format!("/v1/hosts/{name}/cordon"), None)?)
            }
            HostCommand::Uncordon { name } => {
                out.object(&client.call("POST", &format!("/v1/hosts/{name}/uncordon"), None)?)
            }
            HostCommand::Drain {
                name,
                max_parallel,
                no_wait,
            } => {
                let path = format!("/v1/hosts/{name}/drain");
                let mut host = client.send_json("POST", &path, &HostDrain { max_parallel })?;
                // Until done, or the drain is gone (uncordoned meanwhile).
                while !no_wait
                    && host["drain"].is_object()
                    && host["drain"]["done"] != Value::Bool(true)
                {
                    out.progress(&drain_line(&name, &host));
                    std::thread::sleep(Duration::from_millis(500));
                    host = client.call("GET", &format!("/v1/hosts/{name}"), None)?;
                }
                out.progress_done();
                out.object(&host);
            }
            HostCommand::Forget { name } => out.done(
                &client.call("DELETE", &format!("/v1/hosts/{name}"), None)?,
                &format!("host {name} forgotten"),
            ),
            HostCommand::Rollout(flags) => rollout::run(&client, &out, flags)?,
        },
        Command::Peer(command) => match command {
            PeerCommand::Add {
                name,
                address,
                fingerprint,
                peer_port,
            } => {
                let body = serde_json::to_value(nubis_api::PeerCreate {
                    name,
                    address,
                    fingerprint,
                    peer_port,
                })?;
                out.object(&client.call("POST", "/v1/peers", Some(&body))?)
            }
            PeerCommand::Identity => out.object(&client.call("GET", "/v1/host-identity", None)?),
            PeerCommand::List => out.table(
                &client.call("GET", "/v1/peers", None)?,
                &["name", "address", "peer_port", "fingerprint"],
            ),
            PeerCommand::Show { name } => {
                out.object(&client.call("GET", &format!("/v1/peers/{name}"), None)?)
            }
            PeerCommand::Delete { name } => out.done(
                &client.call("DELETE", &format!("/v1/peers/{name}"), None)?,
                &format!("peer {name} removed"),
            ),
        },
        Command::PortForward(command) => match command {
            PortForwardCommand::Create {
                vm,
                host_port,
                vm_port,
                protocol,
                nic,
            } => {
                let protocol = match protocol.as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    other => return Err(usage(format!("--protocol '{other}': tcp or udp"))),
                };
                let body = PortForwardCreate {
                    vm,
                    nic,
                    protocol,
                    host_port,
                    vm_port,
                };
                out.object(&client.send_json("POST", "/v1/port-forwards", &body)?)
            }
            PortForwardCommand::List => out.table(
                &client.call("GET", "/v1/port-forwards", None)?,
                &["id", "vm_id", "nic", "protocol", "host_port", "vm_port"],
            ),
            PortForwardCommand::Show { id } => {
                out.object(&client.call("GET", &format!("/v1/port-forwards/{id}"), None)?)
            }
            PortForwardCommand::Delete { id } => out.done(
                &client.call("DELETE", &format!("/v1/port-forwards/{id}"), None)?,
                &format!("port forward {id} deleted"),
            ),
        },
        Command::Metrics => print!("{}", client.raw("GET", "/metrics", None)?.1),
        Command::Openapi => print!("{}", client.raw("GET", "/v1/openapi.json", None)?.1),
    }
    Ok(())
}

fn vm(client: &Client, out: &output::Output, command: VmCommand) -> Result<(), ClientError> {
    let action = |id: &str, verb: &str, message: &str| -> Result<(), ClientError> {
        let spinner = out.spinner(&format!("{message} {id}"));
        let result = client.call("POST", &format!("/v1/vms/{id}/{verb}"), None);
        spinner.finish();
        out.object(&result?);
        Ok(())
    };
    match command {
        VmCommand::Create(create) => {
            let mut disks = Vec::new();
            for text in &create.disk {
                let disk = parse_device(text, true).map_err(usage)?;
                let size = disk
                    .size
                    .ok_or_else(|| usage(format!("--disk '{text}' needs a size in MiB")))?;
                disks.push(VmDisk {
                    size_mib: size,
                    rate_limit: disk.limit,
                });
            }
            let mut nics = Vec::new();
            for text in &create.nic {
                let nic = parse_device(text, false).map_err(usage)?;
                nics.push(VmNicCreate {
                    rate_limit: nic.limit,
                    network: nic.network,
                });
            }
            let placement = create.placement().map_err(usage)?;
            let mut tags = std::collections::BTreeMap::new();
            for text in &create.tag {
                let (key, value) = text
                    .split_once('=')
                    .ok_or_else(|| usage(format!("--tag '{text}': KEY=VALUE")))?;
                tags.insert(key.to_string(), value.to_string());
            }
            let user_data = match &create.user_data_file {
                Some(path) => {
                    use base64::Engine as _;
                    let data = std::fs::read(path)
                        .map_err(|err| usage(format!("cannot read {}: {err}", path.display())))?;
                    Some(base64::engine::general_purpose::STANDARD.encode(data))
                }
                None => None,
            };
            let body = nubis_api::VmCreate {
                ssh_keys: create.ssh_key,
                tags,
                user_data,
                placement,
                start: create.start,
                name: create.name,
                image: create.image,
                vcpus: create.vcpus,
                memory_mib: create.memory_mib,
                kernel_args: create.kernel_args,
                root_rate_limit: RateLimit::default(),
                disks,
                nics,
            };
            out.object(&client.send_json("POST", "/v1/vms", &body)?);
        }
        VmCommand::List { state, name } => {
            let mut query = Vec::new();
            if let Some(state) = state {
                query.push(format!("state={state}"));
            }
            if let Some(name) = name {
                query.push(format!("name={name}"));
            }
            let path = if query.is_empty() {
                "/v1/vms".to_string()
            } else {
                format!("/v1/vms?{}", query.join("&"))
            };
            out.table(
                &client.call("GET", &path, None)?,
                // host: in a cluster, the member it is placed on ("-"
                // standalone or while pending).
                &["id", "name", "state", "host", "vcpus", "memory_mib", "pid"],
            );
        }
        VmCommand::Show { id } => {
            out.object(&client.call("GET", &format!("/v1/vms/{id}"), None)?)
        }
        VmCommand::Delete { id } => {
            let spinner = out.spinner(&format!("deleting {id}"));
            let result = client.call("DELETE", &format!("/v1/vms/{id}"), None);
            spinner.finish();
            out.done(&result?, &format!("VM {id} deleted"));
        }
        VmCommand::Migrate {
            id,
            host,
            downtime_ms,
        } => {
            let body = MigrationCreate {
                host: host.clone(),
                downtime_ms,
                max_rounds: None,
                max_seconds: None,
            };
            let started = client.send_json("POST", &format!("/v1/vms/{id}/migration"), &body)?;
            // By id: the VM's name is gone from this host once it moved.
            let vm_id = started["vm_id"].as_str().unwrap_or(&id).to_string();
            let progress = loop {
                std::thread::sleep(Duration::from_millis(200));
                let progress = client.call("GET", &format!("/v1/vms/{vm_id}/migration"), None)?;
                out.progress(&migration_line(&progress));
                let phase = progress["phase"].as_str().unwrap_or("");
                if ["completed", "failed", "cancelled", "unconfirmed"].contains(&phase) {
                    break progress;
                }
            };
            out.progress_done();
            if progress["phase"] != "completed" {
                return Err(ClientError::Unexpected {
                    status: 0,
                    body: format!(
                        "the migration {}: {}",
                        progress["phase"].as_str().unwrap_or("ended"),
                        progress["error"].as_str().unwrap_or("no reason given")
                    ),
                });
            }
            out.object(&progress);
            out.note(&format!(
                "{vm_id} runs on {host}; the guest was paused {} ms",
                progress["downtime_ms"]
                    .as_u64()
                    .map_or_else(|| "an unknown number of".to_string(), |ms| ms.to_string())
            ));
        }
        VmCommand::Start {
            id,
            wait_for,
            timeout,
        } => {
            action(&id, "start", "starting")?;
            if let Some(text) = wait_for {
                let spinner = out.spinner(&format!("waiting for '{text}' on the console of {id}"));
                let start = Instant::now();
                let found = loop {
                    let (_, console) = client.raw("GET", &format!("/v1/vms/{id}/console"), None)?;
                    if console
                        .lines()
                        .any(|line| line.trim_end_matches('\r').starts_with(&text))
                    {
                        break true;
                    }
                    if start.elapsed() > Duration::from_secs(timeout) {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                };
                spinner.finish();
                if !found {
                    return Err(ClientError::Unexpected {
                        status: 0,
                        body: format!("'{text}' did not appear on the console within {timeout} s"),
                    });
                }
                out.note(&format!(
                    "'{text}' appeared after {:.1} s",
                    start.elapsed().as_secs_f64()
                ));
            }
        }
        VmCommand::Stop { id } => action(&id, "stop", "stopping")?,
        VmCommand::ForceStop { id } => action(&id, "force-stop", "forcing off")?,
        VmCommand::Reboot { id } => action(&id, "reboot", "rebooting")?,
        VmCommand::Pause { id } => action(&id, "pause", "pausing")?,
        VmCommand::Resume { id } => action(&id, "resume", "resuming")?,
        VmCommand::Console { id, follow } => {
            let path = format!(
                "/v1/vms/{id}/console{}",
                if follow { "?follow=true" } else { "" }
            );
            let (_, text) = client.raw("GET", &path, None)?;
            print!("{text}");
        }
        VmCommand::Events { id } => out.table(
            &client.call("GET", &format!("/v1/vms/{id}/events"), None)?,
            &["at", "kind", "message"],
        ),
        VmCommand::Exec {
            id,
            timeout,
            command,
        } => {
            let request = nubis_api::VmExec {
                command: command.join(" "),
                timeout_s: timeout,
            };
            let mut status = None;
            client.stream_lines(&format!("/v1/vms/{id}/exec"), &request, |line| {
                let event: nubis_api::ExecEvent =
                    serde_json::from_str(line).map_err(|err| ClientError::Unexpected {
                        status: 200,
                        body: format!("{line} ({err})"),
                    })?;
                status = exec_output(event).or(status);
                Ok(())
            })?;
            // The command's status is nubisctl's, as with ssh.
            std::process::exit(status.unwrap_or(1));
        }
    }
    Ok(())
}

/// Prints one event of a command running in a VM; its exit status once
/// known (128 + N for signal N, as a shell reports it).
fn exec_output(event: nubis_api::ExecEvent) -> Option<i32> {
    use std::io::Write;
    match event {
        nubis_api::ExecEvent::Stdout { data } => {
            let mut stdout = std::io::stdout();
            let _ = stdout.write_all(data.as_bytes());
            let _ = stdout.flush();
            None
        }
        nubis_api::ExecEvent::Stderr { data } => {
            let _ = std::io::stderr().write_all(data.as_bytes());
            None
        }
        nubis_api::ExecEvent::Exit { code } => Some(code),
        nubis_api::ExecEvent::Signal { number } => Some(128 + number),
        nubis_api::ExecEvent::Error { message } => {
            eprintln!("nubisctl: error: {message}");
            Some(1)
        }
    }
}

fn usage(message: String) -> ClientError {
    ClientError::Unexpected {
        status: 0,
        body: message,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nubisctl: error: {err}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_statuses_are_the_commands_as_a_shell_reports_them() {
        use nubis_api::ExecEvent;
        assert_eq!(
            exec_output(ExecEvent::Stdout {
                data: String::new()
            }),
            None
        );
        assert_eq!(
            exec_output(ExecEvent::Stderr {
                data: String::new()
            }),
            None
        );
        assert_eq!(exec_output(ExecEvent::Exit { code: 3 }), Some(3));
        assert_eq!(exec_output(ExecEvent::Signal { number: 9 }), Some(137));
        assert_eq!(
            exec_output(ExecEvent::Error {
                message: "gone".into()
            }),
            Some(1)
        );
    }

    #[test]
    fn exec_takes_the_command_after_its_options() {
        let cli = Cli::try_parse_from([
            "nubisctl",
            "vm",
            "exec",
            "web",
            "--timeout",
            "5",
            "--",
            "ls",
            "-l",
            "/",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Exec {
            id,
            timeout,
            command,
        }) = cli.command
        else {
            panic!("not vm exec");
        };
        assert_eq!((id.as_str(), timeout), ("web", Some(5)));
        assert_eq!(command, ["ls", "-l", "/"]);
    }

    #[test]
    fn migration_progress_lines_show_phase_bytes_and_rounds() {
        let progress: Value = serde_json::from_str(
            r#"{"phase": "copying", "bytes_sent": 3145728, "rounds": 1,
                "dirty_pages": 12, "expected_downtime_ms": 40}"#,
        )
        .unwrap();
        let line = migration_line(&progress);
        assert!(line.starts_with("[########............] copying"), "{line}");
        assert!(
            line.contains("3.0 MiB sent, round 1, 12 dirty pages, expected downtime 40 ms"),
            "{line}"
        );
        let done = migration_line(&serde_json::from_str(r#"{"phase": "completed"}"#).unwrap());
        assert!(done.starts_with(&format!("[{}]", "#".repeat(20))), "{done}");
    }

    #[test]
    fn device_flags_are_parsed() {
        let disk = parse_device("16,bw=1000,iops=5", true).unwrap();
        assert_eq!(disk.size, Some(16));
        assert_eq!(
            disk.limit,
            RateLimit {
                bytes_per_s: Some(1000),
                ops_per_s: Some(5)
            }
        );
        let nic = parse_device("network=front,pps=100", false).unwrap();
        assert_eq!(nic.network.as_deref(), Some("front"));
        assert_eq!(
            nic.limit,
            RateLimit {
                bytes_per_s: None,
                ops_per_s: Some(100)
            }
        );
        assert!(parse_device("", false).unwrap().limit.is_unlimited());
        for (bad, first_is_size) in [
            ("network=front", true),
            ("16", false),
            ("bw=lots", false),
            ("x=1", false),
        ] {
            assert!(parse_device(bad, first_is_size).is_err(), "{bad}");
        }
    }
}
