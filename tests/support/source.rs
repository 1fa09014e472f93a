//! A FHIR Bulk Data source written for the tests, with the quirks of real servers: 429 with
//! Retry-After as seconds, HTTP-date or epoch; transient 5xx and OperationOutcome errors; a cancelled job
//! answering 202 forever (HAPI); manifest counts; a download cut off midway; gzip; deleted[]; error[].
//! And hostile ones: errors forever, a kick-off that never answers, bodies trickled a byte at a time,
//! gzip bombs, endless manifests and error lines, raw manifests of any shape.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;

/// One poll answer to inject before the normal ones.
#[derive(Clone, Debug)]
pub enum PollQuirk {
    /// 500 with a plain body.
    ServerError,
    /// 500 with an OperationOutcome whose issue code is `transient`.
    TransientOutcome,
    /// 429 with this Retry-After value.
    TooMany(String),
}

/// Decides whether a bearer token is valid (e.g. issued and unexpired by a test auth server).
#[derive(Clone)]
pub struct TokenCheck(pub Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCheck")
    }
}

/// How the source behaves.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// When set, every request needs a bearer token this accepts.
    pub token_check: Option<TokenCheck>,
    /// Serve `.well-known/smart-configuration` with this token endpoint.
    pub smart_token_endpoint: Option<String>,
    /// Answer file downloads with a 307 to the same path on this origin.
    pub redirect_files_to: Option<String>,
    /// Kick-off by POST only (GET answers 405), like Bulk Data STU4.
    pub post_only: bool,
    /// The manifest in Bulk Data STU4's shape: `outcome` for `error`, `extension` as an array,
    /// `manifestType`, no `request`.
    pub stu4_manifest: bool,
    /// The manifest is paged (STU3 `link` next, at `/status/{id}?page=N`), this many entries a page.
    pub manifest_page_size: Option<usize>,
    /// The first fetch of every page after the first answers 202 (not ready yet).
    pub pages_not_ready_once: bool,
    /// Output files: (resource type, NDJSON lines).
    pub files: Vec<(String, Vec<String>)>,
    /// deleted[] files: each a list of Bundle lines.
    pub deleted: Vec<Vec<String>>,
    /// error[] files: each a list of OperationOutcome lines.
    pub errors: Vec<Vec<String>>,
    /// 202 answers before the manifest.
    pub polls_before_done: u32,
    /// Retry-After on 202 answers.
    pub poll_retry_after: Option<String>,
    /// X-Progress on 202 answers.
    pub progress: Option<String>,
    /// The first kick-offs answer 429 with these Retry-After values.
    pub kickoff_429: Vec<String>,
    /// The first polls answer these.
    pub poll_quirks: Vec<PollQuirk>,
    /// The job answers 202 "Cancelled" forever (HAPI after a cancel).
    pub cancelled_forever: bool,
    /// Put `count` in the manifest.
    pub include_count: bool,
    /// Lie about the count of this file index (manifest count + 1).
    pub wrong_count: Option<usize>,
    /// Cut the first download of each file midway.
    pub cut_first_download: bool,
    /// Serve files gzip-encoded.
    pub gzip: bool,
    /// The first N downloads of each output file answer 429 with this Retry-After.
    pub file_busy: Option<(u32, String)>,
    /// `requiresAccessToken` in the manifest.
    pub requires_token: bool,
    /// When set, every request needs `Authorization: Bearer <token>`.
    pub bearer: Option<String>,
    /// Base URL for file URLs (another origin); default this server.
    pub file_base: Option<String>,
    /// `transactionTime` in the manifest; default: the time of the kick-off.
    pub transaction_time: Option<String>,
    /// Every kick-off answers this status with an OperationOutcome (after `kickoff_429`).
    pub kickoff_error: Option<(u16, String)>,
    /// The first kick-off creates its job but never answers (a process killed while waiting).
    pub hang_first_kickoff: bool,
    /// Output files are sent one byte per interval.
    pub trickle_files: Option<std::time::Duration>,
    /// The manifest is sent one byte per interval.
    pub trickle_manifest: Option<std::time::Duration>,
    /// The manifest body, verbatim (file URLs may use `{base}` for this server's origin).
    pub raw_manifest: Option<String>,
    /// The manifest is an endless JSON stream of this many bytes.
    pub endless_manifest: Option<u64>,
    /// error[] file 0 is one line of this many bytes.
    pub huge_error_line: Option<u64>,
    /// Output file 0 is a gzip bomb: this many MiB of 'a' once decompressed.
    pub gzip_bomb_mib: Option<u32>,
    /// Exports the source runs at once (more get 429, like Epic with 1).
    pub export_slots: i32,
    /// History, searches by `_id` and reads.
    pub rest: super::source_rest::RestConfig,
    /// FHIR search over a store of resources (for `export.method: Search`); it answers searches and
    /// type histories before `rest` does.
    pub search: Option<super::source_search::SearchStore>,
    /// Kick-offs with `_elements` answer 400 (servers that do not support it).
    pub refuse_elements: bool,
    /// Output of exports with `_since` (changes only), when set; `files` otherwise.
    pub since_files: Option<Vec<(String, Vec<String>)>>,
}

