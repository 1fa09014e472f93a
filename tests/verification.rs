//! Drift verification through the run engine: the source's ids (a bulk export with `_elements=id`)
//! against Pathling's (Pathling's own `$export`), per type; extras deleted once the source confirms
//! them gone; pending changes are not drift.

mod support;

use std::collections::BTreeSet;

use fhirsync::api::{BulkExportRunStatus, Drift, IdRead, Phase, VerifyRun};
use serde_json::json;
use support::engine::{Env, drive_inputs};
use support::pathling::PathlingConfig;
use support::source::{SourceConfig, resources};
use support::source_rest::RestConfig;

fn source_data() -> SourceConfig {
    let mut live = BTreeSet::new();
    for i in 0..5 {
        live.insert(format!("Patient/p{i}"));
        live.insert(format!("Observation/o{i}"));
    }
    SourceConfig {
        files: vec![
            ("Patient".into(), resources("Patient", "p", 5)),
            ("Observation".into(), resources("Observation", "o", 3)),
            ("Observation".into(), resources("Observation", "o", 5)), // o0–o2 twice: counted once
        ],
        rest: RestConfig { live, ..Default::default() },
        ..Default::default()
    }
}

async fn env_with(cfg: SourceConfig, pathling: &[(&str, &str)]) -> Env {
    let env = Env::with(cfg, PathlingConfig { export_polls: 1, export_lines_per_file: 2, ..Default::default() }).await;
    for (t, id) in pathling {
        env.pathling.insert(t, id, json!({"resourceType": t, "id": id, "active": true}));
    }
    env
}

fn all_of_source() -> Vec<(&'static str, &'static str)> {
    vec![
        ("Patient", "p0"),
        ("Patient", "p1"),
        ("Patient", "p2"),
        ("Patient", "p3"),
        ("Patient", "p4"),
        ("Observation", "o0"),
        ("Observation", "o1"),
        ("Observation", "o2"),
        ("Observation", "o3"),
        ("Observation", "o4"),
    ]
}

async fn verify(env: &Env, v: VerifyRun) -> (BulkExportRunStatus, Drift) {
    let mut st = BulkExportRunStatus::default();
    drive_inputs(env, &env.verify_inputs("v1", v), &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let d = st.drift.clone().expect("a drift report");
    (st, d)
}

fn repair() -> VerifyRun {
    VerifyRun { repair: true, ..Default::default() }
}

fn of<'a>(d: &'a Drift, t: &str) -> &'a fhirsync::api::TypeDrift {
    d.types.iter().find(|x| x.type_ == t).unwrap_or_else(|| panic!("no {t} in {d:?}"))
}

#[tokio::test]
async fn pathling_equal_to_the_source_is_in_sync() {
    let env = env_with(source_data(), &all_of_source()).await;
    let (st, d) = verify(&env, repair()).await;
    assert!(d.in_sync, "{d:?}");
    assert_eq!((of(&d, "Patient").source, of(&d, "Patient").pathling), (5, 5));
    assert_eq!((of(&d, "Observation").source, of(&d, "Observation").pathling), (5, 5));
    assert_eq!(d.source_read, Some(IdRead::Elements));
    assert!(st.message.unwrap().contains("Pathling matches the source: 10 resources in 2 types"));
    // ids only, of everything, on both sides; nothing imported; spilled files removed
    let k = &env.source.log().kickoffs[0];
    assert_eq!((k.param("_elements").as_deref(), k.param("_since")), (Some("id"), None));
    let pl = env.pathling.log();
    assert!(pl.exports[0].contains("_elements=id"), "{:?}", pl.exports);
    assert!(pl.imports.is_empty() && pl.resource_deletes.is_empty());
    assert!(pl.export_files >= 5, "ids read from several files");
    assert!(!env.staging().join("ns1").join("v1").exists());
    assert_eq!(env.source.log().status_deletes.len(), 1, "the source's export was released");
}

