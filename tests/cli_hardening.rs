//! `fhirsync sync-once` against careless input, hostile sources and shared state files: exit codes,
//! the watermark after a partial export, the state file's lock and ownership, peak memory.

mod support;

use std::process::{Command, Stdio};

use support::cli::{Cli, data, run_measured, s};
use support::source::{SourceConfig, resources};

fn args(f: &std::path::Path, state: Option<&std::path::Path>) -> Vec<String> {
    let mut a = vec!["sync-once".into(), "-f".into(), s(f), "--output".into(), "json".into()];
    if let Some(st) = state {
        a.extend(["--state".into(), s(st)]);
    }
    a
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

#[tokio::test]
async fn durations_that_would_overflow_exit_2_not_a_panic() {
    let c = Cli::new(data()).await;
    for (extra, field) in [
        ("  runTimeout: \"18446744073709551615s1s\"\n", "spec.runTimeout"),
        ("  sinceOverlap: 144115188075855872d\n", "spec.sinceOverlap"),
        ("  runTimeout: 400d\n", "spec.runTimeout"),
    ] {
        let f = c.write_sync("", extra);
        let out = c.run(args(&f, None)).await;
        assert_eq!(out.status.code(), Some(2), "{extra}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains(field), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(c.source.log().kickoffs.is_empty());
}

#[tokio::test]
async fn export_errors_keep_the_watermark_so_the_next_run_retries() {
    let oo = serde_json::json!({"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","diagnostics":"Observation/9 failed"}]});
    let c = Cli::new(SourceConfig { errors: vec![vec![oo.to_string()]], ..data() }).await;
    let f = c.write_sync("", "");
    let out = c.run(args(&f, Some(&c.state()))).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let first = json(&out);
    assert_eq!(first["exportErrors"], 1);
    assert_eq!(first["totalResources"], 324, "what was exported is imported");
    assert!(first["watermark"].is_null(), "the watermark did not move past what failed: {first}");
    // the next run fetches everything again; once clean, the watermark moves
    c.source.configure(|cfg| cfg.errors.clear());
    let out = c.run(args(&f, Some(&c.state()))).await;
    let second = json(&out);
    assert!(second["since"].is_null(), "a full export again: {second}");
    assert!(c.source.log().kickoffs[1].param("_since").is_none());
    assert!(second["watermark"].is_string());
}

#[tokio::test]
async fn a_state_file_resumes_only_the_sync_it_was_written_for() {
    let c = Cli::new(SourceConfig { polls_before_done: 1_000_000, ..data() }).await;
    let f = c.write_sync("", "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhirsync"))
        .args(args(&f, Some(&c.state())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.source.wait_for(|l| l.polls >= 1).await;
    // meanwhile, a second invocation with the same state file is refused
    let out = c.run(args(&f, Some(&c.state()))).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another fhirsync sync-once is using it"));
    child.kill().unwrap();
    child.wait().unwrap();
    // another sync's file with this state: refused, nothing sent anywhere
    let other = c.dir.path().join("other.yaml");
    let text = std::fs::read_to_string(&f).unwrap().replace(&c.pathling.base, "http://127.0.0.1:9/other-pathling");
    std::fs::write(&other, text).unwrap();
    let kickoffs = c.source.log().kickoffs.len();
    let out = c.run(args(&other, Some(&c.state()))).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another sync"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.source.log().kickoffs.len(), kickoffs);
}

#[tokio::test]
async fn a_state_file_cannot_point_cleanup_at_another_directory() {
    let c = Cli::new(data()).await;
    let f = c.write_sync("", "");
    let victim = c.dir.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("keep.txt"), "precious").unwrap();
    let state = serde_json::json!({"run": {"name": "../../victim", "uid": "u1", "status": {"phase": "Importing"}}});
    std::fs::write(c.state(), state.to_string()).unwrap();
    let out = c.run(args(&f, Some(&c.state()))).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid name"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(victim.join("keep.txt").exists());
}

#[tokio::test]
async fn two_runs_of_one_sync_at_once_never_share_staging() {
    let c = Cli::new(data()).await;
    let f = c.write_sync("", "");
    let (a, b) = tokio::join!(
        c.run(args(&f, Some(&c.dir.path().join("a.json")))),
        c.run(args(&f, Some(&c.dir.path().join("b.json"))))
    );
    let (a, b) = (json(&a), json(&b));
    assert_eq!((a["phase"].as_str(), b["phase"].as_str()), (Some("Succeeded"), Some("Succeeded")), "{a}\n{b}");
    assert_ne!(a["run"], b["run"], "distinct run names");
    let imports = c.pathling.log().imports;
    assert_eq!(imports.len(), 2);
    let dir = |i: usize| imports[i].inputs[0].1.rsplit_once('/').unwrap().0.to_string();
    assert_ne!(dir(0), dir(1), "distinct staging areas");
    assert_eq!(c.pathling.counts().get("Observation"), Some(&300));
}

#[tokio::test]
async fn peak_memory_stays_bounded_whatever_the_source_sends() {
    const BUDGET_KIB: u64 = 64 * 1024;
    // one 256 MiB error line
    let c = Cli::new(SourceConfig { errors: vec![vec![]], huge_error_line: Some(256 << 20), ..data() }).await;
    let (out, rss) = run_measured(args(&c.write_sync("", ""), None)).await;
    assert_eq!(json(&out)["exportErrors"], 1);
    eprintln!("peak RSS with a 256 MiB error line: {rss} KiB");
    assert!(rss < BUDGET_KIB, "peak RSS {rss} KiB with a 256 MiB error line");
    // a manifest that never ends
    let c = Cli::new(SourceConfig { endless_manifest: Some(1 << 30), ..data() }).await;
    let (out, rss) = run_measured(args(&c.write_sync("", ""), None)).await;
    assert_eq!(json(&out)["reason"], "ExportFailed");
    eprintln!("peak RSS with an endless manifest: {rss} KiB");
    assert!(rss < BUDGET_KIB, "peak RSS {rss} KiB with an endless manifest");
    // thousands of files
    let files: Vec<(String, Vec<String>)> =
        (0..5000).map(|i| ("Patient".into(), resources("Patient", &format!("p{i}-"), 2))).collect();
    let c = Cli::new(SourceConfig { files, ..Default::default() }).await;
    let (out, rss) = run_measured(args(&c.write_sync("", "  maxParallelDownloads: 16\n"), None)).await;
    assert_eq!(json(&out)["totalResources"], 10_000);
    eprintln!("peak RSS with 5,000 files: {rss} KiB");
    assert!(rss < BUDGET_KIB, "peak RSS {rss} KiB with 5,000 files");
}
