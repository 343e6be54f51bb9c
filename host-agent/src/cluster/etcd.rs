//! The agent's use of etcd, typed: JSON values read with their revisions,
//! and every read-modify-write a transaction on the revision that was read,
//! so that a writer holding stale state loses instead of overwriting newer
//! state.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
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
/// How long a call that failed on the way is tried again: longer than
/// etcd takes to elect a leader, even on a loaded host.
const TRANSIENT_PATIENCE: Duration = Duration::from_secs(10);
/// The pause after the first such failure; it doubles up to a second.
const TRANSIENT_PAUSE: Duration = Duration::from_millis(100);

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

/// `value` as the JSON stored at `key` (named in the error).
pub(super) fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, ClusterError> {
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
        etcd.retrying(
            || format!("reach etcd at {}", urls.join(",")),
            |mut client| async move { client.get("health-check", None).await },
        )
        .await?;
        Ok(etcd)
    }

    /// The client for calls that wait until their caller stops them
    /// (campaigns, lease renewal streams, watches).
    pub fn waiting_client(&self) -> Client {
        self.waiting.clone()
    }

    /// Runs `call` on the client, again when it failed on the way (an
    /// endpoint that died: the client's balancer may still pick it once;
    /// etcd electing a new leader):
    /// every call here may run twice (reads, compare-and-swap writes,
    /// writes of this host's own keys, lease grants that expire unused).
    async fn retrying<T, F, Fut>(
        &self,
        action: impl Fn() -> String,
        call: F,
    ) -> Result<T, ClusterError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + TRANSIENT_PATIENCE;
        let mut pause = TRANSIENT_PAUSE;
        loop {
            match call(self.client.clone()).await {
                Ok(value) => return Ok(value),
                Err(err) if tokio::time::Instant::now() < deadline && is_transient(&err) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(source) => {
                    return Err(ClusterError::Etcd {
                        action: action(),
                        source,
                    })
                }
            }
        }
    }

    /// Returns at the first change in `[start, end)` after `revision` (or
    /// when etcd cancels the watch, e.g. because that revision was
    /// compacted: the caller reads everything again either way).
    pub async fn changed(
        &self,
        what: &str,
        (start, end): (&str, &str),
        revision: i64,
    ) -> Result<(), ClusterError> {
        let options = WatchOptions::new()
            .with_range(end.as_bytes())
            .with_start_revision(revision + 1);
        let failed = etcd_error(format!("watch {what}"));
        let mut client = self.waiting_client();
        let mut stream = match client.watch(start.as_bytes(), Some(options)).await {
            Ok(stream) => stream,
            Err(err) => return Err(failed(err)),
        };
        loop {
            match stream.message().await {
                Ok(Some(response)) if response.canceled() || !response.events().is_empty() => {
                    return Ok(())
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(err) => return Err(failed(err)),
            }
        }
    }

    /// The value at `key`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Stored<T>>, ClusterError> {
        let response = self
            .retrying(
                || format!("read {key}"),
                |mut client| async move { client.get(key, None).await },
            )
            .await?;
        response.kvs().first().map(decode).transpose()
    }

    /// Several prefixes read at one revision: `(key, value)` per prefix.
    pub async fn get_prefixes<T: DeserializeOwned>(
        &self,
        prefixes: &[&str],
    ) -> Result<Vec<Vec<(String, Stored<T>)>>, ClusterError> {
        Ok(self.get_prefixes_at(prefixes).await?.0)
    }

    /// Every value under `prefix`, as a `T`, with its key.
    pub async fn list<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, ClusterError> {
        Ok(self
            .get_prefixes::<T>(&[prefix])
            .await?
            .pop()
            .unwrap_or_default()
            .into_iter()
            .map(|(key, stored)| (key, stored.value))
            .collect())
    }

    /// [`Etcd::get_prefixes`], and the revision they were read at.
    pub async fn get_prefixes_at<T: DeserializeOwned>(
        &self,
        prefixes: &[&str],
    ) -> Result<(Vec<Vec<(String, Stored<T>)>>, i64), ClusterError> {
        let txn = || {
            let ops: Vec<TxnOp> = prefixes
                .iter()
                .map(|prefix| TxnOp::get(*prefix, Some(GetOptions::new().with_prefix())))
                .collect();
            Txn::new().and_then(ops)
        };
        let response = self
            .retrying(
                || format!("read {}", prefixes.join(" and ")),
                |mut client| {
                    let txn = txn();
                    async move { client.txn(txn).await }
                },
            )
            .await?;
        let revision = response.header().map_or(0, |header| header.revision());
        let values = response
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
            .collect::<Result<_, ClusterError>>()?;
        Ok((values, revision))
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
        let bytes = encode(key, value)?;
        let txn = || {
            let compare = if seen == 0 {
                Compare::create_revision(key, CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key, CompareOp::Equal, seen)
            };
            let options = lease.map(|lease| PutOptions::new().with_lease(lease));
            Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key, bytes.clone(), options)])
        };
        let response = self
            .retrying(
                || format!("write {key}"),
                |mut client| {
                    let txn = txn();
                    async move { client.txn(txn).await }
                },
            )
            .await?;
        Ok(response.succeeded())
    }

    /// Puts `value` at `key` unconditionally (a key only this host writes).
    pub async fn put<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        lease: Option<i64>,
    ) -> Result<(), ClusterError> {
        let bytes = encode(key, value)?;
        self.retrying(
            || format!("write {key}"),
            |mut client| {
                let options = lease.map(|lease| PutOptions::new().with_lease(lease));
                let bytes = bytes.clone();
                async move { client.put(key, bytes, options).await }
            },
        )
        .await?;
        Ok(())
    }

    /// Runs `txn`: whether its conditions held, and the revision after it.
    pub async fn txn(&self, action: &str, txn: Txn) -> Result<(bool, i64), ClusterError> {
        let response = self
            .retrying(
                || action.to_string(),
                |mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                },
            )
            .await?;
        let revision = response.header().map_or(0, |header| header.revision());
        Ok((response.succeeded(), revision))
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

    /// Deletes `key` (a key only this host writes).
    pub async fn delete(&self, key: &str) -> Result<(), ClusterError> {
        self.retrying(
            || format!("delete {key}"),
            |mut client| async move { client.delete(key, None).await },
        )
        .await?;
        Ok(())
    }

    /// Deletes `key` if `absent` does not exist (e.g. a member whose
    /// heartbeat is gone). Whether it was deleted.
    pub async fn delete_if_absent(&self, key: &str, absent: &str) -> Result<bool, ClusterError> {
        let response = self
            .retrying(
                || format!("delete {key}"),
                |mut client| {
                    let txn = Txn::new()
                        .when([Compare::create_revision(absent, CompareOp::Equal, 0)])
                        .and_then([TxnOp::delete(key, None)]);
                    async move { client.txn(txn).await }
                },
            )
            .await?;
        Ok(response.succeeded())
    }

    /// Grants a lease of `ttl_s` seconds.
    pub async fn grant(&self, ttl_s: i64) -> Result<i64, ClusterError> {
        let response = self
            .retrying(
                || "grant a lease".to_string(),
                |mut client| async move { client.lease_grant(ttl_s, None).await },
            )
            .await?;
        Ok(response.id())
    }

    /// Revokes lease `id` (its keys go at once); a lease that expired
    /// already is no error.
    pub async fn revoke(&self, id: i64) -> Result<(), ClusterError> {
        let revoked = self
            .retrying(
                || format!("revoke lease {id:x}"),
                |mut client| async move {
                    match client.lease_revoke(id).await {
                        Ok(_) => Ok(()),
                        Err(etcd_client::Error::GRpcStatus(status))
                            if status.message().contains("lease not found") =>
                        {
                            Ok(())
                        }
                        Err(err) => Err(err),
                    }
                },
            )
            .await;
        revoked
    }

    /// The value of the current leader of election `name`, if any.
    pub async fn leader(&self, name: &str) -> Result<Option<String>, ClusterError> {
        self.retrying(
            || format!("read the leader of {name}"),
            |mut client| async move {
                match client.leader(name).await {
                    Ok(response) => Ok(response
                        .kv()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
                    Err(etcd_client::Error::GRpcStatus(status))
                        if status.message().contains("no leader") =>
                    {
                        Ok(None)
                    }
                    Err(err) => Err(err),
                }
            },
        )
        .await
    }
}

/// Whether `err` is a failure on the way to etcd rather than etcd's answer.
fn is_transient(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::TransportError(_) => true,
        // etcd answers Unavailable while it elects a leader ("leader
        // changed", "no leader"); tonic, when an endpoint cannot be reached.
        etcd_client::Error::GRpcStatus(status) => {
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown
            )
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_on_the_way_are_transient_and_answers_are_not() {
        let status =
            |code, message: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, message));
        assert!(is_transient(&status(
            tonic::Code::Unavailable,
            "etcdserver: leader changed"
        )));
        assert!(is_transient(&status(
            tonic::Code::Unavailable,
            "tcp connect error"
        )));
        assert!(!is_transient(&status(
            tonic::Code::InvalidArgument,
            "etcdserver: key is not provided"
        )));
        assert!(!is_transient(&status(
            tonic::Code::NotFound,
            "etcdserver: requested lease not found"
        )));
    }
}
