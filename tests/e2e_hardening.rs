//! End to end, the operator against careless input and awkward lifecycles: durations that would
//! overflow, names longer than a label, a run whose sync is deleted first.

mod support;

use fhirsync::api::{BulkExportRun, FhirSubscriptionSync, Phase};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::cluster::{self, SERIAL, wait_deleted, wait_for};
use support::fhir_server::{FakeFhirServer, ServerConfig};
use support::source::SourceConfig;
use support::world::{World, data, phase, ready};

fn fss(ns: &str, name: &str, source: &str, verify: &str) -> serde_json::Value {
    json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"source": {"url": source}, "criteria": ["Patient?"], "endpoint": "http://pathling.example/fhir",
                 "verifyInterval": verify}})
}

#[tokio::test]
async fn durations_that_would_overflow_are_refused_everywhere() {
    let _g = SERIAL.lock().await;
    let w = World::new("durations", data()).await;
    // the CRD refuses what cannot be a sane duration
    for (field, value) in [("runTimeout", "18446744073709551615s1s"), ("sinceOverlap", "144115188075855872d")] {
        let bad = w.sync_manifest("bad", json!({ field: value }));
        let err = w.syncs.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
    let client = cluster::client().await;
    let fss_api: Api<FhirSubscriptionSync> = Api::namespaced(client, &w.ns);
    let source = FakeFhirServer::start(ServerConfig::default()).await;
    let bad = fss(&w.ns, "bad", &source.base, "18446744073709551615s1s");
    let err = fss_api.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("verifyInterval"), "{err}");

    // what passes the CRD's shape but exceeds a range is InvalidSpec, not a crash
    let mut op = w.operator();
    w.apply_sync("long", json!({"runTimeout": "400d"})).await;
    let s = wait_for(&w.syncs, "long", 30, "InvalidSpec", |s| ready(s).is_some_and(|r| r.1 == "InvalidSpec")).await;
    let c = s.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(c.message.contains("spec.runTimeout"), "{}", c.message);
    assert!(w.runs_of("long").await.is_empty());
    let f = fss(&w.ns, "slow", &source.base, "9999999d");
    fss_api.patch("slow", &PatchParams::apply("e2e").force(), &Patch::Apply(&f)).await.unwrap();
    let o = wait_for(&fss_api, "slow", 30, "InvalidSpec", |o| {
        o.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "InvalidSpec"))
    })
    .await;
    // deleting it is not a crash loop: the finalizer goes and the operator lives on
    fss_api.delete("slow", &DeleteParams::default()).await.unwrap();
    wait_deleted(&fss_api, "slow", &o.uid().unwrap(), 30).await;
    assert!(op.is_running(), "the operator crashed:\n{}", op.logs());
}

#[tokio::test]
async fn a_sync_with_a_name_longer_than_a_label_gets_runs_and_conditions() {
    let _g = SERIAL.lock().await;
    let w = World::new("longname", data()).await;
    let _op = w.operator();
    let name = format!("hospital-{}", "a".repeat(80));
    w.apply_sync(&name, json!({})).await;
    let s = wait_for(&w.syncs, &name, 60, "Ready", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    assert_eq!(s.status.unwrap().last_run_resources, Some(2241));
    let runs = w.runs_of(&name).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(phase(&runs[0]), Phase::Succeeded);
    assert!(runs[0].name_any().len() <= 253);
}

#[tokio::test]
async fn a_run_whose_sync_was_deleted_first_still_cleans_up() {
    let _g = SERIAL.lock().await;
    let w = World::new("orphan", SourceConfig { polls_before_done: 1_000_000, ..data() }).await;
    let _op = w.operator();
    w.apply_sync("hospital-e", json!({})).await;
    let run = wait_for(&w.runs, "hospital-e-g1", 60, "exporting", |r: &BulkExportRun| {
        phase(r) == Phase::Exporting && r.finalizers().iter().any(|f| f == "fhirsync.io/run-cleanup")
    })
    .await;
    assert!(run.spec.template.is_some(), "the run carries its own template");
    w.source.wait_for(|l| l.polls >= 1).await;
    // what garbage collection does: the sync goes first, then its run
    w.syncs.delete("hospital-e", &DeleteParams::default()).await.unwrap();
    w.runs.delete("hospital-e-g1", &DeleteParams::default()).await.unwrap();
    wait_deleted(&w.runs, "hospital-e-g1", &run.uid().unwrap(), 30).await;
    let log = w.source.log();
    assert_eq!(log.status_deletes.len(), 1, "the export was released on the source");
    assert_eq!(log.active_exports, 0);
    assert!(!w.dir.path().join("staging").join(&w.ns).join("hospital-e-g1").exists());
}

#[tokio::test]
async fn an_edit_during_a_run_wins_over_the_run_of_the_old_spec() {
    let _g = SERIAL.lock().await;
    let w = World::new("edit-mid-run", data()).await;
    let _op = w.operator();
    w.apply_sync("ward-e", json!({"export": {"types": ["Patient"]}})).await;
    wait_for(&w.syncs, "ward-e", 60, "first run Ready", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    // the second run (incremental, Patient only) is in flight when export.types gains Observation
    w.source.configure(|c| c.polls_before_done = 1_000_000);
    w.syncs
        .patch(
            "ward-e",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"fhirsync.io/run-now": "1"}}})),
        )
        .await
        .unwrap();
    let polls = w.source.log().polls;
    w.source.wait_for(|l| l.kickoffs.len() == 2 && l.polls > polls).await;
    let old = w.runs_of("ward-e").await.into_iter().find(|r| !phase(r).is_finished()).expect("run in flight");
    w.apply_sync("ward-e", json!({"export": {"types": ["Patient", "Observation"]}})).await;
    wait_for(&w.syncs, "ward-e", 60, "the edit reset the watermark", |s| {
        s.status.as_ref().is_some_and(|st| st.watermark.is_none())
    })
    .await;
    // the run of the old spec finishes after the edit
    w.source.configure(|c| c.polls_before_done = 0);
    wait_for(&w.runs, &old.name_any(), 60, "old run finished", |r| phase(r) == Phase::Succeeded).await;
    w.source.wait_for(|l| l.kickoffs.len() >= 3).await;
    let third = w.source.log().kickoffs[2].clone();
    assert_eq!(third.param("_type").as_deref(), Some("Patient,Observation"));
    assert_eq!(
        third.param("_since"),
        None,
        "the edited spec's first run is a full export: every older Observation comes"
    );
    let s = wait_for(&w.syncs, "ward-e", 60, "the edited spec's run folded", |s| {
        s.status
            .as_ref()
            .and_then(|st| st.last_successful_run.as_ref())
            .is_some_and(|l| l.resources.contains_key("Observation"))
    })
    .await;
    assert!(s.status.unwrap().watermark.is_some(), "the full export of the new spec moves the watermark");
    assert_eq!(w.pathling.counts().get("Observation"), Some(&2217));
}
