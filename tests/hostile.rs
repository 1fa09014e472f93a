//! The run engine against hostile and buggy peers: each observation of the "never loses data, never
//! wedges" issue, reproduced with a double that misbehaves, and the bounded answer checked.

mod support;

use std::time::{Duration, Instant};

use fhirsync::api::{BulkExportRunStatus, Phase};
use fhirsync::run::{self, policy::MAX_STREAK};
use support::engine::{Env, Saved, drive, run_once, step_until};
use support::pathling::PathlingConfig;
use support::source::{SourceConfig, delete_bundle, three_files as data};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn message(st: &BulkExportRunStatus) -> String {
    st.message.clone().unwrap_or_default()
}

#[tokio::test]
async fn a_job_that_is_always_unknown_costs_a_bounded_number_of_requests() {
    let env = Env::with(data(), PathlingConfig { lose_jobs_forever: true, ..Default::default() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("ImportFailed"));
    assert!(message(&st).contains("unknown job"), "{}", message(&st));
    let log = env.pathling.log();
    let bound = run::MAX_LOST_JOBS + 1;
    assert_eq!(log.import_posts, bound, "one submit and {} resubmits", bound - 1);
    assert_eq!(log.job_polls, bound);
}

#[tokio::test]
async fn run_timeout_fires_inside_a_download_trickled_a_byte_at_a_time() {
    let mut env = Env::new(SourceConfig { trickle_files: Some(Duration::from_secs(10)), ..data() }).await;
    env.extra = "  runTimeout: 2s\n".into();
    let t = Instant::now();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("RunTimeout"));
    assert!(t.elapsed() < Duration::from_secs(8), "took {:?}", t.elapsed());
    assert_eq!(env.source.log().status_deletes.len(), 1, "the export was released");
    assert!(!env.staging().join("ns1").join("r1").exists(), "staging was cleaned");
}

#[tokio::test]
async fn run_timeout_fires_inside_a_trickled_manifest() {
    let mut env = Env::new(SourceConfig { trickle_manifest: Some(Duration::from_secs(10)), ..data() }).await;
    env.extra = "  runTimeout: 2s\n".into();
    let t = Instant::now();
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("RunTimeout"), "{}", message(&st));
    assert!(t.elapsed() < Duration::from_secs(8), "took {:?}", t.elapsed());
}

#[tokio::test]
async fn server_errors_are_retried_a_bounded_number_of_times() {
    // a kick-off answering 500 forever
    let env = Env::new(SourceConfig { kickoff_error: Some((500, "boom".into())), ..data() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("ExportFailed"), "{}", message(&st));
    assert!(message(&st).contains("failures in a row"), "{}", message(&st));
    assert_eq!(env.source.log().kickoffs.len() as u32, MAX_STREAK + 1);

    // $import answering 500 forever
    let env = Env::with(data(), PathlingConfig { import_status_forever: Some(500), ..Default::default() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("ImportFailed"), "{}", message(&st));
    assert_eq!(env.pathling.log().import_posts, MAX_STREAK + 1);

    // $job answering 500 forever
    let env = Env::with(data(), PathlingConfig { job_status_forever: Some(500), ..Default::default() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("ImportFailed"), "{}", message(&st));
    assert_eq!(env.pathling.log().job_polls, MAX_STREAK + 1);
    assert!(env.pathling.log().job_deletes >= 1, "the failed job is cancelled");
}

fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/fhir")
}

#[tokio::test]
async fn an_unreachable_pathling_or_source_fails_in_seconds_with_a_hint() {
    let mut env = Env::new(data()).await;
    env.pathling.base = closed_port();
    let t = Instant::now();
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("TargetUnreachable"), "{}", message(&st));
    assert!(message(&st).contains("spec.target.url") && message(&st).contains("host and port"), "{}", message(&st));
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(env.source.log().kickoffs.is_empty(), "nothing is exported toward a Pathling that does not answer");

    let mut env = Env::new(data()).await;
    env.source.base = closed_port();
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("SourceUnreachable"), "{}", message(&st));
    assert!(message(&st).contains("spec.source.url"), "{}", message(&st));
}

