//! A Pathling server emulator written for the tests: `$import` / `$job` / `$import-pnp` / `PUT` /
//! `DELETE`, checking the request shapes Pathling's code accepts (Prefer: respond-async, Parameters with
//! valueCode/valueUrl, explicit saveMode, `.ndjson` URLs under allowable sources), one import at a time
//! (503 for a concurrent one), and a 404 for a job it lost. With `v7`, it speaks Pathling Server 7.2 as
//! the real one was observed to (tests/peers/pathling/FINDINGS.md): `source` parts whose `mode` is
//! read only as a valueCode (else **overwrite**), a 3.0-style body refused, asynchronous jobs keyed by
//! URL (a second body at the same URL gets the first job), imports queued rather than refused, a
//! finished job answered with an OperationOutcome, and no DELETE.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};
use tokio::sync::watch;

/// How the emulator behaves.
#[derive(Clone, Debug, Default)]
pub struct PathlingConfig {
    /// URL prefix → local directory (e.g. `file:///staging` → `/tmp/x`), like allowableSources.
    pub roots: Vec<(String, std::path::PathBuf)>,
    /// `$job` polls answering 202 before the result.
    pub job_polls: u32,
    /// The first kick-offs answer 503 (another import running elsewhere).
    pub busy_kickoffs: u32,
    /// The first `$job` polls answer 503 (the queued job lost the race).
    pub busy_polls: u32,
    /// The first `$job` poll answers 404 (Pathling restarted and forgot the job).
    pub lose_job_once: bool,
    /// Imports fail with this status and message.
    pub fail_import: Option<(u16, String)>,
    /// When set, requests need `Authorization: Bearer <token>`.
    pub bearer: Option<String>,
    /// Every `$job` poll answers 404 (a Pathling that forgets every job).
    pub lose_jobs_forever: bool,
    /// Every `$import` answers this status.
    pub import_status_forever: Option<u16>,
    /// Every `$job` poll answers this status.
    pub job_status_forever: Option<u16>,
    /// A finished job answers 200 with this body instead of its result (and imports nothing).
    pub job_result_body: Option<String>,
    /// `$job` polls of an export answering 202 before the manifest.
    pub export_polls: u32,
    /// Lines per exported file (default 1000).
    pub export_lines_per_file: usize,
    /// Every `$export` kick-off answers this status.
    pub export_status_forever: Option<u16>,
    /// Every write (batch, PUT, DELETE) takes this long, one at a time (a Delta commit each, as in
    /// a real Pathling).
    pub write_delay: Option<std::time::Duration>,
    /// Every write answers this status (Pathling down, or refusing).
    pub writes_forever: Option<u16>,
    /// Down: every request answers 503 (and counts as `refused_while_down`), as a Pathling that is
    /// restarting behind its Service.
    pub down: bool,
    /// A batch or PUT containing one of these ids fails whole with 400 (a resource Pathling cannot
    /// encode).
    pub reject_ids: Vec<String>,
    /// Speak Pathling Server 7.2 instead of 3.0.
    pub v7: bool,
}

/// A received `$import`.
#[derive(Clone, Debug)]
pub struct ImportRecord {
    pub save_mode: String,
    pub input_format: String,
    pub inputs: Vec<(String, String)>,
}

/// What the emulator saw.
#[derive(Clone, Debug, Default)]
pub struct PathlingLog {
    /// `$import` requests received, accepted or not.
    pub import_posts: u32,
    pub metadata_reads: u32,
    pub imports: Vec<ImportRecord>,
    pub pnp: Vec<Value>,
    pub rejected: Vec<String>,
    pub job_polls: u32,
    pub job_deletes: u32,
    pub completed_imports: u32,
    pub resource_deletes: Vec<String>,
    pub puts: Vec<String>,
    pub max_concurrent_imports: u32,
    /// `$export` kick-off queries.
    pub exports: Vec<String>,
    /// `$result` downloads.
    pub export_files: u32,
    /// Write requests (batches, PUTs, DELETEs) received.
    pub writes: u32,
    /// Requests answered 503 while `down`.
    pub refused_while_down: u32,
    /// Batches received, and the entries in them.
    pub batches: u32,
    pub batch_entries: u32,
}

struct Job {
    polls: u32,
    import: ImportRecord,
    busy: bool,
}

