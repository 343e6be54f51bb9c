//! Mutual TLS between hosts. Each host has its own key and self-signed
//! certificate (`DATA_DIR/identity/`, made at first start); the operator
//! registers a peer by its certificate's SHA-256 fingerprint
//! (`GET /v1/host-identity` shows this host's). Both ends pin: a server
//! answers only clients whose certificate is a registered peer's, and a
//! client talks only to the server whose certificate is registered for the
//! address it dialled. No certificate authority is involved, so nothing
//! outside the two hosts' operators can mint an identity they accept.
//!
//! The peer listener (`peer_port` on the underlay address) serves only the
//! host-to-host routes (`/v1/overlay`), and a request there carries the
//! peer's identity ([`PeerHost`]): a peer can do what peers need, never
//! what the operator can, and holds no operator token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// Errors in making or loading this host's identity, or its TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot make this host's key and certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS settings refused: {0}")]
    Tls(#[from] rustls::Error),
}

/// The SHA-256 of a certificate's DER encoding, as 64 lower-case hex digits.
pub fn fingerprint(cert: &[u8]) -> String {
    Sha256::digest(cert)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Whether `text` is a fingerprint as [`fingerprint`] writes it.
pub fn is_fingerprint(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// This host's key and certificate.
pub struct HostIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    pub fingerprint: String,
}

impl HostIdentity {
    const DIR: &'static str = "identity";
    const CERT: &'static str = "host.crt.der";
    const KEY: &'static str = "host.key.der";

    /// Loads the identity from `data_dir/identity`, making it the first
    /// time (the key file is root's only).
    pub fn load_or_create(data_dir: &Path, name: &str) -> Result<Self, IdentityError> {
        let dir = data_dir.join(Self::DIR);
        let (cert_path, key_path) = (dir.join(Self::CERT), dir.join(Self::KEY));
        let io = |what: &'static str, path: &Path| {
            let path = path.display().to_string();
            move |source| IdentityError::Io { what, path, source }
        };
        if !cert_path.exists() || !key_path.exists() {
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
            let key = rcgen::KeyPair::generate()?;
            let params = rcgen::CertificateParams::new(vec![name.to_string()])?;
            let cert = params.self_signed(&key)?;
            write_private(&key_path, &key.serialize_der()).map_err(io("write", &key_path))?;
            std::fs::write(&cert_path, cert.der()).map_err(io("write", &cert_path))?;
        }
        let cert = std::fs::read(&cert_path).map_err(io("read", &cert_path))?;
        let key = std::fs::read(&key_path).map_err(io("read", &key_path))?;
        Ok(Self {
            fingerprint: fingerprint(&cert),
            cert: CertificateDer::from(cert),
            key: PrivatePkcs8KeyDer::from(key),
        })
    }

    fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Writes a file only root can read, created new.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The registered peers' fingerprints, by underlay address; kept in step
/// with the `hosts` table by the handlers that change it.
#[derive(Debug, Default)]
pub struct PeerRegistry {
    by_address: RwLock<HashMap<IpAddr, (String, String)>>,
}

impl PeerRegistry {
    /// Replaces the registry with `peers`: (name, address, fingerprint).
    pub fn replace(&self, peers: impl IntoIterator<Item = (String, IpAddr, String)>) {
        let map = peers
            .into_iter()
            .map(|(name, address, fingerprint)| (address, (name, fingerprint)))
            .collect();
        *self
            .by_address
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = map;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<IpAddr, (String, String)>> {
        self.by_address
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The registered peer whose certificate has `fingerprint`.
    pub fn name_of(&self, fingerprint: &str) -> Option<String> {
        self.read()
            .values()
            .find(|(_, known)| known == fingerprint)
            .map(|(name, _)| name.clone())
    }

    /// The fingerprint registered for the peer at `address`.
    pub fn fingerprint_at(&self, address: IpAddr) -> Option<String> {
        self.read().get(&address).map(|(_, known)| known.clone())
    }
}

/// The ring provider: TLS 1.3 with X25519 and AES-GCM/ChaCha20. rustls
/// marks it deprecated for lacking post-quantum key exchange, which only
/// its aws-lc-rs provider has (a C library built with cmake); hosts pin
/// each other's certificates, so the certificates are not what a future
/// quantum attacker would break, the recorded key exchange is: moving to
/// aws-lc-rs is the upgrade path.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes [`provider`] the process's default, for HTTP clients that build
/// their TLS settings themselves (reqwest's, even for plain-HTTP calls).
/// A second call keeps the first provider.
pub fn install_default_provider() {
    let _ = CryptoProvider::install_default(Arc::unwrap_or_clone(provider()));
}

/// The handshake signature checks both verifiers make the same way: with
/// the provider's algorithms (only who the certificate is differs).
macro_rules! provider_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Accepts a client certificate only when it is a registered peer's.
#[derive(Debug)]
struct RegisteredClients {
    registry: Arc<PeerRegistry>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for RegisteredClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.registry.name_of(&fingerprint(end_entity)) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(rustls::Error::General(format!(
                "certificate {} is no registered peer's",
                fingerprint(end_entity)
            ))),
        }
    }

    provider_signatures!();
}

/// Accepts a server certificate only when it is the one registered for
/// the address dialled.
#[derive(Debug)]
struct PinnedServers {
    registry: Arc<PeerRegistry>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ServerName::IpAddress(address) = server_name else {
            return Err(rustls::Error::General(
                "peers are dialled by underlay address".into(),
            ));
        };
        let address = IpAddr::from(*address);
        let presented = fingerprint(end_entity);
        match self.registry.fingerprint_at(address) {
            Some(pinned) if pinned == presented => Ok(ServerCertVerified::assertion()),
            Some(pinned) => Err(rustls::Error::General(format!(
                "{address} presented certificate {presented}, not the registered {pinned}"
            ))),
            None => Err(rustls::Error::General(format!(
                "{address} is no registered peer"
            ))),
        }
    }

    provider_signatures!();
}