#[tokio::test]
async fn a_manifest_with_thousands_of_types_is_refused_and_the_status_stays_small() {
    let outputs: Vec<String> = (0..9500)
        .map(|i| {
            let t: String = format!("T{i:05}")
                .chars()
                .map(|c| if c.is_ascii_digit() { (b'a' + c as u8 - b'0') as char } else { c })
                .collect();
            format!(r#"{{"type":"{t}","url":"{{base}}/files/out-0.ndjson"}}"#)
        })
        .collect();
    let raw = format!(r#"{{"transactionTime":"2026-11-26T00:00:00Z","output":[{}]}}"#, outputs.join(","));
    let env = Env::new(SourceConfig { raw_manifest: Some(raw), ..data() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("ExportFailed"), "{}", message(&st));
    assert!(message(&st).contains("resource types"), "{}", message(&st));
    let size = serde_json::to_vec(&st).unwrap().len();
    assert!(size < 8 * 1024, "status of {size} bytes");
}

#[tokio::test]
async fn a_job_answering_200_with_anything_but_its_result_is_no_success() {
    for (body, want) in [
        ("<html><head><title>Gateway</title></head></html>", "HTML page"),
        (
            r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"disk full"}]}"#,
            "disk full",
        ),
    ] {
        let env = Env::with(data(), PathlingConfig { job_result_body: Some(body.into()), ..Default::default() }).await;
        let st = run_once(&env).await;
        assert_eq!(st.phase, Phase::Failed, "{want}");
        assert_eq!(st.reason.as_deref(), Some("ImportFailed"));
        assert!(message(&st).contains(want), "{}", message(&st));
        assert!(env.pathling.counts().is_empty());
    }
}

#[tokio::test]
async fn an_emptied_staging_area_on_resume_is_an_error_not_nothing_to_import() {
    let env = Env::new(data()).await;
    let engine = env.engine("r1", None).await.unwrap();
    let (mut st, mem) = step_until(&engine, Phase::Importing).await;
    drop((engine, mem));
    std::fs::remove_dir_all(env.staging().join("ns1").join("r1")).unwrap();
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("ImportFailed"));
    assert!(message(&st).contains("0 of the 3 files"), "{}", message(&st));
    assert!(env.pathling.log().imports.is_empty());
}

#[tokio::test]
async fn two_runs_never_share_a_staging_area() {
    let env = Env::new(data()).await;
    let dir = env.staging().join("ns1").join("r1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".fhirsync-owner"), "another-run-uid").unwrap();
    std::fs::write(dir.join("Patient.000000.ndjson"), "{}\n").unwrap();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert!(message(&st).contains("belongs to another run"), "{}", message(&st));
    assert!(dir.join("Patient.000000.ndjson").exists(), "the other run's files are left alone");
}

#[tokio::test]
async fn deletions_that_walk_paths_are_never_sent() {
    let cfg = SourceConfig {
        deleted: vec![vec![delete_bundle(&["Patient/..", "Patient/%2e%2e", "X/Patient/.", "Patient/gone-1"])]],
        ..data()
    };
    let env = Env::new(cfg).await;
    env.pathling.insert("Patient", "gone-1", serde_json::json!({"resourceType":"Patient","id":"gone-1"}));
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{}", message(&st));
    assert_eq!(st.deleted, 1);
    assert_eq!(env.pathling.log().resource_deletes, vec!["Patient/gone-1".to_string()]);
    assert!(message(&st).contains("skipped 3 entries that are not Type/id"), "{}", message(&st));
}

#[tokio::test]
async fn a_huge_error_line_is_counted_not_kept() {
    let cfg = SourceConfig { errors: vec![vec![]], huge_error_line: Some(64 << 20), ..data() };
    let env = Env::new(cfg).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{}", message(&st));
    assert_eq!(st.export_errors, 1);
    assert!(message(&st).contains("an error line of"), "{}", message(&st));
    assert!(message(&st).len() < 4096);
}

#[tokio::test]
async fn an_endless_manifest_is_refused_at_its_cap() {
    let env = Env::new(SourceConfig { endless_manifest: Some(1 << 30), ..data() }).await;
    let t = Instant::now();
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("ExportFailed"), "{}", message(&st));
    assert!(message(&st).contains("larger than"), "{}", message(&st));
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
}

