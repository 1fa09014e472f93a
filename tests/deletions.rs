//! Deletes for every source: the manifest's deleted[] when it has one, else the source's history,
//! else a warning — and never a deletion of a resource that exists at the source again.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use fhirsync::api::{BulkExportRunStatus, DeletionSource, Phase};
use fhirsync::sync::{WatermarkMove, watermark_after};
use serde_json::json;
use support::engine::{Env, drive};
use support::source::{SourceConfig, delete_bundle, resources};
use support::source_rest::{HistorySupport, RestConfig};

fn since() -> Option<jiff::Timestamp> {
    Some("2026-11-20T00:00:00+02:00".parse().unwrap())
}

fn entry(m: &str, r: &str) -> (String, String) {
    (m.to_string(), r.to_string())
}

fn live(refs: &[&str]) -> BTreeSet<String> {
    refs.iter().map(|r| r.to_string()).collect()
}

fn source(rest: RestConfig) -> SourceConfig {
    SourceConfig {
        files: vec![
            ("Patient".into(), resources("Patient", "p", 5)),
            ("Observation".into(), resources("Observation", "o", 5)),
        ],
        rest,
        ..Default::default()
    }
}

async fn seeded(cfg: SourceConfig, in_pathling: &[(&str, &str)]) -> Env {
    let env = Env::new(cfg).await;
    for (t, id) in in_pathling {
        env.pathling.insert(t, id, json!({"resourceType": t, "id": id}));
    }
    env
}