/// The TLS settings of this host's peer listener: TLS 1.3, a registered
/// peer's certificate required.
pub fn server_config(
    identity: &HostIdentity,
    registry: Arc<PeerRegistry>,
) -> Result<rustls::ServerConfig, IdentityError> {
    let provider = provider();
    let verifier = RegisteredClients {
        registry,
        provider: provider.clone(),
    };
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(identity.chain(), identity.key())?)
}

/// The TLS settings of calls to peers: TLS 1.3, the server pinned by the
/// address dialled, this host's certificate presented.
pub fn client_config(
    identity: &HostIdentity,
    registry: Arc<PeerRegistry>,
) -> Result<rustls::ClientConfig, IdentityError> {
    let provider = provider();
    let verifier = PinnedServers {
        registry,
        provider: provider.clone(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(identity.chain(), identity.key())?)
}

/// The peer a request on the peer listener came from (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHost(pub String);

/// Serves `router` on `listen` over mutual TLS until the runtime stops;
/// each request carries the [`PeerHost`] that made it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: rustls::ServerConfig,
    registry: Arc<PeerRegistry>,
    router: axum::Router,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    if let Ok(listen) = listener.local_addr() {
        tracing::info!("peer API (mutual TLS) listening on {listen}");
    }
    let limit = crate::http::server::ConnectionLimit::default();
    loop {
        let Some(permit) = limit.admit().await else {
            return;
        };
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!("peer listener: accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, registry, router) = (acceptor.clone(), registry.clone(), router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    tracing::warn!(%from, "peer TLS handshake refused: {err}");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%from, "peer TLS handshake timed out");
                    return;
                }
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| registry.name_of(&fingerprint(cert)));
            let Some(peer) = peer else {
                return;
            };
            // Every request on this connection is the peer's.
            let router = router.layer(axum::middleware::from_fn(
                move |mut request: axum::extract::Request, next: axum::middleware::Next| {
                    request.extensions_mut().insert(PeerHost(peer.clone()));
                    next.run(request)
                },
            ));
            crate::http::server::serve_connection(tls, router).await;
        });
    }
}

/// How long a peer may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dir: &Path, name: &str) -> HostIdentity {
        HostIdentity::load_or_create(dir, name).unwrap()
    }

    #[test]
    fn an_identity_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("nubis-identity-{}", std::process::id()));
        let first = identity(&dir, "a");
        let again = identity(&dir, "a");
        assert_eq!(first.fingerprint, again.fingerprint);
        assert!(is_fingerprint(&first.fingerprint));
        let mode = std::fs::metadata(dir.join("identity/host.key.der"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn fingerprints_are_checked() {
        assert!(is_fingerprint(&fingerprint(b"x")));
        assert!(!is_fingerprint("AB"));
        assert!(!is_fingerprint(&"g".repeat(64)));
        assert!(!is_fingerprint(&"A".repeat(64)));
    }

    /// A TLS connection between two in-memory ends with these settings.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::new(192, 0, 2, 2).into());
        let mut client = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut server = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            client
                .write_tls(&mut buf)
                .map_err(|err| rustls::Error::General(err.to_string()))?;
            server
                .read_tls(&mut buf.as_slice())
                .map_err(|err| rustls::Error::General(err.to_string()))?;
            server.process_new_packets()?;
            let mut buf = Vec::new();
            server
                .write_tls(&mut buf)
                .map_err(|err| rustls::Error::General(err.to_string()))?;
            client
                .read_tls(&mut buf.as_slice())
                .map_err(|err| rustls::Error::General(err.to_string()))?;
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General(
            "the handshake did not finish".into(),
        ))
    }

    #[test]
    fn only_registered_peers_talk_both_ways() {
        let dir = std::env::temp_dir().join(format!("nubis-mtls-{}", std::process::id()));
        let a = identity(&dir.join("a"), "a");
        let b = identity(&dir.join("b"), "b");
        let stranger = identity(&dir.join("s"), "s");
        let b_address: IpAddr = std::net::Ipv4Addr::new(192, 0, 2, 2).into();
        let a_address: IpAddr = std::net::Ipv4Addr::new(192, 0, 2, 1).into();
        // a knows b at 192.0.2.2; b knows a.
        let a_knows = Arc::new(PeerRegistry::default());
        a_knows.replace([("b".to_string(), b_address, b.fingerprint.clone())]);
        let b_knows = Arc::new(PeerRegistry::default());
        b_knows.replace([("a".to_string(), a_address, a.fingerprint.clone())]);
        let b_server = || server_config(&b, b_knows.clone()).unwrap();
        handshake(client_config(&a, a_knows.clone()).unwrap(), b_server()).unwrap();
        assert_eq!(b_knows.name_of(&a.fingerprint).as_deref(), Some("a"));
        // A stranger's client certificate is refused by the server.
        let stranger_knows = Arc::new(PeerRegistry::default());
        stranger_knows.replace([("b".to_string(), b_address, b.fingerprint.clone())]);
        assert!(handshake(
            client_config(&stranger, stranger_knows).unwrap(),
            b_server()
        )
        .is_err());
        // A server that is not the registered one is refused by the client.
        let impostor = server_config(&stranger, b_knows.clone()).unwrap();
        assert!(handshake(client_config(&a, a_knows.clone()).unwrap(), impostor).is_err());
        // An address with no registered peer is refused.
        let nobody = Arc::new(PeerRegistry::default());
        assert!(handshake(client_config(&a, nobody).unwrap(), b_server()).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