impl SourceConfig {
    /// Every resource its export files hold is live at the source (`Type/id`), for `_id` searches
    /// and reads: nothing was deleted since.
    pub fn all_files_live(&mut self) {
        for (t, lines) in &self.files {
            for l in lines {
                let v: serde_json::Value = serde_json::from_str(l).expect("test data is JSON");
                self.rest.live.insert(format!("{t}/{}", v["id"].as_str().expect("an id")));
            }
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            files: vec![],
            deleted: vec![],
            errors: vec![],
            polls_before_done: 1,
            poll_retry_after: Some("1".into()),
            progress: Some("in progress".into()),
            kickoff_429: vec![],
            poll_quirks: vec![],
            cancelled_forever: false,
            include_count: true,
            wrong_count: None,
            cut_first_download: false,
            gzip: false,
            file_busy: None,
            requires_token: true,
            bearer: None,
            file_base: None,
            transaction_time: None,
            token_check: None,
            smart_token_endpoint: None,
            redirect_files_to: None,
            post_only: false,
            stu4_manifest: false,
            manifest_page_size: None,
            pages_not_ready_once: false,
            kickoff_error: None,
            hang_first_kickoff: false,
            trickle_files: None,
            trickle_manifest: None,
            raw_manifest: None,
            endless_manifest: None,
            huge_error_line: None,
            gzip_bomb_mib: None,
            export_slots: 1,
            rest: Default::default(),
            search: None,
            refuse_elements: false,
            since_files: None,
        }
    }
}

/// A kick-off the source received.
#[derive(Clone, Debug)]
pub struct KickoffRecord {
    pub method: String,
    /// The POST body's Parameters, when kicked off by POST.
    pub body: Option<serde_json::Value>,
    pub path: String,
    pub query: String,
    pub prefer: Option<String>,
    pub accept: Option<String>,
}

impl KickoffRecord {
    /// A query parameter's value.
    pub fn param(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.to_string())
    }
}

/// What the source saw.
#[derive(Clone, Debug, Default)]
pub struct SourceLog {
    pub kickoffs: Vec<KickoffRecord>,
    pub accepted: u32,
    pub polls: u32,
    /// Fetches of manifest pages after the first, by page number.
    pub page_fetches: Vec<usize>,
    /// GET kick-offs refused with 405 (`post_only`).
    pub refused_gets: u32,
    pub status_deletes: Vec<String>,
    pub downloads: Vec<(String, bool)>,
    pub active_exports: i32,
    pub max_active_exports: i32,
    pub unauthorized: u32,
    /// Authorization headers seen on file downloads and redirects (true = present).
    pub auth_headers: Vec<(String, bool)>,
    /// History pages, searches and reads.
    pub rest: super::source_rest::RestLog,
}

struct Job {
    polls: u32,
    transaction_time: String,
    /// Kicked off with `_since`.
    incremental: bool,
    /// `_type`, when given.
    types: Option<Vec<String>>,
}

struct Inner {
    cfg: SourceConfig,
    log: SourceLog,
    jobs: HashMap<String, Job>,
    downloads_per_file: HashMap<String, u32>,
    next_id: u32,
}

/// A running fake source.
#[derive(Clone)]
pub struct FakeSource {
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
    /// FHIR base URL, e.g. `http://127.0.0.1:port/fhir`.
    pub base: String,
}

