//! Against a real HAPI FHIR JPA server (8.8.0, built from HAPI's libraries: tests/peers/hapi) as the
//! source of `fhirsync sync-once`; the target is the Pathling 3 emulator (real Pathling cannot be
//! had from Maven Central here). A full sync, then creates, updates and deletes at HAPI and an
//! incremental sync: Pathling holds exactly the ids HAPI holds. HAPI lists no `deleted[]`, so the
//! deletions come from its `_history` (entries `request.url` `Type/id/_history/N`, status 200).
//! Then drift planted in Pathling is found against HAPI's ids and repaired.

mod support;

use std::collections::BTreeSet;

use std::time::{Duration, Instant};

use fhirsync::fhir::bulk::{BulkClient, ExportRequest, Level, Poll};
use fhirsync::fhir::client::{ClientConfig, Error, HttpClient};
use futures::TryStreamExt;
use serde_json::json;
use support::cli::{Cli, s};
use support::hapi::Hapi;
use support::source::SourceConfig;

fn patients(prefix: &str, n: usize) -> Vec<serde_json::Value> {
    // HAPI wants client ids with a letter in them
    (0..n).map(|k| json!({"resourceType": "Patient", "id": format!("{prefix}{k}"), "active": true})).collect()
}

#[tokio::test]
async fn full_then_incremental_sync_from_hapi_keeps_pathling_equal_deletes_included() {
    // HAPI's own testing switch: batch jobs move on at once instead of once a minute
    let hapi = Hapi::start(&["--testpeer.job-fast-tracking=true"]).await;
    hapi.put(&patients("p", 30)).await;
    let c = Cli::with(SourceConfig::default(), support::pathling::PathlingConfig::default()).await;
    let yaml = format!(
        "apiVersion: fhirsync.io/v1alpha1\nkind: BulkExportSync\nmetadata: {{name: hapi, namespace: cli}}\nspec:\n  \
         source: {{url: \"{}\", maxPollInterval: 2s}}\n  export: {{types: [Patient]}}\n  \
         target: {{url: \"{}\"}}\n  sinceOverlap: 0s\n  runTimeout: 15m\n  \
         staging: {{volume: {{path: \"{}\", pathlingPath: \"file:///staging\"}}}}\n",
        hapi.base,
        c.pathling.base,
        c.dir.path().join("staging").display()
    );
    let f = c.dir.path().join("hapi.yaml");
    std::fs::write(&f, yaml).unwrap();
    let args: Vec<String> =
        vec!["sync-once".into(), "-f".into(), s(&f), "--state".into(), s(&c.state()), "--output".into(), "json".into()];
    let run = || async {
        let out = c.run(args.clone()).await;
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "{err}\nHAPI:\n{}", hapi.log());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let equal = || async {
        let got: BTreeSet<String> = c.pathling.ids("Patient").into_iter().collect();
        assert_eq!(got, hapi.ids("Patient").await, "Pathling's Patients differ from HAPI's");
    };

    let first = run().await;
    assert_eq!(first["totalResources"], 30, "{first}");
    equal().await;

    // at HAPI: creates, an update, deletes, and a delete followed by a re-create
    hapi.put(&patients("new", 2)).await;
    hapi.put(&[json!({"resourceType": "Patient", "id": "p1", "active": false})]).await;
    for id in ["p2", "p3", "p4"] {
        hapi.delete("Patient", id).await;
    }
    hapi.put(&[json!({"resourceType": "Patient", "id": "p4", "active": true, "gender": "other"})]).await;

    let second = run().await;
    assert!(second["since"].is_string(), "incremental: {second}");
    assert_eq!(second["deletionSource"], "History", "HAPI lists no deleted[]: {second}");
    assert_eq!(second["deleted"], 2, "p2 and p3; p4 was re-created: {second}");
    equal().await;
    assert_eq!(second["totalResources"], 4, "2 new, 1 updated, 1 re-created: {second}");
    let p1 = c.pathling.get("Patient", "p1").expect("p1");
    assert_eq!(p1["active"], false, "the update reached Pathling");

    // drift planted in Pathling is found against HAPI's ids (HAPI ignores `_elements`: the ids are
    // read from whole resources) and repaired
    c.pathling.remove("Patient", "p5");
    c.pathling.insert("Patient", "ghost", json!({"resourceType": "Patient", "id": "ghost"}));
    let mut verify = args.clone();
    verify.push("--verify".into());
    let out = c.run(verify).await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}\nHAPI:\n{}", hapi.log());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["drift"]["repair"]["state"], "Done", "{summary}");
    assert_eq!(summary["drift"]["inSync"], true, "{summary}");
    equal().await;
}

