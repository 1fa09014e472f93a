//! A FHIR server with R4 rest-hook Subscriptions, written for the tests, behaving like HAPI: it keeps
//! Subscriptions (create/read/update/delete, search by `_tag`), moves them from `requested` to `active`
//! (or to `error` when a delivery fails), and really delivers notifications: `PUT {endpoint}/{Type}/{id}`
//! with the resource and the channel headers on every create/update of a matching resource, and
//! `DELETE {endpoint}/{Type}/{id}` on delete when the send-delete-messages extension is set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::{Value, json};
use tokio::sync::watch;

pub const SEND_DELETES: &str = "http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages";

/// How the server behaves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub fhir_version: String,
    pub subscription_supported: bool,
    /// Subscriptions become active by themselves (HAPI with resthook_enabled).
    pub activate: bool,
    /// Creating a rest-hook Subscription answers 422.
    pub reject_rest_hook: bool,
    /// Everything answers 503.
    pub down: bool,
    /// Behaves as Medplum: says so in its CapabilityStatement, POSTs each resource to the bare
    /// endpoint, and a delete as `{}` with `X-Medplum-Deleted-Resource: Type/id` (always sent).
    pub medplum: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            fhir_version: "4.0.1".into(),
            subscription_supported: true,
            activate: true,
            reject_rest_hook: false,
            down: false,
            medplum: false,
        }
    }
}

/// A delivery the server made.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub method: String,
    pub url: String,
    pub status: u16,
    pub headers: Vec<String>,
}

/// What the server saw and did.
#[derive(Clone, Debug, Default)]
pub struct ServerLog {
    pub sub_creates: u32,
    pub sub_updates: u32,
    pub sub_deletes: u32,
    pub searches: u32,
    pub deliveries: Vec<Delivery>,
}

struct Inner {
    cfg: ServerConfig,
    log: ServerLog,
    subs: BTreeMap<String, Value>,
    data: BTreeMap<(String, String), Value>,
    next: u32,
}

/// A running server.
#[derive(Clone)]
pub struct FakeFhirServer {
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
    http: reqwest::Client,
    pub base: String,
}

fn oo(code: &str, diag: &str) -> String {
    json!({"resourceType":"OperationOutcome","issue":[{"severity":"error","code":code,"diagnostics":diag}]}).to_string()
}

fn fhir(status: StatusCode, v: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/fhir+json")], v.to_string()).into_response()
}

