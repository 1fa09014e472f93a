//! The REST side of the test source: `_history` (system and type level, paged, with DELETE entries),
//! search by `_id`, and reads — what fhirsync uses to find deletions and to check that a resource is
//! gone. With hostile options: a history that links to empty pages forever, or to another origin.

use std::collections::BTreeSet;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How the source shows its history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HistorySupport {
    /// No history: `_history` answers 404 (the SMART reference server, many proxies).
    #[default]
    None,
    /// `history-system` in the CapabilityStatement (Helios, HAPI).
    System,
    /// Only `history-type` per resource in the CapabilityStatement.
    TypeLevel,
    /// Works, but the CapabilityStatement does not say so.
    Undeclared,
}

/// The REST side's data and quirks.
#[derive(Clone, Debug, Default)]
pub struct RestConfig {
    /// History entries, newest first: (method, `Type/id`).
    pub history: Vec<(String, String)>,
    pub history_support: HistorySupport,
    /// Resources that exist now (`Type/id`), for searches by `_id` and reads.
    pub live: BTreeSet<String>,
    /// Searches by `_id` answer 400 (reads still work).
    pub no_id_search: bool,
    /// Reads answer 405 too (the source cannot say whether anything exists).
    pub no_reads: bool,
    /// The history links to another empty page forever.
    pub endless_history: bool,
    /// The history's next link points to this origin.
    pub history_next_origin: Option<String>,
}

/// What the REST side saw.
#[derive(Clone, Debug, Default)]
pub struct RestLog {
    /// Queries of history pages read (`path?query`).
    pub history_pages: Vec<String>,
    pub id_searches: u32,
    pub reads: u32,
}

fn outcome(code: &str, diag: &str) -> String {
    json!({"resourceType":"OperationOutcome","issue":[{"severity":"error","code":code,"diagnostics":diag}]}).to_string()
}

fn fhir(status: StatusCode, v: Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/fhir+json")], v.to_string()).into_response()
}

/// The CapabilityStatement's REST parts for `cfg`.
pub fn capability_rest(cfg: &RestConfig, types: &[String]) -> Value {
    let mut rest = json!({"mode": "server", "operation": [{"name": "export"}, {"name": "patient-export"}, {"name": "group-export"}]});
    match cfg.history_support {
        HistorySupport::System => rest["interaction"] = json!([{"code": "history-system"}]),
        HistorySupport::TypeLevel => {
            rest["resource"] = types
                .iter()
                .map(|t| json!({"type": t, "interaction": [{"code": "read"}, {"code": "history-type"}]}))
                .collect();
        }
        _ => {}
    }
    rest
}

fn param(q: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.to_string())
}

/// Answers `rest` (the path under `/fhir/`) when it is a history, search or read; `None` otherwise.
pub fn handle(cfg: &RestConfig, log: &mut RestLog, origin: &str, rest: &str, q: &str) -> Option<Response> {
    let segs: Vec<&str> = rest.split('/').collect();
    match segs.as_slice() {
        ["_history"] => Some(history(cfg, log, origin, rest, None, q)),
        [t, "_history"] => Some(history(cfg, log, origin, rest, Some(t), q)),
        [t] if t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && !t.starts_with('$') => {
            log.id_searches += 1;
            if cfg.no_id_search {
                return Some(
                    (StatusCode::BAD_REQUEST, outcome("not-supported", "unknown search parameter _id")).into_response(),
                );
            }
            let ids: Vec<String> =
                param(q, "_id").map(|v| v.split(',').map(str::to_string).collect()).unwrap_or_default();
            let entries: Vec<Value> = ids
                .iter()
                .filter(|id| cfg.live.contains(&format!("{t}/{id}")))
                .map(|id| json!({"fullUrl": format!("{origin}/fhir/{t}/{id}"), "resource": {"resourceType": t, "id": id}}))
                .collect();
            Some(fhir(
                StatusCode::OK,
                json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries}),
            ))
        }
        [t, id] if t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && !id.starts_with('$') => {
            log.reads += 1;
            if cfg.no_reads {
                return Some((StatusCode::METHOD_NOT_ALLOWED, outcome("not-supported", "no reads")).into_response());
            }
            let r = format!("{t}/{id}");
            if cfg.live.contains(&r) {
                Some(fhir(StatusCode::OK, json!({"resourceType": t, "id": id})))
            } else if cfg.history.iter().any(|(m, h)| m == "DELETE" && *h == r) {
                Some((StatusCode::GONE, outcome("deleted", "resource deleted")).into_response())
            } else {
                Some((StatusCode::NOT_FOUND, outcome("not-found", "no such resource")).into_response())
            }
        }
        _ => None,
    }
}

fn history(cfg: &RestConfig, log: &mut RestLog, origin: &str, path: &str, t: Option<&str>, q: &str) -> Response {
    log.history_pages.push(format!("{path}?{q}"));
    let ok = !matches!((cfg.history_support, t), (HistorySupport::None, _) | (HistorySupport::TypeLevel, None));
    if !ok {
        return (StatusCode::NOT_FOUND, outcome("not-found", "unknown path")).into_response();
    }
    let count: usize = param(q, "_count").and_then(|c| c.parse().ok()).unwrap_or(100).max(1);
    let page: usize = param(q, "_page").and_then(|c| c.parse().ok()).unwrap_or(0);
    let all: Vec<&(String, String)> =
        cfg.history.iter().filter(|(_, r)| t.is_none_or(|t| r.split('/').next() == Some(t))).collect();
    let slice: Vec<&&(String, String)> =
        if cfg.endless_history { vec![] } else { all.iter().skip(page * count).take(count).collect() };
    let entries: Vec<Value> = slice
        .iter()
        .map(|(m, r)| {
            let (ty, id) = r.split_once('/').unwrap_or((r, ""));
            let mut e = json!({"fullUrl": format!("{origin}/fhir/{r}"), "request": {"method": m, "url": if m == "POST" { ty.to_string() } else { r.clone() }}});
            if m != "DELETE" {
                e["resource"] = json!({"resourceType": ty, "id": id, "meta": {"versionId": "1"}});
                e["response"] = json!({"status": "200"});
            } else {
                e["response"] = json!({"status": "204"});
            }
            e
        })
        .collect();
    let mut links = vec![json!({"relation": "self", "url": format!("{origin}/fhir/{path}?{q}")})];
    if cfg.endless_history || (page + 1) * count < all.len() {
        let base = cfg.history_next_origin.clone().unwrap_or_else(|| origin.to_string());
        let since = param(q, "_since").unwrap_or_default();
        let next = format!(
            "{base}/fhir/{path}?_since={}&_count={count}&_page={}",
            url::form_urlencoded::byte_serialize(since.as_bytes()).collect::<String>(),
            page + 1
        );
        links.push(json!({"relation": "next", "url": next}));
    }
    fhir(StatusCode::OK, json!({"resourceType": "Bundle", "type": "history", "link": links, "entry": entries}))
}
