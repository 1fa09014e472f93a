//! `export.method: Search` against a source double that searches like real servers and misbehaves
//! like some: full then incremental (with an update and a delete), `Auto` on a source without
//! `$export`, a resource updated mid-crawl, crowded instants, throttling, a server that ignores
//! `_sort`, one that rounds `ge` down, broken next links, the request pace, and a restart.

mod support;

use std::time::Duration;

use fhirsync::api::{BulkExportRunStatus, DeletionSource, Phase};
use fhirsync::sync::{WatermarkMove, watermark_after};
use support::engine::{Env, drive};
use support::source::SourceConfig;
use support::source_search::{SearchConfig, SearchStore};

const OVERLAP: Duration = Duration::from_secs(60);

async fn env(cfg: SearchConfig, method: &str, extra: &str) -> (Env, SearchStore) {
    let store = SearchStore::new(SearchConfig { no_export: true, ..cfg });
    let mut env = Env::new(SourceConfig { search: Some(store.clone()), ..Default::default() }).await;
    env.extra = format!("  export:\n    method: {method}\n    types: [Patient, Observation]\n{extra}");
    (env, store)
}

fn watermark(st: &BulkExportRunStatus) -> jiff::Timestamp {
    match watermark_after(st, None, OVERLAP) {
        WatermarkMove::To(w) => w,
        m => panic!("the watermark should move: {m:?} ({:?})", st.message),
    }
}

#[tokio::test]
async fn a_source_without_export_is_read_by_search_in_full_then_incrementally() {
    let (env, store) = env(SearchConfig { page_cap: 100, ..Default::default() }, "Search", "").await;
    store.put_many("Patient", "p", 250, false);
    store.put_many("Observation", "o", 120, false);
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(env.pathling.counts().get("Patient"), Some(&250));
    assert_eq!(env.pathling.counts().get("Observation"), Some(&120));
    assert_eq!(st.resource_count, Some(370), "each resource staged once");
    assert_eq!(env.pathling.get("Patient", "p7"), store.get("Patient", "p7"), "the resource as the source holds it");
    let crawl = st.crawl.clone().expect("the run says it searched");
    assert_eq!(crawl.types_done, 2);
    assert_eq!(st.transaction_time.as_ref(), Some(&crawl.up_to), "the run covers up to the crawl's start");
    assert_eq!(st.deletion_source, Some(DeletionSource::FullExport));
    let first = watermark(&st);

    // changes after the first run: one update, one delete, three new resources
    store.now();
    store.touch("Patient", "p5", serde_json::json!("changed"));
    store.delete("Patient", "p9");
    store.put_many("Observation", "new", 3, false);
    let searches_before = store.log().searches.len();
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r2", Some(first), &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.resource_count, Some(4), "only what changed since the watermark");
    assert_eq!(st.deletion_source, Some(DeletionSource::History));
    assert_eq!(st.deleted, 1);
    assert!(env.pathling.get("Patient", "p9").is_none(), "the delete reached Pathling");
    assert_eq!(env.pathling.get("Patient", "p5").unwrap()["note"], "changed");
    assert_eq!(env.pathling.counts().get("Observation"), Some(&123));
    let incremental: Vec<String> =
        store.log().searches[searches_before..].iter().filter(|q| !q.contains("_id=")).cloned().collect();
    assert!(incremental.iter().all(|q| q.contains("_lastUpdated=ge")), "incremental searches: {incremental:?}");
    assert!(watermark(&st) > first);
}

#[tokio::test]
async fn auto_reads_a_source_without_export_by_search_and_says_so() {
    let (env, store) = env(SearchConfig::default(), "Auto", "").await;
    store.put_many("Patient", "p", 30, false);
    store.put_many("Observation", "o", 5, false);
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.resource_count, Some(35));
    assert!(env.source.log().kickoffs.is_empty(), "no $export was tried: the CapabilityStatement lists none");
    assert!(st.crawl.is_some());
}

#[tokio::test]
async fn a_resource_updated_while_the_crawl_reads_shifts_no_page() {
    // offset paging would lose the resource that moves into the updated one's place
    let cfg =
        SearchConfig { page_cap: 100, update_at_page: Some((2, "Patient".into(), "p10".into())), ..Default::default() };
    let (env, store) = env(cfg, "Search", "").await;
    store.put_many("Patient", "p", 300, false);
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let ids = env.pathling.ids("Patient");
    let missing: Vec<String> = (0..300).map(|k| format!("p{k}")).filter(|id| !ids.contains(id)).collect();
    assert!(missing.is_empty(), "lost mid-crawl: {missing:?}");
    assert_eq!(env.pathling.get("Patient", "p10").unwrap()["note"], "updated mid-crawl", "the newer version won");
}

