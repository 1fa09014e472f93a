//! The one place that builds HTTP clients and decides where credentials — and requests — may go.
//!
//! Rules: the `Authorization` header is only ever attached to requests whose origin equals the origin of
//! the server's base URL, and only when the caller asks for credentials (a manifest with
//! `requiresAccessToken: false` does not). Redirects are followed here, hop by hop, so a redirect to
//! another origin never carries the header, and every hop passes the address policy. A 401 with a
//! renewable credential renews once and retries once. Bodies are read with caps: no peer decides how
//! much memory fhirsync uses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use crate::auth::{AuthError, AuthProvider};
use crate::net::{AddressPolicy, PolicyResolver};
use crate::text::redact;

/// Errors talking to a server. URLs in messages never carry query strings (capability URLs are
/// secrets); peer text in them is bounded and sanitised.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect (`connect`), or the connection broke.
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String, connect: bool },
    /// No response headers within the response timeout.
    #[error("{url} did not answer within {secs}s (timeouts.response)")]
    Timeout { url: String, secs: u64 },
    /// The server answered with an unexpected status.
    #[error("{method} {url} answered {status}: {message}")]
    Status {
        method: String,
        url: String,
        status: u16,
        message: String,
        /// The server's `Retry-After`, clamped.
        retry_after: Option<Duration>,
        /// The body says the failure is transient (OperationOutcome `transient` and kin).
        transient: bool,
        /// The protocol says the server is busy with other work (429, Pathling's import lock, an
        /// export-concurrency cap): wait and retry.
        busy: bool,
    },
    /// A credential could not be produced.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The server sent something that breaks the protocol.
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
    /// A body larger than fhirsync accepts for its purpose.
    #[error("{url}: {what} is larger than {limit} bytes; fhirsync does not read it")]
    TooLarge { url: String, what: String, limit: u64 },
    /// The server's generation or kind cannot do this at all (it is not sent).
    #[error("{url}: the server does not support {what}")]
    Unsupported { url: String, what: String },
    /// The address policy refused the URL.
    #[error("{url}: {why}")]
    Refused { url: String, why: String },
    /// The client configuration is unusable.
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// The HTTP status, when the error is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's Retry-After, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Marks a status error as "the server is busy" (a protocol-specific reading of its answer).
    pub fn into_busy(self) -> Self {
        match self {
            Error::Status { method, url, status, message, retry_after, transient, .. } => {
                Error::Status { method, url, status, message, retry_after, transient, busy: true }
            }
            e => e,
        }
    }

    /// For a failure on the first request to a server: what the user most likely got wrong.
    pub fn first_contact_hint(&self) -> Option<&'static str> {
        match self {
            Error::Transport { message, connect: true, .. } => {
                let m = message.to_ascii_lowercase();
                Some(if m.contains("dns") || m.contains("lookup") || m.contains("resolve") {
                    "the host name does not resolve: check the URL's host (and this machine's network, DNS or HTTPS_PROXY)"
                } else if m.contains("refused") {
                    "nothing listens there: check the URL's host and port"
                } else if m.contains("certificate") || m.contains("tls") {
                    "the TLS handshake failed: check https vs http, and tls.caRef"
                } else {
                    "check the URL's host and port, and that the server runs"
                })
            }
            Error::Timeout { .. } => Some("the server accepted the connection but never answered: check the URL"),
            _ => None,
        }
    }

    /// Builds a status error from a response, reading (a bounded part of) its body.
    pub async fn from_response(method: &Method, resp: Response) -> Self {
        let status = resp.status();
        let url = redact(resp.url());
        let retry_after = super::retry::retry_after(resp.headers());
        let ctype = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = read_prefix(resp, ERROR_BODY_MAX).await;
        let oo = super::outcome::OperationOutcome::parse(&body);
        let transient = status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
            || oo.as_ref().is_some_and(|o| o.is_transient());
        let mut message = super::outcome::describe_body(&body, ctype.as_deref());
        if message.is_empty() {
            message = status.canonical_reason().unwrap_or("error").to_string();
        }
        let busy = status == StatusCode::TOO_MANY_REQUESTS;
        Error::Status {
            method: method.to_string(),
            url,
            status: status.as_u16(),
            message,
            retry_after,
            transient,
            busy,
        }
    }
}

