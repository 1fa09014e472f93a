//! End to end: the founding document's push recipe with a real HAPI FHIR JPA server (8.8.0, from HAPI's
//! libraries: tests/peers/hapi). `fhirsync run` on the test API server keeps rest-hook Subscriptions
//! on HAPI that PUT every change straight into Pathling (`delivery: Direct`); the target is the
//! Pathling 3 emulator (real Pathling cannot be had from Maven Central here) — and the same through
//! fhirsync's relay (`delivery: Relay`). Creates, updates and deletes at HAPI reach Pathling both
//! ways; the operator killed and restarted while HAPI changes resources loses nothing and makes no
//! second Subscription; a Subscription deleted at HAPI comes back; deleting the syncs removes the
//! Subscriptions from HAPI. And Pathling down for two minutes
//! under Direct push: HAPI drops what it could not deliver, fhirsync's catch-up brings it back.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use fhirsync::api::{BulkExportRun, BulkExportSync, FhirSubscriptionSync};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::cluster::{self, Operator, SERIAL, fss_all_active, wait_deleted, wait_for};
use support::hapi::Hapi;
use support::pathling::{FakePathling, PathlingConfig};

/// Waits until Pathling's ids of `t` are `want` (woken by each request it gets).
async fn holds(p: &FakePathling, t: &str, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let mut rx = p.requests();
    let r = tokio::time::timeout(Duration::from_secs(90), async {
        while p.ids(t).into_iter().collect::<BTreeSet<_>>() != want {
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(r.is_ok(), "Pathling's {t} never became {want:?}: {:?}", p.ids(t));
}

#[tokio::test]
async fn hapi_pushes_changes_into_pathling_directly_and_through_the_relay() {
    let _g = SERIAL.lock().await;
    let hapi = Hapi::start(&[]).await;
    let client = cluster::client().await;
    cluster::install_crds(&client).await;
    let ns = cluster::namespace("hapi-push");
    let api: Api<FhirSubscriptionSync> = Api::namespaced(client, &ns);
    // Patients go Direct into one Pathling; Observations through fhirsync's relay into another
    let direct = FakePathling::start(PathlingConfig::default()).await;
    let relayed = FakePathling::start(PathlingConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let args = Operator::relay_args(dir.path());
    let mut op = Operator::start_with(&ns, dir.path(), &args);
    let fss = |name: &str, spec: serde_json::Value| {
        json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
               "metadata": {"name": name, "namespace": ns}, "spec": spec})
    };
    let d = fss(
        "direct",
        json!({"source": {"url": hapi.base}, "criteria": ["Patient?"], "endpoint": direct.base,
                                 "sendDeletes": true, "verifyInterval": "2s"}),
    );
    let r = fss(
        "relay",
        json!({"source": {"url": hapi.base}, "criteria": ["Observation?"], "delivery": "Relay",
                                "target": {"url": relayed.base}, "sendDeletes": true, "verifyInterval": "2s"}),
    );
    for (name, m) in [("direct", &d), ("relay", &r)] {
        api.patch(name, &PatchParams::apply("e2e").force(), &Patch::Apply(m)).await.unwrap();
    }
    // HAPI turns Subscriptions active asynchronously (about 5 s)
    let od = wait_for(&api, "direct", 120, "the Direct Subscription active", |o| fss_all_active(o, 1)).await;
    let or = wait_for(&api, "relay", 120, "the Relay Subscription active", |o| fss_all_active(o, 1)).await;

    hapi.put(&[json!({"resourceType": "Patient", "id": "a1", "active": true})]).await;
    hapi.put(&[json!({"resourceType": "Observation", "id": "ob1", "status": "final",
                      "code": {"text": "weight"}, "subject": {"reference": "Patient/a1"}})])
        .await;
    holds(&direct, "Patient", &["a1"]).await;
    holds(&relayed, "Observation", &["ob1"]).await;
    assert!(relayed.ids("Patient").is_empty() && direct.ids("Observation").is_empty(), "each sync its own criteria");

    // updates arrive as PUTs of the whole resource
    hapi.put(&[json!({"resourceType": "Patient", "id": "a1", "active": false})]).await;
    hapi.put(&[json!({"resourceType": "Observation", "id": "ob1", "status": "amended",
                      "code": {"text": "weight"}, "subject": {"reference": "Patient/a1"}})])
        .await;
    let mut rx = (direct.requests(), relayed.requests());
    let r = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            let a1 = direct.get("Patient", "a1").is_some_and(|p| p["active"] == false);
            let ob1 = relayed.get("Observation", "ob1").is_some_and(|o| o["status"] == "amended");
            if a1 && ob1 {
                return;
            }
            tokio::select! { _ = rx.0.changed() => {}, _ = rx.1.changed() => {} }
        }
    })
    .await;
    assert!(r.is_ok(), "updates: {:?} {:?}", direct.get("Patient", "a1"), relayed.get("Observation", "ob1"));
    // the operator killed while HAPI changes resources, then restarted: HAPI delivers Direct without
    // it, retries the relay's until the receiver is back; nothing lost, no duplicate Subscription
    op.kill();
    hapi.put(&[json!({"resourceType": "Patient", "id": "a2", "active": true})]).await;
    hapi.put(&[json!({"resourceType": "Observation", "id": "ob2", "status": "final",
                      "code": {"text": "height"}, "subject": {"reference": "Patient/a2"}})])
        .await;
    let _op = Operator::start_with(&ns, dir.path(), &args);
    holds(&direct, "Patient", &["a1", "a2"]).await;
    holds(&relayed, "Observation", &["ob1", "ob2"]).await;
    wait_for(&api, "direct", 60, "still active after the restart", |o| fss_all_active(o, 1)).await;
    assert_eq!(hapi.ids("Subscription").await.len(), 2, "one Subscription per sync after the restart");

    // a Subscription deleted at HAPI behind the operator's back comes back, and delivers
    let gone = od.status.as_ref().unwrap().subscriptions[0].id.clone().unwrap();
    hapi.delete("Subscription", &gone).await;
    wait_for(&api, "direct", 60, "the deleted Subscription made again", |o| {
        fss_all_active(o, 1) && o.status.as_ref().unwrap().subscriptions[0].id.as_deref() != Some(gone.as_str())
    })
    .await;
    assert_eq!(hapi.ids("Subscription").await.len(), 2);
    hapi.put(&[json!({"resourceType": "Patient", "id": "a3", "active": true})]).await;
    holds(&direct, "Patient", &["a1", "a2", "a3"]).await;

    // deletes arrive (fhirsync sets HAPI's send-delete extension); HAPI keeps referential
    // integrity: the Observation goes before the Patient it refers to
    hapi.delete("Observation", "ob1").await;
    hapi.delete("Patient", "a1").await;
    holds(&direct, "Patient", &["a2", "a3"]).await;
    holds(&relayed, "Observation", &["ob2"]).await;

    // deleting the syncs removes their Subscriptions from HAPI
    for (name, o) in [("direct", &od), ("relay", &or)] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
        wait_deleted(&api, name, &o.uid().unwrap(), 60).await;
    }
    assert!(hapi.ids("Subscription").await.is_empty(), "Subscriptions left at HAPI");
}

