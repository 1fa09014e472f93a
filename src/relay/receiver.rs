//! The receiver: the HTTP side of the relay, on `--receiver-addr` in every replica. Sources call
//! `{--receiver-url}/fss/{namespace}/{name}` (plus `/{Type}/{id}` for classic rest-hooks). A replica
//! that does not hold the lease forwards the request to the one that does (the lease holder's identity
//! carries its receiver address), so gap detection and group commit see every notification of a
//! sync in one place. Optional TLS (`--receiver-tls-cert`, `--receiver-tls-key`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio_util::sync::CancellationToken;

use super::{Answer, Incoming, Relay};

/// Marks a request forwarded by another replica (never forwarded twice).
const FORWARDED: &str = "x-fhirsync-forwarded";

/// Who processes notifications: this process, or the lease holder.
#[derive(Default)]
pub struct Leadership {
    elected: AtomicBool,
    leader: AtomicBool,
    holder: Mutex<Option<String>>,
    /// Whether this process may act ([`crate::fence::Fence::process`]).
    fence: crate::fence::Fence,
}

enum Route {
    Local,
    To(String),
    Unknown,
}

impl Leadership {
    /// Leader election is in use: only the holder processes.
    pub fn elected() -> Self {
        Self { elected: AtomicBool::new(true), fence: crate::fence::Fence::process(), ..Default::default() }
    }

    /// Records what the last look at the lease found.
    pub fn observe(&self, this_is_leader: bool, holder: Option<String>) {
        self.leader.store(this_is_leader, Ordering::SeqCst);
        *self.holder.lock().unwrap_or_else(|p| p.into_inner()) = holder;
    }

    fn route(&self) -> Route {
        if !self.elected.load(Ordering::SeqCst) {
            return Route::Local;
        }
        if self.leader.load(Ordering::SeqCst) {
            // a leader whose lease lapsed (it was paused) takes nothing until it knows again
            return if self.fence.holds() { Route::Local } else { Route::Unknown };
        }
        // identities look like `pod@10.1.2.3:8443` when the holder runs a receiver
        match self.holder.lock().unwrap_or_else(|p| p.into_inner()).as_deref().and_then(|h| h.split_once('@')) {
            // only an address: the lease holder's identity is not a URL to follow anywhere
            Some((_, addr)) if addr.parse::<SocketAddr>().is_ok() => Route::To(addr.to_string()),
            _ => Route::Unknown,
        }
    }
}

#[derive(Clone)]
struct St {
    relay: Arc<Relay>,
    leadership: Arc<Leadership>,
    forward: reqwest::Client,
    scheme: &'static str,
}