impl FakeSource {
    /// Starts the source on a loopback port.
    pub async fn start(cfg: SourceConfig) -> Self {
        Self::start_with(cfg, None).await
    }

    /// Starts the source over HTTPS (certificate from tests/fixtures, signed by fixtures/ca.pem),
    /// optionally requiring a client certificate signed by the same CA.
    pub async fn start_tls(cfg: SourceConfig, require_client_cert: bool) -> Self {
        Self::start_with(cfg, Some(super::tls::server_config(require_client_cert))).await
    }

    async fn start_with(cfg: SourceConfig, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (changed, _) = watch::channel(0);
        let me = Self {
            inner: Arc::new(Mutex::new(Inner {
                cfg,
                log: SourceLog::default(),
                jobs: HashMap::new(),
                downloads_per_file: HashMap::new(),
                next_id: 0,
            })),
            changed,
            base: format!("{}://{addr}/fhir", if tls.is_some() { "https" } else { "http" }),
        };
        let app = Router::new()
            .route("/fhir/{*rest}", get(kickoff).post(kickoff))
            .route("/status/{id}", get(poll).delete(cancel))
            .route("/files/{name}", get(file))
            .with_state(me.clone());
        match tls {
            None => {
                tokio::spawn(async move { axum::serve(listener, app).await.ok() });
            }
            Some(tls) => super::tls::serve(listener, tls, app),
        }
        me
    }

    /// A copy of the log.
    pub fn log(&self) -> SourceLog {
        self.inner.lock().unwrap().log.clone()
    }

    /// Changes the configuration (e.g. new data for the next export).
    pub fn configure(&self, f: impl FnOnce(&mut SourceConfig)) {
        f(&mut self.inner.lock().unwrap().cfg);
    }

    /// Waits until `pred` holds for the log (woken by every request; no sleeps).
    pub async fn wait_for(&self, pred: impl Fn(&SourceLog) -> bool) -> SourceLog {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let l = self.log();
                if pred(&l) {
                    return l;
                }
            }
            rx.changed().await.expect("source stopped");
        }
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn origin(&self) -> String {
        self.base.trim_end_matches("/fhir").to_string()
    }
}

fn unauthorized(s: &FakeSource, headers: &HeaderMap) -> Option<Response> {
    let mut i = s.inner.lock().unwrap();
    let got = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if let Some(check) = i.cfg.token_check.clone() {
        let token = got.strip_prefix("Bearer ").unwrap_or("");
        if check.0(token) {
            return None;
        }
        i.log.unauthorized += 1;
        return Some((StatusCode::UNAUTHORIZED, outcome("error", "login", "invalid or expired token")).into_response());
    }
    let want = i.cfg.bearer.clone()?;
    if got == format!("Bearer {want}") {
        return None;
    }
    i.log.unauthorized += 1;
    Some((StatusCode::UNAUTHORIZED, outcome("error", "login", "invalid or missing token")).into_response())
}

fn outcome(sev: &str, code: &str, diag: &str) -> String {
    json!({"resourceType":"OperationOutcome","issue":[{"severity":sev,"code":code,"diagnostics":diag}]}).to_string()
}

async fn kickoff(
    State(s): State<FakeSource>,
    Path(rest): Path<String>,
    RawQuery(q): RawQuery,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let post_only = s.inner.lock().unwrap().cfg.post_only;
    if post_only && method == axum::http::Method::GET && rest.ends_with("$export") {
        s.inner.lock().unwrap().log.refused_gets += 1;
        s.touch();
        return (StatusCode::METHOD_NOT_ALLOWED, outcome("error", "not-supported", "use POST")).into_response();
    }
    let body =
        (method == axum::http::Method::POST).then(|| serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null));
    let hang = {
        let mut i = s.inner.lock().unwrap();
        std::mem::take(&mut i.cfg.hang_first_kickoff) && rest.ends_with("$export")
    };
    let r = kickoff_inner(&s, rest, q, headers, method.to_string(), body);
    s.touch();
    if hang {
        // the job exists now (not blocking other exports), but its answer never comes
        s.inner.lock().unwrap().log.active_exports -= 1;
        std::future::pending::<()>().await;
    }
    r
}