#[tokio::test]
async fn missing_and_extra_resources_are_found_and_extras_the_source_lost_are_deleted() {
    let mut pathling = all_of_source();
    pathling.retain(|(_, id)| *id != "p4" && *id != "o1");
    pathling.push(("Observation", "o9")); // deleted at the source, still in Pathling
    pathling.push(("Encounter", "e1")); // a type the source does not have at all
    let env = env_with(source_data(), &pathling).await;
    let (st, d) = verify(&env, repair()).await;
    assert!(!d.in_sync);
    let p = of(&d, "Patient");
    assert_eq!((p.missing, p.extra, p.missing_examples.clone()), (1, 0, vec!["p4".to_string()]));
    let o = of(&d, "Observation");
    assert_eq!((o.missing, o.extra, o.extra_examples.clone()), (1, 1, vec!["o9".to_string()]));
    assert_eq!(of(&d, "Encounter").extra, 1);
    assert_eq!((d.deleted, d.kept), (2, 0));
    assert_eq!(d.missing_types(), vec!["Observation".to_string(), "Patient".to_string()]);
    assert!(!env.pathling.ids("Observation").contains(&"o9".to_string()));
    assert!(env.pathling.ids("Encounter").is_empty());
    let msg = st.message.unwrap();
    assert!(msg.contains("Pathling misses 1 Observation, 1 Patient") && msg.contains("deleted 2 extras"), "{msg}");
}

#[tokio::test]
async fn extras_the_source_still_has_are_kept() {
    let mut cfg = source_data();
    cfg.rest.live.insert("Observation/o9".into()); // present at the source, outside the export's selection
    let mut pathling = all_of_source();
    pathling.push(("Observation", "o9"));
    let env = env_with(cfg, &pathling).await;
    let (_, d) = verify(&env, repair()).await;
    assert_eq!((d.deleted, d.kept, d.in_sync), (0, 1, false));
    assert!(env.pathling.ids("Observation").contains(&"o9".to_string()));
}

#[tokio::test]
async fn without_repair_or_with_a_shared_pathling_nothing_is_deleted() {
    let mut pathling = all_of_source();
    pathling.push(("Observation", "o9"));
    let env = env_with(source_data(), &pathling).await;
    let (_, d) = verify(&env, VerifyRun::default()).await;
    assert_eq!((of(&d, "Observation").extra, d.deleted), (1, 0));
    assert_eq!(d.not_repaired.as_deref(), Some("spec.verify.repair is false"));
    let shared = VerifyRun { repair: true, shared_with: vec!["other-sync".into()], ..Default::default() };
    let (_, d) = verify(&env, shared).await;
    assert!(d.not_repaired.unwrap().contains("other-sync"));
    assert!(env.pathling.ids("Observation").contains(&"o9".to_string()));
    assert!(env.pathling.log().resource_deletes.is_empty());
}

#[tokio::test]
async fn changes_after_the_watermark_are_pending_not_drift() {
    let mut cfg = source_data();
    cfg.files.push((
        "Patient".into(),
        vec![
            json!({"resourceType": "Patient", "id": "new1", "meta": {"lastUpdated": "2026-11-26T12:00:00Z"}})
                .to_string(),
        ],
    ));
    let env = env_with(cfg, &all_of_source()).await;
    let v = VerifyRun {
        repair: true,
        pending_after: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-11-26T11:00:00Z".parse().unwrap(),
        )),
        ..Default::default()
    };
    let (st, d) = verify(&env, v).await;
    assert!(d.in_sync, "{d:?}");
    assert_eq!((of(&d, "Patient").pending, of(&d, "Patient").missing), (1, 0));
    assert!(st.message.unwrap().contains("1 changed since the last run, pending"));
}

#[tokio::test]
async fn a_source_refusing_elements_is_verified_from_a_full_export() {
    let cfg = SourceConfig { refuse_elements: true, ..source_data() };
    let env = env_with(cfg, &all_of_source()).await;
    let (_, d) = verify(&env, repair()).await;
    assert!(d.in_sync);
    assert_eq!(d.source_read, Some(IdRead::FullExport));
    let ks = env.source.log().kickoffs;
    assert_eq!(ks.len(), 2);
    assert_eq!((ks[0].param("_elements").as_deref(), ks[1].param("_elements")), (Some("id"), None));
}

#[tokio::test]
async fn a_pathling_that_cannot_export_fails_the_verification_and_cleans_up() {
    let env = env_with(source_data(), &all_of_source()).await;
    env.pathling.configure(|c| c.export_status_forever = Some(403));
    let mut st = BulkExportRunStatus::default();
    drive_inputs(&env, &env.verify_inputs("v1", repair()), &mut st).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("AuthFailed"));
    assert!(st.message.as_ref().unwrap().contains("Pathling $export"), "{:?}", st.message);
    assert!(!env.staging().join("ns1").join("v1").exists(), "spilled ids are removed");
    assert!(env.pathling.log().resource_deletes.is_empty());
}
