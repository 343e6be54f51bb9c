//! `nubis-agent`: the host daemon. Serves the REST API and supervises one
//! `nubis-vmm` per VM. Stopping the agent leaves the VMs running; the next
//! agent adopts them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use nubis_agent::auth::OperatorToken;
use nubis_agent::cluster::settings::{self, ClusterSettings, EtcdTls, HostName, SettingsError};
use nubis_agent::cluster::{Cluster, LocalHost, LocalUsage};
use nubis_agent::config::{AgentConfig, ConfigFile};
use nubis_agent::http::{peer_router, refresh_registry, router, AppState};
use nubis_agent::network::host::LinuxNetwork;
use nubis_agent::peer_directory::PeerDirectory;
use nubis_agent::peer_tls::{self, HostIdentity, PeerRegistry};
use nubis_agent::peers::PeerClient;
use nubis_agent::service::hosts::LocalHostInfo;
use nubis_agent::store::Store;
use nubis_agent::supervisor::Supervisor;

#[derive(Debug, Parser)]
#[command(
    name = "nubis-agent",
    version,
    about = "Nubis host agent: microVMs for tenants over a REST API"
)]
struct Cli {
    /// Address and port to serve the API on.
    #[arg(long, value_name = "ADDR:PORT", required_unless_present = "openapi")]
    listen: Option<SocketAddr>,
    /// Directory for the database and the VMs' files.
    #[arg(long, value_name = "DIR", required_unless_present = "openapi")]
    data_dir: Option<PathBuf>,
    /// Print the API's OpenAPI document and exit.
    #[arg(long)]
    openapi: bool,
    /// JSON config file (operator_token_file, vmm_binary, stop_timeout_s, image_dirs, underlay_address).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// This host's IPv4 address on the network between hosts: the end of
    /// the VXLAN tunnels of networks that span hosts (see /v1/peers).
    #[arg(long, value_name = "IPV4")]
    underlay_address: Option<std::net::Ipv4Addr>,
    /// Cluster mode: the etcd cluster this host joins, etcd=URL[,URL...].
    /// Without it the agent is a standalone host.
    #[arg(long, value_name = "etcd=URL[,URL...]", requires = "host_name")]
    cluster: Option<String>,
    /// This host's name in the cluster (1 to 63 of a-z 0-9 -).
    #[arg(long, value_name = "NAME")]
    host_name: Option<String>,
    /// The host's labels: zone=onprem,fault-domain=1,update-domain=2.
    #[arg(long, value_name = "KEY=VALUE[,...]", default_value = "")]
    labels: String,
    /// What the host does: compute (runs VMs), controller (may be elected).
    #[arg(long, value_name = "ROLE[,...]", default_value = "compute,controller")]
    roles: String,
    /// Seconds after its last heartbeat that a host counts as down.
    #[arg(long, value_name = "SECONDS", default_value_t = nubis_agent::cluster::settings::DEFAULT_LEASE_TTL_S)]
    lease_ttl: i64,
    /// Client certificates for etcd over TLS: the CA that signed etcd's
    /// certificate, and this host's certificate and key (PEM).
    #[arg(long, value_name = "PEM")]
    etcd_ca: Option<PathBuf>,
    #[arg(long, value_name = "PEM")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, value_name = "PEM")]
    etcd_key: Option<PathBuf>,
}

impl Cli {
    /// The cluster settings, when the agent runs in cluster mode.
    fn cluster_settings(&self) -> Result<Option<ClusterSettings>, SettingsError> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        let endpoints = settings::parse_cluster(cluster)?;
        let host_name: HostName = self.host_name.as_deref().unwrap_or_default().parse()?;
        let mut settings = ClusterSettings::new(endpoints, host_name);
        settings.labels = settings::parse_labels(&self.labels)?;
        settings.roles = settings::parse_roles(&self.roles)?;
        settings.lease_ttl_s = self.lease_ttl;
        settings.tls = EtcdTls::from_parts(
            self.etcd_ca.clone(),
            self.etcd_cert.clone(),
            self.etcd_key.clone(),
        )?;
        settings.check()?;
        Ok(Some(settings))
    }
}

