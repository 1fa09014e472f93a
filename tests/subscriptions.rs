//! Subscriptions on a HAPI-like source delivering into the Pathling emulator: the protocol side of
//! FhirSubscriptionSync, without Kubernetes.

mod support;

use fhirsync::fhir::client::{ClientConfig, HttpClient};
use fhirsync::fhir::subscription::{Desired, SubscriptionClient, Tag};
use serde_json::json;
use support::fhir_server::{FakeFhirServer, ServerConfig};
use support::pathling::{FakePathling, PathlingConfig};

fn client(base: &str) -> SubscriptionClient {
    SubscriptionClient::new(HttpClient::new(&ClientConfig::new(base.parse().unwrap())).unwrap())
}

fn tag() -> Tag {
    Tag { system: "https://fhirsync.io/owner".into(), code: "ns1/feed/uid-1".into() }
}

fn desired(criteria: &[&str], endpoint: &str, headers: &[&str]) -> Vec<Desired> {
    criteria
        .iter()
        .map(|c| Desired {
            criteria: c.to_string(),
            endpoint: endpoint.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            send_deletes: true,
            end: None,
            reason: "test".into(),
            how: fhirsync::fhir::subscription::How::Criteria,
        })
        .collect()
}

#[tokio::test]
async fn changes_on_the_source_arrive_in_pathling_and_deletes_remove_them() {
    let source = FakeFhirServer::start(ServerConfig::default()).await;
    let pathling =
        FakePathling::start(PathlingConfig { bearer: Some("hook-secret".into()), ..Default::default() }).await;
    let c = client(&source.base);
    let out = c
        .reconcile(
            &tag(),
            &desired(&["Patient?", "Observation?status=final"], &pathling.base, &["Authorization: Bearer hook-secret"]),
            |_| true,
        )
        .await
        .unwrap();
    assert_eq!(out.created.len(), 2);
    source.wait_for(|_, subs| subs.len() == 2 && subs.iter().all(|s| s["status"] == "active")).await;

    let http = reqwest::Client::new();
    let put =
        |t: &str, id: &str, body: serde_json::Value| http.put(format!("{}/{t}/{id}", source.base)).json(&body).send();
    put("Patient", "p1", json!({"resourceType":"Patient","id":"p1","active":true})).await.unwrap();
    put("Observation", "o1", json!({"resourceType":"Observation","id":"o1","status":"preliminary"})).await.unwrap();
    put("Observation", "o2", json!({"resourceType":"Observation","id":"o2","status":"final"})).await.unwrap();
    pathling.wait_for(|l| l.puts.len() >= 2).await;
    source.wait_for(|l, _| l.deliveries.len() >= 2).await;
    assert_eq!(pathling.ids("Patient"), vec!["p1"]);
    assert_eq!(pathling.ids("Observation"), vec!["o2"], "only the matching criteria is delivered");
    let d = source.log().deliveries;
    assert!(d.iter().all(|d| d.status == 200 || d.status == 201), "{d:?}");
    assert!(d.iter().all(|d| d.headers == vec!["Authorization: Bearer hook-secret".to_string()]));

    // a delete is mirrored with the HAPI extension
    http.delete(format!("{}/Patient/p1", source.base)).send().await.unwrap();
    pathling.wait_for(|l| l.resource_deletes.contains(&"Patient/p1".to_string())).await;
    assert!(pathling.ids("Patient").is_empty());
}

