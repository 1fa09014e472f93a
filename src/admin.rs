//! Admin HTTP server: `/healthz`, `/readyz` (starts unready until the controllers' caches have synced,
//! or immediately ready for a standby), `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Readiness flag shared with the controllers.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks ready.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    /// Whether ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    ready: Readiness,
    metrics: Arc<Metrics>,
}

/// Serves the admin endpoints on a bound listener ([`crate::serve::bind`]) until `stop` fires.
pub async fn serve(listener: TcpListener, ready: Readiness, metrics: Arc<Metrics>, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<AdminState>| async move {
                if s.ready.get() { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move {
                ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
            }),
        )
        .with_state(AdminState { ready, metrics });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin server listening");
    }
    crate::serve::serve(listener, app, None, crate::serve::Limits::ADMIN, stop).await
}
