//! End to end: FhirSubscriptionSync in `delivery: Relay`, reconciled by `fhirsync run` against the
//! real test API server. The Helios FHIR Server (topic-based, R4 Subscriptions Backport, `id-only`
//! over http) notifies the operator's receiver, which writes into the Pathling emulator; a HAPI-like
//! source does the same with classic rest-hooks, and a Pathling outage starts a catch-up run.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use fhirsync::api::{BulkExportSync, FhirSubscriptionSync};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use support::cluster::{self, Operator, SERIAL, free_port, wait_deleted, wait_for};
use support::fhir_server::{FakeFhirServer, ServerConfig};
use support::helios::Helios;
use support::pathling::{FakePathling, PathlingConfig};

struct World {
    ns: String,
    pathling: FakePathling,
    dir: tempfile::TempDir,
    api: Api<FhirSubscriptionSync>,
    client: kube::Client,
    receiver: String,
    key: std::path::PathBuf,
}

impl World {
    async fn new(test: &str) -> Self {
        let client = cluster::client().await;
        cluster::install_crds(&client).await;
        let ns = cluster::namespace(test);
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("relay.key");
        std::fs::write(&key, "a relay key shared by every replica, 32 bytes or more").unwrap();
        // catch-up runs stage here, where the Pathling emulator reads them
        let roots = vec![("file:///usr/share/staging".into(), dir.path().join("staging"))];
        Self {
            api: Api::namespaced(client.clone(), &ns),
            client,
            ns,
            pathling: FakePathling::start(PathlingConfig { roots, ..Default::default() }).await,
            dir,
            receiver: format!("127.0.0.1:{}", free_port()),
            key,
        }
    }

    fn operator(&self) -> Operator {
        let url = format!("http://{}", self.receiver);
        let key = self.key.display().to_string();
        Operator::start(
            &self.ns,
            self.dir.path(),
            &["--receiver-addr", &self.receiver, "--receiver-url", &url, "--relay-key-file", &key],
        )
    }

    /// An operator with no `--relay-key-file`: its credentials are new at every start.
    fn operator_without_key(&self) -> Operator {
        let url = format!("http://{}", self.receiver);
        Operator::start(&self.ns, self.dir.path(), &["--receiver-addr", &self.receiver, "--receiver-url", &url])
    }