#[tokio::test]
async fn reconcile_is_idempotent_follows_criteria_and_updates_in_place() {
    let source = FakeFhirServer::start(ServerConfig::default()).await;
    let c = client(&source.base);
    let ep = "http://pathling.example/fhir";
    c.reconcile(&tag(), &desired(&["Patient?", "Encounter?"], ep, &[]), |_| true).await.unwrap();
    // a crash before the status was written: the next pass finds them by tag, creates nothing
    let again = c.reconcile(&tag(), &desired(&["Patient?", "Encounter?"], ep, &[]), |_| true).await.unwrap();
    assert!(again.created.is_empty() && again.updated.is_empty() && again.deleted.is_empty(), "{again:?}");
    assert_eq!(source.subscriptions().len(), 2);
    // one criteria removed, one added
    let out = c.reconcile(&tag(), &desired(&["Patient?", "Condition?"], ep, &[]), |_| true).await.unwrap();
    assert_eq!(out.created, vec!["Condition?".to_string()]);
    assert_eq!(out.deleted.len(), 1);
    let crit: Vec<String> =
        source.subscriptions().iter().map(|s| s["criteria"].as_str().unwrap().to_string()).collect();
    assert_eq!(crit.len(), 2);
    assert!(crit.contains(&"Patient?".into()) && crit.contains(&"Condition?".into()));
    // a changed endpoint or header updates the same Subscriptions (PUT), no new ones
    let ids_before: Vec<String> =
        source.subscriptions().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    let out = c
        .reconcile(&tag(), &desired(&["Patient?", "Condition?"], "http://moved/fhir", &["X-Key: 1"]), |_| true)
        .await
        .unwrap();
    assert_eq!(out.updated.len(), 2);
    assert!(out.created.is_empty());
    let ids_after: Vec<String> = source.subscriptions().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids_before, ids_after);
    assert!(source.subscriptions().iter().all(|s| s["channel"]["endpoint"] == "http://moved/fhir"));
    // somebody else's Subscriptions are never touched
    let other = Tag { system: "https://fhirsync.io/owner".into(), code: "ns1/other/uid-2".into() };
    c.reconcile(&other, &desired(&["Patient?"], ep, &[]), |_| true).await.unwrap();
    assert_eq!(c.remove_all(&tag()).await.unwrap(), 2);
    assert_eq!(source.subscriptions().len(), 1);
}

#[tokio::test]
async fn a_subscription_in_error_is_rerequested_only_when_the_backoff_allows() {
    let source = FakeFhirServer::start(ServerConfig::default()).await;
    let c = client(&source.base);
    let d = desired(&["Patient?"], "http://pathling.example/fhir", &[]);
    c.reconcile(&tag(), &d, |_| true).await.unwrap();
    source.wait_for(|_, s| s.iter().all(|s| s["status"] == "active")).await;
    let id = source.subscriptions()[0]["id"].as_str().unwrap().to_string();
    source.set_status(&id, "error", "delivery failed: HTTP 503");
    let out = c.reconcile(&tag(), &d, |_| false).await.unwrap();
    assert!(out.rerequested.is_empty());
    assert_eq!(out.states[0].status, "error");
    assert_eq!(out.states[0].error, "delivery failed: HTTP 503");
    let out = c.reconcile(&tag(), &d, |_| true).await.unwrap();
    assert_eq!(out.rerequested, vec!["Patient?".to_string()]);
    source.wait_for(|_, s| s.iter().all(|s| s["status"] == "active")).await;
    assert_eq!(source.subscriptions()[0]["id"], id.as_str(), "the same Subscription, re-requested");
}

#[tokio::test]
async fn unsupported_sources_are_recognised() {
    let r5 = FakeFhirServer::start(ServerConfig { fhir_version: "5.0.0".into(), ..Default::default() }).await;
    let caps = client(&r5.base).capabilities().await.unwrap();
    assert_eq!(caps.unsupported(), None, "an R5 source can host Subscriptions, through the relay");
    assert!(caps.direct_unsupported().unwrap().contains("topic-based"));
    let none = FakeFhirServer::start(ServerConfig { subscription_supported: false, ..Default::default() }).await;
    let caps = client(&none.base).capabilities().await.unwrap();
    assert!(caps.unsupported().unwrap().contains("resthook_enabled"));
    let refusing = FakeFhirServer::start(ServerConfig { reject_rest_hook: true, ..Default::default() }).await;
    let e = client(&refusing.base)
        .reconcile(&tag(), &desired(&["Patient?"], "http://p/fhir", &[]), |_| true)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(422));
    assert!(e.to_string().contains("rest-hook subscriptions are not enabled"), "{e}");
}
