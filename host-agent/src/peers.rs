//! Calls from this agent to its peers (`/v1/peers`) over mutual TLS
//! (`peer_tls`): replicating overlay networks to the hosts they span,
//! asking a network's home host for addresses, and preparing migrations.
//! Each peer is dialled at its underlay address and peer port, and must
//! present the certificate registered for it; this host presents its own.
//! Answers are read up to a bound: a peer cannot make this agent allocate
//! without limit.

use std::time::Duration;

use nubis_api::{
    AddressGrant, AddressRequest, ApiError, ErrorCode, IncomingMigration, IncomingReady, Network,
    NetworkReplica, Vm,
};
use serde::de::DeserializeOwned;

use crate::store::PeerRow;

/// A failed call to a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("host '{host}' ({url}) cannot be reached: {message}")]
    Unreachable {
        host: String,
        url: String,
        message: String,
    },
    #[error("host '{host}' refused ({status}): {message}")]
    Refused {
        host: String,
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("host '{host}' sent an answer this agent cannot read: {message}")]
    Garbled { host: String, message: String },
}

impl PeerError {
    /// The API error code the peer answered with, if it answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            PeerError::Refused { code, .. } => *code,
            _ => None,
        }
    }
}

/// How long a call to a peer may take; a peer that is down must not hang
/// the request that needs it.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read from a peer (a network replica or a VM is a
/// few KiB).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// `err` and what caused it (reqwest's own message leaves the TLS or
/// connection error out).
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The HTTP client for peers.
pub struct PeerClient {
    http: reqwest::Client,
    /// For requests forwarded on a client's behalf (a VM's console
    /// stream, a graceful stop): no overall timeout, the client's own
    /// patience bounds them.
    forwarding: reqwest::Client,
}

/// A request forwarded to the host where its VM lives.
pub struct Forwarded {
    pub method: reqwest::Method,
    /// Path and query, as the client sent them.
    pub path: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl PeerClient {
    /// A client that presents this host's certificate and pins each
    /// peer's (`tls`: `peer_tls::client_config`).
    pub fn new(tls: rustls::ClientConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .tls_backend_preconfigured(tls.clone())
            .build()?;
        let forwarding = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tls_backend_preconfigured(tls)
            .build()?;
        Ok(Self { http, forwarding })
    }

    /// Sends `request` to `peer`, which serves the API on its peer
    /// listener too; its answer (status, headers, a body still to read).
    pub async fn forward(
        &self,
        peer: &PeerRow,
        request: Forwarded,
    ) -> Result<reqwest::Response, PeerError> {
        let url = format!(
            "https://{}:{}{}",
            peer.host.address, peer.host.peer_port, request.path
        );
        self.forwarding
            .request(request.method, &url)
            .headers(request.headers)
            .body(request.body)
            .send()
            .await
            .map_err(|err| PeerError::Unreachable {
                host: peer.host.name.clone(),
                url: url.clone(),
                message: with_causes(&err),
            })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        peer: &PeerRow,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Option<T>, PeerError> {
        let url = format!(
            "https://{}:{}{path}",
            peer.host.address, peer.host.peer_port
        );
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let unreachable = |err: reqwest::Error| PeerError::Unreachable {
            host: peer.host.name.clone(),
            url: url.clone(),
            message: with_causes(&err),
        };
        let mut response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(PeerError::Garbled {
                    host: peer.host.name.clone(),
                    message: format!("an answer of more than {MAX_ANSWER_BYTES} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let error = serde_json::from_slice::<ApiError>(&bytes).ok();
            return Err(PeerError::Refused {
                host: peer.host.name.clone(),
                status: status.as_u16(),
                code: error.as_ref().map(|error| error.error.code),
                message: error
                    .map(|error| error.error.message)
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect()),
            });
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|err| PeerError::Garbled {
                host: peer.host.name.clone(),
                message: with_causes(&err),
            })
    }

    fn garbled(peer: &PeerRow, what: &str) -> PeerError {
        PeerError::Garbled {
            host: peer.host.name.clone(),
            message: format!("no {what} in the answer"),
        }
    }

    fn json<T: serde::Serialize>(value: &T) -> Option<Vec<u8>> {
        serde_json::to_vec(value).ok()
    }

    /// Gives the peer an overlay network (or its new member list).
    pub async fn put_network(
        &self,
        peer: &PeerRow,
        replica: &NetworkReplica,
    ) -> Result<Network, PeerError> {
        let path = format!("/v1/overlay/networks/{}", replica.network.id);
        self.call(peer, reqwest::Method::PUT, &path, Self::json(replica))
            .await?
            .ok_or_else(|| Self::garbled(peer, "network"))
    }

    /// Takes an overlay network off the peer; one it does not have is gone
    /// already.
    pub async fn delete_network(&self, peer: &PeerRow, id: &str) -> Result<(), PeerError> {
        let path = format!("/v1/overlay/networks/{id}");
        match self
            .call::<serde_json::Value>(peer, reqwest::Method::DELETE, &path, None)
            .await
        {
            Err(err) if err.code() == Some(ErrorCode::NotFound) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Asks the network's home host for an address.
    pub async fn request_address(
        &self,
        home: &PeerRow,
        network_id: &str,
        request: &AddressRequest,
    ) -> Result<AddressGrant, PeerError> {
        let path = format!("/v1/overlay/networks/{network_id}/addresses");
        self.call(home, reqwest::Method::POST, &path, Self::json(request))
            .await?
            .ok_or_else(|| Self::garbled(home, "address"))
    }

    /// Gives an address back to the network's home host.
    pub async fn release_address(
        &self,
        home: &PeerRow,
        network_id: &str,
        address: std::net::Ipv4Addr,
        host: std::net::Ipv4Addr,
    ) -> Result<(), PeerError> {
        let path = format!("/v1/overlay/networks/{network_id}/addresses/{address}?host={host}");
        self.call::<serde_json::Value>(home, reqwest::Method::DELETE, &path, None)
            .await
            .map(|_| ())
    }

    /// Asks the peer to receive a VM: it prepares the VM and a VMM that
    /// waits for ours.
    pub async fn incoming(
        &self,
        peer: &PeerRow,
        incoming: &IncomingMigration,
    ) -> Result<IncomingReady, PeerError> {
        self.call(
            peer,
            reqwest::Method::POST,
            "/v1/overlay/migrations",
            Self::json(incoming),
        )
        .await?
        .ok_or_else(|| Self::garbled(peer, "listen address"))
    }

    /// Tells the peer that the VM it received is handed over.
    pub async fn incoming_done(&self, peer: &PeerRow, vm_id: &str) -> Result<(), PeerError> {
        let path = format!("/v1/overlay/migrations/{vm_id}");
        self.call::<serde_json::Value>(peer, reqwest::Method::PUT, &path, None)
            .await
            .map(|_| ())
    }

    /// Tells the peer to drop the VM it was receiving.
    pub async fn incoming_abort(&self, peer: &PeerRow, vm_id: &str) -> Result<(), PeerError> {
        let path = format!("/v1/overlay/migrations/{vm_id}");
        match self
            .call::<serde_json::Value>(peer, reqwest::Method::DELETE, &path, None)
            .await
        {
            Err(err) if err.code() == Some(ErrorCode::NotFound) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// The peer's record of a VM it received.
    pub async fn vm(&self, peer: &PeerRow, vm_id: &str) -> Result<Vm, PeerError> {
        let path = format!("/v1/overlay/migrations/{vm_id}");
        self.call(peer, reqwest::Method::GET, &path, None)
            .await?
            .ok_or_else(|| Self::garbled(peer, "VM"))
    }
}
