//! End to end: FhirSubscriptionSync reconciled by `fhirsync run` against the real test API server, with
//! a HAPI-like source that really delivers into the Pathling emulator.

mod support;

use fhirsync::api::FhirSubscriptionSync;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::cluster::{self, Operator, SERIAL, wait_deleted, wait_for};
use support::fhir_server::{FakeFhirServer, ServerConfig};
use support::pathling::{FakePathling, PathlingConfig};

struct World {
    ns: String,
    source: FakeFhirServer,
    pathling: FakePathling,
    dir: tempfile::TempDir,
    api: Api<FhirSubscriptionSync>,
}

impl World {
    async fn new(test: &str, cfg: ServerConfig) -> Self {
        let client = cluster::client().await;
        cluster::install_crds(&client).await;
        let ns = cluster::namespace(test);
        Self {
            api: Api::namespaced(client, &ns),
            ns,
            source: FakeFhirServer::start(cfg).await,
            pathling: FakePathling::start(PathlingConfig::default()).await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn operator(&self) -> Operator {
        Operator::start(&self.ns, self.dir.path(), &[])
    }

    async fn apply(&self, name: &str, criteria: &[&str]) {
        let m = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {"source": {"url": self.source.base}, "criteria": criteria, "endpoint": self.pathling.base,
                     "sendDeletes": true, "verifyInterval": "1s"}});
        self.api.patch(name, &PatchParams::apply("e2e").force(), &Patch::Apply(&m)).await.expect("apply fss");
    }

    fn criteria_on_source(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.source.subscriptions().iter().map(|s| s["criteria"].as_str().unwrap().to_string()).collect();
        v.sort();
        v
    }
}

use support::cluster::{fss_all_active as all_active, fss_cond as cond};

#[tokio::test]
async fn subscriptions_follow_the_spec_survive_restarts_and_are_cleaned_up() {
    let _g = SERIAL.lock().await;
    let w = World::new("fss", ServerConfig::default()).await;
    let mut op = w.operator();
    w.apply("feed", &["Patient?", "Observation?status=final"]).await;
    let o = wait_for(&w.api, "feed", 30, "all active", |o| all_active(o, 2)).await;
    let uid = o.uid().unwrap();
    let subs = w.source.subscriptions();
    assert_eq!(subs.len(), 2);
    for s in &subs {
        assert_eq!(s["meta"]["tag"][0]["system"], "https://fhirsync.io/owner");
        assert_eq!(s["meta"]["tag"][0]["code"], format!("{}/feed/{uid}", w.ns).as_str());
        assert_eq!(s["channel"]["payload"], "application/fhir+json");
    }
    let st = o.status.unwrap();
    assert!(st.subscriptions.iter().all(|s| s.status == "active" && s.id.is_some() && s.last_verified.is_some()));
    assert_eq!(st.fhir_version.as_deref(), Some("4.0.1"));

    // a change on the source reaches Pathling
    let http = reqwest::Client::new();
    http.put(format!("{}/Patient/p7", w.source.base))
        .json(&json!({"resourceType":"Patient","id":"p7"}))
        .send()
        .await
        .unwrap();
    w.pathling.wait_for(|l| l.puts.contains(&"Patient/p7".to_string())).await;

    // criteria change: one removed, one added
    w.apply("feed", &["Patient?", "Condition?"]).await;
    wait_for(&w.api, "feed", 30, "new criteria active", |o| {
        all_active(o, 2) && o.status.as_ref().unwrap().subscriptions.iter().any(|s| s.criteria == "Condition?")
    })
    .await;
    assert_eq!(w.criteria_on_source(), vec!["Condition?".to_string(), "Patient?".to_string()]);

    // an edited endpoint updates the same Subscriptions in place (PUT), adding none
    let ids: Vec<String> = w.source.subscriptions().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    let creates = w.source.log().sub_creates;
    let moved = format!("{}/", w.pathling.base);
    let m = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
        "metadata": {"name": "feed", "namespace": w.ns},
        "spec": {"source": {"url": w.source.base}, "criteria": ["Patient?", "Condition?"], "endpoint": moved,
                 "sendDeletes": true, "verifyInterval": "1s"}});
    w.api.patch("feed", &PatchParams::apply("e2e").force(), &Patch::Apply(&m)).await.unwrap();
    let moved2 = moved.clone();
    w.source
        .wait_for(move |_, subs| subs.len() == 2 && subs.iter().all(|s| s["channel"]["endpoint"] == moved2.as_str()))
        .await;
    let after: Vec<String> = w.source.subscriptions().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, after);
    assert_eq!(w.source.log().sub_creates, creates);
    wait_for(&w.api, "feed", 30, "active after the update", |o| all_active(o, 2)).await;

    // deleted behind the operator's back: recreated
    let victim = w.source.subscriptions().iter().find(|s| s["criteria"] == "Condition?").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    w.source.drop_subscription(&victim);
    wait_for(&w.api, "feed", 30, "recreated", |o| {
        all_active(o, 2) && o.status.as_ref().unwrap().subscriptions.iter().all(|s| s.id.as_deref() != Some(&victim))
    })
    .await;
    assert_eq!(w.criteria_on_source().len(), 2);

    // restart at any point: no duplicates
    let creates = w.source.log().sub_creates;
    op.kill();
    let _op2 = w.operator();
    let searches = w.source.log().searches;
    w.source.wait_for(|l, _| l.searches >= searches + 2).await; // the new process verified twice
    assert_eq!(w.source.log().sub_creates, creates, "nothing created again after the restart");
    assert_eq!(w.criteria_on_source().len(), 2);

    // deleting the resource removes its Subscriptions from the source
    w.api.delete("feed", &DeleteParams::default()).await.unwrap();
    wait_deleted(&w.api, "feed", &uid, 30).await;
    assert!(w.source.subscriptions().is_empty());
}