/// The name a standalone host shows: the system's host name when it is a
/// valid one, else "local".
fn standalone_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|name| name.trim().to_ascii_lowercase().parse::<HostName>().ok())
        .map_or_else(|| "local".to_string(), |name| name.to_string())
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("nubis-agent: error: {message}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.openapi {
        print!("{}", nubis_agent::http::openapi::document());
        return ExitCode::SUCCESS;
    }
    let (Some(listen), Some(data_dir)) = (cli.listen, cli.data_dir.clone()) else {
        return fail("--listen and --data-dir are required");
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NUBIS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut file = match &cli.config {
        Some(path) => match ConfigFile::load(path) {
            Ok(file) => file,
            Err(err) => return fail(err),
        },
        None => ConfigFile::default(),
    };
    if cli.underlay_address.is_some() {
        file.underlay_address = cli.underlay_address;
    }
    let cluster = match cli.cluster_settings() {
        Ok(cluster) => cluster,
        Err(err) => return fail(err),
    };
    let env_token = std::env::var("NUBIS_OPERATOR_TOKEN").ok();
    let config = match AgentConfig::assemble(data_dir, file, env_token) {
        Ok(config) => config,
        Err(err) => return fail(err),
    };
    if let Err(err) = config.check_api_port(listen.port()) {
        return fail(err);
    }
    for dir in [
        config.data_dir.clone(),
        config.data_dir.join("vms"),
        config.data_dir.join("images"),
    ] {
        if let Err(err) = std::fs::create_dir_all(&dir) {
            return fail(format!("cannot create {}: {err}", dir.display()));
        }
    }
    let store = match Store::open(&config.data_dir.join("agent.db")) {
        Ok(store) => Arc::new(store),
        Err(err) => return fail(err),
    };
    // VMMs are started by nubis-jailer, which exits once they run: as a
    // child subreaper the agent inherits them as its children and sees how
    // they exit. Set before the runtime starts its threads.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return fail(format!(
            "cannot become a child subreaper: {}",
            std::io::Error::last_os_error()
        ));
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return fail(format!("cannot start the async runtime: {err}")),
    };
    match runtime.block_on(serve(listen, config, store, cluster)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

/// Where the agent keeps the metadata service's port when it chose one.
const METADATA_PORT_FILE: &str = "metadata-port";

/// The metadata service's listener: on the configured port, or else on
/// the port this agent chose before (so that a restarted agent makes the
/// same rules), or else on any free port.
async fn metadata_listener(config: &AgentConfig) -> Result<tokio::net::TcpListener, String> {
    let bind = |port: u16| {
        tokio::net::TcpListener::bind(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)))
    };
    if config.metadata_port != 0 {
        return bind(config.metadata_port).await.map_err(|err| {
            format!(
                "cannot listen for the metadata service on port {}: {err}",
                config.metadata_port
            )
        });
    }
    let before = std::fs::read_to_string(config.data_dir.join(METADATA_PORT_FILE))
        .ok()
        .and_then(|text| text.trim().parse::<u16>().ok())
        .filter(|port| *port != 0);
    if let Some(port) = before {
        match bind(port).await {
            Ok(listener) => return Ok(listener),
            Err(err) => tracing::warn!(
                "the metadata service's port {port} is taken now ({err}): choosing another"
            ),
        }
    }
    bind(0)
        .await
        .map_err(|err| format!("cannot listen for the metadata service: {err}"))
}

/// Records the metadata service's port for the next start.
fn remember_metadata_port(data_dir: &std::path::Path, port: u16) {
    if let Err(err) = std::fs::write(data_dir.join(METADATA_PORT_FILE), format!("{port}\n")) {
        tracing::warn!("cannot record the metadata service's port: {err}");
    }
}