struct Inner {
    cfg: PathlingConfig,
    log: PathlingLog,
    jobs: HashMap<String, Job>,
    running: u32,
    next: u32,
    /// type → id → resource
    data: BTreeMap<String, BTreeMap<String, Value>>,
    exports: super::pathling_export::Exports,
    /// 7.2: the job each `$import` URL (with its query) was first given.
    v7_jobs_by_url: HashMap<String, String>,
}

/// A running emulator.
#[derive(Clone)]
pub struct FakePathling {
    inner: Arc<Mutex<Inner>>,
    /// Writes happen one at a time.
    writes: Arc<tokio::sync::Mutex<()>>,
    changed: watch::Sender<u64>,
    pub base: String,
}

/// Answers 503 to everything while the emulator is configured `down`.
async fn when_down(
    State(p): State<FakePathling>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let down = {
        let mut i = p.inner.lock().unwrap();
        if i.cfg.down {
            i.log.refused_while_down += 1;
        }
        i.cfg.down
    };
    if down {
        p.touch();
        return (StatusCode::SERVICE_UNAVAILABLE, "Pathling is restarting").into_response();
    }
    next.run(req).await
}

impl FakePathling {
    /// Starts the emulator on a loopback port.
    pub async fn start(cfg: PathlingConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (changed, _) = watch::channel(0);
        let me = Self {
            writes: Arc::default(),
            inner: Arc::new(Mutex::new(Inner {
                cfg,
                log: PathlingLog::default(),
                jobs: HashMap::new(),
                running: 0,
                next: 0,
                data: BTreeMap::new(),
                exports: Default::default(),
                v7_jobs_by_url: HashMap::new(),
            })),
            changed,
            base: format!("http://{addr}/fhir"),
        };
        let app = Router::new()
            .route("/fhir/metadata", get(metadata))
            .route("/fhir/$import", post(import))
            .route("/fhir/$import-pnp", post(import_pnp))
            .route("/fhir/$job", get(job).delete(delete_job))
            .route("/fhir", post(batch))
            .route("/fhir/$export", get(export))
            .route("/fhir/$result", get(export_result))
            .route("/fhir/{t}/{id}", put(put_resource).delete(delete_resource).get(get_resource))
            .fallback(|| async {
                let page = "<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>";
                (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/html")], page)
            })
            .layer(axum::middleware::from_fn_with_state(me.clone(), when_down))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(me.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        me
    }

    pub fn log(&self) -> PathlingLog {
        self.inner.lock().unwrap().log.clone()
    }

    pub fn configure(&self, f: impl FnOnce(&mut PathlingConfig)) {
        f(&mut self.inner.lock().unwrap().cfg);
    }

    /// Ids stored for a type.
    pub fn ids(&self, t: &str) -> Vec<String> {
        self.inner.lock().unwrap().data.get(t).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// One stored resource.
    pub fn get(&self, t: &str, id: &str) -> Option<Value> {
        self.inner.lock().unwrap().data.get(t).and_then(|m| m.get(id)).cloned()
    }

    /// Resources stored per type.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.inner.lock().unwrap().data.iter().map(|(k, v)| (k.clone(), v.len())).collect()
    }

    /// Removes a resource (drift planted by a test).
    pub fn remove(&self, t: &str, id: &str) {
        if let Some(m) = self.inner.lock().unwrap().data.get_mut(t) {
            m.remove(id);
        }
    }

    /// Seeds a resource.
    pub fn insert(&self, t: &str, id: &str, v: Value) {
        self.inner.lock().unwrap().data.entry(t.into()).or_default().insert(id.into(), v);
    }

    /// Waits until `pred` holds (woken by every request).
    pub async fn wait_for(&self, pred: impl Fn(&PathlingLog) -> bool) -> PathlingLog {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let l = self.log();
                if pred(&l) {
                    return l;
                }
            }
            rx.changed().await.expect("emulator stopped");
        }
    }

