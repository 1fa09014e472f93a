//! End to end: the founding document's push recipe with a real HAPI FHIR JPA server (8.8.0, from HAPI's
//! libraries: tests/peers/hapi). `fhirsync run` on the test API server keeps rest-hook Subscriptions
//! on HAPI that PUT every change straight into Pathling (`delivery: Direct`); the target is the
//! Pathling 3 emulator (real Pathling cannot be had from Maven Central here). Creates, an update and
//! a delete at HAPI reach Pathling; deleting the sync removes the Subscriptions from HAPI.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use fhirsync::api::FhirSubscriptionSync;
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
async fn hapi_pushes_changes_directly_into_pathling() {
    let _g = SERIAL.lock().await;
    let hapi = Hapi::start(&[]).await;
    let client = cluster::client().await;
    cluster::install_crds(&client).await;
    let ns = cluster::namespace("hapi-direct");
    let api: Api<FhirSubscriptionSync> = Api::namespaced(client, &ns);
    let pathling = FakePathling::start(PathlingConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let _op = Operator::start(&ns, dir.path(), &[]);
    let m = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
        "metadata": {"name": "hapi", "namespace": ns},
        "spec": {"source": {"url": hapi.base}, "criteria": ["Patient?", "Observation?"],
                 "endpoint": pathling.base, "sendDeletes": true, "verifyInterval": "2s"}});
    api.patch("hapi", &PatchParams::apply("e2e").force(), &Patch::Apply(&m)).await.unwrap();
    // HAPI turns Subscriptions active asynchronously (about 5 s)
    let o = wait_for(&api, "hapi", 120, "both Subscriptions active at HAPI", |o| fss_all_active(o, 2)).await;
    let uid = o.uid().unwrap();

    hapi.put(&[json!({"resourceType": "Patient", "id": "a1", "active": true})]).await;
    hapi.put(&[json!({"resourceType": "Observation", "id": "ob1", "status": "final",
                      "code": {"text": "weight"}, "subject": {"reference": "Patient/a1"}})])
        .await;
    holds(&pathling, "Patient", &["a1"]).await;
    holds(&pathling, "Observation", &["ob1"]).await;

    // an update arrives as a PUT of the whole resource
    hapi.put(&[json!({"resourceType": "Patient", "id": "a1", "active": false})]).await;
    let mut rx = pathling.requests();
    let r = tokio::time::timeout(Duration::from_secs(90), async {
        while pathling.get("Patient", "a1").is_none_or(|p| p["active"] != false) {
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(r.is_ok(), "the update never reached Pathling: {:?}", pathling.get("Patient", "a1"));
    // a delete arrives (fhirsync sets HAPI's send-delete extension)
    hapi.delete("Observation", "ob1").await;
    holds(&pathling, "Observation", &[]).await;
    assert_eq!(pathling.ids("Patient"), hapi.ids("Patient").await.into_iter().collect::<Vec<_>>());

    // deleting the sync removes its Subscriptions from HAPI
    api.delete("hapi", &DeleteParams::default()).await.unwrap();
    wait_deleted(&api, "hapi", &uid, 60).await;
    assert!(hapi.ids("Subscription").await.is_empty(), "Subscriptions left at HAPI");
}