async fn run(env: &Env, since: Option<jiff::Timestamp>) -> BulkExportRunStatus {
    let mut st = BulkExportRunStatus::default();
    drive(env, "r1", since, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    st
}

fn degraded(st: &BulkExportRunStatus) -> Option<String> {
    st.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True").map(|c| c.reason.clone())
}

#[tokio::test]
async fn a_source_without_deleted_entries_gives_its_deletions_through_its_history() {
    let rest = RestConfig {
        history_support: HistorySupport::System,
        // newest first: p1 deleted; o3 deleted, then re-created (its newest entry is a PUT); p4 deleted
        history: vec![
            entry("DELETE", "Patient/p1"),
            entry("PUT", "Observation/o3"),
            entry("DELETE", "Observation/o3"),
            entry("PUT", "Patient/p2"),
            entry("DELETE", "Patient/p4"),
        ],
        live: live(&["Observation/o3", "Patient/p2"]),
        ..Default::default()
    };
    let env = seeded(source(rest), &[("Patient", "p1"), ("Patient", "p4"), ("Observation", "o3")]).await;
    let st = run(&env, since()).await;
    assert_eq!(st.deletion_source, Some(DeletionSource::History));
    assert_eq!(st.deleted, 2, "{:?}", st.message);
    let patients = env.pathling.ids("Patient");
    assert!(!patients.contains(&"p1".to_string()) && !patients.contains(&"p4".to_string()), "{patients:?}");
    // deleted and re-created in the window: it stays
    assert!(env.pathling.ids("Observation").contains(&"o3".to_string()));
    let msg = st.message.clone().unwrap();
    assert!(msg.contains("from the source's history") && msg.contains("kept 1 re-created"), "{msg}");
    assert_eq!(degraded(&st), None);
    // the history was asked with _since in UTC, and one search by _id per type checked the deletions
    let log = env.source.log();
    assert_eq!(log.rest.history_pages.len(), 1);
    assert!(
        log.rest.history_pages[0].starts_with("_history?_since=2026-11-19T22%3A00%3A00Z"),
        "{:?}",
        log.rest.history_pages
    );
    assert_eq!(log.rest.id_searches, 2);
    assert_eq!(log.rest.reads, 0);
}

#[tokio::test]
async fn history_pages_are_followed_and_only_synced_types_are_deleted() {
    let mut history: Vec<(String, String)> = (0..250).map(|i| entry("DELETE", &format!("Patient/d{i}"))).collect();
    history.push(entry("DELETE", "Encounter/e1"));
    let rest = RestConfig { history_support: HistorySupport::System, history, ..Default::default() };
    let mut env = seeded(source(rest), &[("Patient", "d7"), ("Encounter", "e1")]).await;
    env.extra = "  export:\n    types: [Patient, Observation]\n".into();
    let st = run(&env, since()).await;
    assert_eq!(st.deleted, 250);
    assert!(!env.pathling.ids("Patient").contains(&"d7".to_string()));
    // Encounter is not synced: its deletion is not this sync's business
    assert_eq!(env.pathling.ids("Encounter"), vec!["e1".to_string()]);
    assert_eq!(env.source.log().rest.history_pages.len(), 3);
}

#[tokio::test]
async fn type_level_history_when_that_is_all_the_source_declares() {
    let rest = RestConfig {
        history_support: HistorySupport::TypeLevel,
        history: vec![entry("DELETE", "Patient/p1"), entry("DELETE", "Observation/o1")],
        ..Default::default()
    };
    let mut env = seeded(source(rest), &[("Patient", "p1"), ("Observation", "o1")]).await;
    env.extra = "  export:\n    types: [Patient, Observation]\n".into();
    let st = run(&env, since()).await;
    assert_eq!((st.deletion_source, st.deleted), (Some(DeletionSource::History), 2));
    let pages = env.source.log().rest.history_pages;
    assert!(pages.iter().any(|p| p.starts_with("Patient/_history?")), "{pages:?}");
    assert!(pages.iter().any(|p| p.starts_with("Observation/_history?")), "{pages:?}");
}

#[tokio::test]
async fn an_undeclared_history_is_found_by_a_probe() {
    let rest = RestConfig {
        history_support: HistorySupport::Undeclared,
        history: vec![entry("DELETE", "Patient/p1")],
        ..Default::default()
    };
    let env = seeded(source(rest), &[("Patient", "p1")]).await;
    let st = run(&env, since()).await;
    assert_eq!((st.deletion_source, st.deleted), (Some(DeletionSource::History), 1));
}

#[tokio::test]
async fn the_manifest_comes_first_and_the_history_is_not_read() {
    let mut cfg = source(RestConfig {
        history_support: HistorySupport::System,
        history: vec![entry("DELETE", "Patient/p2")],
        ..Default::default()
    });
    cfg.deleted = vec![vec![delete_bundle(&["Patient/p1"])]];
    let env = seeded(cfg, &[("Patient", "p1")]).await;
    let st = run(&env, since()).await;
    assert_eq!((st.deletion_source, st.deleted), (Some(DeletionSource::Manifest), 1));
    assert!(env.source.log().rest.history_pages.is_empty());
}

#[tokio::test]
async fn a_source_with_neither_is_a_warning_not_a_failure() {
    let env = seeded(source(RestConfig::default()), &[]).await;
    let st = run(&env, since()).await;
    assert_eq!(st.deletion_source, Some(DeletionSource::Unavailable));
    assert_eq!(degraded(&st).as_deref(), Some("DeletionsUnavailable"));
    assert!(st.message.as_ref().unwrap().contains("spec.verify"), "{:?}", st.message);
    // nothing was lost by this run: the watermark moves
    assert!(matches!(watermark_after(&st, None, Duration::from_secs(60)), WatermarkMove::To(_)));
}

#[tokio::test]
async fn a_full_export_has_no_window_to_delete_from() {
    let rest = RestConfig { history_support: HistorySupport::System, ..Default::default() };
    let env = seeded(source(rest), &[]).await;
    let st = run(&env, None).await;
    assert_eq!(st.deletion_source, Some(DeletionSource::FullExport));
    assert!(env.source.log().rest.history_pages.is_empty());
    assert_eq!(degraded(&st), None);
}

#[tokio::test]
async fn without_search_by_id_each_deletion_is_checked_by_a_read() {
    let rest = RestConfig {
        history_support: HistorySupport::System,
        history: vec![entry("DELETE", "Patient/p1"), entry("DELETE", "Patient/p2")],
        live: live(&["Patient/p2"]),
        no_id_search: true,
        ..Default::default()
    };
    let env = seeded(source(rest), &[("Patient", "p1"), ("Patient", "p2")]).await;
    let st = run(&env, since()).await;
    assert_eq!(st.deleted, 1);
    assert_eq!(env.pathling.ids("Patient").iter().filter(|i| i.starts_with("p2")).count(), 1);
    let log = env.source.log();
    assert_eq!((log.rest.id_searches, log.rest.reads), (1, 2), "the unsupported search is tried once");
}

#[tokio::test]
async fn a_history_answering_nonsense_forever_costs_a_bounded_number_of_requests() {
    let rest = RestConfig { history_support: HistorySupport::System, endless_history: true, ..Default::default() };
    let env = seeded(source(rest), &[]).await;
    let st = run(&env, since()).await;
    assert!(st.deletions_incomplete);
    assert_eq!(degraded(&st).as_deref(), Some("DeletionsIncomplete"));
    assert!(st.message.as_ref().unwrap().contains("without entries"), "{:?}", st.message);
    let pages = env.source.log().rest.history_pages.len() as u32;
    assert!(pages <= fhirsync::fhir::history::MAX_EMPTY_PAGES + 2, "{pages} pages");
    // what it could not read holds the watermark
    assert_eq!(watermark_after(&st, None, Duration::from_secs(60)), WatermarkMove::Stays);
}

#[tokio::test]
async fn a_next_link_to_another_origin_is_not_followed() {
    let stranger = support::source::FakeSource::start(SourceConfig::default()).await;
    let rest = RestConfig {
        history_support: HistorySupport::System,
        history: (0..150).map(|i| entry("DELETE", &format!("Patient/d{i}"))).collect(),
        history_next_origin: Some(stranger.base.trim_end_matches("/fhir").to_string()),
        ..Default::default()
    };
    let env = seeded(source(rest), &[]).await;
    let st = run(&env, since()).await;
    assert!(st.deletions_incomplete);
    assert!(st.message.as_ref().unwrap().contains("another origin"), "{:?}", st.message);
    // the first page's deletions were applied; the stranger got nothing
    assert_eq!(st.deleted, 100);
    assert!(stranger.log().rest.history_pages.is_empty());
}
