//! The run engine against in-process doubles of a bulk-data source and of Pathling.

mod support;

use std::time::Duration;

use fhirsync::api::{BulkExportRunStatus, Phase};
use fhirsync::run::{self, KeyedLocks};
use support::engine::{AUTH, Env, Saved, drive, drive_inputs, run_once, step_until};
use support::pathling::PathlingConfig;
use support::source::{PollQuirk, SourceConfig, delete_bundle, resources, three_files as two_types};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn full_export_lands_in_pathling_and_cleans_up() {
    let env = Env::new(two_types()).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.resources.get("Patient"), Some(&24));
    assert_eq!(st.resources.get("Observation"), Some(&117));
    assert_eq!(st.resource_count, Some(141));
    assert_eq!(st.files.as_ref().unwrap().staged, 3);
    assert!(st.bytes > 0);
    // Pathling got everything, through one well-formed import
    assert_eq!(env.pathling.counts().get("Patient"), Some(&24));
    assert_eq!(env.pathling.counts().get("Observation"), Some(&117));
    let log = env.pathling.log();
    assert!(log.rejected.is_empty(), "{:?}", log.rejected);
    assert_eq!(log.imports.len(), 1);
    let imp = &log.imports[0];
    assert_eq!(imp.save_mode, "merge");
    assert_eq!(imp.input_format, "application/fhir+ndjson");
    assert_eq!(imp.inputs.len(), 3);
    for (_, url) in &imp.inputs {
        assert!(url.starts_with("file:///pathling-staging/ns1/r1/") && url.ends_with(".ndjson"), "{url}");
    }
    // the source saw a proper kick-off, and the export was released
    let s = env.source.log();
    assert_eq!(s.kickoffs.len(), 1);
    assert_eq!(s.kickoffs[0].prefer.as_deref(), Some("respond-async"));
    assert_eq!(s.kickoffs[0].accept.as_deref(), Some("application/fhir+json"));
    assert_eq!(s.kickoffs[0].param("_since"), None);
    assert_eq!(s.status_deletes, vec!["job1".to_string()]);
    // staging is empty afterwards
    assert!(!env.staging().join("ns1").join("r1").exists());
    // watermark: min(transactionTime, kickoff) - overlap
    match fhirsync::sync::watermark_after(&st, None, Duration::from_secs(300)) {
        fhirsync::sync::WatermarkMove::To(w) => assert!(w < st.kickoff_time.as_ref().unwrap().0),
        m => panic!("{m:?}"),
    }
}

#[tokio::test]
async fn kickoff_parameters_and_since() {
    let mut env = Env::new(two_types()).await;
    env.extra = "  export:\n    level: Group\n    groupId: cohort-1\n    types: [Patient, Observation]\n    typeFilters: [\"Observation?status=final,amended\"]\n".into();
    let since: jiff::Timestamp = "2026-11-20T00:00:00Z".parse().unwrap();
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r1", Some(since), &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let k = &env.source.log().kickoffs[0];
    assert_eq!(k.path, "Group/cohort-1/$export");
    assert_eq!(k.param("_since").as_deref(), Some("2026-11-20T00:00:00Z"));
    assert_eq!(k.param("_type").as_deref(), Some("Patient,Observation"));
    assert_eq!(k.param("_typeFilter").as_deref(), Some("Observation?status=final%2Camended"));
    assert_eq!(k.param("_outputFormat").as_deref(), Some("application/fhir+ndjson"));
}

#[tokio::test]
async fn retry_after_as_seconds_http_date_and_epoch() {
    let soon = std::time::SystemTime::now() + Duration::from_secs(2);
    let epoch = soon.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs().to_string();
    let cfg = SourceConfig {
        kickoff_429: vec!["1".into(), httpdate::fmt_http_date(soon), epoch],
        poll_quirks: vec![PollQuirk::TooMany("1".into())],
        ..two_types()
    };
    let env = Env::new(cfg).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let log = env.source.log();
    assert_eq!(log.kickoffs.len(), 4, "three 429s, then accepted");
    assert_eq!(log.accepted, 1);
}