async fn serve(
    listen: SocketAddr,
    mut config: AgentConfig,
    store: Arc<Store>,
    cluster_settings: Option<ClusterSettings>,
) -> Result<(), String> {
    let operator = Arc::new(OperatorToken::new(&config.operator_token));
    let image_dirs = Arc::new(config.image_dirs.clone());
    let data_dir = config.data_dir.clone();
    // This host's identity towards its peers (mutual TLS).
    let identity_name = config
        .underlay_address
        .map(|address| address.to_string())
        .unwrap_or_else(|| "nubis-host".to_string());
    let identity = HostIdentity::load_or_create(&data_dir, &identity_name)
        .map_err(|err| format!("cannot set up this host's identity: {err}"))?;
    peer_tls::install_default_provider();
    let registry = Arc::new(PeerRegistry::default());
    let client_tls =
        peer_tls::client_config(&identity, registry.clone()).map_err(|err| err.to_string())?;
    let peers =
        PeerClient::new(client_tls).map_err(|err| format!("cannot make the peer client: {err}"))?;
    let peer_listen = config
        .underlay_address
        .map(|address| SocketAddr::from((address, config.peer_port)));
    let capacity = nubis_agent::capacity::of_host(&config);
    let (underlay_address, peer_port) = (config.underlay_address, config.peer_port);
    let peer_directory = PeerDirectory::new(store.clone());
    // The metadata service listens before the network's rules are made:
    // they send VMs' requests to its port.
    let metadata_listener = metadata_listener(&config).await?;
    config.metadata_port = metadata_listener
        .local_addr()
        .map_err(|err| format!("the metadata service's listener: {err}"))?
        .port();
    remember_metadata_port(&config.data_dir, config.metadata_port);
    let zone = cluster_settings
        .as_ref()
        .and_then(|settings| settings.labels.get("zone").cloned());
    tokio::spawn(
        nubis_agent::metadata::server::MetadataService::new(store.clone(), zone)
            .serve(metadata_listener),
    );
    tracing::info!(
        "metadata service listening for VMs on port {}",
        config.metadata_port
    );
    let network = LinuxNetwork::new(store.clone(), &config, peer_directory.clone());
    let supervisor = Supervisor::new(store.clone(), config, network.clone());
    supervisor
        .adopt_all()
        .await
        .map_err(|err| format!("cannot reconcile the VMs: {err}"))?;
    supervisor.spawn_console_rotation();
    network
        .reconcile()
        .await
        .map_err(|err| format!("cannot set up the tenant networks: {err}"))?;
    let peers = Arc::new(peers);
    let mut services = nubis_agent::service::Services::new(
        store.clone(),
        supervisor.clone(),
        network,
        peers.clone(),
        peer_directory.clone(),
        data_dir.clone(),
        image_dirs.clone(),
    );
    services.local_host = Arc::new(LocalHostInfo {
        name: cluster_settings
            .as_ref()
            .map_or_else(standalone_name, |s| s.host_name.to_string()),
        fingerprint: identity.fingerprint.clone(),
        api_address: Some(listen.to_string()),
        underlay_address: underlay_address.map(|a| a.to_string()),
        capacity,
        started_at: nubis_agent::store::now(),
    });
    if let Some(settings) = cluster_settings {
        let usage_store = store.clone();
        let local = LocalHost {
            fingerprint: identity.fingerprint.clone(),
            api_address: listen,
            underlay_address,
            peer_port,
            capacity,
            usage: Box::new(move || {
                let (resources, vms) =
                    nubis_agent::capacity::used(&usage_store).unwrap_or_else(|err| {
                        tracing::warn!("cannot count this host's usage: {err}");
                        Default::default()
                    });
                LocalUsage { resources, vms }
            }),
        };
        let name = settings.host_name.clone();
        let cluster = Cluster::join(settings, local, store.clone())
            .await
            .map_err(|err| format!("cannot join the cluster as {name}: {err}"))?;
        peer_directory.use_cluster(cluster.clone());
        services.cluster = Some(cluster);
    }
    let cluster = services.cluster.clone();
    let state = AppState {
        store,
        supervisor,
        operator,
        image_dirs,
        metrics: Default::default(),
        data_dir,
        peers,
        peer_registry: registry.clone(),
        fingerprint: Arc::new(identity.fingerprint.clone()),
        services,
    };
    refresh_registry(&state)
        .map_err(|err| format!("cannot read the peers: {}", err.0.error.message))?;
    if let Some(cluster) = &cluster {
        // Before the API serves anything: copies replaced elsewhere while
        // this host was away go first.
        nubis_agent::service::placed::fence_now(&state.services, cluster)
            .await
            .map_err(|err| format!("cannot check this host's VMs against the cluster: {err}"))?;
        tokio::spawn(follow_members(state.clone(), cluster.clone()));
        tokio::spawn(nubis_agent::service::placed::self_fence(
            state.services.clone(),
            cluster.clone(),
        ));
        tokio::spawn(nubis_agent::service::placed::follow(
            state.services.clone(),
            cluster.clone(),
        ));
        tokio::spawn(nubis_agent::service::probes::run(
            state.services.probes.clone(),
        ));
        if let Some(mut freed) = cluster.take_freed_subnets() {
            let network = state.services.host_network.clone();
            tokio::spawn(async move {
                while let Some(subnet) = freed.recv().await {
                    if let Err(err) = network.remove_tenant_bridge(subnet).await {
                        tracing::warn!("cannot remove a deleted tenant's bridge: {err}");
                    }
                }
            });
        }
    }
    if let Some(peer_listen) = peer_listen {
        let server_tls =
            peer_tls::server_config(&identity, registry.clone()).map_err(|err| err.to_string())?;
        let peer_app = peer_router(state.clone());
        let listener = tokio::net::TcpListener::bind(peer_listen)
            .await
            .map_err(|err| format!("cannot listen for peers on {peer_listen}: {err}"))?;
        tokio::spawn(async move {
            peer_tls::serve(listener, server_tls, registry, peer_app).await;
        });
    }
    tokio::spawn(
        nubis_agent::service::migrations::resolve_interrupted_handovers(state.services.clone()),
    );
    let app = router(state);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|err| format!("cannot listen on {listen}: {err}"))?;
    tracing::info!("nubis-agent listening on {listen}");
    nubis_agent::http::server::serve(listener, app, async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down; the VMs keep running");
    })
    .await;
    if let Some(cluster) = cluster {
        cluster.leave().await;
    }
    Ok(())
}

/// In cluster mode the peers are the other members: when one joins, leaves
/// or changes its address or certificate, the TLS layer's registry and the
/// tenant egress rules (which keep peers out of reach) follow.
async fn follow_members(state: AppState, cluster: Cluster) {
    let mut changes = cluster.view_changes();
    let mut known = state.services.peer_directory.list().ok();
    // The network was reconciled before the cluster was joined.
    let mut stale = true;
    loop {
        let now = state.services.peer_directory.list().ok();
        if now != known || stale {
            if let Err(err) = refresh_registry(&state) {
                tracing::warn!("cannot refresh the peers: {}", err.0.error.message);
            }
            match state.services.host_network.reconcile().await {
                Ok(()) => stale = false,
                Err(err) => tracing::warn!("cannot apply the peers to the host network: {err}"),
            }
            known = now;
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}