#[tokio::test]
async fn a_gzip_bomb_fails_its_file_once_and_leaves_nothing_staged() {
    let mut env = Env::new(SourceConfig { gzip_bomb_mib: Some(2048), ..data() }).await;
    env.extra = "  limits: {maxFileSize: 64Mi}\n".into();
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("TransferFailed"), "{}", message(&st));
    assert!(message(&st).contains("maxFileSize"), "{}", message(&st));
    let tries = env.source.log().downloads.iter().filter(|(n, _)| n == "out-0.ndjson").count();
    assert_eq!(tries, 1, "a file over the cap is not downloaded again");
    assert!(!env.staging().join("ns1").join("r1").exists());
}

#[tokio::test]
async fn a_full_staging_volume_is_a_clear_failure() {
    let env = Env::new(data()).await;
    // the partial file of output 0 lands on a device that is always full
    let dir = env.staging().join("ns1").join("r1");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.join(".Patient.000000.ndjson.partial")).unwrap();
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("TransferFailed"), "{}", message(&st));
    assert!(message(&st).contains("staging volume is full"), "{}", message(&st));
    assert!(!dir.exists(), "nothing half-written is kept");
}

#[tokio::test]
async fn link_local_redirects_are_refused_and_peer_text_is_sanitised() {
    let env = Env::new(SourceConfig { redirect_files_to: Some("http://169.254.169.254".into()), ..data() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.reason.as_deref(), Some("TransferFailed"), "{}", message(&st));
    assert!(message(&st).contains("cloud metadata"), "{}", message(&st));
    assert!(env.pathling.counts().is_empty());

    let evil = format!("\u{1b}[31mred\ninjected\r\nline {}", "x".repeat(5000));
    let oo = serde_json::json!({"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","diagnostics": evil}]});
    let env = Env::new(SourceConfig { errors: vec![vec![oo.to_string()]], ..data() }).await;
    let st = run_once(&env).await;
    let m = message(&st);
    assert!(!m.chars().any(|c| c.is_control()), "{m:?}");
    assert!(m.contains("red injected line"), "{m}");
    assert!(m.len() < 2048, "{} bytes", m.len());
}

#[tokio::test]
async fn a_kickoff_lost_in_a_crash_is_recorded_and_the_run_goes_on() {
    let env = Env::new(SourceConfig { hang_first_kickoff: true, ..data() }).await;
    let mut st = BulkExportRunStatus::default();
    let mut saved = Saved::default();
    let (tx, _rx) = watch::channel(st.clone());
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let src = env.source.clone();
    tokio::spawn(async move {
        src.wait_for(|l| l.accepted >= 1).await;
        c2.cancel(); // the process dies while the kick-off's answer is on its way
    });
    let r = run::drive(&env.inputs("r1", None), &env.deps(), &mut st, &mut saved, &tx, &cancel).await;
    assert!(matches!(r, Err(run::DriveError::Cancelled)));
    let mut st = saved.0.last().cloned().expect("the intent was stored before the kick-off");
    assert!(st.kickoff_time.is_some() && st.export_status_url.is_none());
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{}", message(&st));
    assert_eq!(st.lost_kickoffs, 1);
    assert_eq!(env.source.log().accepted, 2, "the lost export and the new one");
}

// The second campaign of hostile peers.

