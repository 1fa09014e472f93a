//! FHIR search on the test source, for `export.method: Search`: resources with a `lastUpdated`
//! from a fake clock, `_lastUpdated` ranges (`ge gt le lt eq`), `_sort=_lastUpdated`, `_count`
//! capped like real servers, offset `next` links (as HAPI's `_getpagesoffset`), `_id` searches,
//! simple `param=value` filters, and type history with deletes. Hostile options: no `$export`,
//! `429` for the first searches, `_sort` or `le` ignored, `ge` rounded down to the second, next
//! links to another origin, and a resource updated while a crawl reads the pages.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

/// How the search behaves.
#[derive(Clone, Debug, Default)]
pub struct SearchConfig {
    /// Largest page served, whatever `_count` asks (0: 100).
    pub page_cap: usize,
    /// The source has no `$export` (404, and none in its CapabilityStatement).
    pub no_export: bool,
    /// The first searches answer 429 with `Retry-After: 1`.
    pub throttle_first: u32,
    /// `_sort` is ignored: resources come in id order.
    pub ignore_sort: bool,
    /// `_lastUpdated=le…` is ignored.
    pub ignore_le: bool,
    /// `ge` is rounded down to its second (servers that search at second precision).
    pub ge_to_second: bool,
    /// Next links point to this origin instead.
    pub next_origin: Option<String>,
    /// When the n-th search page (1-based) is served, this resource is updated (its lastUpdated moves
    /// to now), as a clinician would while a crawl runs.
    pub update_at_page: Option<(u32, String, String)>,
}

/// What the search saw.
#[derive(Clone, Debug, Default)]
pub struct SearchLog {
    /// Every search's query, in order.
    pub searches: Vec<String>,
    /// Searches answered 429.
    pub throttled: u32,
    /// When each search arrived.
    pub at: Vec<std::time::Instant>,
}

struct State {
    cfg: SearchConfig,
    clock: Timestamp,
    /// (type, id) → (lastUpdated, resource).
    live: BTreeMap<(String, String), (Timestamp, Value)>,
    deleted: Vec<(String, String, Timestamp)>,
    log: SearchLog,
}

/// The resources a test source searches, shared with the test that changes them.
#[derive(Clone)]
pub struct SearchStore(Arc<Mutex<State>>);

impl std::fmt::Debug for SearchStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SearchStore")
    }
}

fn outcome(code: &str, diag: &str) -> String {
    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": diag}]})
        .to_string()
}

fn fhir(v: Value) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/fhir+json")], v.to_string()).into_response()
}

impl SearchStore {
    pub fn new(cfg: SearchConfig) -> Self {
        let clock: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
        Self(Arc::new(Mutex::new(State {
            cfg,
            clock,
            live: BTreeMap::new(),
            deleted: vec![],
            log: SearchLog::default(),
        })))
    }

    pub fn log(&self) -> SearchLog {
        self.0.lock().unwrap().log.clone()
    }

    pub fn no_export(&self) -> bool {
        self.0.lock().unwrap().cfg.no_export
    }

    /// The fake clock: every change moves it on by `step_ms` (0: the change shares the last instant).
    fn tick(s: &mut State, step_ms: i64) -> Timestamp {
        s.clock = s.clock.checked_add(SignedDuration::from_millis(step_ms)).unwrap();
        s.clock
    }

    /// Creates or updates `n` resources `{prefix}{k}` of `t`, each a millisecond after the last, or
    /// all at one instant when `same_instant`.
    pub fn put_many(&self, t: &str, prefix: &str, n: usize, same_instant: bool) {
        let mut s = self.0.lock().unwrap();
        for k in 0..n {
            let at = Self::tick(&mut s, if same_instant && k > 0 { 0 } else { 1 });
            let id = format!("{prefix}{k}");
            let v =
                json!({"resourceType": t, "id": id, "meta": {"lastUpdated": at.to_string()}, "active": true, "n": k});
            s.live.insert((t.into(), id), (at, v));
        }
    }

    /// Updates one resource: its lastUpdated moves to the clock's next instant.
    pub fn touch(&self, t: &str, id: &str, field: Value) {
        let mut s = self.0.lock().unwrap();
        Self::update(&mut s, t, id, field);
    }

    fn update(s: &mut State, t: &str, id: &str, field: Value) {
        let at = Self::tick(s, 1);
        if let Some((old, v)) = s.live.get_mut(&(t.to_string(), id.to_string())) {
            *old = at;
            v["meta"]["lastUpdated"] = json!(at.to_string());
            v["note"] = field;
        }
    }

    pub fn delete(&self, t: &str, id: &str) {
        let mut s = self.0.lock().unwrap();
        let at = Self::tick(&mut s, 1);
        s.live.remove(&(t.to_string(), id.to_string()));
        s.deleted.push((t.into(), id.into(), at));
    }

    /// Moves the fake clock to a second before the wall clock's now: changes after it are newer
    /// than an earlier run's watermark and older than the next run's start.
    pub fn now(&self) {
        let mut s = self.0.lock().unwrap();
        s.clock = s.clock.max(Timestamp::now().checked_sub(SignedDuration::from_secs(1)).unwrap());
    }

    pub fn count(&self, t: &str) -> usize {
        self.0.lock().unwrap().live.keys().filter(|(ty, _)| ty == t).count()
    }

    pub fn get(&self, t: &str, id: &str) -> Option<Value> {
        self.0.lock().unwrap().live.get(&(t.to_string(), id.to_string())).map(|(_, v)| v.clone())
    }