impl FakeFhirServer {
    pub async fn start(cfg: ServerConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (changed, _) = watch::channel(0);
        fhirsync::net::init_tls();
        let me = Self {
            inner: Arc::new(Mutex::new(Inner {
                cfg,
                log: ServerLog::default(),
                subs: BTreeMap::new(),
                data: BTreeMap::new(),
                next: 0,
            })),
            changed,
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap(),
            base: format!("http://{addr}/fhir"),
        };
        let app = Router::new()
            .route("/fhir/metadata", get(metadata))
            .route("/fhir/Subscription", get(search).post(create_sub))
            .route("/fhir/Subscription/{id}", get(read_sub).put(update_sub).delete(delete_sub))
            .route("/fhir/{t}", any(create_resource))
            .route("/fhir/{t}/{id}", any(resource))
            .with_state(me.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        me
    }

    pub fn log(&self) -> ServerLog {
        self.inner.lock().unwrap().log.clone()
    }

    pub fn configure(&self, f: impl FnOnce(&mut ServerConfig)) {
        f(&mut self.inner.lock().unwrap().cfg);
    }

    /// All Subscriptions on the server.
    pub fn subscriptions(&self) -> Vec<Value> {
        self.inner.lock().unwrap().subs.values().cloned().collect()
    }

    /// Deletes a Subscription behind the operator's back.
    pub fn drop_subscription(&self, id: &str) {
        self.inner.lock().unwrap().subs.remove(id);
        self.touch();
    }

    /// Sets a Subscription's status (e.g. `error`) behind the operator's back.
    pub fn set_status(&self, id: &str, status: &str, error: &str) {
        if let Some(s) = self.inner.lock().unwrap().subs.get_mut(id) {
            s["status"] = json!(status);
            s["error"] = json!(error);
        }
        self.touch();
    }

    pub async fn wait_for(&self, pred: impl Fn(&ServerLog, &[Value]) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let l = self.log();
                if pred(&l, &self.subscriptions()) {
                    return;
                }
            }
            rx.changed().await.unwrap();
        }
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn activate_later(&self, id: String) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await; // activation is asynchronous, as in HAPI
            {
                let mut i = me.inner.lock().unwrap();
                let activate = i.cfg.activate;
                if let Some(s) = i.subs.get_mut(&id)
                    && s["status"] == "requested"
                    && activate
                {
                    s["status"] = json!("active");
                    s.as_object_mut().unwrap().remove("error");
                }
            }
            me.touch();
        });
    }

    /// Notifies every active Subscription whose criteria match (HAPI style: PUT or DELETE per resource).
    fn notify(&self, t: &str, id: &str, resource: Option<&Value>) {
        let targets: Vec<(String, Value)> = {
            let i = self.inner.lock().unwrap();
            i.subs
                .iter()
                .filter(|(_, s)| s["status"] == "active" && matches(s["criteria"].as_str().unwrap_or(""), t, resource))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let medplum = self.inner.lock().unwrap().cfg.medplum;
        for (sid, sub) in targets {
            let ch = &sub["channel"];
            let sends_deletes = ch["extension"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["url"] == SEND_DELETES && e["valueBoolean"] == true));
            if resource.is_none() && !sends_deletes && !medplum {
                continue; // R4 sends nothing on delete
            }
            let endpoint = ch["endpoint"].as_str().unwrap_or_default().trim_end_matches('/').to_string();
            let url = if medplum { endpoint.clone() } else { format!("{endpoint}/{t}/{id}") };
            let headers: Vec<String> = ch["header"]
                .as_array()
                .map(|a| a.iter().filter_map(|h| h.as_str().map(String::from)).collect())
                .unwrap_or_default();
            let mut req = match (resource, medplum) {
                (Some(r), false) => {
                    self.http.put(&url).header("content-type", "application/fhir+json").body(r.to_string())
                }
                (None, false) => self.http.delete(&url),
                (Some(r), true) => {
                    self.http.post(&url).header("content-type", "application/fhir+json").body(r.to_string())
                }
                (None, true) => self
                    .http
                    .post(&url)
                    .header("content-type", "application/fhir+json")
                    .header("x-medplum-deleted-resource", format!("{t}/{id}"))
                    .body("{}"),
            };
            for h in &headers {
                if let Some((k, v)) = h.split_once(':') {
                    req = req.header(k.trim(), v.trim());
                }
            }
            let me = self.clone();
            let method = match (resource.is_some(), medplum) {
                (_, true) => "POST",
                (true, false) => "PUT",
                (false, false) => "DELETE",
            }
            .to_string();
            tokio::spawn(async move {
                let status = match req.send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                {
                    let mut i = me.inner.lock().unwrap();
                    i.log.deliveries.push(Delivery { method: method.clone(), url, status, headers });
                    let ok = (200..300).contains(&status) || (method == "DELETE" && status == 404);
                    if !ok && let Some(s) = i.subs.get_mut(&sid) {
                        s["status"] = json!("error");
                        s["error"] = json!(format!("delivery failed: HTTP {status}"));
                    }
                }
                me.touch();
            });
        }
    }
}

