//! Figures for drift verification: the time and peak RSS of `fhirsync sync-once --verify` comparing
//! N ids per type at the source with Pathling's, against a baseline of 10,000 ids per type from the
//! same invocation. Two scenarios: a comparison that finds 0.1 % missing and 0.1 % extra (repair off:
//! the figure of the comparison alone), and one that also deletes the 0.1 % extra (repair on; nothing
//! missing, so no repair run). The source and Pathling are light in-process
//! doubles that generate their ids as they stream them (they hold nothing), so the figures are
//! fhirsync's own. Two types; the run before the verification is an empty incremental one.
//!
//!     cargo build --release --bin fhirsync --example bench_verify
//!     target/release/examples/bench_verify [N ...]        (default: 1000000)

#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde_json::json;
use support::cli::{run_measured, s};

const TYPES: [&str; 2] = ["Patient", "Observation"];
/// Ids per file.
const PER_FILE: u64 = 100_000;

#[derive(Clone)]
struct Peer {
    origin: String,
    n: u64,
    incremental: Arc<Mutex<HashMap<String, bool>>>,
    requests: Arc<AtomicU64>,
    deletes: Arc<AtomicU64>,
    /// Pathling misses every 1,000th id.
    missing: bool,
}

fn ndjson(lines: impl Iterator<Item = String> + Send + 'static) -> Response {
    // 1,000 lines per chunk
    let chunks =
        futures::stream::iter(lines).chunks(1000).map(|v| Ok::<Bytes, std::io::Error>(Bytes::from(v.concat())));
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/fhir+ndjson")
        .body(Body::from_stream(chunks))
        .unwrap()
}

fn line(t: &str, id: &str) -> String {
    format!("{{\"resourceType\":\"{t}\",\"id\":\"{id}\",\"meta\":{{\"lastUpdated\":\"2020-01-01T00:00:00Z\"}}}}\n")
}

fn files(p: &Peer, base: &str) -> Vec<serde_json::Value> {
    let per_type = p.n.div_ceil(PER_FILE);
    TYPES.iter().flat_map(|t| (0..per_type).map(move |k| json!({"type": t, "url": format!("{base}{t}/{k}")}))).collect()
}

async fn source_fhir(State(p): State<Peer>, Path(rest): Path<String>, RawQuery(q): RawQuery) -> Response {
    p.requests.fetch_add(1, Ordering::Relaxed);
    let q = q.unwrap_or_default();
    if rest == "metadata" {
        return Json(json!({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "rest": [{"mode": "server",
            "interaction": [{"code": "history-system"}], "operation": [{"name": "export"}]}]}));
    }
    if rest.ends_with("_history") || TYPES.contains(&rest.as_str()) {
        // no deletions; no extra is alive at the source
        return Json(json!({"resourceType": "Bundle", "type": "searchset", "entry": []}));
    }
    if rest == "$export" {
        let id = format!("j{}", p.requests.load(Ordering::Relaxed));
        p.incremental.lock().unwrap().insert(id.clone(), q.contains("_since="));
        return (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, format!("{}/status/{id}", p.origin))], "")
            .into_response();
    }
    StatusCode::NOT_FOUND.into_response()
}

#[allow(non_snake_case)]
fn Json(v: serde_json::Value) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/fhir+json")], v.to_string()).into_response()
}

async fn source_status(State(p): State<Peer>, Path(id): Path<String>, method: axum::http::Method) -> Response {
    p.requests.fetch_add(1, Ordering::Relaxed);
    if method == axum::http::Method::DELETE {
        return StatusCode::ACCEPTED.into_response();
    }
    let inc = p.incremental.lock().unwrap().get(&id).copied().unwrap_or(false);
    let output = if inc { vec![] } else { files(&p, &format!("{}/files/", p.origin)) };
    Json(json!({"transactionTime": jiff::Timestamp::now().to_string(), "request": "x", "requiresAccessToken": false,
                "output": output, "error": []}))
}

async fn source_file(State(p): State<Peer>, Path((t, k)): Path<(String, u64)>) -> Response {
    p.requests.fetch_add(1, Ordering::Relaxed);
    let (lo, hi) = (k * PER_FILE, ((k + 1) * PER_FILE).min(p.n));
    ndjson((lo..hi).map(move |i| line(&t, &format!("{i:09}"))))
}

#[derive(serde::Deserialize)]
struct ResultQ {
    file: String,
}

