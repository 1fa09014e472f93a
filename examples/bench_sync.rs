//! Benchmark: one sync of a large NDJSON export from a fast loopback source into `volume` staging and a
//! Pathling emulator, by `fhirsync sync-once` and by a minimal curl script doing the same job
//! (kick-off, poll, 4 parallel downloads, `$import`, poll, remove the files). Reports throughput of both, their ratio,
//! and the peak RSS of `fhirsync sync-once`. `--export-ms` and `--import-ms` make the export and the
//! import jobs take that long (202 with `Retry-After: 1` meanwhile), as real jobs do; the script
//! polls every second, as such scripts do.
//!
//!     cargo build --release --bin fhirsync --example bench_sync
//!     target/release/examples/bench_sync --size-mib 1024 --files 16 --export-ms 500 --import-ms 500
//!
//! Needs curl and python3 (for the baseline script). Data is generated once under the target dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

#[derive(Clone)]
struct Srv {
    data: PathBuf,
    files: usize,
    lines_per_file: u64,
    base: String,
    export_ms: u64,
    import_ms: u64,
    /// When the export and the import job were started.
    started: std::sync::Arc<std::sync::Mutex<(Instant, Instant)>>,
    /// The input URLs of the last `$import`, listed in its result as Pathling 3 does.
    inputs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Srv {
    /// 202 while the job started at `at` has not run for `ms`.
    fn running(at: Instant, ms: u64) -> Option<Response> {
        (at.elapsed().as_millis() < ms as u128)
            .then(|| (StatusCode::ACCEPTED, [(header::RETRY_AFTER, "1")], "").into_response())
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).find(|w| w[0] == name).and_then(|w| w[1].parse().ok()).unwrap_or(default)
}

/// Writes `files` NDJSON files of about `size / files` bytes (≈1 KiB lines). Returns lines per file.
fn generate(dir: &Path, size: u64, files: usize) -> u64 {
    let line_len = 1024u64;
    let per_file = size / files as u64;
    let lines = per_file / line_len;
    std::fs::create_dir_all(dir).unwrap();
    let marker = dir.join(format!("done-{size}-{files}"));
    if marker.exists() {
        return lines;
    }
    for f in 0..files {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("f{f}.ndjson"))).unwrap());
        for l in 0..lines {
            let head =
                format!("{{\"resourceType\":\"Observation\",\"id\":\"o{f}-{l}\",\"status\":\"final\",\"note\":\"");
            let pad = line_len as usize - head.len() - 3;
            writeln!(w, "{head}{}\"}}", "x".repeat(pad)).unwrap();
        }
    }
    std::fs::write(marker, b"").unwrap();
    lines
}

async fn export(State(s): State<Srv>) -> Response {
    s.started.lock().unwrap().0 = Instant::now();
    (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, format!("{}/status/1", s.base))], "").into_response()
}

async fn status(State(s): State<Srv>) -> Response {
    if let Some(r) = Srv::running(s.started.lock().unwrap().0, s.export_ms) {
        return r;
    }
    let out: Vec<_> = (0..s.files)
        .map(|f| json!({"type":"Observation","url":format!("{}/files/f{f}.ndjson", s.base),"count":s.lines_per_file}))
        .collect();
    let m = json!({"transactionTime": jiff::Timestamp::now().to_string(), "request": "x", "requiresAccessToken": false,
                   "output": out, "error": []});
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], m.to_string()).into_response()
}

async fn file(State(s): State<Srv>, UrlPath(name): UrlPath<String>) -> Response {
    let f = tokio::fs::File::open(s.data.join(&name)).await.unwrap();
    let len = f.metadata().await.unwrap().len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024));
    Response::builder().header(header::CONTENT_LENGTH, len).body(body).unwrap()
}

