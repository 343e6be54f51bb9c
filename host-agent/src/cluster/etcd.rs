//! The agent's use of etcd, typed: JSON values read with their revisions,
//! and every read-modify-write a transaction on the revision that was read,
//! so that a writer holding stale state loses instead of overwriting newer
//! state.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::settings::ClusterSettings;
use super::ClusterError;

/// How long one etcd call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a read-modify-write is retried when another writer got
/// in between.
const CAS_ATTEMPTS: usize = 16;

/// A value as it was read: what `update` compares against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<T> {
    pub value: T,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A connection to the cluster's etcd.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    /// For calls that wait as long as they must (an election campaign,
    /// a watch): no per-call timeout; their callers stop them.
    waiting: Client,
}

fn etcd_error(action: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> ClusterError {
    let action = action.into();
    move |source| ClusterError::Etcd { action, source }
}

/// Decodes the JSON at `kv`.
fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<Stored<T>, ClusterError> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    let value = serde_json::from_slice(kv.value()).map_err(|err| ClusterError::Corrupt {
        key,
        reason: err.to_string(),
    })?;
    Ok(Stored {
        value,
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    })
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, ClusterError> {
    serde_json::to_vec(value).map_err(|err| ClusterError::Corrupt {
        key: key.to_string(),
        reason: format!("cannot encode: {err}"),
    })
}

async fn read_file(path: &std::path::Path) -> Result<Vec<u8>, ClusterError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| ClusterError::TlsFile {
            path: path.to_path_buf(),
            source,
        })
}

impl Etcd {
    /// Connects to the endpoints of `settings`, with client certificates
    /// if it has them.
    pub async fn connect(settings: &ClusterSettings) -> Result<Self, ClusterError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &settings.tls {
            let ca = read_file(&tls.ca).await?;
            let cert = read_file(&tls.cert).await?;
            let key = read_file(&tls.key).await?;
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .identity(Identity::from_pem(cert, key)),
            );
        }
        let urls: Vec<String> = settings.endpoints.iter().map(|e| e.url()).collect();
        let waiting = Client::connect(&urls, Some(options.clone()))
            .await
            .map_err(etcd_error(format!("connect to {}", urls.join(","))))?;
        let client = Client::connect(&urls, Some(options.with_timeout(CALL_TIMEOUT)))
            .await
            .map_err(etcd_error(format!("connect to {}", urls.join(","))))?;
        let etcd = Etcd { client, waiting };
        // A connection is lazy: one read shows now whether etcd answers.
        etcd.client
            .clone()
            .get("health-check", None)
            .await
            .map_err(etcd_error(format!("reach etcd at {}", urls.join(","))))?;
        Ok(etcd)
    }

    /// The client for calls that wait until their caller stops them
    /// (campaigns, lease renewal streams, watches).
    pub fn waiting_client(&self) -> Client {
        self.waiting.clone()
    }

    /// The value at `key`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Stored<T>>, ClusterError> {
        let response = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(etcd_error(format!("read {key}")))?;
        response.kvs().first().map(decode).transpose()
    }

    /// Several prefixes read at one revision: `(key, value)` per prefix.
    pub async fn get_prefixes<T: DeserializeOwned>(
        &self,
        prefixes: &[&str],
    ) -> Result<Vec<Vec<(String, Stored<T>)>>, ClusterError> {
        let ops: Vec<TxnOp> = prefixes
            .iter()
            .map(|prefix| TxnOp::get(*prefix, Some(GetOptions::new().with_prefix())))
            .collect();
        let response = self
            .client
            .clone()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(etcd_error(format!("read {}", prefixes.join(" and "))))?;
        response
            .op_responses()
            .iter()
            .map(|op| match op {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .iter()
                    .map(|kv| Ok((String::from_utf8_lossy(kv.key()).into_owned(), decode(kv)?)))
                    .collect(),
                _ => Ok(Vec::new()),
            })
            .collect()
    }

    /// Puts `value` at `key` if nobody wrote it since `seen` (a
    /// `mod_revision`; 0: if it does not exist). Whether it was written.
    pub async fn put_if<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        seen: i64,
        lease: Option<i64>,
    ) -> Result<bool, ClusterError> {
        let compare = if seen == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, seen)
        };
        let options = lease.map(|lease| PutOptions::new().with_lease(lease));
        let txn =
            Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key, encode(key, value)?, options)]);
        let response = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(etcd_error(format!("write {key}")))?;
        Ok(response.succeeded())
    }

    /// Puts `value` at `key` unconditionally (a key only this host writes).
    pub async fn put<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        lease: Option<i64>,
    ) -> Result<(), ClusterError> {
        let options = lease.map(|lease| PutOptions::new().with_lease(lease));
        self.client
            .clone()
            .put(key, encode(key, value)?, options)
            .await
            .map_err(etcd_error(format!("write {key}")))?;
        Ok(())
    }

    /// Reads `key`, lets `change` make its new value from the current one
    /// (or refuse), and writes it if nobody wrote in between; retries
    /// otherwise. The value written.
    pub async fn update<T, F>(&self, key: &str, mut change: F) -> Result<T, ClusterError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> Result<T, ClusterError>,
    {
        for _ in 0..CAS_ATTEMPTS {
            let current: Option<Stored<T>> = self.get(key).await?;
            let seen = current.as_ref().map_or(0, |stored| stored.mod_revision);
            let new = change(current.map(|stored| stored.value))?;
            if self.put_if(key, &new, seen, None).await? {
                return Ok(new);
            }
        }
        Err(ClusterError::Contended {
            key: key.to_string(),
            attempts: CAS_ATTEMPTS,
        })
    }

    /// Deletes `key` if `absent` does not exist (e.g. a member whose
    /// heartbeat is gone). Whether it was deleted.
    pub async fn delete_if_absent(&self, key: &str, absent: &str) -> Result<bool, ClusterError> {
        let txn = Txn::new()
            .when([Compare::create_revision(absent, CompareOp::Equal, 0)])
            .and_then([TxnOp::delete(key, None)]);
        let response = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(etcd_error(format!("delete {key}")))?;
        Ok(response.succeeded())
    }

    /// Grants a lease of `ttl_s` seconds.
    pub async fn grant(&self, ttl_s: i64) -> Result<i64, ClusterError> {
        let response = self
            .client
            .clone()
            .lease_grant(ttl_s, None)
            .await
            .map_err(etcd_error("grant a lease"))?;
        Ok(response.id())
    }

    /// Revokes lease `id` (its keys go at once); a lease that expired
    /// already is no error.
    pub async fn revoke(&self, id: i64) -> Result<(), ClusterError> {
        match self.client.clone().lease_revoke(id).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(status))
                if status.message().contains("lease not found") =>
            {
                Ok(())
            }
            Err(source) => Err(ClusterError::Etcd {
                action: format!("revoke lease {id:x}"),
                source,
            }),
        }
    }

    /// The value of the current leader of election `name`, if any.
    pub async fn leader(&self, name: &str) -> Result<Option<String>, ClusterError> {
        match self.client.clone().leader(name).await {
            Ok(response) => Ok(response
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            Err(etcd_client::Error::GRpcStatus(status))
                if status.message().contains("no leader") =>
            {
                Ok(None)
            }
            Err(source) => Err(ClusterError::Etcd {
                action: format!("read the leader of {name}"),
                source,
            }),
        }
    }
}