    async fn apply(&self, name: &str, source: &str, criteria: &[&str], extra: Value) {
        let mut spec = json!({"source": {"url": source}, "delivery": "Relay", "target": {"url": self.pathling.base},
                              "criteria": criteria, "sendDeletes": true, "verifyInterval": "2s"});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        let m = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec});
        self.api.patch(name, &PatchParams::apply("e2e").force(), &Patch::Apply(&m)).await.expect("apply fss");
    }

    async fn has(&self, t: &str, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let t2 = t.to_string();
        let p = self.pathling.clone();
        let w2 = want.clone();
        tokio::time::timeout(Duration::from_secs(60), async move {
            loop {
                if p.ids(&t2).into_iter().collect::<BTreeSet<_>>() == w2 {
                    return;
                }
                p.wait_for(|_| true).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("Pathling's {t} never became {want:?}: {:?}", self.pathling.ids(t)));
    }
}

use support::cluster::{fss_all_active as all_active, fss_cond as cond};

async fn search(base: &str, t: &str) -> Vec<Value> {
    let b: Value = reqwest::get(format!("{base}/{t}?_count=100")).await.unwrap().json().await.unwrap();
    b["entry"].as_array().cloned().unwrap_or_default().into_iter().map(|e| e["resource"].clone()).collect()
}

#[tokio::test]
async fn helios_pushes_through_the_relay_across_a_restart_and_is_cleaned_up() {
    let _g = SERIAL.lock().await;
    let helios = Helios::start().await;
    let w = World::new("relay-helios").await;
    let mut op = w.operator();
    w.apply("feed", &helios.base, &["Patient?", "Observation?status=final"], json!({})).await;
    let o = wait_for(&w.api, "feed", 60, "both topic Subscriptions active", |o| all_active(o, 2)).await;
    let uid = o.uid().unwrap();
    let st = o.status.clone().unwrap();
    assert!(st.subscriptions.iter().all(|s| s.kind == "topic" && s.topic.is_some()), "{:?}", st.subscriptions);
    let subs = search(&helios.base, "Subscription").await;
    assert_eq!(subs.len(), 2);
    assert!(subs.iter().all(|s| s["channel"]["endpoint"] == format!("http://{}/fss/{}/feed", w.receiver, w.ns)));

    // creates, updates and a delete on Helios reach Pathling; the filter holds
    helios.put(&[json!({"resourceType": "Patient", "id": "p1", "active": true})]).await;
    helios.put(&[json!({"resourceType": "Patient", "id": "p2", "active": true})]).await;
    helios
        .put(&[json!({"resourceType": "Observation", "id": "o1", "status": "final",
                     "code": {"text": "weight"}, "subject": {"reference": "Patient/p1"}})])
        .await;
    helios
        .put(&[json!({"resourceType": "Observation", "id": "o2", "status": "preliminary",
                     "code": {"text": "weight"}, "subject": {"reference": "Patient/p1"}})])
        .await;
    w.has("Patient", &["p1", "p2"]).await;
    w.has("Observation", &["o1"]).await;
    helios.delete("Patient", "p2").await;
    w.has("Patient", &["p1"]).await;
    let o = wait_for(&w.api, "feed", 30, "relay counters", |o| {
        o.status.as_ref().and_then(|s| s.relay.as_ref()).is_some_and(|r| r.applied >= 4)
    })
    .await;
    let relay = o.status.unwrap().relay.unwrap();
    assert_eq!(relay.failed, 0, "{relay:?}");
    assert!(!relay.last_event_numbers.is_empty(), "{relay:?}");

    // the operator is down while a change happens: Helios retries (2, 4, 8 s …) until it is back
    op.kill();
    helios.put(&[json!({"resourceType": "Patient", "id": "p3", "active": true})]).await;
    let _op2 = w.operator();
    w.has("Patient", &["p1", "p3"]).await;

    // deleting the sync removes its Subscriptions and the topics fhirsync made
    w.api.delete("feed", &DeleteParams::default()).await.unwrap();
    wait_deleted(&w.api, "feed", &uid, 60).await;
    assert!(search(&helios.base, "Subscription").await.is_empty());
    let topics: Vec<Value> = search(&helios.base, "Basic").await;
    assert!(topics.is_empty(), "{topics:?}");
}

#[tokio::test]
async fn helios_after_a_restart_without_a_relay_key_the_missed_change_comes_by_a_catch_up_at_once() {
    let _g = SERIAL.lock().await;
    let helios = Helios::start().await;
    let w = World::new("relay-newkey").await;
    let bes: Api<BulkExportSync> = Api::namespaced(w.client.clone(), &w.ns);
    let staging = w.dir.path().join("staging");
    let b = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportSync",
        "metadata": {"name": "catch-up", "namespace": w.ns},
        "spec": {"source": {"url": helios.base, "maxPollInterval": "1s"}, "target": {"url": w.pathling.base},
                 "export": {"types": ["Patient"]}, "suspend": true,
                 "staging": {"volume": {"path": staging.display().to_string(), "pathlingPath": "file:///usr/share/staging"}}}});
    bes.patch("catch-up", &PatchParams::apply("e2e").force(), &Patch::Apply(&b)).await.unwrap();
    let mut op = w.operator_without_key();
    w.apply("feed", &helios.base, &["Patient?"], json!({"catchUp": {"bulkExportSyncRef": {"name": "catch-up"}}})).await;
    wait_for(&w.api, "feed", 60, "topic Subscription active", |o| all_active(o, 1)).await;
    helios.put(&[json!({"resourceType": "Patient", "id": "k1", "active": true})]).await;
    w.has("Patient", &["k1"]).await;

    // down while a change happens, back with a new key: Helios retries the change with the old
    // credential (refused) for minutes; fhirsync knows, and brings the change by a catch-up
    op.kill();
    helios.put(&[json!({"resourceType": "Patient", "id": "k2", "active": true})]).await;
    let t = std::time::Instant::now();
    let _op2 = w.operator_without_key();
    w.has("Patient", &["k1", "k2"]).await;
    let took = t.elapsed();
    eprintln!("restart to the missed change in Pathling: {took:?}");
    assert!(took < Duration::from_secs(60), "{took:?}: the catch-up did not start at once");
    wait_for(&w.api, "feed", 30, "catch-up counted", |o| {
        o.status.as_ref().and_then(|s| s.relay.as_ref()).is_some_and(|r| r.catch_ups >= 1)
    })
    .await;
    let runs = kube::Api::<fhirsync::api::BulkExportRun>::namespaced(w.client.clone(), &w.ns);
    let list = runs.list(&Default::default()).await.unwrap();
    assert!(!list.items.is_empty(), "the catch-up ran as a BulkExportRun");
}

