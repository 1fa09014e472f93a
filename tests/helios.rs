//! Against a real, independent FHIR server: the Helios FHIR Server as the source of `fhirsync
//! sync-once` (Pathling is the in-process double). A full sync, creates, updates and deletes at the
//! source, an incremental sync: Pathling holds exactly the ids Helios holds, per type. Then drift
//! planted in Pathling is found by a verification and repaired. The same full and incremental sync
//! again by search (`export.method: Search`), as for a source without `$export`.

mod support;

use std::collections::BTreeSet;

use support::cli::{Cli, s};
use support::helios::{Helios, observations, patients};
use support::source::SourceConfig;

const TYPES: [&str; 2] = ["Patient", "Observation"];

async fn setup(method: &str) -> (Helios, Cli, Vec<String>) {
    let helios = Helios::start().await;
    helios.put(&patients("p", 20)).await;
    helios.put(&observations("o", 60, 20)).await;
    let c =
        Cli::with(SourceConfig::default(), support::pathling::PathlingConfig { export_polls: 1, ..Default::default() })
            .await;
    let yaml = format!(
        "apiVersion: fhirsync.io/v1alpha1\nkind: BulkExportSync\nmetadata: {{name: helios, namespace: cli}}\nspec:\n  \
         source: {{url: \"{}\", maxPollInterval: 1s}}\n  export: {{types: [Patient, Observation], method: {method}}}\n  \
         target: {{url: \"{}\"}}\n  sinceOverlap: 0s\n  \
         staging: {{volume: {{path: \"{}\", pathlingPath: \"file:///staging\"}}}}\n",
        helios.base,
        c.pathling.base,
        c.dir.path().join("staging").display()
    );
    let f = c.dir.path().join("helios.yaml");
    std::fs::write(&f, yaml).unwrap();
    let args =
        vec!["sync-once".into(), "-f".into(), s(&f), "--state".into(), s(&c.state()), "--output".into(), "json".into()];
    (helios, c, args)
}

async fn run(c: &Cli, args: &[String]) -> serde_json::Value {
    let out = c.run(args.to_vec()).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout: {}\nstderr: {err}", String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn assert_equal(helios: &Helios, c: &Cli) {
    for t in TYPES {
        let want = helios.ids(t).await;
        let got: BTreeSet<String> = c.pathling.ids(t).into_iter().collect();
        assert_eq!(got, want, "Pathling's {t} ids differ from Helios's");
    }
}

#[tokio::test]
async fn full_then_incremental_sync_keeps_pathling_equal_to_helios_deletes_included() {
    full_then_incremental("BulkExport").await;
}

#[tokio::test]
async fn full_then_incremental_sync_by_search_keeps_pathling_equal_to_helios() {
    full_then_incremental("Search").await;
}

async fn full_then_incremental(method: &str) {
    let (helios, c, args) = setup(method).await;
    let first = run(&c, &args).await;
    assert_eq!(first["totalResources"], 80, "{first}");
    assert_eq!(first["deletionSource"], "FullExport");
    assert_equal(&helios, &c).await;

    // at the source: creates, updates, deletes, and a delete followed by a re-create
    helios.put(&patients("new", 3)).await;
    let mut changed = observations("o", 2, 20);
    changed[0]["status"] = "amended".into();
    helios.put(&changed).await;
    for (t, id) in
        [("Patient", "p3"), ("Patient", "p4"), ("Observation", "o10"), ("Observation", "o11"), ("Observation", "o12")]
    {
        helios.delete(t, id).await;
    }
    helios.delete("Patient", "p5").await;
    helios.put(&[serde_json::json!({"resourceType": "Patient", "id": "p5", "active": false})]).await;

    let second = run(&c, &args).await;
    assert!(second["since"].is_string(), "incremental: {second}");
    assert_eq!(second["deletionSource"], "History", "Helios lists no deleted[]: its history is read");
    assert_eq!(second["deleted"], 5, "{second}");
    assert_equal(&helios, &c).await;
    assert!(c.pathling.ids("Patient").contains(&"p5".to_string()), "deleted and re-created: present");
    // the incremental run brought the changes only: 3 new, 2 updated, 1 re-created
    assert_eq!(second["totalResources"], 6, "{second}");
}

#[tokio::test]
async fn a_verification_against_helios_finds_planted_drift_and_repairs_it() {
    let (helios, c, mut args) = setup("BulkExport").await;
    run(&c, &args).await;
    assert_equal(&helios, &c).await;
    c.pathling.remove("Observation", "o7");
    c.pathling.remove("Observation", "o8");
    c.pathling.insert("Patient", "ghost", serde_json::json!({"resourceType": "Patient", "id": "ghost"}));
    args.push("--verify".into());
    let out = run(&c, &args).await;
    let drift = &out["drift"];
    assert_eq!(drift["sourceRead"], "Elements", "Helios exports ids with _elements=id: {drift}");
    assert_eq!(drift["repair"]["state"], "Done", "{drift}");
    assert_eq!(drift["inSync"], true);
    assert_equal(&helios, &c).await;
    assert!(!c.pathling.ids("Patient").contains(&"ghost".to_string()));
}