    /// Changes with every request the emulator gets: subscribe, check, then await `changed()`.
    pub fn requests(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

fn oo(code: &str, diag: &str) -> String {
    json!({"resourceType":"OperationOutcome","issue":[{"severity":"error","code":code,"diagnostics":diag}]}).to_string()
}

fn check_auth(i: &Inner, headers: &HeaderMap) -> Option<Response> {
    let want = i.cfg.bearer.as_ref()?;
    let got = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    if got == format!("Bearer {want}") {
        None
    } else {
        Some((StatusCode::UNAUTHORIZED, oo("login", "bad token")).into_response())
    }
}

fn parse_import(body: &[u8]) -> Result<ImportRecord, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if v["resourceType"] != "Parameters" {
        return Err("body is not a Parameters resource".into());
    }
    let mut rec = ImportRecord { save_mode: String::new(), input_format: String::new(), inputs: vec![] };
    for p in v["parameter"].as_array().ok_or("no parameter array")? {
        match p["name"].as_str() {
            Some("saveMode") => rec.save_mode = p["valueCode"].as_str().ok_or("saveMode must be a valueCode")?.into(),
            Some("inputFormat") => {
                rec.input_format = p["valueCode"].as_str().ok_or("inputFormat must be a valueCode")?.into()
            }
            Some("input") => {
                let parts = p["part"].as_array().ok_or("input without parts")?;
                let t = parts
                    .iter()
                    .find(|x| x["name"] == "resourceType")
                    .and_then(|x| x["valueCode"].as_str())
                    .ok_or("input.resourceType must be a valueCode")?;
                let u = parts
                    .iter()
                    .find(|x| x["name"] == "url")
                    .and_then(|x| x["valueUrl"].as_str())
                    .ok_or("input.url must be a valueUrl")?;
                rec.inputs.push((t.into(), u.into()));
            }
            Some(other) => return Err(format!("unknown parameter {other}")),
            None => return Err("parameter without name".into()),
        }
    }
    if rec.save_mode.is_empty() {
        return Err("saveMode missing (fhirsync must always send it)".into());
    }
    Ok(rec)
}

/// Pathling 7.2's `$import` body: `source` parts; a `mode` that is not a valueCode is ignored, and
/// the default is overwrite.
fn parse_import_v7(body: &[u8]) -> Result<ImportRecord, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let mut rec = ImportRecord { save_mode: String::new(), input_format: "ndjson".into(), inputs: vec![] };
    for p in v["parameter"].as_array().into_iter().flatten().filter(|p| p["name"] == "source") {
        let parts = p["part"].as_array().ok_or("source without parts")?;
        let get = |n: &str, ty: &str| parts.iter().find(|x| x["name"] == n).and_then(|x| x[ty].as_str());
        let t = get("resourceType", "valueCode").ok_or("500: resourceType must be a valueCode")?;
        let u = get("url", "valueUrl").ok_or("500: url must be a valueUrl")?;
        let mode = get("mode", "valueCode").unwrap_or("overwrite");
        if rec.save_mode.is_empty() {
            rec.save_mode = mode.into();
        } else if rec.save_mode != mode {
            return Err("the emulator takes one mode per request".into());
        }
        rec.inputs.push((t.into(), u.into()));
    }
    if rec.inputs.is_empty() {
        return Err("Must provide at least one source parameter".into());
    }
    Ok(rec)
}

fn v7_done() -> String {
    json!({"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational",
        "diagnostics":"Data import completed successfully"}]})
    .to_string()
}

async fn metadata(State(s): State<FakePathling>) -> Response {
    let v7 = {
        let mut i = s.inner.lock().unwrap();
        i.log.metadata_reads += 1;
        i.cfg.v7
    };
    s.touch();
    if v7 {
        let types: Vec<Value> = ["Patient", "Observation", "Condition"]
            .iter()
            .map(|t| {
                json!({"type": t, "interaction": [{"code": "search-type"}, {"code": "create"}, {"code": "update"}],
                            "operation": [{"name": "aggregate"}, {"name": "extract"}, {"name": "fhirPath"}]})
            })
            .collect();
        let cs = json!({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "status": "active", "kind": "instance",
            "url": "https://pathling.csiro.au/fhir/CapabilityStatement/pathling-fhir-api-7",
            "software": {"name": "Pathling", "version": "7.2.0+1ec7c05"},
            "rest": [{"mode": "server", "resource": types,
                      "operation": [{"name": "import"}, {"name": "result"}, {"name": "job"}],
                      "interaction": [{"code": "batch"}]}]});
        return (StatusCode::OK, [(header::CONTENT_TYPE, "application/fhir+json")], cs.to_string()).into_response();
    }
    let cs = json!({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "status": "active", "kind": "instance",
        "software": {"name": "Pathling", "version": "3.0.0"},
        "rest": [{"mode": "server", "operation": [{"name": "import"}, {"name": "export"}, {"name": "job"}],
                  "interaction": [{"code": "batch"}]}]});
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/fhir+json")], cs.to_string()).into_response()
}