fn kickoff_inner(
    s: &FakeSource,
    rest: String,
    q: Option<String>,
    headers: HeaderMap,
    method: String,
    body: Option<serde_json::Value>,
) -> Response {
    if rest == ".well-known/smart-configuration" {
        let te = s.inner.lock().unwrap().cfg.smart_token_endpoint.clone();
        return match te {
            Some(te) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                json!({"token_endpoint": te, "grant_types_supported": ["client_credentials"],
                       "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post"]})
                .to_string(),
            )
                .into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if rest == "metadata" {
        let i = s.inner.lock().unwrap();
        let types: Vec<String> = i.cfg.files.iter().map(|f| f.0.clone()).collect();
        let mut cs = json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
            "software": {"name": "fhirsync test source", "version": "1"},
            "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
            "rest": [super::source_rest::capability_rest(&i.cfg.rest, &types)]});
        if let Some(store) = &i.cfg.search {
            cs["rest"] = json!([store.capability_rest()]);
            if store.no_export() {
                cs.as_object_mut().unwrap().remove("instantiates");
            } else {
                cs["rest"][0]["operation"] = json!([{"name": "export"}]);
            }
        }
        return (StatusCode::OK, [(header::CONTENT_TYPE, "application/fhir+json")], cs.to_string()).into_response();
    }
    if !rest.ends_with("$export") && method == "GET" {
        if let Some(r) = unauthorized(s, &headers) {
            return r;
        }
        let origin = s.origin();
        let mut i = s.inner.lock().unwrap();
        let Inner { cfg, log, .. } = &mut *i;
        if let Some(r) = cfg.search.as_ref().and_then(|st| st.handle(&origin, &rest, q.as_deref().unwrap_or(""))) {
            return r;
        }
        if let Some(r) =
            super::source_rest::handle(&cfg.rest, &mut log.rest, &origin, &rest, q.as_deref().unwrap_or(""))
        {
            return r;
        }
    }
    let no_export = s.inner.lock().unwrap().cfg.search.as_ref().is_some_and(|st| st.no_export());
    if !rest.ends_with("$export") || no_export {
        return (StatusCode::NOT_FOUND, outcome("error", "not-found", "unknown path")).into_response();
    }
    if let Some(r) = unauthorized(s, &headers) {
        return r;
    }
    let mut i = s.inner.lock().unwrap();
    i.log.kickoffs.push(KickoffRecord {
        method,
        body,
        path: rest.clone(),
        query: q.unwrap_or_default(),
        prefer: headers.get("prefer").and_then(|v| v.to_str().ok()).map(str::to_string),
        accept: headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).map(str::to_string),
    });
    if headers.get("prefer").and_then(|v| v.to_str().ok()) != Some("respond-async") {
        return (StatusCode::BAD_REQUEST, outcome("error", "invalid", "Prefer: respond-async is required"))
            .into_response();
    }
    if !i.cfg.kickoff_429.is_empty() {
        let ra = i.cfg.kickoff_429.remove(0);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, ra)],
            outcome("error", "throttled", "one export at a time"),
        )
            .into_response();
    }
    if i.cfg.refuse_elements && i.log.kickoffs.last().and_then(|k| k.param("_elements")).is_some() {
        return (StatusCode::BAD_REQUEST, outcome("error", "not-supported", "_elements is not supported"))
            .into_response();
    }
    if let Some((code, msg)) = i.cfg.kickoff_error.clone() {
        return (StatusCode::from_u16(code).unwrap(), outcome("error", "exception", &msg)).into_response();
    }
    if i.log.active_exports >= i.cfg.export_slots {
        // like Epic/Cerner: one export in flight per client
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "2".to_string())],
            outcome("error", "throttled", "an export is already running"),
        )
            .into_response();
    }
    i.next_id += 1;
    let id = format!("job{}", i.next_id);
    let tt = i.cfg.transaction_time.clone().unwrap_or_else(|| jiff::Timestamp::now().to_string());
    let incremental = i.log.kickoffs.last().is_some_and(|k| {
        k.param("_since").is_some() || k.body.as_ref().is_some_and(|b| b.to_string().contains("_since"))
    });
    let types = i.log.kickoffs.last().and_then(|k| {
        let from_body: Vec<String> = k
            .body
            .as_ref()
            .and_then(|b| b["parameter"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|p| p["name"] == "_type")
            .filter_map(|p| p["valueString"].as_str().map(str::to_string))
            .collect();
        let list = k.param("_type").map(|t| vec![t]).unwrap_or(from_body);
        (!list.is_empty()).then(|| list.iter().flat_map(|t| t.split(',')).map(str::to_string).collect())
    });
    i.jobs.insert(id.clone(), Job { polls: 0, transaction_time: tt, incremental, types });
    i.log.accepted += 1;
    i.log.active_exports += 1;
    i.log.max_active_exports = i.log.max_active_exports.max(i.log.active_exports);
    let loc = format!("{}/status/{id}", s.origin());
    (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, loc)], "").into_response()
}