fn outcome(a: &Answer) -> Response {
    let severity = if a.status < 400 { "information" } else { "error" };
    let code = match a.status {
        200..=299 => "informational",
        401 => "security",
        404 => "not-found",
        503 => "transient",
        _ => "processing",
    };
    let body = serde_json::json!({"resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": a.message}]});
    let mut r =
        (StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/fhir+json"));
    if let Some(s) = a.retry_after
        && let Ok(v) = header::HeaderValue::from_str(&s.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Builds the receiver's routes.
pub fn router(relay: Arc<Relay>, leadership: Arc<Leadership>, tls: bool) -> Router {
    let forward = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .danger_accept_invalid_certs(true) // the hop to a pod IP: the leader checks the sync's credential
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default();
    let st = St { relay, leadership, forward, scheme: if tls { "https" } else { "http" } };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/fss/{ns}/{name}", any(notification))
        .route("/fss/{ns}/{name}/{*rest}", any(notification_rest))
        .with_state(st)
}

async fn notification(
    State(st): State<St>,
    Path((ns, name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    dispatch(st, ns, name, String::new(), method, headers, body).await
}

async fn notification_rest(
    State(st): State<St>,
    Path((ns, name, rest)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    dispatch(st, ns, name, rest, method, headers, body).await
}

async fn dispatch(
    st: St,
    ns: String,
    name: String,
    rest: String,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let length = h(header::CONTENT_LENGTH.as_str()).and_then(|l| l.parse().ok());
    match st.leadership.route() {
        Route::Local => {}
        Route::To(addr) if h(FORWARDED).is_none() => {
            // a request without a credential fhirsync issued is refused here, before its body is
            // read: a flood at this replica cannot take the budget real changes pass through
            if !st.relay.vouch(h("authorization").as_deref()) {
                return outcome(&Answer {
                    status: 401,
                    retry_after: None,
                    message: "missing or wrong credential".into(),
                });
            }
            // held within this replica's budget while it travels on
            let body = match st.relay.read(length, body.into_data_stream()).await {
                Ok(b) => b,
                Err(a) => return outcome(&a),
            };
            return forward(&st, &addr, &ns, &name, &rest, method, &headers, body.bytes().clone()).await;
        }
        _ => {
            return outcome(&Answer {
                status: 503,
                retry_after: Some(2),
                message: "the replica that relays is changing; send this again".into(),
            });
        }
    }
    let authorization = h("authorization");
    // a request the relay will not take is answered before its body is read
    let sync = match st.relay.admit(&ns, &name, authorization.as_deref()) {
        Ok(s) => s,
        Err(a) => return outcome(&a),
    };
    let body = match st.relay.read(length, body.into_data_stream()).await {
        Ok(b) => b,
        Err(a) => {
            if a.status == 503 {
                sync.asked_to_come_back();
            }
            return outcome(&a);
        }
    };
    let rest: Vec<String> = if rest.is_empty() { vec![] } else { rest.split('/').map(str::to_string).collect() };
    let a = st
        .relay
        .handle(
            &sync,
            Incoming {
                rest: &rest,
                method: method.as_str(),
                medplum_deleted: h("x-medplum-deleted-resource").as_deref(),
                body,
            },
        )
        .await;
    if a.status >= 400 {
        tracing::debug!(fss = %format!("{ns}/{name}"), status = a.status, message = %a.message, "notification not applied");
    }
    outcome(&a)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    st: &St,
    addr: &str,
    ns: &str,
    name: &str,
    rest: &str,
    method: Method,
    headers: &HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let mut url = format!("{}://{addr}/fss/{ns}/{name}", st.scheme);
    if !rest.is_empty() {
        url.push('/');
        url.push_str(rest);
    }
    let mut rb = st.forward.request(method, &url).header(FORWARDED, "1").body(body);
    for n in [
        header::AUTHORIZATION.as_str(),
        header::CONTENT_TYPE.as_str(),
        "x-medplum-deleted-resource",
        "x-medplum-subscription",
    ] {
        if let Some(v) = headers.get(n) {
            rb = rb.header(n, v);
        }
    }
    match rb.send().await {
        Ok(r) => {
            let status = r.status();
            let retry = r.headers().get(header::RETRY_AFTER).cloned();
            // the leader's own OperationOutcome: small, and kept so
            let mut r = r;
            let mut body = Vec::new();
            while let Ok(Some(chunk)) = r.chunk().await {
                if body.len() + chunk.len() > 64 << 10 {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            let mut resp = Response::builder().status(status.as_u16());
            if let Some(v) = retry {
                resp = resp.header(header::RETRY_AFTER, v);
            }
            resp.header(header::CONTENT_TYPE, "application/fhir+json")
                .body(Body::from(body))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
        }
        Err(e) => outcome(&Answer {
            status: 503,
            retry_after: Some(5),
            message: format!("the replica that relays cannot be reached ({})", e.without_url()),
        }),
    }
}

/// Serves the receiver on a bound listener until `stop` fires (bind first with [`crate::serve::bind`],
/// and read the certificate with [`tls_config`], so that a port in use or a bad certificate stops
/// the process before it says it is ready).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    relay: Arc<Relay>,
    leadership: Arc<Leadership>,
    stop: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = tls.is_some(), "relay receiver listening");
    }
    let app = router(relay, leadership, tls.is_some());
    crate::serve::serve(listener, app, tls, crate::serve::Limits::RECEIVER, stop).await;
}

/// The receiver's TLS configuration from PEM certificate chain and key.
pub fn tls_config(cert: &[u8], key: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--receiver-tls-cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("--receiver-tls-key: {e}"))?;
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map(Arc::new)
        .map_err(|e| format!("the receiver's TLS certificate and key: {e}"))
}