async fn import(State(s): State<FakePathling>, uri: axum::http::Uri, headers: HeaderMap, body: Bytes) -> Response {
    let r = {
        let mut i = s.inner.lock().unwrap();
        i.log.import_posts += 1;
        if let Some(r) = check_auth(&i, &headers) {
            r
        } else if i.cfg.v7 {
            import_v7(&mut i, &s.base, &uri, &headers, &body)
        } else if let Some(code) = i.cfg.import_status_forever {
            (StatusCode::from_u16(code).unwrap(), oo("exception", "internal error")).into_response()
        } else if headers.get("prefer").and_then(|v| v.to_str().ok()) != Some("respond-async") {
            i.log.rejected.push("missing Prefer: respond-async".into());
            (StatusCode::BAD_REQUEST, oo("invalid", "Prefer: respond-async is mandatory")).into_response()
        } else if headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) != Some("application/fhir+json") {
            i.log.rejected.push("wrong content type".into());
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, oo("invalid", "content type")).into_response()
        } else {
            match parse_import(&body) {
                Err(e) => {
                    i.log.rejected.push(e.clone());
                    (StatusCode::BAD_REQUEST, oo("invalid", &e)).into_response()
                }
                Ok(rec) => {
                    if i.cfg.busy_kickoffs > 0 || i.running > 0 {
                        i.cfg.busy_kickoffs = i.cfg.busy_kickoffs.saturating_sub(1);
                        (StatusCode::SERVICE_UNAVAILABLE, oo("transient", "another import is in progress"))
                            .into_response()
                    } else {
                        let id = open_job(&mut i, rec);
                        let loc = format!("{}/$job?id={id}", s.base);
                        (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, loc)], "").into_response()
                    }
                }
            }
        }
    };
    s.touch();
    r
}

/// Records an import and starts its job; returns the job's id.
fn open_job(i: &mut Inner, rec: ImportRecord) -> String {
    i.next += 1;
    let id = format!("j{}", i.next);
    i.log.imports.push(rec.clone());
    i.running += 1;
    i.log.max_concurrent_imports = i.log.max_concurrent_imports.max(i.running);
    i.jobs.insert(id.clone(), Job { polls: 0, import: rec, busy: false });
    id
}

/// Pathling 7.2's `$import`: asynchronous only with exactly `Prefer: respond-async` (else done at
/// once), jobs keyed by URL, imports queued.
fn import_v7(i: &mut Inner, base: &str, uri: &axum::http::Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let rec = match parse_import_v7(body) {
        Ok(r) => r,
        Err(e) => {
            i.log.rejected.push(e.clone());
            let code = if e.starts_with("500") { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::BAD_REQUEST };
            return (code, oo("invalid", &e)).into_response();
        }
    };
    let asynchronous = headers.get("prefer").and_then(|v| v.to_str().ok()) == Some("respond-async");
    if !asynchronous {
        i.log.imports.push(rec.clone());
        return match apply_import(i, &rec) {
            Ok(()) => {
                i.log.completed_imports += 1;
                (StatusCode::OK, v7_done()).into_response()
            }
            Err((code, msg)) => (StatusCode::from_u16(code).unwrap(), oo("processing", &msg)).into_response(),
        };
    }
    let key = uri.to_string();
    let id = match i.v7_jobs_by_url.get(&key) {
        // the same URL and headers: the first job, whatever this body says
        Some(id) => id.clone(),
        None => {
            let id = open_job(i, rec);
            i.v7_jobs_by_url.insert(key, id.clone());
            id
        }
    };
    (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, format!("{base}/$job?id={id}"))], "").into_response()
}

async fn import_pnp(State(s): State<FakePathling>, headers: HeaderMap, body: Bytes) -> Response {
    let r = {
        let mut i = s.inner.lock().unwrap();
        if let Some(r) = check_auth(&i, &headers) {
            r
        } else {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            i.log.pnp.push(v);
            i.next += 1;
            let id = format!("j{}", i.next);
            i.running += 1;
            i.jobs.insert(
                id.clone(),
                Job {
                    polls: 0,
                    import: ImportRecord { save_mode: "merge".into(), input_format: String::new(), inputs: vec![] },
                    busy: false,
                },
            );
            (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, format!("{}/$job?id={id}", s.base))], "").into_response()
        }
    };
    s.touch();
    r
}

