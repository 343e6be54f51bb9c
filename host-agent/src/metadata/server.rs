//! The metadata service's listener. Every VM's requests to
//! 169.254.169.254:80 are sent here by the host's rules (a DNAT to its
//! network's gateway, on this listener's port: `network::firewall`), so a
//! connection's peer is the VM's own address (the bridge's anti-spoofing
//! rules hold every tap to its NIC's address) and its local end is the
//! gateway of that NIC's network. The VM is the one of this host whose NIC
//! has both; anything else (another host, a process on this one, a VM
//! naming another network's gateway) is refused.
//!
//! IMDSv2: `PUT /latest/api/token` with a TTL gives a token that every
//! other request must carry; a request with `X-Forwarded-For` (a proxy in
//! the guest passing it on) gets none. Each VM is rate limited.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;

use super::content::{Answer, Instance, Nic};
use super::tokens::{self, Tokens};
use crate::http::server::{serve_connection, ConnectionLimit};
use crate::ipv4::Cidr;
use crate::network::dhcp_server::RateLimiter;
use crate::network::nic_cidr;
use crate::store::{NetworkRow, Store, VmRow};

/// The address guests ask, as on every public cloud.
pub const METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The header a token request gives its TTL in, and the one every other
/// request gives its token in.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Requests a second all VMs together may make, and one VM's burst and
/// rate: cloud-init reads some thirty paths at boot.
const REQUESTS_PER_SECOND: u32 = 500;
const VM_BURST: f64 = 64.0;
const VM_PER_SECOND: f64 = 16.0;

/// What the listener answers from.
pub struct MetadataService {
    store: Arc<Store>,
    /// The host's zone (its `zone` label), in cluster mode.
    zone: Option<String>,
    tokens: Mutex<Tokens>,
    limiter: Mutex<RateLimiter>,
}

/// The two ends of one connection.
#[derive(Debug, Clone, Copy)]
struct Origin {
    peer: SocketAddr,
    local: SocketAddr,
}