#[tokio::test]
async fn transient_poll_errors_are_retried() {
    let cfg = SourceConfig {
        poll_quirks: vec![PollQuirk::ServerError, PollQuirk::TransientOutcome, PollQuirk::ServerError],
        ..two_types()
    };
    let env = Env::new(cfg).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(env.pathling.counts().get("Patient"), Some(&24));
}

#[tokio::test]
async fn a_cancelled_job_answering_202_forever_fails_the_run() {
    let cfg = SourceConfig { cancelled_forever: true, ..two_types() };
    let env = Env::new(cfg).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("ExportFailed"));
    assert!(st.message.as_deref().unwrap().contains("Cancelled"), "{:?}", st.message);
    assert!(env.pathling.log().imports.is_empty());
}

#[tokio::test]
async fn run_timeout_stops_a_run_that_never_finishes() {
    let mut env = Env::new(SourceConfig { polls_before_done: u32::MAX, ..two_types() }).await;
    env.extra = "  runTimeout: 1s\n".into();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("RunTimeout"));
    // the export was cancelled on the source
    assert_eq!(env.source.log().status_deletes.len(), 1);
}

#[tokio::test]
async fn a_count_mismatch_fails_the_transfer_with_a_clear_message() {
    let env = Env::new(SourceConfig { wrong_count: Some(1), ..two_types() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("TransferFailed"));
    let m = st.message.unwrap();
    assert!(m.contains("101") && m.contains("100 arrived"), "{m}");
    assert!(env.pathling.log().imports.is_empty(), "nothing imported from a bad transfer");
    assert!(!env.staging().join("ns1").join("r1").exists(), "staging cleaned after failure");
}

#[tokio::test]
async fn a_download_cut_midway_is_retried() {
    let env = Env::new(SourceConfig { cut_first_download: true, ..two_types() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(env.pathling.counts().get("Observation"), Some(&117));
    let downloads = env.source.log().downloads;
    assert_eq!(downloads.iter().filter(|(n, _)| n == "out-1.ndjson").count(), 2);
}

#[tokio::test]
async fn gzip_files_are_decoded() {
    let env = Env::new(SourceConfig { gzip: true, ..two_types() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.resources.get("Observation"), Some(&117));
    assert_eq!(env.pathling.counts().get("Observation"), Some(&117));
}

#[tokio::test]
async fn deleted_entries_are_replayed_and_404_counts_as_done() {
    let cfg = SourceConfig {
        deleted: vec![vec![
            delete_bundle(&["Patient/gone-1", "Patient/gone-2"]),
            delete_bundle(&["Observation/never-existed"]),
        ]],
        ..two_types()
    };
    let env = Env::new(cfg).await;
    env.pathling.insert("Patient", "gone-1", serde_json::json!({"resourceType":"Patient","id":"gone-1"}));
    env.pathling.insert("Patient", "gone-2", serde_json::json!({"resourceType":"Patient","id":"gone-2"}));
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.deleted, 3);
    let ids = env.pathling.ids("Patient");
    assert!(!ids.contains(&"gone-1".to_string()) && !ids.contains(&"gone-2".to_string()));
    assert_eq!(ids.len(), 24);
    // deleted[] bundles are never imported as data
    assert!(env.pathling.log().imports[0].inputs.iter().all(|(t, _)| t != "Bundle"));
}

#[tokio::test]
async fn export_errors_do_not_fail_the_run() {
    let oo = |d: &str| {
        serde_json::json!({"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","diagnostics":d}]}).to_string()
    };
    let cfg = SourceConfig {
        errors: vec![vec![oo("Observation/9 could not be serialized"), oo("second problem")]],
        ..two_types()
    };
    let env = Env::new(cfg).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded);
    assert_eq!(st.export_errors, 2);
    assert_eq!(st.reason.as_deref(), Some("PartialExport"));
    assert!(st.message.as_deref().unwrap().contains("Observation/9 could not be serialized"), "{:?}", st.message);
    assert!(st.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "PartialExport"));
    assert_eq!(env.pathling.counts().get("Patient"), Some(&24));
}

