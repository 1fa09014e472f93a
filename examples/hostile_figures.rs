//! Figures for the hardened engine: what hostile peers cost a release `fhirsync sync-once`, against
//! a baseline run from the same invocation. Uses the test doubles of tests/support.
//!
//!     cargo build --release --bin fhirsync --example hostile_figures
//!     target/release/examples/hostile_figures
//!
//! Reports, per scenario: outcome, wall time, peak RSS of sync-once (wait4), and requests sent.

#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::cli::{Cli, run_measured, s};
use support::pathling::PathlingConfig;
use support::source::{SourceConfig, resources};

struct Row {
    scenario: &'static str,
    outcome: String,
    secs: f64,
    rss_mib: f64,
    requests: String,
}

async fn run(c: &Cli, extra: &str) -> (serde_json::Value, f64, f64) {
    let f = c.write_sync("", extra);
    let t = Instant::now();
    let (out, rss) = run_measured(vec!["sync-once".into(), "-f".into(), s(&f), "--output".into(), "json".into()]).await;
    let secs = t.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (v, secs, rss as f64 / 1024.0)
}

fn outcome(v: &serde_json::Value) -> String {
    match v["phase"].as_str() {
        Some("Succeeded") => {
            format!("Succeeded, {} resources, {} export errors", v["totalResources"], v["exportErrors"])
        }
        Some(p) => format!("{p} ({})", v["reason"].as_str().unwrap_or("")),
        None => "no summary".into(),
    }
}

#[tokio::main]
async fn main() {
    let mut rows = vec![];
    let two = || SourceConfig {
        files: vec![
            ("Patient".into(), resources("Patient", "p", 24)),
            ("Observation".into(), resources("Observation", "o", 300)),
        ],
        ..Default::default()
    };

    let c = Cli::new(two()).await;
    let (v, secs, rss) = run(&c, "").await;
    let baseline = rss;
    rows.push(Row {
        scenario: "baseline: 2 files, 324 resources",
        outcome: outcome(&v),
        secs,
        rss_mib: rss,
        requests: String::new(),
    });

    let files: Vec<(String, Vec<String>)> =
        (0..20_000).map(|i| ("Patient".into(), resources("Patient", &format!("p{i}-"), 2))).collect();
    let c = Cli::new(SourceConfig { files, ..Default::default() }).await;
    let (v, secs, rss) = run(&c, "  maxParallelDownloads: 16\n").await;
    rows.push(Row {
        scenario: "20,000 output files",
        outcome: outcome(&v),
        secs,
        rss_mib: rss,
        requests: format!("{} downloads", c.source.log().downloads.len()),
    });

    let c = Cli::new(SourceConfig { errors: vec![vec![]], huge_error_line: Some(1 << 30), ..two() }).await;
    let (v, secs, rss) = run(&c, "").await;
    rows.push(Row {
        scenario: "one error[] line of 1 GiB",
        outcome: outcome(&v),
        secs,
        rss_mib: rss,
        requests: String::new(),
    });

    let c = Cli::new(SourceConfig { endless_manifest: Some(1 << 30), ..two() }).await;
    let (v, secs, rss) = run(&c, "").await;
    rows.push(Row { scenario: "a 1 GiB manifest", outcome: outcome(&v), secs, rss_mib: rss, requests: String::new() });

    let c = Cli::with(two(), PathlingConfig { lose_jobs_forever: true, ..Default::default() }).await;
    let (v, secs, rss) = run(&c, "").await;
    let l = c.pathling.log();
    rows.push(Row {
        scenario: "Pathling's $job answers 404 forever",
        outcome: outcome(&v),
        secs,
        rss_mib: rss,
        requests: format!("{} $import POSTs, {} $job GETs", l.import_posts, l.job_polls),
    });

    let c = Cli::new(SourceConfig { trickle_files: Some(Duration::from_secs(10)), ..two() }).await;
    let (v, secs, rss) = run(&c, "  runTimeout: 20s\n").await;
    rows.push(Row {
        scenario: "runTimeout 20s, files trickled 1 byte / 10 s",
        outcome: outcome(&v),
        secs,
        rss_mib: rss,
        requests: String::new(),
    });

    println!("| scenario | outcome | wall time | peak RSS | vs baseline RSS | requests |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} s | {:.1} MiB | {:.2}× | {} |",
            r.scenario,
            r.outcome,
            r.secs,
            r.rss_mib,
            r.rss_mib / baseline,
            r.requests
        );
    }
}