/// HAPI retries a failed delivery for about a minute, then drops it, and its Subscription stays
/// `active`: nothing at HAPI says a change was lost. With `catchUp`, fhirsync watches Pathling, and
/// when it answers again after two minutes down, a catch-up run brings what HAPI dropped.
#[tokio::test]
async fn direct_push_loses_nothing_while_pathling_is_down_for_two_minutes() {
    let _g = SERIAL.lock().await;
    let hapi = Hapi::start(&[]).await;
    let client = cluster::client().await;
    cluster::install_crds(&client).await;
    let ns = cluster::namespace("hapi-outage");
    let api: Api<FhirSubscriptionSync> = Api::namespaced(client.clone(), &ns);
    let bes: Api<BulkExportSync> = Api::namespaced(client.clone(), &ns);
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let pathling = FakePathling::start(PathlingConfig {
        roots: vec![("file:///usr/share/staging".into(), staging.clone())],
        ..Default::default()
    })
    .await;
    let _op = Operator::start(&ns, dir.path(), &[]);
    let b = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportSync",
        "metadata": {"name": "catch-up", "namespace": ns},
        "spec": {"source": {"url": hapi.base, "maxPollInterval": "1s"}, "target": {"url": pathling.base},
                 "export": {"types": ["Patient"]}, "suspend": true,
                 "staging": {"volume": {"path": staging.display().to_string(), "pathlingPath": "file:///usr/share/staging"}}}});
    bes.patch("catch-up", &PatchParams::apply("e2e").force(), &Patch::Apply(&b)).await.unwrap();
    let d = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
        "metadata": {"name": "direct", "namespace": ns},
        "spec": {"source": {"url": hapi.base}, "criteria": ["Patient?"], "endpoint": pathling.base,
                 "sendDeletes": true, "verifyInterval": "2s",
                 "catchUp": {"bulkExportSyncRef": {"name": "catch-up"}}}});
    api.patch("direct", &PatchParams::apply("e2e").force(), &Patch::Apply(&d)).await.unwrap();
    wait_for(&api, "direct", 120, "the Direct Subscription active", |o| fss_all_active(o, 1)).await;
    hapi.put(&[json!({"resourceType": "Patient", "id": "a1", "active": true})]).await;
    holds(&pathling, "Patient", &["a1"]).await;

    // Pathling goes down; meanwhile a create and an update at HAPI
    pathling.configure(|c| c.down = true);
    hapi.put(&[json!({"resourceType": "Patient", "id": "a2", "active": true})]).await;
    hapi.put(&[json!({"resourceType": "Patient", "id": "a1", "active": false})]).await;
    let o = wait_for(&api, "direct", 60, "TargetUnavailable", |o| {
        o.status.as_ref().is_some_and(|s| s.target_unavailable_since.is_some())
    })
    .await;
    assert_eq!(cluster::fss_cond(&o, "Degraded").map(|c| c.1), Some("TargetUnavailable".to_string()));
    // the outage under test: two minutes, longer than HAPI's retries
    tokio::time::sleep(Duration::from_secs(100)).await;
    let tried = pathling.log().refused_while_down;
    tokio::time::sleep(Duration::from_secs(20)).await;
    eprintln!(
        "requests refused while Pathling was down: {tried} after 100 s, {} after 120 s (HAPI's retries and fhirsync's probes)",
        pathling.log().refused_while_down
    );
    assert!(tried > 2, "HAPI tried to deliver: {tried}");
    assert!(pathling.get("Patient", "a2").is_none(), "nothing reached Pathling while it was down");
    let o = api.get("direct").await.unwrap();
    assert!(fss_all_active(&o, 1), "HAPI's Subscription stays active: {:?}", o.status);

    // back: a catch-up run brings what HAPI dropped
    pathling.configure(|c| c.down = false);
    let mut rx = pathling.requests();
    let r = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            let a1 = pathling.get("Patient", "a1").is_some_and(|p| p["active"] == false);
            if a1 && pathling.get("Patient", "a2").is_some() {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(r.is_ok(), "after the outage: {:?}", pathling.ids("Patient"));
    let o = wait_for(&api, "direct", 60, "the outage over", |o| {
        o.status.as_ref().is_some_and(|s| s.target_unavailable_since.is_none())
    })
    .await;
    assert_eq!(cluster::fss_cond(&o, "Degraded").map(|c| c.0), Some("False".to_string()));
    let runs = Api::<BulkExportRun>::namespaced(client, &ns).list(&Default::default()).await.unwrap();
    assert_eq!(runs.items.len(), 1, "one catch-up run for one outage");
}