/// How much of an error body is read.
const ERROR_BODY_MAX: usize = 64 * 1024;

/// Reads at most `limit` bytes of a body, dropping the rest (error bodies only).
pub async fn read_prefix(mut resp: Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    out
}

/// Reads a whole body of at most `limit` bytes; a bigger one is an error (the body is not kept).
pub async fn read_capped(resp: Response, limit: usize, what: &str) -> Result<Bytes, Error> {
    let url = redact(resp.url());
    crate::net::read_capped(resp, limit).await.map_err(|e| match e {
        crate::net::BodyError::TooLarge(_) => Error::TooLarge { url, what: what.into(), limit: limit as u64 },
        crate::net::BodyError::Broken(m) => Error::Transport { url, message: m, connect: false },
    })
}

/// Everything needed to talk to one server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The server's base URL; its origin is the only one that ever receives credentials.
    pub base_url: Url,
    /// Credential provider, if any.
    pub auth: Option<Arc<dyn AuthProvider>>,
    /// Extra trusted CA certificates (PEM bundle).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_identity_pem: Option<Vec<u8>>,
    /// Skip certificate verification.
    pub insecure_skip_verify: bool,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Time until response headers.
    pub response_timeout: Duration,
    /// Longest pause while reading a body.
    pub idle_timeout: Duration,
    /// Which addresses may be reached.
    pub policy: AddressPolicy,
    /// Identifies the credentials in use (a digest of them, never the secrets): a client built
    /// from changed Secrets differs.
    pub credential_digest: String,
    /// Most requests a second to the server's origin (shared with its other clients with the same
    /// credential); `None`: unpaced.
    pub max_requests_per_second: Option<u32>,
}

impl ClientConfig {
    /// A configuration with default timeouts, no credentials and the default address policy.
    pub fn new(base_url: Url) -> Self {
        Self {
            base_url,
            auth: None,
            ca_pem: None,
            client_identity_pem: None,
            insecure_skip_verify: false,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(120),
            policy: AddressPolicy::default(),
            credential_digest: String::new(),
            max_requests_per_second: None,
        }
    }
}

/// An HTTP client bound to one server and its credential.
#[derive(Clone, Debug)]
pub struct HttpClient {
    http: reqwest::Client,
    base: Url,
    auth: Option<Arc<dyn AuthProvider>>,
    response_timeout: Duration,
    policy: AddressPolicy,
    /// Whether the server has ever answered (any HTTP response) through this client.
    answered: Arc<AtomicBool>,
    credential_digest: String,
    pace: Option<Arc<super::pace::Pace>>,
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// Attach credentials (only ever to the base URL's origin).
    pub credentials: bool,
}

impl Request {
    /// A request with credentials (for the server's own origin).
    pub fn new(method: Method, url: Url) -> Self {
        Self { method, url, headers: HeaderMap::new(), body: None, credentials: true }
    }
    /// Adds a header.
    pub fn header(mut self, name: HeaderName, value: &'static str) -> Self {
        self.headers.insert(name, HeaderValue::from_static(value));
        self
    }
    /// Sets a body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }
    /// Whether credentials may be attached.
    pub fn credentials(mut self, yes: bool) -> Self {
        self.credentials = yes;
        self
    }
}

const MAX_REDIRECTS: usize = 10;