/// `Type?`, `Type?field=value&...`, `[*]` or `[A,B]`.
fn matches(criteria: &str, t: &str, resource: Option<&Value>) -> bool {
    if criteria == "[*]" {
        return true;
    }
    if let Some(list) = criteria.strip_prefix('[').and_then(|c| c.strip_suffix(']')) {
        return list.split(',').any(|x| x.trim() == t);
    }
    let (ty, q) = criteria.split_once('?').unwrap_or((criteria, ""));
    if ty != t {
        return false;
    }
    let Some(r) = resource else { return true };
    url::form_urlencoded::parse(q.as_bytes()).all(|(k, v)| r[k.as_ref()].as_str() == Some(v.as_ref()))
}

fn down(s: &FakeFhirServer) -> Option<Response> {
    s.inner.lock().unwrap().cfg.down.then(|| (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response())
}

async fn metadata(State(s): State<FakeFhirServer>) -> Response {
    if let Some(r) = down(&s) {
        return r;
    }
    let cfg = s.inner.lock().unwrap().cfg.clone();
    let mut resources = vec![
        json!({"type":"Patient","interaction":[{"code":"read"},{"code":"create"},{"code":"update"},{"code":"delete"}]}),
    ];
    if cfg.subscription_supported {
        resources.push(json!({"type":"Subscription","interaction":[{"code":"read"},{"code":"create"},{"code":"update"},{"code":"delete"},{"code":"search-type"}]}));
    }
    fhir(
        StatusCode::OK,
        &json!({"resourceType":"CapabilityStatement","status":"active","kind":"instance","fhirVersion":cfg.fhir_version,
        "format":["json"],"rest":[{"mode":"server","resource":resources}],
        "software": {"name": if cfg.medplum { "Medplum" } else { "HAPI FHIR Server" }}}),
    )
}

async fn search(State(s): State<FakeFhirServer>, RawQuery(q): RawQuery) -> Response {
    if let Some(r) = down(&s) {
        return r;
    }
    let tag = url::form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "_tag")
        .map(|(_, v)| v.to_string());
    let mut i = s.inner.lock().unwrap();
    i.log.searches += 1;
    let entries: Vec<Value> = i
        .subs
        .values()
        .filter(|sub| match &tag {
            None => true,
            Some(t) => {
                let (sys, code) = t.split_once('|').unwrap_or(("", t));
                sub["meta"]["tag"].as_array().is_some_and(|a| a.iter().any(|x| x["system"] == sys && x["code"] == code))
            }
        })
        .map(|sub| json!({"fullUrl": format!("{}/Subscription/{}", s.base, sub["id"].as_str().unwrap()), "resource": sub}))
        .collect();
    drop(i);
    s.touch();
    fhir(StatusCode::OK, &json!({"resourceType":"Bundle","type":"searchset","total":entries.len(),"entry":entries}))
}

fn validate_sub(v: &Value) -> Result<(), String> {
    if v["resourceType"] != "Subscription" {
        return Err("not a Subscription".into());
    }
    if v["reason"].as_str().is_none_or(str::is_empty) {
        return Err("Subscription.reason is required".into());
    }
    if v["criteria"].as_str().is_none_or(str::is_empty) {
        return Err("Subscription.criteria is required".into());
    }
    if v["channel"]["type"] != "rest-hook" {
        return Err("only rest-hook channels here".into());
    }
    Ok(())
}

/// The checks both create and update make: server up, JSON, a rest-hook Subscription.
fn incoming_sub(s: &FakeFhirServer, body: &[u8]) -> Result<Value, Box<Response>> {
    if let Some(r) = down(s) {
        return Err(Box::new(r));
    }
    let v = serde_json::from_slice::<Value>(body)
        .map_err(|_| Box::new((StatusCode::BAD_REQUEST, oo("invalid", "bad JSON")).into_response()))?;
    validate_sub(&v).map_err(|e| Box::new((StatusCode::UNPROCESSABLE_ENTITY, oo("invalid", &e)).into_response()))?;
    Ok(v)
}

