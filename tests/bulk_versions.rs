//! Bulk Data STU3 and STU4 shapes against in-process doubles: paged manifests (`link` next) read in
//! full, STU4 manifests (`outcome`, `extension` arrays, `manifestType`), POST-only kick-offs learned
//! once per source, and `_until`.

mod support;

use std::time::Duration;

use fhirsync::api::{BulkExportRunStatus, Phase};
use fhirsync::sync::{WatermarkMove, watermark_after};
use support::engine::{Env, drive, run_once};
use support::source::{SourceConfig, three_files};

#[tokio::test]
async fn a_paged_manifest_is_read_in_full_before_the_run_goes_on() {
    // one file a page, and every later page "not ready" at first: three pages, five page fetches
    let cfg = SourceConfig { manifest_page_size: Some(1), pages_not_ready_once: true, ..three_files() };
    let env = Env::new(cfg).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.files.as_ref().unwrap().staged, 3, "every page's file was staged");
    assert_eq!(st.resource_count, Some(141));
    assert_eq!(env.pathling.counts().get("Patient"), Some(&24));
    assert_eq!(env.pathling.counts().get("Observation"), Some(&117));
    assert_eq!(env.source.log().page_fetches, vec![2, 2, 3, 3], "each page waited for once, read once");
    assert!(matches!(watermark_after(&st, None, Duration::from_secs(60)), WatermarkMove::To(_)));
}

#[tokio::test]
async fn a_manifest_whose_pages_leave_the_source_or_loop_fails_the_run_and_keeps_the_watermark() {
    let page = |link: &str| {
        format!(
            r#"{{"transactionTime":"2026-11-30T00:00:00Z","requiresAccessToken":true,
               "output":[{{"type":"Patient","url":"{{base}}/files/out-0.ndjson"}}],"error":[],
               "link":[{{"relation":"next","url":"{link}"}}]}}"#
        )
    };
    let table = [
        ("another origin", page("http://127.0.0.1:9/status/job1?page=2"), "another origin"),
        ("a loop back to the first page", page("{base}/status/job1"), "link back to an earlier page"),
        ("a link that is not a next link", page("{base}/x").replace("\"next\"", "\"prev\""), "one `next` link"),
    ];
    for (what, raw, want) in table {
        let env = Env::new(SourceConfig { raw_manifest: Some(raw), ..three_files() }).await;
        let st = run_once(&env).await;
        assert_eq!(st.phase, Phase::Failed, "{what}");
        let msg = st.message.clone().unwrap_or_default();
        assert!(msg.contains(want), "{what}: {msg}");
        assert!(env.pathling.log().imports.is_empty(), "{what}: nothing imported from a partial manifest");
        assert_eq!(watermark_after(&st, None, Duration::from_secs(60)), WatermarkMove::Stays, "{what}");
    }
}

#[tokio::test]
async fn an_stu4_source_gets_a_post_with_one_parameter_per_value_and_its_outcome_files_are_read() {
    let oo = serde_json::json!({"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","diagnostics":"Observation/9 failed"}]});
    let cfg = SourceConfig {
        post_only: true,
        stu4_manifest: true,
        manifest_page_size: Some(2),
        errors: vec![vec![oo.to_string()]],
        ..three_files()
    };
    let mut env = Env::new(cfg).await;
    env.extra = "  export:\n    types: [Patient, Observation]\n".into();
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.resource_count, Some(141));
    assert_eq!(st.export_errors, 1, "STU4's `outcome` is read as `error` was");
    let k = env.source.log().kickoffs;
    assert_eq!(k[0].method, "POST");
    let body = k[0].body.clone().unwrap();
    let types: Vec<&str> = body["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "_type")
        .map(|p| p["valueString"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["Patient", "Observation"], "STU4 takes no comma lists");
    assert_eq!(env.source.log().refused_gets, 1);

    // the next run on this source POSTs at once: no GET refused again
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r2", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(env.source.log().refused_gets, 1, "the 405 was learned");
    assert_eq!(env.source.log().kickoffs.len(), 2);
}

#[tokio::test]
async fn until_bounds_the_export_and_the_watermark() {
    let mut env = Env::new(three_files()).await;
    env.extra = "  export:\n    until: \"2026-11-25T00:00:00Z\"\n".into();
    let since: jiff::Timestamp = "2026-11-20T00:00:00Z".parse().unwrap();
    let until: jiff::Timestamp = "2026-11-25T00:00:00Z".parse().unwrap();
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r1", Some(since), &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let k = &env.source.log().kickoffs[0];
    assert_eq!(k.param("_until").as_deref(), Some("2026-11-25T00:00:00Z"));
    assert_eq!(k.param("_since").as_deref(), Some("2026-11-20T00:00:00Z"));
    assert_eq!(st.transaction_time.as_ref().map(|t| t.0), Some(until), "the export covers up to _until, not now");
    match watermark_after(&st, None, Duration::from_secs(60)) {
        WatermarkMove::To(w) => assert!(w < until, "{w}"),
        m => panic!("{m:?}"),
    }
}