/// The underlying HTTP client for a configuration, shared by every server with the same TLS,
/// timeouts and address policy: building one loads the system's root certificates (hundreds of
/// kilobytes and a few milliseconds each time), and a shared one shares its connection pool.
pub fn build_reqwest(cfg: &ClientConfig) -> Result<reqwest::Client, Error> {
    use std::collections::HashMap;
    use std::hash::{Hash, Hasher};
    use std::sync::{Mutex, OnceLock};
    static CLIENTS: OnceLock<Mutex<HashMap<u64, reqwest::Client>>> = OnceLock::new();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&cfg.ca_pem, &cfg.client_identity_pem, cfg.insecure_skip_verify, cfg.connect_timeout, cfg.idle_timeout)
        .hash(&mut h);
    cfg.policy.allow_link_local.hash(&mut h);
    let key = h.finish();
    let cache = CLIENTS.get_or_init(Mutex::default);
    if let Some(c) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    let client = build_reqwest_uncached(cfg)?;
    let mut m = cache.lock().unwrap_or_else(|p| p.into_inner());
    if m.len() >= 256 {
        m.clear(); // bounded: so many distinct settings are rare; the next builds refill it
    }
    m.insert(key, client.clone());
    Ok(client)
}

fn build_reqwest_uncached(cfg: &ClientConfig) -> Result<reqwest::Client, Error> {
    crate::net::init_tls();
    let mut b = reqwest::Client::builder()
        .tls_backend_rustls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(cfg.connect_timeout)
        .read_timeout(cfg.idle_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("fhirsync/", env!("CARGO_PKG_VERSION")));
    if !cfg.policy.allow_link_local {
        b = b.dns_resolver(Arc::new(PolicyResolver { policy: cfg.policy }));
    }
    if let Some(pem) = &cfg.ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| Error::Config(format!("the CA bundle is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Config("the CA bundle holds no certificate".into()));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if let Some(pem) = &cfg.client_identity_pem {
        let id = reqwest::Identity::from_pem(pem)
            .map_err(|e| Error::Config(format!("the client certificate and key are not a valid PEM pair: {e}")))?;
        b = b.identity(id);
    }
    if cfg.insecure_skip_verify {
        b = b.tls_danger_accept_invalid_certs(true);
    }
    b.build().map_err(|e| Error::Config(format!("cannot build HTTP client: {e}")))
}

impl HttpClient {
    /// Builds a client.
    pub fn new(cfg: &ClientConfig) -> Result<Self, Error> {
        let http = build_reqwest(cfg)?;
        Ok(Self {
            http,
            base: cfg.base_url.clone(),
            auth: cfg.auth.clone(),
            response_timeout: cfg.response_timeout,
            policy: cfg.policy,
            answered: Arc::default(),
            credential_digest: cfg.credential_digest.clone(),
            pace: cfg.max_requests_per_second.map(|n| {
                let key = format!("{}|{}|{n}", cfg.base_url.origin().ascii_serialization(), cfg.credential_digest);
                super::pace::Pace::shared(&key, n)
            }),
        })
    }

    /// Identifies the credentials this client was built with (changes when its Secrets do).
    pub fn credential_digest(&self) -> &str {
        &self.credential_digest
    }

    /// The server's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// `base` joined with a relative path (`Patient/$export`, `$import`), keeping the base's path.
    pub fn url(&self, path: &str) -> Url {
        join(&self.base, path)
    }

    /// `base` joined with path segments, each percent-encoded as one segment (for ids from peers).
    pub fn url_segments(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        u.set_query(None);
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty().extend(segments);
        }
        u
    }

    /// Whether `url` has the base URL's origin (scheme, host and port).
    pub fn same_origin(&self, url: &Url) -> bool {
        url.origin() == self.base.origin()
    }

    /// Produces a credential now (obtains a token for OAuth): `Ok(false)` when the client has none.
    pub async fn authorize(&self) -> Result<bool, Error> {
        match &self.auth {
            Some(a) => a.authorization().await.map(|_| true).map_err(Error::from),
            None => Ok(false),
        }
    }

    /// Whether the server has answered any request made through this client.
    pub fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// Sends a request, following redirects and renewing a credential once after a 401.
    pub async fn send(&self, req: Request) -> Result<Response, Error> {
        let resp = self.send_following(&req).await?;
        if resp.status() == StatusCode::UNAUTHORIZED
            && req.credentials
            && self.same_origin(&req.url)
            && let Some(auth) = &self.auth
            && auth.invalidate()
        {
            return self.send_following(&req).await;
        }
        Ok(resp)
    }

    async fn send_following(&self, req: &Request) -> Result<Response, Error> {
        let mut url = req.url.clone();
        let mut method = req.method.clone();
        let mut body = req.body.clone();
        for _ in 0..=MAX_REDIRECTS {
            self.policy.check_url(&url).map_err(|why| Error::Refused { url: redact(&url), why })?;
            if let Some(p) = &self.pace
                && url.origin() == self.base.origin()
            {
                p.wait().await;
            }
            let mut rb = self.http.request(method.clone(), url.clone()).headers(req.headers.clone());
            if req.credentials
                && url.origin() == self.base.origin()
                && let Some(auth) = &self.auth
            {
                rb = rb.header(AUTHORIZATION, auth.authorization().await?);
            }
            if let Some(b) = &body {
                rb = rb.body(b.clone());
            }
            let resp = match tokio::time::timeout(self.response_timeout, rb.send()).await {
                Err(_) => return Err(Error::Timeout { url: redact(&url), secs: self.response_timeout.as_secs() }),
                Ok(Err(e)) => return Err(transport(&url, e)),
                Ok(Ok(r)) => r,
            };
            self.answered.store(true, Ordering::Relaxed);
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let Some(loc) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) else {
                return Ok(resp);
            };
            let next = url.join(loc).map_err(|_| Error::Protocol {
                url: redact(&url),
                message: "redirect with an invalid Location header".into(),
            })?;
            if matches!(resp.status(), StatusCode::SEE_OTHER)
                || (matches!(resp.status(), StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND)
                    && method == Method::POST)
            {
                method = Method::GET;
                body = None;
            }
            url = next;
        }
        Err(Error::Protocol { url: redact(&req.url), message: format!("more than {MAX_REDIRECTS} redirects") })
    }
}

