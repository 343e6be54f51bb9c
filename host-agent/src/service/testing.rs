//! In-process fixtures for the tests of the services and of the router: a
//! real store in a temporary directory and a host network that changes
//! nothing on the host (it only counts, and fails when told to). Starting
//! VMs and real bridges are left to the end-to-end tests (`tests/`).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use nubis_api::{Image, ImageCreate, Quota, Tenant};
use tokio::sync::OwnedMutexGuard;

use super::{HostNetwork, Services};
use crate::config::{AgentConfig, ConfigFile};
use crate::http::AppState;
use crate::ipv4::Cidr;
use crate::network::host::{HostNetworkError, LinuxNetwork};
use crate::network::NetworkError;
use crate::store::Store;
use crate::supervisor::Supervisor;

pub const OPERATOR_TOKEN: &str = "operator-token-for-tests";

/// A host network that touches nothing.
#[derive(Default)]
pub struct FakeNetwork {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// When set, every reconcile fails, as a host refusing the rules.
    pub refuse: AtomicBool,
    pub reconciles: AtomicUsize,
    /// This host's underlay address, when a test gives it one.
    pub underlay: std::sync::Mutex<Option<Ipv4Addr>>,
}

impl HostNetwork for FakeNetwork {
    fn lock(&self) -> BoxFuture<'_, OwnedMutexGuard<()>> {
        Box::pin(self.lock.clone().lock_owned())
    }

    fn reconcile(&self) -> BoxFuture<'_, Result<(), HostNetworkError>> {
        Box::pin(async move {
            self.reconciles.fetch_add(1, Ordering::SeqCst);
            if self.refuse.load(Ordering::SeqCst) {
                return Err(HostNetworkError::Network(NetworkError::Command {
                    program: "nft",
                    args: "-f -".into(),
                    message: "the test refuses the rules".into(),
                }));
            }
            Ok(())
        })
    }

    fn shadowed(&self, cidr: Cidr) -> BoxFuture<'_, Result<Option<String>, HostNetworkError>> {
        // The host's own network, as a test sees it: 192.168.0.0/16.
        let host = Cidr::of(Ipv4Addr::new(192, 168, 0, 0), 16);
        Box::pin(async move {
            Ok(host
                .overlaps(&cidr)
                .then(|| format!("{cidr} overlaps the host's network {host}")))
        })
    }

    fn underlay_address(&self) -> Option<Ipv4Addr> {
        *self.underlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn underlay_mtu(&self, _local: Ipv4Addr) -> BoxFuture<'_, Result<u16, String>> {
        Box::pin(async { Ok(1500) })
    }

    fn remove_tenant_bridge(&self, _subnet: u8) -> BoxFuture<'_, Result<(), NetworkError>> {
        Box::pin(async { Ok(()) })
    }
}

/// An agent's services and router state over a fresh store.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub network: Arc<FakeNetwork>,
    pub services: Services,
    pub state: AppState,
}

/// Panics with the error: fixtures are set up by the tests themselves.
fn must<T, E: std::fmt::Display>(what: &str, result: Result<T, E>) -> T {
    match result {
        Ok(value) => value,
        Err(err) => panic!("{what}: {err}"),
    }
}

impl Fixture {
    pub fn new() -> Self {
        let dir = must("temporary directory", tempfile::tempdir());
        let data_dir = dir.path().to_path_buf();
        let mut config = must(
            "config",
            AgentConfig::assemble(
                data_dir.clone(),
                ConfigFile::default(),
                Some(OPERATOR_TOKEN.to_string()),
            ),
        );
        // The temporary directory's filesystem may be small.
        config.reserved_disk_mib = 0;
        must(
            "image directory",
            std::fs::create_dir_all(data_dir.join("images")),
        );
        let store = Arc::new(must("store", Store::open(&data_dir.join("agent.db"))));
        let peer_directory = crate::peer_directory::PeerDirectory::new(store.clone());
        // The runner's own network is the real one's type but is never
        // reconciled here: the services use the stand-in.
        let supervisor = Supervisor::new(
            store.clone(),
            config.clone(),
            LinuxNetwork::new(store.clone(), &config, peer_directory.clone()),
        );
        let identity = must(
            "identity",
            crate::peer_tls::HostIdentity::load_or_create(&data_dir, "nubis-test"),
        );
        crate::peer_tls::install_default_provider();
        let registry = Arc::new(crate::peer_tls::PeerRegistry::default());
        let client_tls = must(
            "client TLS",
            crate::peer_tls::client_config(&identity, registry.clone()),
        );
        let peers = Arc::new(must(
            "peer client",
            crate::peers::PeerClient::new(client_tls),
        ));
        let network = Arc::new(FakeNetwork::default());
        let image_dirs = Arc::new(config.image_dirs.clone());
        let services = Services {
            store: store.clone(),
            supervisor: supervisor.clone(),
            host_network: network.clone(),
            peers: peers.clone(),
            data_dir: data_dir.clone(),
            image_dirs: image_dirs.clone(),
            migrations: Default::default(),
            local_host: Default::default(),
            cluster: None,
            peer_directory,
            probes: Default::default(),
        };
        let state = AppState {
            store,
            supervisor,
            operator: Arc::new(crate::auth::OperatorToken::new(OPERATOR_TOKEN)),
            image_dirs,
            metrics: Default::default(),
            data_dir,
            peers,
            peer_registry: registry,
            fingerprint: Arc::new(identity.fingerprint.clone()),
            services: services.clone(),
        };
        Fixture {
            dir,
            network,
            services,
            state,
        }
    }

    /// A tenant with `quota`, and a token of it.
    pub fn tenant(&self, name: &str, quota: Quota) -> (Tenant, String) {
        let tenant = must("tenant", self.services.store.create_tenant(name, quota));
        let token = must("token", self.services.store.create_token(&tenant.id));
        (tenant.into(), token.token)
    }

    /// An image of `tenant` with a root disk of `rootfs_bytes`.
    pub fn image(&self, tenant: &Tenant, name: &str, rootfs_bytes: u64) -> Image {
        let images = self.dir.path().join("images");
        let kernel = images.join(format!("{name}.vmlinux"));
        let rootfs = images.join(format!("{name}.ext4"));
        must("kernel file", std::fs::write(&kernel, b"kernel"));
        let file = must("rootfs file", std::fs::File::create(&rootfs));
        must("rootfs size", file.set_len(rootfs_bytes));
        must(
            "image",
            super::images::register(
                &self.services,
                &tenant.id,
                ImageCreate {
                    name: name.to_string(),
                    kernel: kernel.display().to_string(),
                    rootfs: rootfs.display().to_string(),
                    initrd: None,
                    cmdline: "console=ttyS0".to_string(),
                },
            ),
        )
    }
}
