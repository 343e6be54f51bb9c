//! Serving connections with bounds, for the public API and the peer API
//! alike: a client may not hold the agent with unbounded connections or
//! with headers it never finishes (slowloris). Request bodies are bounded by
//! each endpoint (JSON bodies by axum's limit, uploads by the tenant's
//! storage quota), and streaming answers (a followed console) end with their
//! VM or their client.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections served at once on one listener; more wait in the kernel's
/// backlog until one ends.
pub const MAX_CONNECTIONS: usize = 512;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 streams one connection may have open at once.
const MAX_STREAMS: u32 = 64;

/// Admission of connections on one listener.
#[derive(Clone)]
pub struct ConnectionLimit(Arc<Semaphore>);

impl Default for ConnectionLimit {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(MAX_CONNECTIONS)))
    }
}

impl ConnectionLimit {
    /// Waits for room for one more connection.
    pub async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().acquire_owned().await.ok()
    }
}

/// Serves one connection with `router`, headers within [`HEADER_TIMEOUT`].
pub async fn serve_connection<I>(io: I, router: axum::Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS);
    let service = TowerToHyperService::new(router);
    if let Err(err) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!("connection ended: {err}");
    }
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    let limit = ConnectionLimit::default();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            permit = limit.admit() => permit,
        };
        let Some(permit) = permit else { return };
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _from)) => stream,
            Err(err) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(stream, router).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn router() -> axum::Router {
        axum::Router::new().route("/", axum::routing::get(|| async { "ok" }))
    }

    #[tokio::test]
    async fn requests_are_answered_and_connections_admitted_up_to_the_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router(), async {
            let _ = stopped.await;
        }));
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        let _ = stop.send(());
        server.await.unwrap();

        let limit = ConnectionLimit::default();
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(limit.admit().await.unwrap());
        }
        let waiting = tokio::time::timeout(Duration::from_millis(50), limit.admit()).await;
        assert!(waiting.is_err(), "a connection past the limit was admitted");
        held.pop();
        assert!(limit.admit().await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn unfinished_headers_end_the_connection() {
        let (client, server_side) = tokio::io::duplex(1024);
        let served = tokio::spawn(serve_connection(server_side, router()));
        let (mut read, mut write) = tokio::io::split(client);
        write
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // Headers never finish: the server gives up after HEADER_TIMEOUT.
        tokio::time::sleep(HEADER_TIMEOUT + Duration::from_secs(1)).await;
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the connection outlived the header timeout")
            .unwrap();
        let mut rest = Vec::new();
        let _ = read.read_to_end(&mut rest).await;
    }
}