#[tokio::test]
async fn pathling_busy_lost_jobs_and_503_from_job_are_survived() {
    let pcfg =
        PathlingConfig { busy_kickoffs: 2, busy_polls: 1, lose_job_once: false, job_polls: 2, ..Default::default() };
    let env = Env::with(two_types(), pcfg).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let log = env.pathling.log();
    assert_eq!(log.completed_imports, 1);
    assert!(log.job_deletes >= 1, "the job refused with 503 is deleted before resubmitting");
    assert_eq!(log.imports.len(), 2, "accepted twice: the 503'd job and the resubmission");

    let pcfg = PathlingConfig { lose_job_once: true, job_polls: 1, ..Default::default() };
    let env = Env::with(two_types(), pcfg).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(env.pathling.log().imports.len(), 2, "a lost job (404) is resubmitted");
    assert_eq!(env.pathling.counts().get("Patient"), Some(&24));
}

#[tokio::test]
async fn a_failed_import_fails_the_run_and_forgets_the_job() {
    let pcfg = PathlingConfig { fail_import: Some((400, "bad data".into())), ..Default::default() };
    let env = Env::with(two_types(), pcfg).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("ImportFailed"));
    assert!(st.message.as_deref().unwrap().contains("bad data"));
    assert!(env.pathling.log().job_deletes >= 1);
}

#[tokio::test]
async fn a_restarted_run_resumes_polling_the_same_export() {
    let env = Env::new(SourceConfig { polls_before_done: 4, ..two_types() }).await;
    let mut st = BulkExportRunStatus::default();
    let mut saved = Saved::default();
    let (tx, _rx) = watch::channel(st.clone());
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let src = env.source.clone();
    tokio::spawn(async move {
        src.wait_for(|l| l.polls >= 2).await;
        c2.cancel(); // the "operator" dies mid-poll
    });
    let r = run::drive(&env.inputs("r1", None), &env.deps(), &mut st, &mut saved, &tx, &cancel).await;
    assert!(matches!(r, Err(run::DriveError::Cancelled)));
    // a new process starts from the last persisted status
    let mut st = saved.0.last().unwrap().clone();
    assert_eq!(st.phase, Phase::Exporting);
    let url = st.export_status_url.clone().unwrap();
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.export_status_url.as_deref(), Some(url.as_str()));
    let log = env.source.log();
    assert_eq!(log.accepted, 1, "no second export");
    assert_eq!(env.pathling.log().imports.len(), 1, "imported once");
    assert_eq!(env.pathling.counts().get("Observation"), Some(&117));
}

#[tokio::test]
async fn a_resumed_transfer_keeps_files_already_staged() {
    let env = Env::new(two_types()).await;
    // first process: export finished, file 0 staged, then a crash before anything else
    let engine = env.engine("r1", None).await.unwrap();
    let (mut st, mem) = step_until(&engine, Phase::Transferring).await;
    let dir = env.staging().join("ns1").join("r1");
    std::fs::create_dir_all(&dir).unwrap();
    let mut body = resources("Patient", "p", 24).join("\n");
    body.push('\n');
    std::fs::write(dir.join("Patient.000000.ndjson"), body).unwrap();
    std::fs::write(dir.join(".Observation.000001.ndjson.partial"), "{\"half").unwrap();
    drop((engine, mem));
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.resources.get("Patient"), Some(&24), "the staged file is counted");
    let d = env.source.log().downloads;
    assert!(!d.iter().any(|(n, _)| n == "out-0.ndjson"), "the staged file is not downloaded again: {d:?}");
    assert!(d.iter().any(|(n, _)| n == "out-1.ndjson"));
    assert_eq!(env.pathling.counts().get("Observation"), Some(&117));
}