    /// The `rest` part of the CapabilityStatement: search, read and history per type.
    pub fn capability_rest(&self) -> Value {
        let s = self.0.lock().unwrap();
        let mut types: Vec<&String> = s.live.keys().map(|(t, _)| t).collect();
        types.dedup();
        let res: Vec<Value> = types
            .iter()
            .map(|t| {
                json!({"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "history-type"}],
                "searchParam": [{"name": "_lastUpdated", "type": "date"}]})
            })
            .collect();
        json!({"mode": "server", "resource": res})
    }

    /// Answers `rest` (the path under `/fhir/`) when it is a search or a type history.
    pub fn handle(&self, origin: &str, rest: &str, q: &str) -> Option<Response> {
        let segs: Vec<&str> = rest.split('/').collect();
        let mut s = self.0.lock().unwrap();
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        match segs.as_slice() {
            [t, "_history"] => Some(history(&s, origin, t, &pairs)),
            [t] if t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => {
                s.log.searches.push(q.to_string());
                s.log.at.push(std::time::Instant::now());
                if s.log.searches.len() as u32 <= s.cfg.throttle_first {
                    s.log.throttled += 1;
                    return Some(
                        (
                            StatusCode::TOO_MANY_REQUESTS,
                            [(header::RETRY_AFTER, "1")],
                            outcome("throttled", "slow down"),
                        )
                            .into_response(),
                    );
                }
                let page_no = s.log.searches.len() as u32 - s.log.throttled;
                if let Some((n, ut, uid)) = s.cfg.update_at_page.clone()
                    && n == page_no
                {
                    Self::update(&mut s, &ut, &uid, json!("updated mid-crawl"));
                }
                Some(search(&s, origin, t, &pairs))
            }
            _ => None,
        }
    }
}

fn search(s: &State, origin: &str, t: &str, q: &[(String, String)]) -> Response {
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let mut hits: Vec<(&Timestamp, &String, &Value)> =
        s.live.iter().filter(|((ty, _), _)| ty == t).map(|((_, id), (at, v))| (at, id, v)).collect();
    for (k, v) in q {
        match k.as_str() {
            "_lastUpdated" => {
                let (op, when) = v.split_at(2);
                let Ok(mut when) = when.parse::<Timestamp>() else {
                    return (StatusCode::BAD_REQUEST, outcome("invalid", "bad _lastUpdated")).into_response();
                };
                if op == "ge" && s.cfg.ge_to_second {
                    when = Timestamp::from_second(when.as_second()).unwrap();
                }
                if op == "le" && s.cfg.ignore_le {
                    continue;
                }
                hits.retain(|(at, _, _)| match op {
                    "ge" => **at >= when,
                    "gt" => **at > when,
                    "le" => **at <= when,
                    "lt" => **at < when,
                    _ => **at == when,
                });
            }
            "_id" => {
                let ids: Vec<&str> = v.split(',').collect();
                hits.retain(|(_, id, _)| ids.contains(&id.as_str()));
            }
            "_sort" | "_count" | "_getpagesoffset" | "_elements" => {}
            other => hits.retain(|(_, _, r)| {
                r[other].as_str() == Some(v.as_str()) || v.parse::<i64>().is_ok_and(|n| r[other] == n)
            }),
        }
    }
    if get("_sort") == Some("_lastUpdated") && !s.cfg.ignore_sort {
        hits.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    } else {
        hits.sort_by(|a, b| a.1.cmp(b.1));
    }
    let cap = if s.cfg.page_cap == 0 { 100 } else { s.cfg.page_cap };
    let count = get("_count").and_then(|c| c.parse::<usize>().ok()).unwrap_or(20).min(cap);
    let offset = get("_getpagesoffset").and_then(|c| c.parse::<usize>().ok()).unwrap_or(0);
    let page: Vec<Value> = hits
        .iter()
        .skip(offset)
        .take(count)
        .map(|(_, id, v)| json!({"fullUrl": format!("{origin}/fhir/{t}/{id}"), "resource": v, "search": {"mode": "match"}}))
        .collect();
    let mut links = vec![];
    if offset + count < hits.len() {
        let mut next = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in q.iter().filter(|(k, _)| k != "_getpagesoffset") {
            next.append_pair(k, v);
        }
        next.append_pair("_getpagesoffset", &(offset + count).to_string());
        let host = s.cfg.next_origin.clone().unwrap_or_else(|| origin.to_string());
        links.push(json!({"relation": "next", "url": format!("{host}/fhir/{t}?{}", next.finish())}));
    }
    // pretty, as HAPI sends it: fhirsync writes each resource on one line
    let body = serde_json::to_string_pretty(&json!({"resourceType": "Bundle", "type": "searchset",
        "total": hits.len(), "link": links, "entry": page}))
    .unwrap();
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/fhir+json")], body).into_response()
}

fn history(s: &State, origin: &str, t: &str, q: &[(String, String)]) -> Response {
    let since = q.iter().find(|(k, _)| k == "_since").and_then(|(_, v)| v.parse::<Timestamp>().ok());
    let entries: Vec<Value> = s
        .deleted
        .iter()
        .filter(|(ty, _, at)| ty == t && since.is_none_or(|s| *at > s))
        .map(|(ty, id, _)| json!({"fullUrl": format!("{origin}/fhir/{ty}/{id}"), "request": {"method": "DELETE", "url": format!("{ty}/{id}")}}))
        .collect();
    fhir(json!({"resourceType": "Bundle", "type": "history", "entry": entries}))
}
