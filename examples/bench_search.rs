//! Search versus BulkExport from the same real source: the Helios FHIR Server holding N resources
//! (a fifth Patients, the rest Observations), read by `fhirsync sync-once` into the in-process
//! Pathling double, once in full and once incrementally after 1 % of the resources changed. For each
//! method: wall time, requests to Helios (counted by a pass-through proxy in front of it, which both
//! methods go through), and fhirsync's peak RSS; medians of R runs, interleaved. Helios answers
//! every export poll with `Retry-After: 120`, so the export runs with `maxPollInterval: 1s`, as the
//! README recommends for Helios.
//!
//!     cargo build --release --bin fhirsync --example bench_search
//!     target/release/examples/bench_search [N] [R]        (default: 10000 3)

#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use support::cli::{run_measured, s};
use support::helios::{Helios, observations, patients};
use support::pathling::{FakePathling, PathlingConfig};

#[derive(Clone)]
struct Proxy {
    upstream: String,
    http: reqwest::Client,
    requests: Arc<AtomicU64>,
}

/// Forwards every request to Helios, streaming the answer back, and counts it.
async fn forward(State(p): State<Proxy>, req: Request) -> Response {
    p.requests.fetch_add(1, Ordering::Relaxed);
    let url = format!("{}{}", p.upstream, req.uri().path_and_query().map(|x| x.as_str()).unwrap_or("/"));
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap_or_default();
    let mut rb = p.http.request(method, &url).body(body);
    for (k, v) in headers.iter().filter(|(k, _)| *k != "host") {
        rb = rb.header(k, v);
    }
    match rb.send().await {
        Ok(r) => {
            let mut b = Response::builder().status(r.status());
            for (k, v) in r.headers() {
                b = b.header(k, v);
            }
            b.body(Body::from_stream(r.bytes_stream())).unwrap()
        }
        Err(e) => Response::builder().status(502).body(Body::from(e.to_string())).unwrap(),
    }
}

struct Figure {
    secs: f64,
    requests: u64,
    rss_kib: u64,
    resources: i64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let reps: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    // Helios hands out its status and file URLs on the proxy's origin: every request is counted
    let helios = Helios::start_as(Some(&proxy_url)).await;
    let (np, no) = (n / 5, n - n / 5);
    for chunk in patients("p", np).chunks(500) {
        helios.put(chunk).await;
    }
    for chunk in observations("o", no, np).chunks(500) {
        helios.put(chunk).await;
    }
    let proxy = Proxy { upstream: helios.base.clone(), http: reqwest::Client::new(), requests: Arc::default() };
    let counter = proxy.requests.clone();
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let pcfg =
        PathlingConfig { roots: vec![("file:///staging".into(), dir.path().join("staging"))], ..Default::default() };
    let pathling = FakePathling::start(pcfg).await;
    println!("Helios with {np} Patients and {no} Observations; {reps} runs of each, interleaved\n");

    let run = |method: &'static str, state: std::path::PathBuf| {
        let yaml = format!(
            "apiVersion: fhirsync.io/v1alpha1\nkind: BulkExportSync\nmetadata: {{name: bench, namespace: cli}}\nspec:\n  \
             source: {{url: \"{proxy_url}\", maxPollInterval: 1s}}\n  export: {{types: [Patient, Observation], method: {method}}}\n  \
             target: {{url: \"{}\"}}\n  sinceOverlap: 0s\n  \
             staging: {{volume: {{path: \"{}\", pathlingPath: \"file:///staging\"}}}}\n",
            pathling.base,
            dir.path().join("staging").display()
        );
        let f = dir.path().join(format!("{method}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        let args =
            vec!["sync-once".into(), "-f".into(), s(&f), "--state".into(), s(&state), "--output".into(), "json".into()];
        let counter = counter.clone();
        async move {
            let before = counter.load(Ordering::Relaxed);
            let t = Instant::now();
            let (out, rss) = run_measured(args).await;
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(out.status.code(), Some(0), "{method}: {}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["method"], method);
            Figure {
                secs,
                requests: counter.load(Ordering::Relaxed) - before,
                rss_kib: rss,
                resources: v["totalResources"].as_i64().unwrap_or(0),
            }
        }
    };

    let methods = ["BulkExport", "Search"];
    let mut full: Vec<Vec<Figure>> = vec![vec![], vec![]];
    let mut incr: Vec<Vec<Figure>> = vec![vec![], vec![]];
    for r in 0..reps {
        for (i, m) in methods.iter().enumerate() {
            let state = dir.path().join(format!("{m}-{r}.state"));
            let f = run(m, state.clone()).await;
            assert_eq!(f.resources, n as i64, "{m}: a full run brings every resource");
            full[i].push(f);
            // 1 % changes, then the incremental run of the same sync
            let changed: Vec<serde_json::Value> = observations("o", n / 100, np)
                .into_iter()
                .map(|mut o| {
                    o["status"] = format!("amended-{m}-{r}").into();
                    o
                })
                .collect();
            helios.put(&changed).await;
            let f = run(m, state).await;
            assert_eq!(f.resources, (n / 100) as i64, "{m}: the incremental run brings the changes");
            incr[i].push(f);
        }
    }
    let row = |what: &str, figs: &[Vec<Figure>]| {
        let med = |i: usize, f: &dyn Fn(&Figure) -> f64| median(figs[i].iter().map(f).collect());
        let (bt, st) = (med(0, &|f| f.secs), med(1, &|f| f.secs));
        println!(
            "| {what} | {bt:.2} s | {st:.2} s ({:.2}×) | {:.0} | {:.0} | {:.1} MiB | {:.1} MiB |",
            st / bt,
            med(0, &|f| f.requests as f64),
            med(1, &|f| f.requests as f64),
            med(0, &|f| f.rss_kib as f64) / 1024.0,
            med(1, &|f| f.rss_kib as f64) / 1024.0
        );
    };
    println!(
        "| run | BulkExport | Search (× BulkExport) | requests BulkExport | requests Search | peak RSS BulkExport | peak RSS Search |"
    );
    println!("|---|---|---|---|---|---|---|");
    row(&format!("full, {n} resources"), &full);
    row(&format!("incremental, {} changed", n / 100), &incr);
}