impl MetadataService {
    pub fn new(store: Arc<Store>, zone: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            store,
            zone,
            tokens: Mutex::new(Tokens::default()),
            limiter: Mutex::new(RateLimiter::with_clients(
                Instant::now(),
                REQUESTS_PER_SECOND,
                VM_BURST,
                VM_PER_SECOND,
            )),
        })
    }

    /// Serves `listener` for as long as the agent runs.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let limit = ConnectionLimit::default();
        loop {
            let Some(permit) = limit.admit().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!("metadata service: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            let router = self.router(Origin { peer, local });
            tokio::spawn(async move {
                let _permit = permit;
                serve_connection(stream, router).await;
            });
        }
    }

    fn router(self: &Arc<Self>, origin: Origin) -> Router {
        let service = self.clone();
        Router::new()
            .fallback(
                move |method: Method, uri: Uri, headers: HeaderMap| async move {
                    service.answer(origin, &method, &uri, &headers)
                },
            )
            .layer(DefaultBodyLimit::max(1024))
    }

    fn answer(&self, origin: Origin, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response {
        let vm = match self.caller(origin) {
            Ok(vm) => vm,
            Err(status) => return plain(status, "not a VM of this host\n"),
        };
        let admitted = self
            .limiter
            .lock()
            .map(|mut limiter| limiter.admit(&vm.id, Instant::now()))
            .unwrap_or(false);
        if !admitted {
            return plain(StatusCode::TOO_MANY_REQUESTS, "slow down\n");
        }
        let header_text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        let path = uri.path();
        if path == "/latest/api/token" {
            if method != Method::PUT {
                return plain(StatusCode::METHOD_NOT_ALLOWED, "PUT a token request\n");
            }
            // A proxy in the guest relaying someone else's request.
            if headers.contains_key("x-forwarded-for") {
                return plain(StatusCode::FORBIDDEN, "forwarded requests get no token\n");
            }
            return match self.issue(&vm.id, header_text(TTL_HEADER)) {
                Ok((token, ttl)) => {
                    let mut response = plain(StatusCode::OK, &token);
                    if let Ok(value) = HeaderValue::from_str(&ttl.as_secs().to_string()) {
                        response.headers_mut().insert(TTL_HEADER, value);
                    }
                    response
                }
                Err(err) => plain(StatusCode::BAD_REQUEST, &format!("{err}\n")),
            };
        }
        if method != Method::GET && method != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        let checked = self
            .tokens
            .lock()
            .map_err(|_| tokens::TokenError::Invalid)
            .and_then(|tokens| tokens.check(header_text(TOKEN_HEADER), &vm.id, Instant::now()));
        if let Err(err) = checked {
            return plain(StatusCode::UNAUTHORIZED, &format!("{err}\n"));
        }
        let instance = match self.instance(&vm) {
            Ok(instance) => instance,
            Err(err) => {
                tracing::warn!(vm = %vm.id, "metadata service: {err}");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "unavailable\n");
            }
        };
        match instance.answer(path) {
            Some(Answer::Text(text)) => plain(StatusCode::OK, &text),
            Some(Answer::Json(json)) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                json,
            )
                .into_response(),
            Some(Answer::Bytes(bytes)) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/octet-stream")],
                bytes,
            )
                .into_response(),
            None => plain(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// The running VM of this host whose NIC has the connection's peer
    /// address, on the network whose gateway the connection reached.
    fn caller(&self, origin: Origin) -> Result<VmRow, StatusCode> {
        let (IpAddr::V4(peer), IpAddr::V4(local)) = (origin.peer.ip(), origin.local.ip()) else {
            return Err(StatusCode::FORBIDDEN);
        };
        let vms = self
            .store
            .list_vms(None, None)
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        vms.into_iter()
            .filter(|vm| vm.state.has_process())
            .find(|vm| {
                vm.nics.iter().any(|nic| {
                    nic.address
                        .as_deref()
                        .and_then(nic_cidr)
                        .is_some_and(|(address, prefix)| {
                            address == peer && Cidr::of(address, prefix).gateway() == local
                        })
                })
            })
            .ok_or(StatusCode::FORBIDDEN)
    }

    fn issue(&self, vm_id: &str, ttl: Option<&str>) -> Result<(String, Duration), String> {
        let ttl = tokens::parse_ttl(ttl).map_err(|err| err.to_string())?;
        let token = crate::store::random_hex(32).map_err(|err| err.to_string())?;
        self.tokens
            .lock()
            .map_err(|_| "the token table is unusable".to_string())?
            .issue(token.clone(), vm_id, ttl, Instant::now());
        Ok((token, ttl))
    }

    /// What `vm` may learn about itself.
    fn instance(&self, vm: &VmRow) -> Result<Instance, String> {
        let networks = self
            .store
            .list_networks(Some(&vm.tenant_id))
            .map_err(|err| err.to_string())?;
        let nics = vm
            .nics
            .iter()
            .filter_map(|nic| {
                let (address, prefix) = nic_cidr(nic.address.as_deref()?)?;
                let network: Option<&NetworkRow> = nic
                    .network
                    .as_deref()
                    .and_then(|id| networks.iter().find(|net| net.id == id));
                Some(Nic {
                    mac: nic.mac.clone()?,
                    address,
                    prefix,
                    gateway: Cidr::of(address, prefix).gateway(),
                    dns: network
                        .map(|net| net.dns.iter().filter_map(|dns| dns.parse().ok()).collect())
                        .unwrap_or_default(),
                    mtu: network.map_or(1500, |net| net.mtu),
                })
            })
            .collect();
        let user_data = match &vm.metadata.user_data {
            Some(encoded) => Some(
                super::inputs::BASE64
                    .decode(encoded)
                    .map_err(|err| format!("VM {}'s stored user data: {err}", vm.id))?,
            ),
            None => None,
        };
        Ok(Instance {
            id: vm.id.clone(),
            tenant_id: vm.tenant_id.clone(),
            image_id: vm.image_id.clone(),
            hostname: vm.name.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            nics,
            tags: vm.metadata.tags.clone(),
            ssh_keys: vm
                .metadata
                .ssh_keys
                .iter()
                .map(|key| (key.name.clone(), key.public_key.clone()))
                .collect(),
            user_data,
            zone: self.zone.clone(),
        })
    }
}

