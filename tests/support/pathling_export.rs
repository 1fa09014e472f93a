//! Pathling 3.0's bulk `$export` in the test double: `GET $export?_type&_elements` (Prefer:
//! respond-async, Accept exactly application/fhir+json) → 202 + `$job?id=`; `$job` → 202 with
//! X-Progress, then 200 with the manifest (plain JSON for Accept: application/json, the Parameters form
//! otherwise); files at `$result?job=&file=`, NDJSON; `_elements=id` keeps resourceType, id and meta.

use std::collections::{BTreeMap, HashMap};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Export jobs of the double.
#[derive(Default)]
pub struct Exports {
    jobs: HashMap<String, Job>,
}

struct Job {
    polls: u32,
    /// file name → lines
    files: BTreeMap<String, Vec<String>>,
}

fn oo(code: &str, diag: &str) -> String {
    json!({"resourceType":"OperationOutcome","issue":[{"severity":"error","code":code,"diagnostics":diag}]}).to_string()
}

fn param(q: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.to_string())
}

/// Starts an export of `data` (type → id → resource) as the query asks.
pub fn kickoff(
    ex: &mut Exports,
    data: &BTreeMap<String, BTreeMap<String, Value>>,
    id: String,
    base: &str,
    q: &str,
    headers: &HeaderMap,
    lines_per_file: usize,
) -> Response {
    if headers.get("prefer").and_then(|v| v.to_str().ok()) != Some("respond-async") {
        return (StatusCode::BAD_REQUEST, oo("invalid", "Prefer: respond-async is required")).into_response();
    }
    if headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) != Some("application/fhir+json") {
        return (StatusCode::BAD_REQUEST, oo("invalid", "Accept must be application/fhir+json")).into_response();
    }
    let types: Option<Vec<String>> = param(q, "_type").map(|t| t.split(',').map(str::to_string).collect());
    let ids_only = param(q, "_elements").is_some_and(|e| e.split(',').any(|x| x == "id"));
    let mut files = BTreeMap::new();
    for (t, table) in data {
        if types.as_ref().is_some_and(|ts| !ts.contains(t)) {
            continue;
        }
        let lines: Vec<String> = table
            .values()
            .map(|v| {
                if ids_only {
                    json!({"resourceType": v["resourceType"], "id": v["id"],
                           "meta": {"tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}]}})
                    .to_string()
                } else {
                    v.to_string()
                }
            })
            .collect();
        for (n, chunk) in lines.chunks(lines_per_file.max(1)).enumerate() {
            files.insert(format!("{t}.{n:05}.ndjson"), chunk.to_vec());
        }
    }
    ex.jobs.insert(id.clone(), Job { polls: 0, files });
    (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, format!("{base}/$job?id={id}"))], "").into_response()
}

/// Answers `$job` for an export job; `None` when `id` is not one.
pub fn poll(ex: &mut Exports, id: &str, headers: &HeaderMap, base: &str, polls_needed: u32) -> Option<Response> {
    let job = ex.jobs.get_mut(id)?;
    if job.polls < polls_needed {
        job.polls += 1;
        return Some(
            (StatusCode::ACCEPTED, [("x-progress", format!("{}%", 100 * job.polls / (polls_needed + 1)))], "")
                .into_response(),
        );
    }
    let outputs: Vec<(String, String)> = job
        .files
        .keys()
        .map(|f| (f.split('.').next().unwrap_or_default().to_string(), format!("{base}/$result?job={id}&file={f}")))
        .collect();
    let plain = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) == Some("application/json");
    let body = if plain {
        json!({"transactionTime": jiff::Timestamp::now().to_string(), "request": format!("{base}/$export"),
               "requiresAccessToken": false,
               "output": outputs.iter().map(|(t, u)| json!({"type": t, "url": u})).collect::<Vec<_>>(), "error": []})
    } else {
        let mut p = vec![json!({"name": "transactionTime", "valueInstant": jiff::Timestamp::now().to_string()})];
        p.extend(outputs.iter().map(|(t, u)| {
            json!({"name": "output", "part": [{"name": "type", "valueCode": t}, {"name": "url", "valueUri": u}]})
        }));
        json!({"resourceType": "Parameters", "parameter": p})
    };
    Some((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response())
}

/// Forgets an export job (and its files); whether it was one.
pub fn delete(ex: &mut Exports, id: &str) -> bool {
    ex.jobs.remove(id).is_some()
}

/// Serves one file of an export job.
pub fn result(ex: &Exports, job: &str, file: &str) -> Response {
    match ex.jobs.get(job).and_then(|j| j.files.get(file)) {
        Some(lines) => {
            let mut body = lines.join("\n");
            body.push('\n');
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
        }
        None => (StatusCode::NOT_FOUND, oo("not-found", "no such file")).into_response(),
    }
}
