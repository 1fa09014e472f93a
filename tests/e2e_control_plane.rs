//! End to end, a quiet control plane: a finished run is never started again (not after a restart,
//! not from a cached copy), and a FhirSubscriptionSync that verifies and finds nothing new writes
//! nothing.

mod support;

use fhirsync::api::{BulkExportRun, FhirSubscriptionSync, Phase};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::cluster::{self, Operator, SERIAL, wait_for};
use support::fhir_server::{FakeFhirServer, ServerConfig};
use support::world::{World, data, phase, ready};

async fn metric(op: &Operator, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", op.admin)).await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn wait_ready(op: &Operator) {
    for _ in 0..400 {
        if let Ok(r) = reqwest::get(format!("{}/readyz", op.admin)).await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // an HTTP endpoint: nothing to watch
    }
    panic!("operator never ready:\n{}", op.logs());
}

#[tokio::test]
async fn a_finished_run_is_never_started_again() {
    let _g = SERIAL.lock().await;
    let w = World::new("finished", data()).await;
    let mut op = w.operator();
    w.apply_sync("hospital-q", json!({"schedule": "0 0 1 1 *"})).await;
    let syncs = w.syncs.clone();
    let m = json!({"metadata": {"annotations": {"fhirsync.io/run-now": "1"}}});
    syncs.patch("hospital-q", &PatchParams::default(), &Patch::Merge(&m)).await.unwrap();
    wait_for(&w.syncs, "hospital-q", 60, "Ready", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    let runs = w.runs_of("hospital-q").await;
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(phase(run), Phase::Succeeded);
    let rv = run.resource_version();
    wait_ready(&op).await;
    assert_eq!(metric(&op, "fhirsync_run_tasks_started_total").await, 1.0, "one task for one run");

    // a restart sees the finished run in its first list and leaves it alone
    op.kill();
    let op = w.operator();
    wait_ready(&op).await;
    let m = json!({"spec": {"historyLimit": 5}});
    syncs.patch("hospital-q", &PatchParams::default(), &Patch::Merge(&m)).await.unwrap();
    let gen_ = w.syncs.get("hospital-q").await.unwrap().metadata.generation;
    wait_for(&w.syncs, "hospital-q", 30, "reconciled", |s| {
        s.status.as_ref().and_then(|st| st.observed_generation) == gen_
    })
    .await;
    let runs_api: Api<BulkExportRun> = w.runs.clone();
    let after = runs_api.get(&run.name_any()).await.unwrap();
    assert_eq!(after.resource_version(), rv, "the finished run was not written again");
    assert_eq!(phase(&after), Phase::Succeeded);
    assert_eq!(metric(&op, "fhirsync_run_tasks_started_total").await, 0.0, "no task for a finished run");
    assert_eq!(w.source.log().accepted, 1, "no second export");
    assert_eq!(w.pathling.log().imports.len(), 1, "no second import");
}

#[tokio::test]
async fn subscription_verification_writes_status_only_on_change() {
    let _g = SERIAL.lock().await;
    let client = cluster::client().await;
    cluster::install_crds(&client).await;
    let ns = cluster::namespace("quiet");
    let api: Api<FhirSubscriptionSync> = Api::namespaced(client, &ns);
    let source = FakeFhirServer::start(ServerConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let _op = Operator::start(&ns, dir.path(), &[]);
    let m = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
        "metadata": {"name": "quiet", "namespace": ns},
        "spec": {"source": {"url": source.base}, "criteria": ["Patient?", "Observation?"],
                 "endpoint": "http://pathling.example/fhir", "verifyInterval": "1s"}});
    api.patch("quiet", &PatchParams::apply("e2e").force(), &Patch::Apply(&m)).await.unwrap();
    let o = wait_for(&api, "quiet", 60, "Ready", |o: &FhirSubscriptionSync| {
        o.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await;
    let rv = o.resource_version();
    // three more verifications (each searches the source) find nothing new
    let searches = source.log().searches;
    source.wait_for(|l, _| l.searches >= searches + 3).await;
    let now = api.get("quiet").await.unwrap();
    assert_eq!(now.resource_version(), rv, "verifications that found nothing new wrote nothing");
    // a change is written
    let id = source.subscriptions()[0]["id"].as_str().unwrap().to_string();
    source.set_status(&id, "error", "endpoint refused");
    wait_for(&api, "quiet", 30, "the error shows", |o: &FhirSubscriptionSync| {
        o.status.as_ref().is_some_and(|s| s.subscriptions.iter().any(|x| x.status == "error" || x.retries > 0))
    })
    .await;
}
