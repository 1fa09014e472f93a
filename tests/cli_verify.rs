//! `fhirsync sync-once --verify`: the run, then a verification, a repair of what differs, and a
//! check of the repair — the operator's decisions, from the command line.

mod support;

use support::cli::{Cli, data, s};
use support::pathling::PathlingConfig;
use support::source::SourceConfig;

fn source() -> SourceConfig {
    let mut cfg = data();
    cfg.all_files_live();
    cfg.poll_retry_after = Some("0".into());
    cfg.since_files = Some(vec![]); // nothing changes at the source after the first run
    cfg
}

async fn synced(spec: &str) -> (Cli, Vec<String>) {
    let c = Cli::with(source(), PathlingConfig { export_polls: 1, ..Default::default() }).await;
    let f = c.write_sync("", spec);
    let args = vec!["sync-once".into(), "-f".into(), s(&f), "--state".into(), s(&c.state())];
    let out = c.run(args.clone()).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // drift: one Observation lost, one Patient Pathling should not have
    c.pathling.remove("Observation", "o5");
    c.pathling.insert("Patient", "ghost", serde_json::json!({"resourceType": "Patient", "id": "ghost"}));
    (c, args)
}

#[tokio::test]
async fn verify_finds_drift_repairs_it_and_checks_the_repair() {
    let (c, mut args) = synced("").await;
    args.extend(["--verify".into(), "--output".into(), "json".into()]);
    let out = c.run(args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let drift = &summary["drift"];
    assert_eq!(drift["repair"]["state"], "Done", "{drift}");
    assert_eq!(drift["inSync"], true);
    // Pathling equals the source again
    assert!(c.pathling.ids("Observation").contains(&"o5".to_string()));
    assert!(!c.pathling.ids("Patient").contains(&"ghost".to_string()));
    assert_eq!(c.pathling.counts().get("Observation"), Some(&300));
    // the repair exported only the type that missed resources, in full
    let kick = c.source.log().kickoffs;
    let repair =
        kick.iter().find(|k| k.param("_elements").is_none() && k.param("_type").is_some()).expect("a repair export");
    assert_eq!((repair.param("_type").as_deref(), repair.param("_since")), (Some("Observation"), None));
    assert!(err.contains("repairing: exporting Observation in full"), "{err}");
    // the watermark is the run's, untouched by the repair
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(c.state()).unwrap()).unwrap();
    assert_eq!(state["watermark"], summary["watermark"]);
}

#[tokio::test]
async fn verify_without_repair_reports_the_drift_and_exits_3() {
    let (c, mut args) = synced("  verify: {repair: false}\n").await;
    args.push("--verify".into());
    let out = c.run(args).await;
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("in sync:    False (Drift)"), "{text}");
    assert!(text.contains("Observation: source 300, pathling 299, missing 1 (e.g. o5)"), "{text}");
    assert!(text.contains("Patient: source 24, pathling 25, extra 1 (e.g. ghost)"), "{text}");
    assert!(c.pathling.ids("Patient").contains(&"ghost".to_string()), "nothing was deleted");
}