#[tokio::test]
async fn classic_rest_hooks_through_the_relay_and_a_catch_up_after_an_outage() {
    let _g = SERIAL.lock().await;
    let source = FakeFhirServer::start(ServerConfig::default()).await;
    let w = World::new("relay-hapi").await;
    let _op = w.operator();
    let bes: Api<BulkExportSync> = Api::namespaced(w.client.clone(), &w.ns);
    let b = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportSync",
        "metadata": {"name": "nightly", "namespace": w.ns},
        "spec": {"source": {"url": source.base}, "target": {"url": w.pathling.base}, "schedule": "0 2 * * *",
                 "suspend": true, "staging": {"volume": {"path": "/s", "pathlingPath": "file:///s"}}}});
    bes.patch("nightly", &PatchParams::apply("e2e").force(), &Patch::Apply(&b)).await.unwrap();
    w.apply("feed", &source.base, &["Patient?"], json!({"catchUp": {"bulkExportSyncRef": {"name": "nightly"}}})).await;
    wait_for(&w.api, "feed", 30, "active", |o| all_active(o, 1)).await;
    let sub = &source.subscriptions()[0];
    assert_eq!(sub["channel"]["endpoint"], format!("http://{}/fss/{}/feed", w.receiver, w.ns));
    assert!(sub["channel"]["header"][0].as_str().unwrap().starts_with("Authorization: Bearer "));

    let http = reqwest::Client::new();
    let put = |id: &str| {
        http.put(format!("{}/Patient/{id}", source.base)).json(&json!({"resourceType": "Patient", "id": id})).send()
    };
    put("a").await.unwrap();
    w.has("Patient", &["a"]).await;
    http.delete(format!("{}/Patient/a", source.base)).send().await.unwrap();
    w.has("Patient", &[]).await;

    // Pathling down: the source is told to come back; its Subscription errs and is re-requested, and
    // once Pathling answers again a catch-up run is started for what the source gave up on
    w.pathling.configure(|c| c.writes_forever = Some(503));
    put("b").await.unwrap();
    source.wait_for(|l, subs| l.deliveries.iter().any(|d| d.status != 200) && subs[0]["status"] == "error").await;
    w.pathling.configure(|c| c.writes_forever = None);
    source.wait_for(|_, subs| subs[0]["status"] == "active").await;
    put("c").await.unwrap();
    w.has("Patient", &["c"]).await;
    let s = wait_for(&bes, "nightly", 30, "catch-up requested", |s| {
        s.annotations().get("fhirsync.io/run-now").is_some_and(|v| v.starts_with("catch-up-"))
    })
    .await;
    assert!(s.annotations().contains_key("fhirsync.io/run-now"));
    let o = wait_for(&w.api, "feed", 30, "catch-up counted", |o| {
        o.status.as_ref().and_then(|s| s.relay.as_ref()).is_some_and(|r| r.catch_ups >= 1)
    })
    .await;
    let relay = o.status.unwrap().relay.unwrap();
    assert!(relay.last_missed.unwrap_or_default().contains("unavailable"));
}

#[tokio::test]
async fn relay_without_a_receiver_says_how_to_configure_one() {
    let _g = SERIAL.lock().await;
    let source = FakeFhirServer::start(ServerConfig::default()).await;
    let w = World::new("relay-none").await;
    let _op = Operator::start(&w.ns, w.dir.path(), &[]);
    w.apply("feed", &source.base, &["Patient?"], json!({})).await;
    let o = wait_for(&w.api, "feed", 30, "ReceiverNotConfigured", |o| {
        cond(o, "Ready").is_some_and(|c| c.1 == "ReceiverNotConfigured")
    })
    .await;
    let msg = cond(&o, "Ready").unwrap().2;
    assert!(msg.contains("--receiver-addr") && msg.contains("--receiver-url"), "{msg}");
    assert!(source.subscriptions().is_empty(), "nothing created that could not deliver");
}

#[tokio::test]
async fn medplum_posts_through_the_relay_and_direct_mode_says_to_use_it() {
    let _g = SERIAL.lock().await;
    let source = FakeFhirServer::start(ServerConfig { medplum: true, ..Default::default() }).await;
    let w = World::new("relay-medplum").await;
    let _op = w.operator();
    // Direct cannot work with Medplum (it POSTs to the bare endpoint): said, not waited on
    let direct = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
        "metadata": {"name": "direct", "namespace": w.ns},
        "spec": {"source": {"url": source.base}, "criteria": ["Patient?"], "endpoint": w.pathling.base}});
    w.api.patch("direct", &PatchParams::apply("e2e").force(), &Patch::Apply(&direct)).await.unwrap();
    let o = wait_for(&w.api, "direct", 30, "SourceUnsupported", |o| {
        cond(o, "Ready").is_some_and(|c| c.1 == "SourceUnsupported")
    })
    .await;
    assert!(cond(&o, "Ready").unwrap().2.contains("delivery: Relay"));

    w.apply("feed", &source.base, &["Patient?"], json!({})).await;
    let o = wait_for(&w.api, "feed", 30, "active", |o| all_active(o, 1)).await;
    assert_eq!(o.status.unwrap().subscriptions[0].kind, "medplum");
    let http = reqwest::Client::new();
    http.put(format!("{}/Patient/m1", source.base))
        .json(&json!({"resourceType": "Patient", "id": "m1"}))
        .send()
        .await
        .unwrap();
    w.has("Patient", &["m1"]).await;
    http.delete(format!("{}/Patient/m1", source.base)).send().await.unwrap();
    w.has("Patient", &[]).await;
    let posts = source.log().deliveries;
    assert!(posts.iter().all(|d| d.method == "POST" && d.status == 200), "{posts:?}");
}