fn transport(url: &Url, e: reqwest::Error) -> Error {
    let connect = e.is_connect();
    let timeout = e.is_timeout();
    let e = e.without_url();
    // the innermost cause says what happened ("Connection refused", "failed to lookup address")
    let mut deepest: &dyn std::error::Error = &e;
    while let Some(s) = deepest.source() {
        deepest = s;
    }
    let mut message = deepest.to_string();
    if connect && !message.to_ascii_lowercase().contains("connect") && !message.contains("lookup") {
        message = format!("connection failed: {message}");
    }
    if timeout {
        message = format!("timed out: {message}");
    }
    Error::Transport {
        url: redact(url),
        message: crate::text::peer_text(&message, crate::text::PEER_TEXT_MAX),
        connect,
    }
}

/// A URL a peer gave (a job, status or file location), parsed; the error quotes it shortened.
pub fn peer_url(u: &str) -> Result<Url, Error> {
    Url::parse(u).map_err(|_| Error::Protocol {
        url: "(invalid)".into(),
        message: format!("not a URL: {}", crate::text::peer_text(u, 80)),
    })
}

/// Joins a relative path onto a base URL, treating the base as a directory.
pub fn join(base: &Url, path: &str) -> Url {
    let mut u = base.clone();
    let p = format!("{}/{}", base.path().trim_end_matches('/'), path.trim_start_matches('/'));
    u.set_path(&p);
    u.set_query(None);
    u
}

/// Classifies a transport-level error from reading a body stream.
pub fn body_error(url: &Url, e: reqwest::Error) -> Error {
    transport(url, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_keeps_base_path() {
        let b = Url::parse("http://h:1/fhir/").unwrap();
        assert_eq!(join(&b, "$export").as_str(), "http://h:1/fhir/$export");
        let b = Url::parse("http://h:1/fhir").unwrap();
        assert_eq!(join(&b, "Group/g1/$export").as_str(), "http://h:1/fhir/Group/g1/$export");
    }

    #[test]
    fn segments_are_encoded_one_by_one() {
        let c = HttpClient::new(&ClientConfig::new(Url::parse("http://h:1/fhir/").unwrap())).unwrap();
        assert_eq!(c.url_segments(&["Patient", "a.b"]).as_str(), "http://h:1/fhir/Patient/a.b");
        assert_eq!(c.url_segments(&["Patient", "x/y"]).as_str(), "http://h:1/fhir/Patient/x%2Fy");
    }
}