fn local_path(cfg: &PathlingConfig, url: &str) -> Option<std::path::PathBuf> {
    cfg.roots
        .iter()
        .find_map(|(prefix, dir)| url.strip_prefix(prefix.as_str()).map(|rest| dir.join(rest.trim_start_matches('/'))))
}

/// Reads the job's files into the store (merge = upsert on id). Errors become the job's failure.
fn apply_import(i: &mut Inner, rec: &ImportRecord) -> Result<(), (u16, String)> {
    for (t, url) in &rec.inputs {
        if !url.ends_with(".ndjson") {
            continue; // Pathling silently skips other names
        }
        let path = local_path(&i.cfg, url).ok_or((403, format!("{url} is not under an allowable source")))?;
        let text = std::fs::read_to_string(&path).map_err(|e| (400, format!("cannot read {url}: {e}")))?;
        let table = i.data.entry(t.clone()).or_default();
        if rec.save_mode == "overwrite" {
            table.clear();
        }
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| (400, format!("bad NDJSON in {url}: {e}")))?;
            let id = v["id"].as_str().unwrap_or_default().to_string();
            table.insert(id, v);
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct JobQ {
    id: String,
}

async fn job(State(s): State<FakePathling>, Query(q): Query<JobQ>, headers: HeaderMap) -> Response {
    let r = {
        let mut guard = s.inner.lock().unwrap();
        let i = &mut *guard;
        i.log.job_polls += 1;
        let export_polls = i.cfg.export_polls;
        if let Some(r) = check_auth(i, &headers) {
            r
        } else if let Some(r) = super::pathling_export::poll(&mut i.exports, &q.id, &headers, &s.base, export_polls) {
            r
        } else if i.cfg.lose_jobs_forever {
            if i.jobs.remove(&q.id).is_some() {
                i.running = i.running.saturating_sub(1);
            }
            (StatusCode::NOT_FOUND, oo("not-found", "unknown job")).into_response()
        } else if let Some(code) = i.cfg.job_status_forever {
            (StatusCode::from_u16(code).unwrap(), oo("exception", "internal error")).into_response()
        } else if let Some(body) = i.cfg.job_result_body.clone()
            && i.jobs.contains_key(&q.id)
        {
            i.jobs.remove(&q.id);
            i.running = i.running.saturating_sub(1);
            (StatusCode::OK, body).into_response()
        } else if i.cfg.lose_job_once && i.jobs.contains_key(&q.id) {
            i.cfg.lose_job_once = false;
            i.jobs.remove(&q.id);
            i.running = i.running.saturating_sub(1);
            (StatusCode::NOT_FOUND, oo("not-found", "unknown job")).into_response()
        } else if i.cfg.busy_polls > 0 && i.jobs.get(&q.id).is_some_and(|j| !j.busy) {
            i.cfg.busy_polls -= 1;
            if let Some(j) = i.jobs.get_mut(&q.id) {
                j.busy = true;
            }
            i.running = i.running.saturating_sub(1);
            (StatusCode::SERVICE_UNAVAILABLE, oo("transient", "another import is in progress")).into_response()
        } else {
            let polls_needed = i.cfg.job_polls;
            match i.jobs.get_mut(&q.id) {
                None => (StatusCode::NOT_FOUND, oo("not-found", "unknown job")).into_response(),
                Some(j) if j.busy => {
                    (StatusCode::SERVICE_UNAVAILABLE, oo("transient", "another import is in progress")).into_response()
                }
                Some(j) if j.polls < polls_needed => {
                    j.polls += 1;
                    (StatusCode::ACCEPTED, [("x-progress", format!("{}%", 100 * j.polls / (polls_needed + 1)))], "")
                        .into_response()
                }
                Some(j) => {
                    let rec = j.import.clone();
                    if let Some((code, msg)) = i.cfg.fail_import.clone() {
                        i.running = i.running.saturating_sub(1);
                        (StatusCode::from_u16(code).unwrap(), oo("processing", &msg)).into_response()
                    } else {
                        let applied = apply_import(i, &rec);
                        i.jobs.remove(&q.id);
                        i.running = i.running.saturating_sub(1);
                        match applied {
                            Ok(()) if i.cfg.v7 => {
                                i.log.completed_imports += 1;
                                (StatusCode::OK, v7_done()).into_response()
                            }
                            Ok(()) => {
                                i.log.completed_imports += 1;
                                let out: Vec<_> = rec
                                    .inputs
                                    .iter()
                                    .map(|(_, u)| json!({"name":"output","part":[{"name":"inputUrl","valueUrl":u}]}))
                                    .collect();
                                let mut params = vec![
                                    json!({"name":"transactionTime","valueString": jiff::Timestamp::now().to_string()}),
                                ];
                                params.extend(out);
                                (StatusCode::OK, json!({"resourceType":"Parameters","parameter":params}).to_string())
                                    .into_response()
                            }
                            Err((code, msg)) => {
                                (StatusCode::from_u16(code).unwrap(), oo("processing", &msg)).into_response()
                            }
                        }
                    }
                }
            }
        }
    };
    s.touch();
    r
}

async fn delete_job(State(s): State<FakePathling>, Query(q): Query<JobQ>) -> Response {
    let r = {
        let mut i = s.inner.lock().unwrap();
        i.log.job_deletes += 1;
        if super::pathling_export::delete(&mut i.exports, &q.id) {
            StatusCode::ACCEPTED.into_response()
        } else if let Some(j) = i.jobs.remove(&q.id) {
            if !j.busy {
                i.running = i.running.saturating_sub(1);
            }
            StatusCode::ACCEPTED.into_response()
        } else {
            StatusCode::NOT_FOUND.into_response()
        }
    };
    s.touch();
    r
}

async fn export(
    State(s): State<FakePathling>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    headers: HeaderMap,
) -> Response {
    let r = {
        let mut guard = s.inner.lock().unwrap();
        let i = &mut *guard;
        let q = q.unwrap_or_default();
        i.log.exports.push(q.clone());
        if let Some(r) = check_auth(i, &headers) {
            r
        } else if let Some(code) = i.cfg.export_status_forever {
            (StatusCode::from_u16(code).unwrap(), oo("exception", "export failed")).into_response()
        } else {
            i.next += 1;
            let id = format!("x{}", i.next);
            let per = if i.cfg.export_lines_per_file == 0 { 1000 } else { i.cfg.export_lines_per_file };
            super::pathling_export::kickoff(&mut i.exports, &i.data, id, &s.base, &q, &headers, per)
        }
    };
    s.touch();
    r
}

#[derive(serde::Deserialize)]
struct ResultQ {
    job: String,
    file: String,
}

async fn export_result(State(s): State<FakePathling>, Query(q): Query<ResultQ>, headers: HeaderMap) -> Response {
    let r = {
        let mut i = s.inner.lock().unwrap();
        i.log.export_files += 1;
        match check_auth(&i, &headers) {
            Some(r) => r,
            None => super::pathling_export::result(&i.exports, &q.job, &q.file),
        }
    };
    s.touch();
    r
}

/// Takes the write lock (one write at a time), waits the write delay; an answer when writes fail.
async fn write_gate(s: &FakePathling) -> (tokio::sync::OwnedMutexGuard<()>, Option<Response>) {
    {
        let mut i = s.inner.lock().unwrap();
        i.log.writes += 1;
    }
    let g = s.writes.clone().lock_owned().await;
    let (delay, forever) = {
        let i = s.inner.lock().unwrap();
        (i.cfg.write_delay, i.cfg.writes_forever)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let r = forever.map(|code| (StatusCode::from_u16(code).unwrap(), oo("transient", "unavailable")).into_response());
    (g, r)
}

/// `POST [base]` with a batch Bundle: Pathling's rules — PUTs only with a matching resource, a DELETE
/// of an absent resource fails the whole request, no per-entry failures.
async fn batch(State(s): State<FakePathling>, headers: HeaderMap, body: Bytes) -> Response {
    let (_g, refused) = write_gate(&s).await;
    let r = {
        let mut guard = s.inner.lock().unwrap();
        let i = &mut *guard;
        if let Some(r) = check_auth(i, &headers).or(refused) {
            r
        } else {
            i.log.batches += 1;
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let entries = v["entry"].as_array().cloned().unwrap_or_default();
            i.log.batch_entries += entries.len() as u32;
            let mut ok = v["resourceType"] == "Bundle";
            let mut out = vec![];
            let mut staged: Vec<(String, String, Option<Value>)> = vec![];
            for e in &entries {
                let (m, u) =
                    (e["request"]["method"].as_str().unwrap_or(""), e["request"]["url"].as_str().unwrap_or(""));
                let Some((t, id)) = u.split_once('/') else {
                    ok = false;
                    break;
                };
                match m {
                    "PUT" if e["resource"]["resourceType"] == t && e["resource"]["id"] == id => {
                        if i.cfg.reject_ids.iter().any(|r| r == id) {
                            ok = false;
                            break;
                        }
                        staged.push((t.into(), id.into(), Some(e["resource"].clone())));
                        out.push(json!({"resource": e["resource"], "response": {"status": "200"}}));
                    }
                    "DELETE" if i.data.get(t).is_some_and(|m| m.contains_key(id)) => {
                        staged.push((t.into(), id.into(), None));
                        out.push(json!({"response": {"status": "204"}}));
                    }
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                (StatusCode::BAD_REQUEST, oo("invalid", "a batch entry could not be processed")).into_response()
            } else {
                for (t, id, v) in staged {
                    match v {
                        Some(v) => {
                            i.log.puts.push(format!("{t}/{id}"));
                            i.data.entry(t).or_default().insert(id, v);
                        }
                        None => {
                            i.log.resource_deletes.push(format!("{t}/{id}"));
                            i.data.get_mut(&t).map(|m| m.remove(&id));
                        }
                    }
                }
                let b = json!({"resourceType": "Bundle", "type": "batch-response", "entry": out});
                (StatusCode::OK, [(header::CONTENT_TYPE, "application/fhir+json")], b.to_string()).into_response()
            }
        }
    };
    s.touch();
    r
}

async fn put_resource(
    State(s): State<FakePathling>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (_g, refused) = write_gate(&s).await;
    let r = {
        let mut i = s.inner.lock().unwrap();
        if let Some(r) = check_auth(&i, &headers).or(refused) {
            r
        } else if i.cfg.reject_ids.contains(&id) {
            (StatusCode::BAD_REQUEST, oo("invalid", "cannot encode the resource")).into_response()
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) if v["id"].as_str() == Some(id.as_str()) && v["resourceType"].as_str() == Some(t.as_str()) => {
                    i.log.puts.push(format!("{t}/{id}"));
                    let existed = i.data.entry(t.clone()).or_default().insert(id, v.clone()).is_some();
                    (if existed { StatusCode::OK } else { StatusCode::CREATED }, v.to_string()).into_response()
                }
                Ok(_) => (StatusCode::BAD_REQUEST, oo("invalid", "resource id must match the URL")).into_response(),
                Err(e) => (StatusCode::BAD_REQUEST, oo("invalid", &e.to_string())).into_response(),
            }
        }
    };
    s.touch();
    r
}

async fn delete_resource(
    State(s): State<FakePathling>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (_g, refused) = write_gate(&s).await;
    let r = {
        let mut i = s.inner.lock().unwrap();
        if let Some(r) = check_auth(&i, &headers).or(refused) {
            r
        } else if i.cfg.v7 {
            i.log.rejected.push(format!("DELETE {t}/{id}"));
            (StatusCode::BAD_REQUEST, oo("not-supported", "Operation is not supported")).into_response()
        } else {
            i.log.resource_deletes.push(format!("{t}/{id}"));
            match i.data.get_mut(&t).and_then(|m| m.remove(&id)) {
                Some(_) => StatusCode::NO_CONTENT.into_response(),
                None => (StatusCode::NOT_FOUND, oo("not-found", "no such resource")).into_response(),
            }
        }
    };
    s.touch();
    r
}

async fn get_resource(State(s): State<FakePathling>, Path((t, id)): Path<(String, String)>) -> Response {
    let i = s.inner.lock().unwrap();
    match i.data.get(&t).and_then(|m| m.get(&id)) {
        Some(v) => (StatusCode::OK, v.to_string()).into_response(),
        None => (StatusCode::NOT_FOUND, oo("not-found", "no such resource")).into_response(),
    }
}