async fn import(State(s): State<Srv>, body: axum::body::Bytes) -> Response {
    s.started.lock().unwrap().1 = Instant::now();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    *s.inputs.lock().unwrap() = v["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "input")
        .flat_map(|p| p["part"].as_array().cloned().unwrap_or_default())
        .filter(|x| x["name"] == "url")
        .filter_map(|x| x["valueUrl"].as_str().map(str::to_string))
        .collect();
    (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, format!("{}/pathling/$job?id=1", s.base))], "").into_response()
}

async fn job(State(s): State<Srv>) -> Response {
    if let Some(r) = Srv::running(s.started.lock().unwrap().1, s.import_ms) {
        return r;
    }
    let outputs: Vec<_> = s
        .inputs
        .lock()
        .unwrap()
        .iter()
        .map(|u| json!({"name":"output","part":[{"name":"inputUrl","valueUrl":u}]}))
        .collect();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        json!({"resourceType":"Parameters","parameter":outputs}).to_string(),
    )
        .into_response()
}

/// Pathling's preflight: a CapabilityStatement naming Pathling 3.
async fn pathling_metadata() -> Response {
    let cs = json!({"resourceType":"CapabilityStatement","fhirVersion":"4.0.1",
        "software":{"name":"Pathling","version":"3.0.0"},
        "rest":[{"mode":"server","operation":[{"name":"import"},{"name":"job"}]}]});
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/fhir+json")], cs.to_string()).into_response()
}

fn children_max_rss_kib() -> i64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss
}

