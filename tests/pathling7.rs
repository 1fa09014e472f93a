//! Runs into a Pathling Server 7.x, as the real 7.2.0 was observed to behave
//! (tests/peers/pathling/FINDINGS.md) and the emulator's `v7` mode speaks it: the generation is told
//! from the CapabilityStatement before anything is sent, every `$import` carries `mode: merge` as a
//! valueCode (7.x overwrites otherwise), each submission its own URL (7.x hands a second body at the
//! same URL the first one's job), deletions are said, not sent, and a verification is refused.

mod support;

use fhirsync::api::{BulkExportRunStatus, DeletionSource, Phase};
use fhirsync::sync::{WatermarkMove, watermark_after};
use std::time::Duration;
use support::engine::{Env, drive, run_once};
use support::pathling::PathlingConfig;
use support::source::{SourceConfig, delete_bundle, resources};

fn v7() -> PathlingConfig {
    PathlingConfig { v7: true, ..Default::default() }
}

fn data() -> SourceConfig {
    SourceConfig {
        files: vec![
            ("Patient".into(), resources("Patient", "p", 24)),
            ("Observation".into(), resources("Observation", "o", 117)),
        ],
        since_files: Some(vec![("Patient".into(), resources("Patient", "new", 3))]),
        ..Default::default()
    }
}

fn message(st: &BulkExportRunStatus) -> String {
    st.message.clone().unwrap_or_default()
}

#[tokio::test]
async fn an_incremental_run_into_pathling_7_keeps_what_was_there() {
    let env = Env::with(data(), v7()).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{}", message(&st));
    assert_eq!(env.pathling.counts().get("Patient"), Some(&24));
    // the next run brings three new patients: merged, not a table of three
    let since = "2026-11-26T00:00:00Z".parse().unwrap();
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r2", Some(since), &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{}", message(&st));
    assert_eq!(env.pathling.counts().get("Patient"), Some(&27), "an incremental import into 7.x must merge");
    assert_eq!(env.pathling.counts().get("Observation"), Some(&117));
    let log = env.pathling.log();
    assert!(log.rejected.is_empty(), "{:?}", log.rejected);
    assert_eq!(log.imports.len(), 2, "each submission its own job (7.x keys jobs by URL)");
    assert!(log.imports.iter().all(|i| i.save_mode == "merge"), "{:?}", log.imports);
}

#[tokio::test]
async fn deletions_pathling_7_cannot_apply_are_said_and_hold_the_watermark() {
    let cfg = SourceConfig { deleted: vec![vec![delete_bundle(&["Patient/p1", "Patient/p2"])]], ..data() };
    let env = Env::with(cfg, v7()).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{}", message(&st));
    assert_eq!(st.deletion_source, Some(DeletionSource::Manifest));
    assert_eq!(st.deleted, 0);
    assert!(st.deletions_incomplete, "the watermark must not move past deletions not applied");
    let degraded = st.conditions.iter().find(|c| c.type_ == "Degraded").expect("Degraded");
    assert_eq!(degraded.reason, "DeletionsUnsupported");
    assert!(degraded.message.contains("Patient: 2") && degraded.message.contains("overwrite"), "{}", degraded.message);
    assert_eq!(watermark_after(&st, None, Duration::from_secs(60)), WatermarkMove::Stays);
    assert!(env.pathling.log().rejected.is_empty(), "no DELETE was sent: {:?}", env.pathling.log().rejected);
}

#[tokio::test]
async fn a_verification_against_pathling_7_is_refused_with_what_to_do() {
    let env = Env::with(data(), v7()).await;
    let mut st = BulkExportRunStatus::default();
    let inputs = env.verify_inputs("v1", Default::default());
    support::engine::drive_inputs(&env, &inputs, &mut st).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("VerifyFailed"));
    assert!(message(&st).contains("Pathling Server 7.x") && message(&st).contains("spec.verify"), "{}", message(&st));
    assert!(env.source.log().kickoffs.is_empty(), "refused before anything was exported");
}