fn plain(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain")],
        text.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::{NamedSshKey, VmMetadata, VmNic, VmState};

    fn origin(peer: [u8; 4], local: [u8; 4]) -> Origin {
        Origin {
            peer: SocketAddr::from((peer, 40000)),
            local: SocketAddr::from((local, 8775)),
        }
    }

    /// A running VM at 10.88.1.2/24 with a key and user data.
    fn service() -> (Arc<MetadataService>, VmRow) {
        let (store, tenant, image) = crate::store::fixture();
        let vm = crate::store::fixture_vm(
            &store,
            &tenant,
            &image,
            "web",
            vec![VmNic {
                mac: Some("02:4e:42:00:00:01".into()),
                address: Some("10.88.1.2/24".into()),
                ..VmNic::default()
            }],
        );
        store
            .set_vm_state(&vm.id, VmState::Running, Some(1), None)
            .unwrap();
        let mut vm = store.get_vm(None, &vm.id).unwrap().unwrap();
        vm.metadata = VmMetadata {
            ssh_keys: vec![NamedSshKey {
                name: "laptop".into(),
                public_key: "ssh-ed25519 AAAA".into(),
            }],
            user_data: Some("aGk=".into()),
            ..VmMetadata::default()
        };
        (
            MetadataService::new(Arc::new(store), Some("cloud".into())),
            vm,
        )
    }

    #[test]
    fn a_vm_is_known_by_its_address_and_its_network_s_gateway() {
        let (service, vm) = service();
        assert_eq!(
            service
                .caller(origin([10, 88, 1, 2], [10, 88, 1, 1]))
                .unwrap()
                .id,
            vm.id
        );
        for (peer, local) in [
            // Another address on the network, or the host itself.
            ([10, 88, 1, 3], [10, 88, 1, 1]),
            ([10, 88, 1, 1], [10, 88, 1, 1]),
            // The VM's address, but another network's gateway.
            ([10, 88, 1, 2], [10, 77, 0, 1]),
            ([127, 0, 0, 1], [127, 0, 0, 1]),
        ] {
            assert_eq!(
                service.caller(origin(peer, local)).unwrap_err(),
                StatusCode::FORBIDDEN,
                "{peer:?} -> {local:?}"
            );
        }
        // A stopped VM asks nothing.
        service
            .store
            .set_vm_state(&vm.id, VmState::Stopped, None, None)
            .unwrap();
        assert!(service
            .caller(origin([10, 88, 1, 2], [10, 88, 1, 1]))
            .is_err());
    }

    #[test]
    fn the_answers_are_the_vm_s_own_with_its_zone() {
        let (service, vm) = service();
        let instance = service.instance(&vm).unwrap();
        assert_eq!(instance.hostname, "web");
        assert_eq!(instance.zone.as_deref(), Some("cloud"));
        assert_eq!(instance.user_data.as_deref(), Some(&b"hi"[..]));
        assert_eq!(
            instance.ssh_keys,
            [("laptop".into(), "ssh-ed25519 AAAA".into())]
        );
        let nic = &instance.nics[0];
        assert_eq!(
            (nic.address, nic.prefix, nic.gateway, nic.mtu),
            (
                Ipv4Addr::new(10, 88, 1, 2),
                24,
                Ipv4Addr::new(10, 88, 1, 1),
                1500
            )
        );
    }

    #[test]
    fn tokens_are_issued_for_a_ttl_and_checked_per_vm() {
        let (service, vm) = service();
        assert!(service.issue(&vm.id, Some("0")).is_err());
        assert!(service.issue(&vm.id, None).is_err());
        let (token, ttl) = service.issue(&vm.id, Some("60")).unwrap();
        assert_eq!(ttl, Duration::from_secs(60));
        let tokens = service.tokens.lock().unwrap();
        assert!(tokens.check(Some(&token), &vm.id, Instant::now()).is_ok());
        assert!(tokens
            .check(Some(&token), "vm-other", Instant::now())
            .is_err());
    }
}