#[tokio::test]
async fn one_export_at_a_time_per_source_credential() {
    let env = Env::new(SourceConfig { polls_before_done: 2, ..two_types() }).await;
    let locks = KeyedLocks::default();
    let (mut s1, mut s2) = (BulkExportRunStatus::default(), BulkExportRunStatus::default());
    let (d1, d2) = (env.deps_with(locks.clone()), env.deps_with(locks.clone()));
    let (i1, i2) = (env.inputs("r1", None), env.inputs("r2", None));
    let (mut p1, mut p2) = (Saved::default(), Saved::default());
    let (t1, _r1) = watch::channel(s1.clone());
    let (t2, _r2) = watch::channel(s2.clone());
    let c = CancellationToken::new();
    let (a, b) =
        tokio::join!(run::drive(&i1, &d1, &mut s1, &mut p1, &t1, &c), run::drive(&i2, &d2, &mut s2, &mut p2, &t2, &c));
    a.unwrap();
    b.unwrap();
    assert_eq!(s1.phase, Phase::Succeeded, "{:?}", s1.message);
    assert_eq!(s2.phase, Phase::Succeeded, "{:?}", s2.message);
    let log = env.source.log();
    assert_eq!(log.max_active_exports, 1);
    assert_eq!(log.accepted, 2);
    assert_eq!(log.kickoffs.len(), 2, "the second run waited instead of hammering the source");
    assert_eq!(env.pathling.log().max_concurrent_imports, 1);
}

#[tokio::test]
async fn bearer_token_from_a_secret_and_none_on_capability_urls() {
    let cfg = SourceConfig { bearer: Some("s3cr3t".into()), requires_token: false, ..two_types() };
    let mut env = Env::new(cfg).await;
    env.secret("src", "token", "s3cr3t\n");
    env.source_auth = AUTH.into();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let log = env.source.log();
    assert_eq!(log.unauthorized, 0);
    assert!(log.downloads.iter().all(|(_, auth)| !auth), "requiresAccessToken false: no token on file downloads");
}

#[tokio::test]
async fn a_missing_secret_is_an_auth_failure_naming_the_secret() {
    let mut env = Env::new(two_types()).await;
    env.source_auth = AUTH.into();
    let err = env.engine("r1", None).await.err().expect("setup must fail");
    assert_eq!(err.reason, run::Reason::AuthFailed);
    assert!(err.message.contains("ns1/src") && err.message.contains("not found"), "{}", err.message);
    env.secret("src", "other", "x");
    let err = env.engine("r1", None).await.err().expect("setup must fail");
    assert!(err.message.contains("no key \"token\""), "{}", err.message);
}

#[tokio::test]
async fn wrong_token_is_reported_as_auth_failed() {
    let cfg = SourceConfig { bearer: Some("right".into()), ..two_types() };
    let mut env = Env::new(cfg).await;
    env.secret("src", "token", "wrong");
    env.source_auth = AUTH.into();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("AuthFailed"));
    assert!(!st.message.as_deref().unwrap().contains("wrong"), "the token never appears in messages");
}

#[tokio::test]
async fn object_store_staging_against_a_real_s3_implementation() {
    let s3 = support::s3::FakeS3::start("lake").await;
    let pcfg = PathlingConfig { roots: vec![("s3a://lake".into(), s3.root.path().join("lake"))], ..Default::default() };
    let mut env = Env::with(two_types(), pcfg).await;
    env.secret("s3", "accessKeyId", support::s3::ACCESS_KEY);
    env.secret("s3", "secretAccessKey", support::s3::SECRET_KEY);
    env.staging_yaml = Some(format!(
        "{{objectStore: {{url: \"s3://lake/fhir-staging\", pathlingUrl: \"s3a://lake/fhir-staging\", endpoint: \"{}\", \
         accessKeyIdRef: {{name: s3, key: accessKeyId}}, secretAccessKeyRef: {{name: s3, key: secretAccessKey}}}}}}",
        s3.endpoint
    ));
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(env.pathling.counts().get("Observation"), Some(&117));
    let imp = &env.pathling.log().imports[0];
    assert_eq!(imp.inputs.len(), 3);
    for (_, url) in &imp.inputs {
        assert!(url.starts_with("s3a://lake/fhir-staging/ns1/r1/") && url.ends_with(".ndjson"), "{url}");
    }
    assert!(
        s3.objects().iter().all(|o| !o.contains("fhir-staging/ns1/r1/")),
        "staged objects removed: {:?}",
        s3.objects()
    );

    // wrong credentials: a clear failure, no secret in the message
    env.secret("s3", "secretAccessKey", "not-the-key");
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert!(!st.message.as_deref().unwrap().contains("not-the-key"));
}

