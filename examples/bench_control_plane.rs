//! Benchmark of the control plane: N BulkExportSyncs and N FhirSubscriptionSyncs on the test API
//! server (../shared/test-apiserver, started here), against in-process sources, Pathlings and FHIR
//! servers (the test doubles), driven by a release `fhirsync run`. Reports the time until all are
//! Ready, the operator's API requests by verb and resource (from the API server's /metrics), status
//! conflicts, runs started per run, the operator's CPU seconds and peak RSS, idle CPU, and the time
//! SIGTERM takes; per run: its status writes, its API requests (the run, its sync's status) and its
//! time split into the operator's own waits and its steps. Each export answers `--export-polls`
//! polls with 202 (`Retry-After: 1`) before its manifest, each import `--import-polls` `$job` polls.
//!
//!     cargo build --release --bin fhirsync --example bench_control_plane
//!     target/release/examples/bench_control_plane --syncs 1000 --sources 10 --pathlings 10 --export-polls 2 --import-polls 2
//!
//! Needs what .ci/run needs for the test API server (openssl, xz, kubectl) and ../shared beside the
//! clone (or SHARED=/path/to/shared).

#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fhirsync::api::{BulkExportRun, BulkExportSync, FhirSubscriptionSync};
use futures::StreamExt;
use kube::api::{ListParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::fhir_server::{FakeFhirServer, ServerConfig};
use support::pathling::{FakePathling, PathlingConfig};
use support::source::{FakeSource, SourceConfig};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).find(|w| w[0] == name).and_then(|w| w[1].parse().ok()).unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The test API server, in its own folder, stopped and removed on drop.
struct ApiServer {
    shared: PathBuf,
    home: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl ApiServer {
    fn start() -> Self {
        let shared = std::env::var("SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
        let home = tempfile::Builder::new().prefix("fhirsync-bench-apiserver").tempdir().unwrap();
        let env = vec![
            ("K".to_string(), home.path().display().to_string()),
            ("API_PORT".to_string(), free_port().to_string()),
            ("ETCD_PORT".to_string(), free_port().to_string()),
        ];
        for script in ["setup.sh", "up.sh"] {
            let st = Command::new(shared.join("test-apiserver").join(script))
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdout(Stdio::null())
                .status()
                .expect("test API server script");
            assert!(st.success(), "{script} failed");
        }
        Self { shared, home, env }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.home.path().join("kubeconfig")
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new(self.shared.join("test-apiserver").join("down.sh"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `apiserver_request_total` summed by (verb, resource/subresource, code class).
async fn api_requests(client: &Client) -> BTreeMap<(String, String), f64> {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let (labels, value) = line.rsplit_once(' ').unwrap_or((line, "0"));
        let get = |k: &str| {
            labels.split(&format!("{k}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string()
        };
        let resource = match get("subresource").as_str() {
            "" => get("resource"),
            sub => format!("{}/{sub}", get("resource")),
        };
        let key = (get("verb"), if get("code") == "409" { format!("{resource} (409)") } else { resource });
        *out.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// CPU seconds (user + system) and peak RSS (KiB) of a process.
fn cpu_and_peak(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

async fn operator_metric(admin: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics")).await.and_then(|r| r.error_for_status()).map(|r| r.text());
    match text {
        Ok(t) => t
            .await
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum(),
        Err(_) => 0.0,
    }
}

fn is_ready(conditions: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>) -> bool {
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::main]
async fn main() {
    let n = arg("--syncs", 1000) as usize;
    let n_src = arg("--sources", 10).max(1) as usize;
    let n_pl = arg("--pathlings", 10).max(1) as usize;
    let idle = arg("--idle", 20);
    let lines = arg("--lines", 1000) as usize;
    let export_polls = arg("--export-polls", 2) as u32;
    let import_polls = arg("--import-polls", 2) as u32;
    fhirsync::net::init_tls();
    let ns = "bench";
    eprintln!("starting the test API server …");
    let apiserver = ApiServer::start();
    let kc = kube::config::Kubeconfig::read_from(apiserver.kubeconfig()).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let client = Client::try_from(cfg).unwrap();
    support::cluster::install_crds(&client).await;
    let shims = apiserver.shared.join("test-apiserver/core-shims.yaml");
    let _ = Command::new("kubectl")
        .args([
            "--kubeconfig",
            &apiserver.kubeconfig().display().to_string(),
            "apply",
            "-f",
            &shims.display().to_string(),
        ])
        .output();

    // peers: sources with ~1 MiB exports, Pathlings, FHIR servers for the Subscriptions
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let line = |i: usize| {
        json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final", "note": "x".repeat(1000)})
            .to_string()
    };
    let data: Vec<String> = (0..lines).map(line).collect();
    let mut sources = vec![];
    let mut fhir = vec![];
    for _ in 0..n_src {
        let cfg = SourceConfig {
            files: vec![("Observation".into(), data.clone())],
            polls_before_done: export_polls,
            poll_retry_after: Some("1".into()),
            export_slots: 1000,
            ..Default::default()
        };
        sources.push(FakeSource::start(cfg).await);
        fhir.push(FakeFhirServer::start(ServerConfig::default()).await);
    }
    let mut pathlings = vec![];
    for _ in 0..n_pl {
        let pcfg = PathlingConfig {
            roots: vec![("file:///staging".into(), staging.clone())],
            job_polls: import_polls,
            ..Default::default()
        };
        pathlings.push(FakePathling::start(pcfg).await);
    }

    // the operator (release build, beside this example)
    let admin_port = free_port();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let log = dir.path().join("operator.log");
    let mut op: Child = Command::new(support::fhirsync_bin())
        .args(["run", "--namespace", ns, "--admin-addr", &format!("127.0.0.1:{admin_port}")])
        .args(["--staging-root", &dir.path().display().to_string(), "--log-level", "warn"])
        .env("KUBECONFIG", apiserver.kubeconfig())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("operator");
    let pid = op.id();
    let before = api_requests(&client).await;

    // N syncs and N FhirSubscriptionSyncs
    let syncs: Api<BulkExportSync> = Api::namespaced(client.clone(), ns);
    let fss: Api<FhirSubscriptionSync> = Api::namespaced(client.clone(), ns);
    let t0 = Instant::now();
    let pp = PostParams::default();
    futures::stream::iter(0..n)
        .map(|i| {
            let (syncs, fss, pp) = (syncs.clone(), fss.clone(), pp.clone());
            let sync = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportSync",
                "metadata": {"name": format!("sync-{i}"), "namespace": ns},
                "spec": {"source": {"url": sources[i % n_src].base, "maxConcurrentExports": 10},
                         "target": {"url": pathlings[i % n_pl].base},
                         "staging": {"volume": {"path": staging.display().to_string(), "pathlingPath": "file:///staging"}}}});
            let sub = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
                "metadata": {"name": format!("live-{i}"), "namespace": ns},
                "spec": {"source": {"url": fhir[i % n_src].base}, "criteria": ["Patient?"],
                         "endpoint": "http://pathling.invalid/fhir"}});
            async move {
                syncs.create(&pp, &serde_json::from_value(sync).unwrap()).await.expect("create sync");
                fss.create(&pp, &serde_json::from_value(sub).unwrap()).await.expect("create fss");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let created = t0.elapsed();
    eprintln!("created {n} + {n} objects in {:.1}s; waiting until all are Ready …", created.as_secs_f64());

    // watch both kinds until every object is Ready (two watches: the benchmark's only reads)
    let mut ready: HashMap<String, bool> = HashMap::new();
    let s_stream = watcher::watcher(syncs.clone(), Default::default())
        .applied_objects()
        .map(|r| r.map(|o| Obj::Sync(Box::new(o))));
    let f_stream =
        watcher::watcher(fss.clone(), Default::default()).applied_objects().map(|r| r.map(|o| Obj::Fss(Box::new(o))));
    let mut merged = futures::stream::select(s_stream.boxed(), f_stream.boxed());
    let deadline = Instant::now() + Duration::from_secs(arg("--timeout", 1800));
    while ready.values().filter(|r| **r).count() < 2 * n {
        let ev = tokio::time::timeout_at(deadline.into(), merged.next()).await;
        let o = match ev {
            Ok(Some(Ok(o))) => o,
            Ok(Some(Err(_))) => continue,
            _ => {
                eprintln!("timed out: {} of {} Ready", ready.values().filter(|r| **r).count(), 2 * n);
                break;
            }
        };
        let (key, r) = match o {
            Obj::Sync(s) => (format!("s/{}", s.name_any()), is_ready(s.status.as_ref().map(|s| &s.conditions))),
            Obj::Fss(f) => (format!("f/{}", f.name_any()), is_ready(f.status.as_ref().map(|s| &s.conditions))),
        };
        ready.insert(key, r);
    }
    let all_ready = t0.elapsed();
    drop(merged);
    let (cpu_busy, peak_busy) = cpu_and_peak(pid);
    let after = api_requests(&client).await;
    let runs: Api<BulkExportRun> = Api::namespaced(client.clone(), ns);
    let run_count = runs.list(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
    let tasks = operator_metric(&admin, "fhirsync_run_tasks_started_total").await;
    let conflicts = operator_metric(&admin, "fhirsync_status_conflicts_total").await;
    let waiting = operator_metric(&admin, "fhirsync_run_waiting_seconds_total").await;
    let working = operator_metric(&admin, "fhirsync_run_working_seconds_total").await;

    // idle
    tokio::time::sleep(Duration::from_secs(idle)).await; // measuring idle CPU over a span of time
    let (cpu_idle, _) = cpu_and_peak(pid);
    let (_, peak) = cpu_and_peak(pid);
    // SIGTERM
    let t = Instant::now();
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let code = op.wait().ok().and_then(|s| s.code());
    let term = t.elapsed();

    // the benchmark's own requests: the creates, and the LIST + WATCH of each watch
    let mut delta: BTreeMap<(String, String), f64> = BTreeMap::new();
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if d > 0.0 {
            delta.insert(k.clone(), d);
        }
    }
    let ours = 2.0 * n as f64 + 6.0;
    let runs_f = run_count.max(1) as f64; // creates, two LISTs and two WATCHes, two /metrics reads
    let total: f64 = delta.values().sum();
    let operator_requests = (total - ours).max(0.0);
    println!(
        "\n## fhirsync control plane: {n} BulkExportSyncs + {n} FhirSubscriptionSyncs, {n_src} sources, {n_pl} Pathlings\n"
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| all Ready after | {:.1} s (objects created in {:.1} s) |",
        all_ready.as_secs_f64(),
        created.as_secs_f64()
    );
    println!("| Ready | {} of {} |", ready.values().filter(|r| **r).count(), 2 * n);
    println!(
        "| operator API requests | {operator_requests:.0} ({:.1} per run, {run_count} runs) |",
        operator_requests / run_count.max(1) as f64
    );
    let per_run =
        |verb: &str, res: &str| delta.get(&(verb.to_string(), res.to_string())).copied().unwrap_or(0.0) / runs_f;
    let run_writes = per_run("APPLY", "bulkexportruns/status") + per_run("PATCH", "bulkexportruns/status");
    let run_requests: f64 = delta
        .iter()
        .filter(|((verb, res), _)| {
            res.starts_with("bulkexportruns") && verb != "WATCH" && verb != "LIST"
                || res.starts_with("bulkexportsyncs/status")
        })
        .map(|(_, v)| v)
        .sum::<f64>()
        / runs_f;
    println!("| status writes per run (BulkExportRun) | {run_writes:.2} |");
    println!(
        "| API requests per run (its creation, its status, its sync's status, its deletion) | {run_requests:.2} |"
    );
    println!(
        "| run time per run | {:.2} s waiting between polls, {:.2} s in steps |",
        waiting / runs_f,
        working / runs_f
    );
    println!("| status conflicts (operator) | {conflicts:.0} |");
    println!(
        "| run tasks started per run | {:.2} ({tasks:.0} tasks, {run_count} runs) |",
        tasks / run_count.max(1) as f64
    );
    println!("| operator CPU until all Ready | {cpu_busy:.1} s |");
    println!("| operator CPU while idle ({idle} s) | {:.2} s |", cpu_idle - cpu_busy);
    println!(
        "| operator peak RSS | {:.1} MiB (at all Ready: {:.1} MiB) |",
        peak as f64 / 1024.0,
        peak_busy as f64 / 1024.0
    );
    println!("| SIGTERM to exit | {:.2} s (exit code {code:?}) |", term.as_secs_f64());
    println!("\nAPI requests during the run (all clients; the benchmark's own ≈ {ours:.0}):\n");
    println!("| verb | resource | requests |");
    println!("|---|---|---|");
    for ((verb, res), v) in &delta {
        println!("| {verb} | {res} | {v:.0} |");
    }
    drop(apiserver);
}

enum Obj {
    Sync(Box<BulkExportSync>),
    Fss(Box<FhirSubscriptionSync>),
}