const BASELINE: &str = r#"#!/usr/bin/env bash
# Minimal script: kick-off, poll, 4 parallel curl downloads, $import, poll.
set -euo pipefail
SRC=$1; PATHLING=$2; OUT=$3
loc=$(curl -s -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' "$SRC/fhir/\$export" | tr -d '\r' | awk -F': ' 'tolower($1)=="content-location"{print $2}')
until [ "$(curl -s -o "$OUT/manifest.json" -w '%{http_code}' "$loc")" = 200 ]; do sleep 1; done
python3 -c 'import json,sys; [print(o["url"]) for o in json.load(open(sys.argv[1]))["output"]]' "$OUT/manifest.json" \
  | xargs -P 4 -I{} sh -c 'curl -s -f -o "$0/$(basename {})" {}' "$OUT"
body=$(python3 -c 'import json,sys,os; print(json.dumps({"resourceType":"Parameters","parameter":[{"name":"inputFormat","valueCode":"application/fhir+ndjson"},{"name":"saveMode","valueCode":"merge"}]+[{"name":"input","part":[{"name":"resourceType","valueCode":"Observation"},{"name":"url","valueUrl":"file://"+os.path.join(sys.argv[1],f)}]} for f in sorted(os.listdir(sys.argv[1])) if f.endswith(".ndjson")]}))' "$OUT")
job=$(curl -s -D - -o /dev/null -X POST -H 'Prefer: respond-async' -H 'Content-Type: application/fhir+json' -d "$body" "$PATHLING/\$import" | tr -d '\r' | awk -F': ' 'tolower($1)=="content-location"{print $2}')
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$job")" = 200 ]; do sleep 1; done
rm -f "$OUT"/*.ndjson   # fhirsync removes its staged files too
"#;

#[tokio::main]
async fn main() {
    let size_mib = arg("--size-mib", 1024);
    let files = arg("--files", 16) as usize;
    let size = size_mib * 1024 * 1024;
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let fhirsync = target.join("fhirsync");
    assert!(fhirsync.exists(), "build it first: cargo build --release --bin fhirsync");
    let data = target.join("bench-data").join(format!("{size_mib}mib-{files}"));
    eprintln!("generating {size_mib} MiB in {files} files under {} (cached)…", data.display());
    let lines = generate(&data, size, files);
    let bytes: u64 = (0..files).map(|f| std::fs::metadata(data.join(format!("f{f}.ndjson"))).unwrap().len()).sum();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let srv = Srv {
        data: data.clone(),
        files,
        lines_per_file: lines,
        base: base.clone(),
        export_ms: arg("--export-ms", 0),
        import_ms: arg("--import-ms", 0),
        started: std::sync::Arc::new(std::sync::Mutex::new((Instant::now(), Instant::now()))),
        inputs: Default::default(),
    };
    let app = Router::new()
        .route("/fhir/$export", get(export))
        .route("/status/1", get(status).delete(|| async { StatusCode::ACCEPTED }))
        .route("/files/{name}", get(file))
        .route("/pathling/metadata", get(pathling_metadata))
        .route("/pathling/$import", post(import))
        .route("/pathling/$job", get(job).delete(|| async { StatusCode::ACCEPTED }))
        .with_state(srv);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let work = tempfile::tempdir_in(&target).unwrap();
    // warm the page cache for both contenders
    // (in small chunks: this process's RSS is inherited by the children it forks, and would
    // pollute their ru_maxrss)
    for f in 0..files {
        use std::io::Read;
        let mut file = std::fs::File::open(data.join(format!("f{f}.ndjson"))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while file.read(&mut buf).unwrap() > 0 {}
    }

    // each contender `reps` times, interleaved; dirty pages are flushed (outside the timing) before
    // every run so that neither pays for the other's writeback; the median is reported
    let reps = arg("--reps", 3).max(1) as usize;
    let staging = work.path().join("staging");
    let yaml = work.path().join("sync.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: fhirsync.io/v1alpha1\nkind: BulkExportSync\nmetadata: {{name: bench}}\nspec:\n  source: {{url: \"{base}/fhir\"}}\n  \
             target: {{url: \"{base}/pathling\"}}\n  staging: {{volume: {{path: \"{}\", pathlingPath: \"file:///staging\"}}}}\n  maxParallelDownloads: 4\n",
            staging.display()
        ),
    )
    .unwrap();
    let script = work.path().join("baseline.sh");
    std::fs::write(&script, BASELINE).unwrap();
    let flush = || unsafe { libc::sync() };
    let (mut ours, mut theirs) = (vec![], vec![]);
    for _ in 0..reps {
        flush();
        let (f, y) = (fhirsync.clone(), yaml.clone());
        let t = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(f).args(["sync-once", "-f"]).arg(&y).args(["--output", "json"]).output().unwrap()
        })
        .await
        .unwrap();
        ours.push(t.elapsed().as_secs_f64());
        assert!(out.status.success(), "fhirsync failed: {}", String::from_utf8_lossy(&out.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["totalResources"].as_u64(), Some(lines * files as u64));

        let dl = work.path().join("curl");
        let _ = std::fs::remove_dir_all(&dl);
        std::fs::create_dir_all(&dl).unwrap();
        flush();
        let (b2, d2, sc) = (base.clone(), dl.clone(), script.clone());
        let t = Instant::now();
        let st = tokio::task::spawn_blocking(move || {
            Command::new("bash").arg(&sc).arg(&b2).arg(format!("{b2}/pathling")).arg(&d2).status().unwrap()
        })
        .await
        .unwrap();
        theirs.push(t.elapsed().as_secs_f64());
        assert!(st.success(), "baseline script failed");
        let _ = std::fs::remove_dir_all(&dl);
    }
    let rss = children_max_rss_kib();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (fhirsync_secs, curl_secs) = (median(&mut ours), median(&mut theirs));
    eprintln!("(peak RSS: getrusage(RUSAGE_CHILDREN), the largest of all children; this process stays small)");
    let mib = bytes as f64 / (1024.0 * 1024.0);
    println!(
        "export: {mib:.0} MiB in {files} files, {} resources; median of {reps} interleaved runs each",
        lines * files as u64
    );
    println!(
        "fhirsync sync-once: {fhirsync_secs:>7.2} s  {:>7.1} MiB/s  peak RSS {:.1} MiB",
        mib / fhirsync_secs,
        rss as f64 / 1024.0
    );
    println!("curl script:        {curl_secs:>7.2} s  {:>7.1} MiB/s", mib / curl_secs);
    println!("throughput ratio fhirsync/curl: {:.2} (target >= 0.9)", curl_secs / fhirsync_secs);
}