#[tokio::test]
async fn a_status_url_answering_200_with_an_error_outcome_fails_the_run_and_holds_the_watermark() {
    let outcome = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"export job 7 failed: disk full"}]}"#;
    let env = Env::new(SourceConfig { raw_manifest: Some(outcome.into()), ..data() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed, "{}", message(&st));
    assert_eq!(st.reason.as_deref(), Some("ExportFailed"));
    assert!(message(&st).contains("disk full"), "the source's own words: {}", message(&st));
    assert!(env.pathling.log().imports.is_empty(), "nothing imported");
    assert_eq!(
        fhirsync::sync::watermark_after(&st, None, Duration::from_secs(300)),
        fhirsync::sync::WatermarkMove::Stays,
        "the window's changes are fetched again by the next run"
    );
    // a body that is no manifest at all is not "no files" either
    let env =
        Env::new(SourceConfig { raw_manifest: Some(r#"{"transactionTime":"2026-11-26T00:00:00Z"}"#.into()), ..data() })
            .await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed, "{}", message(&st));
    assert!(message(&st).contains("no `output` array"), "{}", message(&st));
}

#[tokio::test]
async fn a_file_that_is_busy_six_times_is_waited_out_not_failed() {
    let env = Env::new(SourceConfig { file_busy: Some((6, "2".into())), ..data() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{}", message(&st));
    assert_eq!(st.resource_count, Some(141));
    let downloads = env.source.log().downloads.iter().filter(|(n, _)| n == "out-0.ndjson").count();
    assert_eq!(downloads, 7, "six 429s waited out, then the file");
}

#[tokio::test]
async fn a_broken_gzip_download_is_retried_like_a_plain_one() {
    let env = Env::new(SourceConfig { gzip: true, cut_first_download: true, ..data() }).await;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{}", message(&st));
    assert_eq!(st.resource_count, Some(141));
    let log = env.source.log();
    let first = log.downloads.iter().filter(|(n, _)| n == "out-0.ndjson").count();
    assert_eq!(first, 2, "the broken download was tried again");
}

#[tokio::test]
async fn a_run_stops_acting_the_moment_its_process_loses_the_lease() {
    // an export that never finishes, polled by a leader whose lease lapses mid-export (it was
    // paused): it must neither poll again, nor release the export, nor fail the run, nor clean up
    let env = Env::new(SourceConfig { polls_before_done: 1_000_000, ..data() }).await;
    let fence = fhirsync::fence::Fence::lease();
    fence.renewed(Instant::now(), Duration::from_millis(600));
    let deps = run::Deps { fence: fence.clone(), ..env.deps() };
    let mut st = BulkExportRunStatus::default();
    let mut saved = Saved::default();
    let (tx, _rx) = watch::channel(st.clone());
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        run::drive(&env.inputs("r1", None), &deps, &mut st, &mut saved, &tx, &CancellationToken::new()),
    )
    .await
    .expect("drive returns once the fence lapses");
    assert!(matches!(r, Err(run::DriveError::Fenced)), "{r:?}");
    assert!(!st.phase.is_finished(), "the run is not failed by a process that may not act: {:?}", st.phase);
    let polls = env.source.log().polls;
    assert!(polls >= 1, "it was exporting");
    tokio::time::sleep(Duration::from_millis(300)).await; // nothing to await: proving silence
    let log = env.source.log();
    // (a poll sent just before the fence lapsed may reach the source just after drive returned)
    assert!(log.polls <= polls + 1, "no poll after the fence lapsed: {} then {}", polls, log.polls);
    assert!(log.status_deletes.is_empty(), "the export was not released: the new leader resumes it");
    // a fence that never held: the run does not even start
    let mut st = BulkExportRunStatus::default();
    let deps = run::Deps { fence: fhirsync::fence::Fence::lease(), ..env.deps() };
    let r = run::drive(&env.inputs("r2", None), &deps, &mut st, &mut Saved::default(), &tx, &CancellationToken::new())
        .await;
    assert!(matches!(r, Err(run::DriveError::Fenced)), "{r:?}");
    assert_eq!(env.source.log().kickoffs.len(), 1, "no kick-off from a standby");
}