#[tokio::test]
async fn searches_that_misbehave_are_survived_or_refused_never_half_read() {
    // (what, config, crowded instant, succeeds, words of the failure)
    let table: Vec<(&str, SearchConfig, bool, bool, &str)> = vec![
        ("429 three times", SearchConfig { throttle_first: 3, ..Default::default() }, false, true, ""),
        (
            "ge rounded to the second",
            SearchConfig { ge_to_second: true, page_cap: 40, ..Default::default() },
            false,
            true,
            "",
        ),
        ("250 resources at one instant", SearchConfig { page_cap: 100, ..Default::default() }, true, true, ""),
        (
            "_sort ignored",
            SearchConfig { ignore_sort: true, page_cap: 100, ..Default::default() },
            false,
            false,
            "_lastUpdated order",
        ),
        (
            "next links to another origin",
            SearchConfig { page_cap: 100, next_origin: Some("http://127.0.0.1:9".into()), ..Default::default() },
            true,
            false,
            "another origin",
        ),
    ];
    for (what, cfg, crowded, ok, words) in table {
        let (env, store) = env(cfg, "Search", "").await;
        // ids sort apart from their order in time, so a server that ignores _sort shows it
        store.put_many("Patient", "z", 150, crowded);
        store.put_many("Patient", "a", 100, crowded);
        let mut st = BulkExportRunStatus::default();
        drive(&env, "r1", None, &mut st).await;
        let msg = st.message.clone().unwrap_or_default();
        if ok {
            assert_eq!(st.phase, Phase::Succeeded, "{what}: {msg}");
            assert_eq!(st.resource_count, Some(250), "{what}: each resource once");
            assert_eq!(env.pathling.counts().get("Patient"), Some(&250), "{what}");
        } else {
            assert_eq!(st.phase, Phase::Failed, "{what}");
            assert!(msg.contains(words), "{what}: {msg}");
            assert!(env.pathling.log().imports.is_empty(), "{what}: nothing imported from a partial read");
            assert_eq!(watermark_after(&st, None, OVERLAP), WatermarkMove::Stays, "{what}");
        }
        if what.starts_with("429") {
            assert_eq!(store.log().throttled, 3, "{what}");
        }
    }
}

#[tokio::test]
async fn max_requests_per_second_spaces_the_searches() {
    let (mut env, store) = env(SearchConfig { page_cap: 10, ..Default::default() }, "Search", "").await;
    env.source_auth = ", maxRequestsPerSecond: 20".into();
    store.put_many("Patient", "p", 100, false);
    let mut st = BulkExportRunStatus::default();
    drive(&env, "r1", None, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let at = store.log().at;
    assert!(at.len() >= 10, "{}", at.len());
    let closest = at.windows(2).map(|w| w[1] - w[0]).min().unwrap();
    assert!(closest >= Duration::from_millis(45), "20 a second are 50 ms apart; the closest two were {closest:?}");
}

#[tokio::test]
async fn a_restarted_crawl_goes_on_from_its_last_finished_file_and_stages_nothing_twice() {
    // small files (half of maxFileSize): the crawl finishes one every few dozen resources
    let (env, store) =
        env(SearchConfig { page_cap: 30, ..Default::default() }, "Search", "  limits: {maxFileSize: 8Ki}\n").await;
    store.put_many("Patient", "p", 200, false);
    store.put_many("Observation", "o", 50, false);
    let engine = env.engine("r1", None).await.unwrap();
    let (tx, _rx) = tokio::sync::watch::channel(BulkExportRunStatus::default());
    let mut st = BulkExportRunStatus::default();
    let mut mem = fhirsync::run::Memory::default();
    let staged = |st: &BulkExportRunStatus| st.files.as_ref().map_or(0, |f| f.staged);
    // the last status stored: after the first file finished inside the Patients
    while st.crawl.as_ref().is_none_or(|c| c.after.is_none()) {
        assert!(!st.phase.is_finished(), "{:?}", st.message);
        engine.step(&mut st, &mut mem, &tx).await;
    }
    let stored = st.clone();
    // the process went on, finished another file, and stopped before storing it
    while staged(&st) == staged(&stored) {
        engine.step(&mut st, &mut mem, &tx).await;
    }
    drop((engine, mem));
    let in_first = stored.resources.get("Patient").copied().unwrap_or(0);
    assert!(in_first > 0 && in_first < 200, "{in_first}");
    let mut resumed = stored;
    drive(&env, "r1", None, &mut resumed).await;
    assert_eq!(resumed.phase, Phase::Succeeded, "{:?}", resumed.message);
    assert_eq!(resumed.resource_count, Some(250), "each resource staged once across the restart");
    assert_eq!(resumed.resources.get("Patient"), Some(&200));
    assert_eq!(env.pathling.counts().get("Patient"), Some(&200));
    assert_eq!(env.pathling.counts().get("Observation"), Some(&50));
}
