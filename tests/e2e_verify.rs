//! End to end: drift found and repaired by the operator. A BulkExportSync with `spec.verify`, drift
//! planted in Pathling, the `fhirsync.io/verify-now` annotation: a verification run finds it, deletes
//! the extra, a repair run brings the missing type again, a second verification checks it — and
//! `kubectl get bes -o wide` says `In sync: True`.

mod support;

use std::collections::BTreeSet;

use fhirsync::api::{BulkExportSync, RepairState, Trigger};
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use support::cluster::{self, SERIAL, wait_for};
use support::world::{World, data, ready};

fn in_sync(s: &BulkExportSync) -> Option<(String, String)> {
    let c = s.status.as_ref()?.conditions.iter().find(|c| c.type_ == "InSync")?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn verify_now_finds_drift_repairs_it_and_says_in_sync() {
    let _g = SERIAL.lock().await;
    let mut cfg = data();
    cfg.all_files_live();
    cfg.since_files = Some(vec![]);
    let w = World::new("verify", cfg).await;
    w.pathling.configure(|c| c.export_polls = 1);
    let op = w.operator();
    w.apply_sync("hospital-a", json!({"verify": {}})).await;
    let s = wait_for(&w.syncs, "hospital-a", 60, "first run", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    assert_eq!(in_sync(&s), Some(("Unknown".into(), "NotVerified".into())));
    let watermark = s.status.as_ref().unwrap().watermark.clone();

    // drift: an Observation lost in Pathling, a Patient Pathling should not have
    w.pathling.remove("Observation", "o7");
    w.pathling.insert("Patient", "ghost", json!({"resourceType": "Patient", "id": "ghost"}));
    w.syncs
        .patch(
            "hospital-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"fhirsync.io/verify-now": "1"}}})),
        )
        .await
        .unwrap();
    let s = wait_for(&w.syncs, "hospital-a", 90, "drift repaired and checked", |s| {
        in_sync(s).is_some_and(|c| c == ("True".into(), "Repaired".into()))
    })
    .await;
    let st = s.status.clone().unwrap();
    let drift = st.drift.clone().unwrap();
    assert_eq!(drift.repair.as_ref().map(|r| r.state), Some(RepairState::Done), "{drift:?}");
    assert!(drift.in_sync);
    assert_eq!(st.watermark, watermark, "verifications and repairs never move the watermark");
    assert!(w.pathling.ids("Observation").contains(&"o7".to_string()));
    assert!(!w.pathling.ids("Patient").contains(&"ghost".to_string()));

    // the runs tell the story: a verification, a repair of Observation only, a check (runs made
    // within one second share a creation timestamp: they are told apart by what they did)
    let runs = w.runs_of("hospital-a").await;
    let triggers: Vec<Trigger> = runs.iter().map(|r| r.spec.trigger).collect();
    let count = |t: Trigger| triggers.iter().filter(|x| **x == t).count();
    assert_eq!((count(Trigger::Verify), count(Trigger::Repair), triggers.len()), (2, 1, 4), "{triggers:?}");
    let repair = runs.iter().find(|r| r.spec.trigger == Trigger::Repair).unwrap();
    assert_eq!(repair.status.as_ref().unwrap().resources.keys().collect::<Vec<_>>(), vec!["Observation"]);
    let missed_o7 = |r: &&fhirsync::api::BulkExportRun| {
        r.status.as_ref().and_then(|s| s.drift.as_ref()).is_some_and(|d| {
            d.types.iter().any(|t| t.type_ == "Observation" && t.missing_examples == vec!["o7".to_string()])
        })
    };
    let found = runs
        .iter()
        .filter(|r| r.spec.trigger == Trigger::Verify)
        .find(missed_o7)
        .expect("the verification that found o7 missing");
    let check = runs.iter().filter(|r| r.spec.trigger == Trigger::Verify).find(|r| !missed_o7(r)).expect("the check");
    assert!(found.creation_timestamp() <= repair.creation_timestamp());
    assert!(repair.creation_timestamp() <= check.creation_timestamp());
    let first = found.status.as_ref().unwrap().drift.clone().unwrap();
    assert_eq!(first.deleted, 1);

    // an Event says what was found; the gauges and kubectl say where it stands
    let events: kube::Api<k8s_openapi::api::events::v1::Event> = kube::Api::namespaced(cluster::client().await, &w.ns);
    let evs = events.list(&ListParams::default()).await.unwrap();
    assert!(
        evs.items.iter().any(|e| e.reason.as_deref() == Some("DriftFound")),
        "{:?}",
        evs.items.iter().map(|e| e.reason.clone()).collect::<Vec<_>>()
    );
    let m = reqwest::get(format!("{}/metrics", op.admin)).await.unwrap().text().await.unwrap();
    assert!(m.contains("fhirsync_in_sync{namespace=") && m.contains("fhirsync_drift_resources{"), "{m}");
    let out = std::process::Command::new("kubectl")
        .args(["--kubeconfig", &cluster::kubeconfig().display().to_string(), "get", "bes", "-n", &w.ns, "-o", "wide"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("IN SYNC") && text.contains("VERIFIED"), "{text}");
    let line = text.lines().find(|l| l.starts_with("hospital-a")).unwrap();
    assert!(line.split_whitespace().any(|c| c == "True"), "{line}");
    let _ = s.name_any();
}

#[tokio::test]
async fn the_operator_syncs_from_helios_deletes_included_and_verifies_in_sync() {
    let _g = SERIAL.lock().await;
    let helios = support::helios::Helios::start().await;
    helios.put(&support::helios::patients("p", 10)).await;
    helios.put(&support::helios::observations("o", 30, 10)).await;
    let w = World::new("helios", fhirsync_test_source()).await;
    w.pathling.configure(|c| c.export_polls = 1);
    let _op = w.operator();
    let spec = json!({
        "source": {"url": helios.base, "maxPollInterval": "1s"},
        "export": {"types": ["Patient", "Observation"]},
        "sinceOverlap": "0s",
        "verify": {},
    });
    w.apply_sync("helios", spec.clone()).await;
    wait_for(&w.syncs, "helios", 90, "first run from Helios", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    let equal = || async {
        for t in ["Patient", "Observation"] {
            let got: BTreeSet<String> = w.pathling.ids(t).into_iter().collect();
            assert_eq!(got, helios.ids(t).await, "{t}");
        }
    };
    equal().await;

    // deletes at Helios reach Pathling through its history
    helios.delete("Patient", "p1").await;
    helios.delete("Observation", "o2").await;
    w.syncs
        .patch(
            "helios",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"fhirsync.io/run-now": "1"}}})),
        )
        .await
        .unwrap();
    let s = wait_for(&w.syncs, "helios", 90, "incremental run from Helios", |s| {
        s.status.as_ref().and_then(|st| st.last_successful_run.as_ref()).is_some_and(|r| r.deleted == 2)
    })
    .await;
    assert_eq!(
        s.status.unwrap().last_successful_run.unwrap().deletion_source,
        Some(fhirsync::api::DeletionSource::History)
    );
    equal().await;

    // and a verification says so
    w.syncs
        .patch(
            "helios",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"fhirsync.io/verify-now": "1"}}})),
        )
        .await
        .unwrap();
    let s = wait_for(&w.syncs, "helios", 90, "verified in sync", |s| {
        in_sync(s).is_some_and(|c| c == ("True".into(), "InSync".into()))
    })
    .await;
    let d = s.status.unwrap().drift.unwrap();
    assert_eq!(
        d.types.iter().map(|t| (t.type_.as_str(), t.source, t.pathling)).collect::<Vec<_>>(),
        vec![("Observation", 29, 29), ("Patient", 9, 9)]
    );
}

/// The World's own source double is unused when the sync points at Helios.
fn fhirsync_test_source() -> support::source::SourceConfig {
    support::source::SourceConfig::default()
}