async fn create_sub(State(s): State<FakeFhirServer>, body: Bytes) -> Response {
    let mut v = match incoming_sub(&s, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let id = {
        let mut i = s.inner.lock().unwrap();
        if i.cfg.reject_rest_hook {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                oo("processing", "rest-hook subscriptions are not enabled on this server"),
            )
                .into_response();
        }
        i.next += 1;
        let id = format!("sub-{}", i.next);
        v["id"] = json!(id);
        v["status"] = json!("requested");
        v["meta"]["versionId"] = json!("1");
        i.subs.insert(id.clone(), v.clone());
        i.log.sub_creates += 1;
        id
    };
    s.activate_later(id.clone());
    s.touch();
    let loc = format!("{}/Subscription/{id}/_history/1", s.base);
    (
        StatusCode::CREATED,
        [(header::LOCATION, loc), (header::CONTENT_TYPE, "application/fhir+json".into())],
        v.to_string(),
    )
        .into_response()
}

async fn read_sub(State(s): State<FakeFhirServer>, Path(id): Path<String>) -> Response {
    if let Some(r) = down(&s) {
        return r;
    }
    match s.inner.lock().unwrap().subs.get(&id) {
        Some(v) => fhir(StatusCode::OK, v),
        None => (StatusCode::NOT_FOUND, oo("not-found", "no such Subscription")).into_response(),
    }
}

async fn update_sub(State(s): State<FakeFhirServer>, Path(id): Path<String>, body: Bytes) -> Response {
    let mut v = match incoming_sub(&s, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if v["id"].as_str() != Some(id.as_str()) {
        return (StatusCode::BAD_REQUEST, oo("invalid", "id mismatch")).into_response();
    }
    {
        let mut i = s.inner.lock().unwrap();
        let version =
            i.subs.get(&id).and_then(|o| o["meta"]["versionId"].as_str()?.parse::<u32>().ok()).unwrap_or(0) + 1;
        v["meta"]["versionId"] = json!(version.to_string());
        v["status"] = json!("requested");
        i.subs.insert(id.clone(), v.clone());
        i.log.sub_updates += 1;
    }
    s.activate_later(id);
    s.touch();
    fhir(StatusCode::OK, &v)
}

async fn delete_sub(State(s): State<FakeFhirServer>, Path(id): Path<String>) -> Response {
    if let Some(r) = down(&s) {
        return r;
    }
    let r = {
        let mut i = s.inner.lock().unwrap();
        if i.subs.remove(&id).is_some() {
            i.log.sub_deletes += 1;
            StatusCode::NO_CONTENT.into_response()
        } else {
            (StatusCode::NOT_FOUND, oo("not-found", "no such Subscription")).into_response()
        }
    };
    s.touch();
    r
}

async fn create_resource(
    State(s): State<FakeFhirServer>,
    Path(t): Path<String>,
    method: Method,
    body: Bytes,
) -> Response {
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(&body) else { return StatusCode::BAD_REQUEST.into_response() };
    let id = {
        let mut i = s.inner.lock().unwrap();
        i.next += 1;
        let id = format!("{}", 1000 + i.next);
        v["id"] = json!(id);
        i.data.insert((t.clone(), id.clone()), v.clone());
        id
    };
    s.notify(&t, &id, Some(&v));
    fhir(StatusCode::CREATED, &v)
}

async fn resource(
    State(s): State<FakeFhirServer>,
    Path((t, id)): Path<(String, String)>,
    method: Method,
    _h: HeaderMap,
    body: Bytes,
) -> Response {
    match method {
        Method::PUT => {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else { return StatusCode::BAD_REQUEST.into_response() };
            s.inner.lock().unwrap().data.insert((t.clone(), id.clone()), v.clone());
            s.notify(&t, &id, Some(&v));
            fhir(StatusCode::OK, &v)
        }
        Method::DELETE => {
            let existed = s.inner.lock().unwrap().data.remove(&(t.clone(), id.clone())).is_some();
            if existed {
                s.notify(&t, &id, None);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Method::GET => match s.inner.lock().unwrap().data.get(&(t, id)) {
            Some(v) => fhir(StatusCode::OK, v),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}