async fn poll(
    State(s): State<FakeSource>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let page = q.as_deref().and_then(|q| q.strip_prefix("page=")).and_then(|p| p.parse::<usize>().ok());
    let r = poll_inner(&s, id, page, headers);
    s.touch();
    r
}

fn poll_inner(s: &FakeSource, id: String, page: Option<usize>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(s, &headers) {
        return r;
    }
    let origin = s.origin();
    let mut i = s.inner.lock().unwrap();
    if let Some(n) = page {
        i.log.page_fetches.push(n);
        if i.cfg.pages_not_ready_once && i.log.page_fetches.iter().filter(|p| **p == n).count() == 1 {
            return (StatusCode::ACCEPTED, [(header::RETRY_AFTER, "1")], "").into_response();
        }
    } else {
        i.log.polls += 1;
    }
    if !i.cfg.poll_quirks.is_empty() {
        return match i.cfg.poll_quirks.remove(0) {
            PollQuirk::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
            PollQuirk::TransientOutcome => {
                (StatusCode::INTERNAL_SERVER_ERROR, outcome("error", "transient", "database busy, try again"))
                    .into_response()
            }
            PollQuirk::TooMany(ra) => {
                (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, ra)], "slow down").into_response()
            }
        };
    }
    let cfg = i.cfg.clone();
    let Some(job) = i.jobs.get_mut(&id) else {
        return (StatusCode::NOT_FOUND, outcome("error", "not-found", "no such job")).into_response();
    };
    if cfg.cancelled_forever {
        return (
            StatusCode::ACCEPTED,
            [("x-progress", "Cancelled".to_string()), (header::RETRY_AFTER.as_str(), "1".into())],
            "",
        )
            .into_response();
    }
    if job.polls < cfg.polls_before_done {
        job.polls += 1;
        let mut h = vec![];
        if let Some(ra) = &cfg.poll_retry_after {
            h.push((header::RETRY_AFTER.to_string(), ra.clone()));
        }
        if let Some(p) = &cfg.progress {
            h.push(("x-progress".to_string(), p.clone()));
        }
        let mut resp = (StatusCode::ACCEPTED, "").into_response();
        for (k, v) in h {
            resp.headers_mut().insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        return resp;
    }
    let file_base = cfg.file_base.clone().unwrap_or(origin);
    let (kind, files) = match (&cfg.since_files, job.incremental) {
        (Some(f), true) => ("inc", f),
        _ => ("out", &cfg.files),
    };
    let output: Vec<_> = files
        .iter()
        .enumerate()
        .filter(|(_, (t, _))| job.types.as_ref().is_none_or(|ts| ts.contains(t)))
        .map(|(n, (t, lines))| {
            let mut o = json!({"type": t, "url": format!("{file_base}/files/{kind}-{n}.ndjson")});
            if cfg.include_count {
                let c = lines.len() + usize::from(cfg.wrong_count == Some(n));
                o["count"] = json!(c);
            }
            o
        })
        .collect();
    let deleted: Vec<_> = (0..cfg.deleted.len())
        .map(|n| json!({"type": "Bundle", "url": format!("{file_base}/files/del-{n}.ndjson")}))
        .collect();
    let errors: Vec<_> = (0..cfg.errors.len())
        .map(|n| json!({"type": "OperationOutcome", "url": format!("{file_base}/files/err-{n}.ndjson")}))
        .collect();
    let mut manifest = json!({
        "transactionTime": job.transaction_time,
        "request": format!("{}/fhir/$export", s.origin()),
        "requiresAccessToken": cfg.requires_token,
        "output": output, "deleted": deleted, "error": errors
    });
    if let Some(size) = cfg.manifest_page_size {
        // page N holds entries [(N-1)·size, N·size) of output, deleted and error alike
        let n = page.unwrap_or(1);
        let mut more = false;
        for key in ["output", "deleted", "error"] {
            let all = manifest[key].as_array().cloned().unwrap_or_default();
            more |= all.len() > n * size;
            manifest[key] = json!(all.into_iter().skip((n - 1) * size).take(size).collect::<Vec<_>>());
        }
        if more {
            manifest["link"] =
                json!([{"relation": "next", "url": format!("{}/status/{id}?page={}", s.origin(), n + 1)}]);
        }
    }
    if cfg.stu4_manifest {
        let m = manifest.as_object_mut().unwrap();
        m.remove("request");
        let errors = m.remove("error").unwrap_or_default();
        m.insert("outcome".into(), errors);
        m.insert("manifestType".into(), json!("http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest"));
        m.insert("extension".into(), json!([{"url": "http://example.org/x", "valueBoolean": true}]));
    }
    if let Some(n) = cfg.endless_manifest {
        let head = Bytes::from_static(b"{\"output\":[");
        let entry = Bytes::from(format!(r#"{{"type":"Patient","url":"{}/files/out-0.ndjson"}},"#, s.origin()));
        let chunks = n / entry.len() as u64;
        let stream = futures::stream::iter(std::iter::once(head).chain((0..chunks).map(move |_| entry.clone())))
            .map(Ok::<Bytes, std::io::Error>);
        return Response::builder()
            .status(200)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let body = match &cfg.raw_manifest {
        Some(raw) => raw.replace("{base}", &s.origin()),
        None => manifest.to_string(),
    };
    if let Some(every) = cfg.trickle_manifest {
        return trickle(body.into_bytes(), every, "application/json");
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A body sent one byte per `every`.
fn trickle(body: Vec<u8>, every: std::time::Duration, ctype: &'static str) -> Response {
    let stream = futures::stream::iter(body).then(move |b| async move {
        tokio::time::sleep(every).await;
        Ok::<Bytes, std::io::Error>(Bytes::from(vec![b]))
    });
    Response::builder().status(200).header(header::CONTENT_TYPE, ctype).body(Body::from_stream(stream)).unwrap()
}

async fn cancel(State(s): State<FakeSource>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let r = {
        if let Some(r) = unauthorized(&s, &headers) {
            r
        } else {
            let mut i = s.inner.lock().unwrap();
            i.log.status_deletes.push(id.clone());
            if i.jobs.remove(&id).is_some() {
                i.log.active_exports -= 1;
                StatusCode::ACCEPTED.into_response()
            } else {
                StatusCode::NOT_FOUND.into_response()
            }
        }
    };
    s.touch();
    r
}

async fn file(State(s): State<FakeSource>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    let had_auth = headers.contains_key(header::AUTHORIZATION);
    let (lines, cut, gzip, need_auth, special, busy) = {
        let mut i = s.inner.lock().unwrap();
        i.log.downloads.push((name.clone(), had_auth));
        i.log.auth_headers.push((name.clone(), had_auth));
        if let Some(to) = i.cfg.redirect_files_to.clone() {
            drop(i);
            s.touch();
            return Response::builder()
                .status(307)
                .header(header::LOCATION, format!("{to}/files/{name}"))
                .body(Body::empty())
                .unwrap();
        }
        let n = i.downloads_per_file.entry(name.clone()).or_default();
        *n += 1;
        let first = *n == 1;
        let stem = name.trim_end_matches(".ndjson");
        let (kind, idx) = stem.split_once('-').unwrap_or(("", "0"));
        let idx: usize = idx.parse().unwrap_or(usize::MAX);
        let lines = match kind {
            "out" => i.cfg.files.get(idx).map(|f| f.1.clone()),
            "inc" => i.cfg.since_files.as_ref().and_then(|f| f.get(idx)).map(|f| f.1.clone()),
            "del" => i.cfg.deleted.get(idx).cloned(),
            "err" => i.cfg.errors.get(idx).cloned(),
            _ => None,
        };
        let need_auth = i.cfg.requires_token && i.cfg.file_base.is_none();
        let special = match (kind, idx) {
            ("err", 0) if i.cfg.huge_error_line.is_some() => i.cfg.huge_error_line.map(Special::ErrorLine),
            ("out", 0) if i.cfg.gzip_bomb_mib.is_some() => i.cfg.gzip_bomb_mib.map(Special::Bomb),
            ("out", _) => i.cfg.trickle_files.map(Special::Trickle),
            _ => None,
        };
        let busy = i.cfg.file_busy.clone().filter(|(n, _)| kind == "out" && i.downloads_per_file[&name] <= *n);
        (lines, i.cfg.cut_first_download && first && kind == "out", i.cfg.gzip, need_auth, special, busy)
    };
    if let Some((_, retry_after)) = busy {
        return Response::builder()
            .status(429)
            .header(header::RETRY_AFTER, retry_after)
            .body(Body::from("too many requests"))
            .unwrap();
    }
    s.touch();
    if need_auth && let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    match special {
        Some(Special::ErrorLine(n)) => {
            // one line of n bytes, generated as it is sent
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let full = n / chunk.len() as u64;
            let stream = futures::stream::iter(
                (0..full).map(move |_| chunk.clone()).chain(std::iter::once(Bytes::from_static(b"\n"))),
            )
            .map(Ok::<Bytes, std::io::Error>);
            return Response::builder()
                .status(200)
                .header(header::CONTENT_TYPE, "application/fhir+ndjson")
                .body(Body::from_stream(stream))
                .unwrap();
        }
        Some(Special::Bomb(mib)) => {
            // gzip members of 1 MiB of 'a' each: ~1 KiB on the wire per MiB decoded
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(&vec![b'a'; 1 << 20]).unwrap();
            let member = Bytes::from(e.finish().unwrap());
            let stream = futures::stream::iter((0..mib).map(move |_| member.clone())).map(Ok::<Bytes, std::io::Error>);
            return Response::builder()
                .status(200)
                .header(header::CONTENT_TYPE, "application/fhir+ndjson")
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from_stream(stream))
                .unwrap();
        }
        _ => {}
    }
    let Some(lines) = lines else { return StatusCode::NOT_FOUND.into_response() };
    let mut body = lines.join("\n").into_bytes();
    body.push(b'\n');
    if let Some(Special::Trickle(every)) = special {
        return trickle(body, every, "application/fhir+ndjson");
    }
    if cut {
        // send half of the promised bytes, then break the connection (gzip-encoded when files are)
        let body = if gzip { gzip_bytes(&body) } else { body };
        let half = Bytes::copy_from_slice(&body[..body.len() / 2]);
        let stream = futures::stream::iter(vec![
            Ok::<Bytes, std::io::Error>(half),
            Err(std::io::Error::other("connection reset")),
        ]);
        let mut r = Response::builder()
            .status(200)
            .header(header::CONTENT_TYPE, "application/fhir+ndjson")
            .header(header::CONTENT_LENGTH, body.len());
        if gzip {
            r = r.header(header::CONTENT_ENCODING, "gzip");
        }
        return r.body(Body::from_stream(stream)).unwrap();
    }
    if gzip {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&body).unwrap();
        let gz = e.finish().unwrap();
        return Response::builder()
            .status(200)
            .header(header::CONTENT_TYPE, "application/fhir+ndjson")
            .header(header::CONTENT_ENCODING, "gzip")
            .body(Body::from(gz))
            .unwrap();
    }
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/fhir+ndjson")
        .body(Body::from(body))
        .unwrap()
}

fn gzip_bytes(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

enum Special {
    ErrorLine(u64),
    Bomb(u32),
    Trickle(std::time::Duration),
}

/// `n` resources of a type, as NDJSON lines.
/// Three output files of two types: 24 Patients, 100 and 17 Observations.
pub fn three_files() -> SourceConfig {
    SourceConfig {
        files: vec![
            ("Patient".into(), resources("Patient", "p", 24)),
            ("Observation".into(), resources("Observation", "o", 100)),
            ("Observation".into(), resources("Observation", "o2-", 17)),
        ],
        ..Default::default()
    }
}

pub fn resources(t: &str, prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|k| json!({"resourceType": t, "id": format!("{prefix}{k}"), "active": true}).to_string()).collect()
}

/// A deleted[] Bundle line deleting `refs` (`Patient/1`).
pub fn delete_bundle(refs: &[&str]) -> String {
    let entries: Vec<_> = refs.iter().map(|r| json!({"request": {"method": "DELETE", "url": r}})).collect();
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}).to_string()
}
