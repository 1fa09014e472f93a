//! The one way fhirsync serves HTTP (the admin endpoints and the relay's receiver): a listener bound
//! before anything says it is ready — a failed bind stops the process with a clear message — and
//! connections bounded whatever a client sends: at most [`Limits::connections`] at once (past it,
//! new ones wait in the kernel's backlog and hold no descriptor or memory here), headers within
//! [`Limits::header_time`] and [`Limits::header_bytes`], HTTP/1 only, optional TLS with a
//! handshake deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bounds on the connections of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub connections: usize,
    /// Longest a client may take to send its request headers (a slow sender is cut off).
    pub header_time: Duration,
    /// The same while fewer than a quarter of the connections are free: a flood of slow senders
    /// is cycled out quickly, and real clients (whose headers take milliseconds) get their turn.
    pub header_time_under_load: Duration,
    /// Largest read buffer of a connection (headers beyond it are refused with 431).
    pub header_bytes: usize,
    /// Longest a TLS handshake may take.
    pub handshake_time: Duration,
}

impl Limits {
    /// The relay's receiver: sources send small headers; a notification's body is bounded by the
    /// relay itself. 256 connections × 32 KiB of buffer is 8 MiB at most.
    pub const RECEIVER: Limits = Limits {
        connections: 256,
        header_time: Duration::from_secs(5),
        header_time_under_load: Duration::from_secs(1),
        header_bytes: 32 << 10,
        handshake_time: Duration::from_secs(10),
    };
    /// The admin endpoints (probes and a metrics scraper).
    pub const ADMIN: Limits = Limits {
        connections: 32,
        header_time: Duration::from_secs(5),
        header_time_under_load: Duration::from_secs(1),
        header_bytes: 16 << 10,
        handshake_time: Duration::from_secs(10),
    };
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {addr} ({what}): {source}; is another process using the port, or is the address not this host's?"
)]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` for `what` (named in the error).
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { addr, what, source })
}

/// Serves `app` on a bound listener until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections.max(1)));
    let builder = |header_time: Duration| {
        let mut b = Builder::new(TokioExecutor::new()).http1_only();
        b.http1().timer(TokioTimer::new()).header_read_timeout(header_time).max_buf_size(limits.header_bytes.max(8192));
        Arc::new(b)
    };
    let (normal, loaded) = (builder(limits.header_time), builder(limits.header_time_under_load));
    let pressure = limits.connections.max(1) / 4;
    loop {
        // a slot first: at the cap, connections wait in the backlog, not in this process
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => return },
            _ = stop.cancelled() => return,
        };
        let socket = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    // out of file descriptors and the like: do not spin
                    tracing::warn!(error = %e, "a listener could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let builder = if slots.available_permits() < pressure { loaded.clone() } else { normal.clone() };
        let (acceptor, app, stop) = (acceptor.clone(), app.clone(), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = TowerToHyperService::new(app);
            match acceptor {
                None => drive(&builder, TokioIo::new(socket), service, &stop).await,
                Some(acceptor) => {
                    if let Ok(Ok(stream)) = tokio::time::timeout(limits.handshake_time, acceptor.accept(socket)).await {
                        drive(&builder, TokioIo::new(stream), service, &stop).await
                    }
                }
            }
        });
    }
}

/// Most a connection in flight is given to finish after `stop`.
const GRACE: Duration = Duration::from_secs(5);

async fn drive<I, S>(
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    io: I,
    service: S,
    stop: &CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = axum::response::Response>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(GRACE, conn).await;
}