async fn pathling_fhir(State(p): State<Peer>, Path(rest): Path<String>, method: axum::http::Method) -> Response {
    p.requests.fetch_add(1, Ordering::Relaxed);
    match (method.as_str(), rest.as_str()) {
        ("GET", "metadata") => Json(json!({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
            "software": {"name": "Pathling", "version": "3.0.0"}, "rest": [{"mode": "server"}]})),
        ("GET", "$export") => {
            (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, format!("{}/fhir/$job?id=x", p.origin))], "")
                .into_response()
        }
        ("GET", "$job") => {
            let files: Vec<serde_json::Value> = files(&p, "")
                .into_iter()
                .map(|f| {
                    let u = f["url"].as_str().unwrap().replace('/', ".");
                    json!({"type": f["type"], "url": format!("{}/fhir/$result?job=x&file={u}.ndjson", p.origin)})
                })
                .collect();
            Json(json!({"transactionTime": jiff::Timestamp::now().to_string(), "request": "x",
                        "requiresAccessToken": false, "output": files, "error": []}))
        }
        ("DELETE", "$job") => StatusCode::ACCEPTED.into_response(),
        ("DELETE", _) => {
            p.deletes.fetch_add(1, Ordering::Relaxed);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn pathling_result(State(p): State<Peer>, Query(q): Query<ResultQ>) -> Response {
    p.requests.fetch_add(1, Ordering::Relaxed);
    let mut parts = q.file.split('.');
    let t = parts.next().unwrap_or_default().to_string();
    let k: u64 = parts.next().and_then(|k| k.parse().ok()).unwrap_or(0);
    let (lo, hi) = (k * PER_FILE, ((k + 1) * PER_FILE).min(p.n));
    let t2 = t.clone();
    // drift: every 1,000th id missing, and one extra per 1,000
    let missing = p.missing;
    let held = (lo..hi).filter(move |i| !missing || i % 1000 != 7).map(move |i| line(&t, &format!("{i:09}")));
    let extra = (lo..hi).filter(|i| i % 1000 == 3).map(move |i| line(&t2, &format!("x{i:09}")));
    ndjson(held.chain(extra))
}

struct Row {
    scenario: &'static str,
    n: u64,
    secs: f64,
    rss_mib: f64,
    result: String,
    requests: u64,
    deleted: u64,
}

async fn measure(n: u64, repair: bool) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let mk = |origin: String| Peer {
        origin,
        n,
        incremental: Arc::default(),
        requests: Arc::default(),
        deletes: Arc::default(),
        missing: !repair,
    };
    // routes need the origin: bind first
    let sl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let src = mk(format!("http://{}", sl.local_addr().unwrap()));
    let app = Router::new()
        .route("/fhir/{*rest}", get(source_fhir).post(source_fhir))
        .route("/status/{id}", get(source_status).delete(source_status))
        .route("/files/{t}/{k}", get(source_file))
        .with_state(src.clone());
    tokio::spawn(async move { axum::serve(sl, app).await.ok() });
    let pl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pth = mk(format!("http://{}", pl.local_addr().unwrap()));
    let app = Router::new()
        .route("/fhir/$result", get(pathling_result))
        .route("/fhir/{*rest}", get(pathling_fhir).delete(pathling_fhir))
        .with_state(pth.clone());
    tokio::spawn(async move { axum::serve(pl, app).await.ok() });
    let yaml = format!(
        "apiVersion: fhirsync.io/v1alpha1\nkind: BulkExportSync\nmetadata: {{name: bench, namespace: b}}\nspec:\n  \
         source: {{url: \"{}/fhir\"}}\n  export: {{types: [Patient, Observation], since: \"2026-01-01T00:00:00Z\"}}\n  \
         target: {{url: \"{}/fhir\"}}\n  staging: {{volume: {{path: \"{}\", pathlingPath: \"file:///staging\"}}}}\n  \
         verify: {{repair: {repair}}}\n",
        src.origin,
        pth.origin,
        dir.path().join("staging").display()
    );
    let f = dir.path().join("bench.yaml");
    std::fs::write(&f, yaml).unwrap();
    let t = Instant::now();
    let (out, rss) =
        run_measured(vec!["sync-once".into(), "-f".into(), s(&f), "--verify".into(), "--output".into(), "json".into()])
            .await;
    let secs = t.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let d = &v["drift"];
    let result = match d["types"].as_array() {
        Some(ts) => ts
            .iter()
            .map(|t| {
                format!(
                    "{} {}/{} missing {} extra {}",
                    t["type"].as_str().unwrap_or(""),
                    t["source"],
                    t["pathling"],
                    t["missing"],
                    t["extra"]
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        None => format!("no drift report (exit {:?}): {}", out.status.code(), String::from_utf8_lossy(&out.stderr)),
    };
    Row {
        scenario: if repair { "compare + delete extras" } else { "compare only" },
        n,
        secs,
        rss_mib: rss as f64 / 1024.0,
        result,
        requests: src.requests.load(Ordering::Relaxed) + pth.requests.load(Ordering::Relaxed),
        deleted: pth.deletes.load(Ordering::Relaxed),
    }
}

#[tokio::main]
async fn main() {
    let ns: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let ns = if ns.is_empty() { vec![1_000_000] } else { ns };
    let mut rows = vec![];
    for repair in [false, true] {
        rows.push(measure(10_000, repair).await);
        for n in &ns {
            rows.push(measure(*n, repair).await);
        }
    }
    let b = (rows[0].secs, rows[0].rss_mib);
    println!("## fhirsync sync-once --verify: N ids per type × 2 types\n");
    println!(
        "| scenario | ids per type | wall time | vs baseline | peak RSS | vs baseline | requests | extras deleted | result |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} s | {:.1}× | {:.1} MiB | {:.2}× | {} | {} | {} |",
            r.scenario,
            r.n,
            r.secs,
            r.secs / b.0,
            r.rss_mib,
            r.rss_mib / b.1,
            r.requests,
            r.deleted,
            r.result
        );
    }
    println!(
        "\nbaseline: the first row (10,000 ids per type, compare only), same invocation; the run before each verification is an empty incremental run."
    );
}