#[tokio::test]
async fn ping_and_pull_hands_the_export_to_pathling() {
    let mut env = Env::new(two_types()).await;
    env.staging_yaml = Some("{pingAndPull: {}}".into());
    let mut sync = env.sync();
    sync.spec.target.apply_deletes = false;
    sync.spec.export.types = vec!["Patient".into(), "Observation".into()];
    fhirsync::api::validate::validate_bulk_sync(&sync.spec).unwrap();
    let since: jiff::Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
    let mut inputs = env.inputs("r1", Some(since));
    inputs.template = fhirsync::api::RunTemplate::from(&sync.spec);
    let mut st = BulkExportRunStatus::default();
    drive_inputs(&env, &inputs, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert!(env.source.log().kickoffs.is_empty(), "Pathling exports, not fhirsync");
    let pnp = &env.pathling.log().pnp[0];
    let params = pnp["parameter"].as_array().unwrap();
    let get = |n: &str| params.iter().filter(|p| p["name"] == n).cloned().collect::<Vec<_>>();
    assert_eq!(get("exportUrl")[0]["valueUrl"], env.source.base.as_str());
    assert_eq!(get("saveMode")[0]["valueCode"], "merge");
    assert_eq!(get("_type").len(), 2);
    assert_eq!(get("_since")[0]["valueInstant"], "2026-11-01T00:00:00Z");
    assert!(st.kickoff_time.is_some(), "the watermark comes from fhirsync's clock");
}

#[tokio::test]
async fn a_truncated_staged_file_is_downloaded_again_on_resume() {
    let env = Env::new(two_types()).await;
    let engine = env.engine("r1", None).await.unwrap();
    let (mut st, mem) = step_until(&engine, Phase::Transferring).await;
    // a node crash left a short file under the final name
    let dir = env.staging().join("ns1").join("r1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Patient.000000.ndjson"), resources("Patient", "p", 5).join("\n")).unwrap();
    drop((engine, mem));
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.resources.get("Patient"), Some(&24));
    assert!(env.source.log().downloads.iter().any(|(n, _)| n == "out-0.ndjson"));
    assert_eq!(env.pathling.counts().get("Patient"), Some(&24));
}

#[tokio::test]
async fn post_only_servers_get_a_parameters_kickoff() {
    let mut env = Env::new(SourceConfig { post_only: true, ..two_types() }).await;
    env.extra = "  export:\n    types: [Patient]\n    typeFilters: [\"Patient?active=true\"]\n".into();
    let since: jiff::Timestamp = "2026-11-20T00:00:00Z".parse().unwrap();
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r1", Some(since), &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let k = env.source.log().kickoffs;
    assert_eq!(k.len(), 1, "the GET answered 405 before being recorded");
    assert_eq!(k[0].method, "POST");
    let body = k[0].body.clone().unwrap();
    assert_eq!(body["resourceType"], "Parameters");
    let p = body["parameter"].as_array().unwrap();
    assert!(p.iter().any(|x| x["name"] == "_since" && x["valueInstant"] == "2026-11-20T00:00:00Z"));
    assert!(p.iter().any(|x| x["name"] == "_typeFilter" && x["valueString"] == "Patient?active=true"));
}