/// What real HAPI does on the pull side, each row of the README's quirks table asserted on the
/// client fhirsync uses: `Retry-After: 120` on every poll, identical GET kick-offs are separate jobs
/// (fhirsync always sends a query and `Cache-Control: no-cache`), a cancelled job answers 404 (not
/// 202 forever, on 8.8.0), outputs are `Binary/{id}` URLs with `requiresAccessToken: true`, no
/// `count` and no `deleted[]`, served as NDJSON for fhirsync's `Accept` (HAPI hands out the Binary
/// resource itself for `application/fhir+json`), and a release of a finished job is a 404 taken as done.
#[tokio::test]
async fn hapi_pull_quirks_are_what_fhirsync_expects() {
    let hapi = Hapi::start(&["--testpeer.job-fast-tracking=true"]).await;
    hapi.put(&patients("q", 3)).await;
    let http = HttpClient::new(&ClientConfig::new(url::Url::parse(&format!("{}/", hapi.base)).unwrap())).unwrap();
    let bulk = BulkClient::new(http);
    let req = ExportRequest {
        level: Level::System,
        types: vec!["Patient".into()],
        type_filters: vec![],
        elements: vec![],
        since: None,
        until: None,
    };
    let first = bulk.kickoff(&req).await.expect("kick-off");
    assert!(first.contains("$export-poll-status?_jobId="), "{first}");
    let second = bulk.kickoff(&req).await.expect("second kick-off");
    assert_ne!(first, second, "an identical kick-off is a job of its own, not HAPI's cached earlier one");

    match bulk.poll(&first).await.expect("poll") {
        Poll::InProgress { wait, .. } => assert_eq!(wait, Some(Duration::from_secs(120)), "HAPI always says 120 s"),
        Poll::Complete(_) => {} // fast-tracked jobs may be done already
    }

    // a cancelled job: 404 from then on
    bulk.release(&second).await.expect("cancel");
    match bulk.poll(&second).await {
        Err(Error::Status { status: 404, .. }) => {}
        other => panic!("a cancelled job answered {other:?}\n{}", hapi.log()),
    }

    // the finished export
    let deadline = Instant::now() + Duration::from_secs(300);
    let manifest = loop {
        match bulk.poll(&first).await.expect("poll") {
            Poll::Complete(m) => break m,
            Poll::InProgress { .. } => {
                assert!(Instant::now() < deadline, "HAPI's export did not finish in 5 minutes\n{}", hapi.log());
                tokio::time::sleep(Duration::from_secs(2)).await; // HAPI gives no event to await; its batch runs on a timer
            }
        }
    };
    assert!(manifest.requires_access_token, "HAPI says its files need the token");
    assert!(manifest.deleted.is_empty(), "HAPI lists no deleted[]");
    assert_eq!(manifest.output.len(), 1);
    let out = &manifest.output[0];
    assert!(out.url.starts_with(&format!("{}/Binary/", hapi.base)), "{}", out.url);
    assert_eq!(out.count, None, "HAPI gives no count");
    let body: Vec<u8> = bulk
        .download(&out.url, manifest.requires_access_token)
        .await
        .expect("download")
        .map_ok(|b| b.to_vec())
        .try_concat()
        .await
        .expect("read");
    let text = String::from_utf8(body).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 3, "NDJSON, one Patient a line, not a Binary resource: {text:.200}");
    assert!(lines.iter().all(|l| l.contains("\"resourceType\":\"Patient\"")), "{text:.200}");
    bulk.release(&first).await.expect("a release of a finished job (404 at HAPI) counts as done");
}