#[tokio::test]
async fn a_source_that_is_down_blocks_cleanup_until_it_returns() {
    let _g = SERIAL.lock().await;
    let w = World::new("fss-down", ServerConfig::default()).await;
    let _op = w.operator();
    w.apply("feed", &["Patient?"]).await;
    let o = wait_for(&w.api, "feed", 30, "active", |o| all_active(o, 1)).await;
    w.source.configure(|c| c.down = true);
    w.api.delete("feed", &DeleteParams::default()).await.unwrap();
    let o2 = wait_for(&w.api, "feed", 30, "CleanupBlocked", |o| {
        cond(o, "Degraded").is_some_and(|c| c.1 == "CleanupBlocked")
    })
    .await;
    let msg = cond(&o2, "Degraded").unwrap().2;
    assert!(msg.contains("kubectl patch fss feed") && msg.contains("finalizers"), "{msg}");
    assert_eq!(w.source.subscriptions().len(), 1);
    w.source.configure(|c| c.down = false);
    wait_deleted(&w.api, "feed", &o.uid().unwrap(), 30).await;
    assert!(w.source.subscriptions().is_empty());
}

#[tokio::test]
async fn unsupported_and_failing_sources_are_conditions_not_crash_loops() {
    let _g = SERIAL.lock().await;
    let w = World::new("fss-bad", ServerConfig { fhir_version: "5.0.0".into(), ..Default::default() }).await;
    let _op = w.operator();
    w.apply("r5", &["Patient?"]).await;
    let o = wait_for(&w.api, "r5", 30, "unsupported", |o| cond(o, "Ready").is_some_and(|c| c.1 == "SourceUnsupported"))
        .await;
    assert!(cond(&o, "Ready").unwrap().2.contains("topic-based"));
    assert!(w.source.subscriptions().is_empty());

    // a Subscription the source puts in error: Ready=False, the error shown, re-requested
    w.source.configure(|c| c.fhir_version = "4.0.1".into());
    w.apply("r5", &["Patient?"]).await;
    wait_for(&w.api, "r5", 30, "active", |o| all_active(o, 1)).await;
    let id = w.source.subscriptions()[0]["id"].as_str().unwrap().to_string();
    w.source.configure(|c| c.activate = false);
    w.source.set_status(&id, "error", "delivery failed: HTTP 401");
    let o =
        wait_for(&w.api, "r5", 30, "error reported", |o| cond(o, "Ready").is_some_and(|c| c.1 == "SubscriptionError"))
            .await;
    let st = o.status.clone().unwrap();
    assert_eq!(st.subscriptions[0].error, "delivery failed: HTTP 401");
    assert_eq!(st.active_subscriptions.as_deref(), Some("0/1"));
    assert!(cond(&o, "Degraded").is_some_and(|c| c.0 == "True"));
    w.source.configure(|c| c.activate = true);
    wait_for(&w.api, "r5", 60, "re-requested and active again", |o| all_active(o, 1)).await;
    assert_eq!(w.source.subscriptions()[0]["id"], id.as_str());
}
