//! End to end, a new user's first sync with the operator: preflight findings as a condition before a
//! first run, a failed run that says why in `kubectl get`, and info-level logs that tell the story.

mod support;

use serde_json::json;
use support::cluster::{SERIAL, wait_for};
use support::source::SourceConfig;
use support::world::{World, data, ready};

fn condition(s: &fhirsync::api::BulkExportSync, t: &str) -> Option<(String, String, String)> {
    let c = s.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn a_first_run_waits_for_its_preflight_checks_and_says_why() {
    let _g = SERIAL.lock().await;
    let w = World::new("preflight", data()).await;
    let op = w.operator();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        format!("http://127.0.0.1:{p}/fhir")
    };
    w.apply_sync("hospital-p", json!({"target": {"url": closed}})).await;
    let s = wait_for(&w.syncs, "hospital-p", 30, "Preflight False", |s| {
        condition(s, "Preflight").is_some_and(|c| c.0 == "False")
    })
    .await;
    let (_, reason, message) = condition(&s, "Preflight").unwrap();
    assert_eq!(reason, "TargetUnreachable");
    assert!(message.contains("nothing listens there") && message.contains("spec.target.url"), "{message}");
    assert_eq!(condition(&s, "Progressing").unwrap().1, "PreflightFailed");
    assert!(w.runs_of("hospital-p").await.is_empty(), "no run before the checks pass");
    // fixed: the checks pass and the first run follows by itself
    w.apply_sync("hospital-p", json!({"target": {"url": w.pathling.base}})).await;
    let s = wait_for(&w.syncs, "hospital-p", 60, "Ready", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    let (status, reason, message) = condition(&s, "Preflight").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "ChecksPassed"));
    assert!(message.contains("source answers") && message.contains("Pathling 3.0.0"), "{message}");
    // info level tells each run's story in a line per step
    let logs = op.logs();
    for line in ["run started", "run phase", "run succeeded"] {
        assert!(logs.contains(line), "no {line:?} in the operator's log:\n{logs}");
    }
}

#[tokio::test]
async fn a_failed_run_says_why_in_kubectl_and_how_to_retry() {
    let _g = SERIAL.lock().await;
    let w =
        World::new("failed", SourceConfig { kickoff_error: Some((404, "no such operation".into())), ..data() }).await;
    let _op = w.operator();
    w.apply_sync("hospital-f", json!({})).await;
    let s = wait_for(&w.syncs, "hospital-f", 60, "RunFailed", |s| ready(s).is_some_and(|r| r.1 == "RunFailed")).await;
    let (_, _, message) = condition(&s, "Ready").unwrap();
    assert!(message.contains("fhirsync.io/run-now"), "a sync without a schedule says how to retry: {message}");
    assert!(!message.contains("next scheduled run"), "{message}");
    let out = std::process::Command::new("kubectl")
        .args(["--kubeconfig", &support::cluster::kubeconfig().display().to_string(), "get", "ber", "-n", &w.ns])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().find(|l| l.starts_with("hospital-f")).unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("Failed") && row.contains("ExportFailed"), "{text}");
    assert!(!row.contains("<none>   <none>"), "STARTED and DURATION are filled: {text}");
}
