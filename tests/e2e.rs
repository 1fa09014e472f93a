//! End to end: `fhirsync run` against the real Kubernetes API server from ../shared/test-apiserver,
//! with in-process doubles of the FHIR source and of Pathling.

mod support;

use std::time::Duration;

use fhirsync::api::{BulkExportRun, BulkExportSync, Phase};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::cluster::{self, Operator, SERIAL, wait_deleted, wait_for};
use support::source::{SourceConfig, resources};
use support::world::{World, data, phase, ready};

#[tokio::test]
async fn a_sync_runs_imports_and_then_goes_incremental() {
    let _g = SERIAL.lock().await;
    let w = World::new("sync", data()).await;
    let _op = w.operator();
    w.apply_sync("hospital-a", json!({"historyLimit": 1})).await;

    // the first run: a full export
    let s = wait_for(&w.syncs, "hospital-a", 60, "sync Ready", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    let st = s.status.clone().unwrap();
    assert_eq!(st.last_run_resources, Some(2241));
    let last = st.last_successful_run.clone().unwrap();
    assert_eq!(last.resources.get("Observation"), Some(&2217));
    let watermark = st.watermark.clone().expect("watermark").0;
    assert!(st.active_run.is_none());
    let runs = w.runs_of("hospital-a").await;
    assert_eq!(runs.len(), 1);
    let r1 = &runs[0];
    assert_eq!(phase(r1), Phase::Succeeded);
    assert!(r1.spec.since.is_none(), "the first run is a full export");
    assert_eq!(r1.owner_references()[0].name, "hospital-a");
    assert!(r1.finalizers().is_empty() || r1.finalizers() == ["fhirsync.io/run-cleanup"]);
    let kickoff = r1.status.as_ref().unwrap().kickoff_time.clone().unwrap().0;
    assert_eq!(watermark, kickoff.checked_sub(jiff::SignedDuration::from_secs(60)).unwrap().min(watermark));
    assert_eq!(w.pathling.counts().get("Observation"), Some(&2217));
    assert!(w.source.log().kickoffs[0].param("_since").is_none());

    // run-now: the next run is incremental from the watermark
    w.source.configure(|c| c.files = vec![("Patient".into(), resources("Patient", "new", 3))]);
    w.syncs
        .patch(
            "hospital-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"fhirsync.io/run-now": "1"}}})),
        )
        .await
        .unwrap();
    let s = wait_for(&w.syncs, "hospital-a", 60, "second run folded", |s| {
        s.status.as_ref().and_then(|st| st.last_successful_run.as_ref()).is_some_and(|l| l.name != r1.name_any())
    })
    .await;
    assert_eq!(s.status.as_ref().unwrap().last_run_resources, Some(3));
    let k = w.source.log().kickoffs;
    assert_eq!(k.len(), 2);
    assert_eq!(k[1].param("_since").as_deref(), Some(watermark.to_string().as_str()), "incremental _since = watermark");
    assert_eq!(w.pathling.counts().get("Patient"), Some(&27), "merged, not replaced");
    // historyLimit 1: the first run is pruned
    let runs_api = w.runs.clone();
    let first = r1.name_any();
    let uid = r1.uid().unwrap();
    wait_deleted(&runs_api, &first, &uid, 30).await;
    let runs = w.runs_of("hospital-a").await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].spec.since.as_ref().map(|t| t.0), Some(watermark));
    // changing the export resets the watermark: the run for the new generation is a full export
    w.apply_sync("hospital-a", json!({"historyLimit": 1, "export": {"types": ["Patient"]}})).await;
    let s = wait_for(&w.syncs, "hospital-a", 60, "third run folded", |s| {
        s.status.as_ref().and_then(|st| st.last_successful_run.as_ref()).is_some_and(|l| l.name != runs[0].name_any())
    })
    .await;
    let k = w.source.log().kickoffs;
    assert_eq!(k.len(), 3);
    assert_eq!(k[2].param("_since"), None, "a changed query starts over with a full export");
    assert_eq!(k[2].param("_type").as_deref(), Some("Patient"));
    assert!(s.status.unwrap().watermark.is_some(), "and sets a new watermark");
    // printer columns: true at a glance, as CronJob and Job users expect
    let kubectl = |wide: bool| {
        let mut a = vec!["--kubeconfig".to_string(), cluster::kubeconfig().display().to_string()];
        a.extend(["get", "bes,ber", "-n", &w.ns].map(String::from));
        if wide {
            a.extend(["-o", "wide"].map(String::from));
        }
        let out = std::process::Command::new("kubectl").args(a).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let text = kubectl(false);
    assert!(text.contains("READY") && text.contains("REASON") && text.contains("LAST SYNC"), "{text}");
    assert!(
        text.contains("PHASE") && text.contains("Succeeded") && text.contains("STARTED") && text.contains("DURATION"),
        "{text}"
    );
    let wide = kubectl(true);
    assert!(wide.contains("NEXT RUN") && wide.contains("WATERMARK") && wide.contains("MESSAGE"), "{wide}");
    assert!(!text.contains("<invalid>") && !wide.contains("<invalid>"), "{text}\n{wide}");
}

#[tokio::test]
async fn a_killed_operator_resumes_the_same_run() {
    let _g = SERIAL.lock().await;
    let w = World::new("resume", SourceConfig { polls_before_done: 1_000_000, ..data() }).await;
    let mut op = w.operator();
    w.apply_sync("hospital-b", json!({})).await;
    let run = loop {
        let runs = w.runs_of("hospital-b").await;
        if let Some(r) = runs.into_iter().next() {
            break r;
        }
        w.source.wait_for(|l| l.polls >= 1).await;
    };
    let r = wait_for(&w.runs, &run.name_any(), 60, "export status URL persisted", |r| {
        r.status.as_ref().is_some_and(|s| s.phase == Phase::Exporting && s.export_status_url.is_some())
    })
    .await;
    let url = r.status.unwrap().export_status_url.unwrap();
    w.source.wait_for(|l| l.polls >= 2).await;
    op.kill(); // a crash mid-poll
    w.source.configure(|c| c.polls_before_done = 0);
    let _op2 = w.operator();
    let r = wait_for(&w.runs, &run.name_any(), 60, "resumed run succeeds", |r| phase(r).is_finished()).await;
    let st = r.status.unwrap();
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.export_status_url.as_deref(), Some(url.as_str()), "the same export was resumed");
    let log = w.source.log();
    assert_eq!(log.accepted, 1, "no second export was started");
    assert_eq!(w.pathling.log().imports.len(), 1, "imported exactly once");
    assert_eq!(w.pathling.counts().get("Observation"), Some(&2217));
    assert_eq!(w.runs_of("hospital-b").await.len(), 1);
}

#[tokio::test]
async fn deleting_a_running_run_cancels_the_export_and_cleans_staging() {
    let _g = SERIAL.lock().await;
    let w = World::new("cancel", SourceConfig { polls_before_done: 1_000_000, ..data() }).await;
    let _op = w.operator();
    // a run created by hand against a suspended sync (so no scheduled run competes)
    w.apply_sync("hospital-c", json!({"suspend": true, "schedule": "0 0 1 1 *"})).await;
    let run: BulkExportRun = serde_json::from_value(json!({
        "apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportRun",
        "metadata": {"name": "by-hand", "namespace": w.ns},
        "spec": {"syncRef": {"name": "hospital-c"}}
    }))
    .unwrap();
    let created = w.runs.create(&PostParams::default(), &run).await.unwrap();
    wait_for(&w.runs, "by-hand", 60, "exporting", |r| {
        r.status.as_ref().is_some_and(|s| s.phase == Phase::Exporting)
            && r.finalizers().iter().any(|f| f == "fhirsync.io/run-cleanup")
    })
    .await;
    w.source.wait_for(|l| l.polls >= 1).await;
    w.runs.delete("by-hand", &DeleteParams::default()).await.unwrap();
    wait_deleted(&w.runs, "by-hand", &created.uid().unwrap(), 30).await;
    let log = w.source.log();
    assert_eq!(log.status_deletes, vec!["job1".to_string()], "the export was cancelled on the source");
    assert_eq!(log.active_exports, 0);
    assert!(!w.dir.path().join("staging").join(&w.ns).join("by-hand").exists());
    assert!(w.pathling.log().imports.is_empty());
}

#[tokio::test]
async fn invalid_syncs_are_refused_or_reported() {
    let _g = SERIAL.lock().await;
    let w = World::new("invalid", data()).await;
    // refused by the API server, with a message naming the field
    let bad = w.sync_manifest("bad", json!({"export": {"level": "Group"}}));
    let err = w.syncs.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("groupId"), "{msg}");
    let bad = w.sync_manifest("bad", json!({"target": {"url": w.pathling.base, "saveMode": "overwrite"}}));
    let err = w.syncs.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("saveMode"), "{err}");
    let bad = w.sync_manifest("bad", json!({"runTimeout": "a day"}));
    let err = w.syncs.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("runTimeout"), "{err}");
    // every example in examples/ is accepted by the API server (server-side dry run)
    let client = cluster::client().await;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut v: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        v["metadata"]["namespace"] = json!(w.ns);
        let dry = PostParams { dry_run: true, ..Default::default() };
        let r = match v["kind"].as_str() {
            Some("BulkExportSync") => Api::<BulkExportSync>::namespaced(client.clone(), &w.ns)
                .create(&dry, &serde_json::from_value(v).unwrap())
                .await
                .map(|_| ()),
            Some("BulkExportRun") => Api::<BulkExportRun>::namespaced(client.clone(), &w.ns)
                .create(&dry, &serde_json::from_value(v).unwrap())
                .await
                .map(|_| ()),
            Some("FhirSubscriptionSync") => {
                Api::<fhirsync::api::FhirSubscriptionSync>::namespaced(client.clone(), &w.ns)
                    .create(&dry, &serde_json::from_value(v).unwrap())
                    .await
                    .map(|_| ())
            }
            k => panic!("{}: unexpected kind {k:?}", path.display()),
        };
        r.unwrap_or_else(|e| panic!("{} is refused: {e}", path.display()));
    }
    // a schedule of the right shape that does not parse: a condition, not a crash loop
    let _op = w.operator();
    w.apply_sync("odd", json!({"schedule": "61 * * * *"})).await;
    let s =
        wait_for(&w.syncs, "odd", 30, "InvalidSchedule", |s| ready(s).is_some_and(|r| r.1 == "InvalidSchedule")).await;
    let c = s.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(c.status, "False");
    assert!(c.message.contains("61 * * * *"), "{}", c.message);
    assert!(w.runs_of("odd").await.is_empty());
    // a staging path outside the operator's --staging-root: reported before any run
    w.apply_sync("outside", json!({"staging": {"volume": {"path": "/etc/fhirsync", "pathlingPath": "file:///x"}}}))
        .await;
    let s = wait_for(&w.syncs, "outside", 30, "InvalidSpec", |s| ready(s).is_some_and(|r| r.1 == "InvalidSpec")).await;
    let c = s.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(c.message.contains("--staging-root"), "{}", c.message);
    assert!(w.runs_of("outside").await.is_empty());
    // fixing it clears the condition
    w.apply_sync("odd", json!({"schedule": "0 0 1 1 *"})).await;
    wait_for(&w.syncs, "odd", 30, "valid again", |s| ready(s).is_some_and(|r| r.1 != "InvalidSchedule")).await;
}

#[tokio::test]
async fn admin_endpoints_and_graceful_shutdown() {
    let _g = SERIAL.lock().await;
    let w = World::new("admin", data()).await;
    let mut op = Operator::start(&w.ns, w.dir.path(), &["--log-format", "json"]);
    let http = reqwest::Client::new();
    // healthz answers as soon as the server is up; readyz once the caches have synced
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{}/readyz", op.admin)).send().await
            && r.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // polling an HTTP endpoint: nothing to watch
    }
    assert!(ready, "operator never became ready: {}", op.logs());
    let h = http.get(format!("{}/healthz", op.admin)).send().await.unwrap();
    assert!(h.status().is_success());
    // structured logs: one JSON object per line
    let logs = op.logs();
    let first = logs.lines().find(|l| !l.trim().is_empty()).expect("some log output");
    let v: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("not JSON ({e}): {first}"));
    assert!(v["level"].is_string() && v["message"].is_string(), "{v}");
    // insecureSkipVerify is reported while in use
    w.apply_sync("hospital-d", json!({"source": {"url": w.source.base, "tls": {"insecureSkipVerify": true}}})).await;
    let s = wait_for(&w.syncs, "hospital-d", 60, "sync Ready", ready_true).await;
    let c = s.status.unwrap().conditions.into_iter().find(|c| c.type_ == "InsecureTLS").expect("InsecureTLS condition");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "InsecureSkipVerify"));
    let m = http.get(format!("{}/metrics", op.admin)).send().await.unwrap().text().await.unwrap();
    for name in [
        "fhirsync_reconciles_total",
        "fhirsync_runs_total{result=\"succeeded\"} 1",
        "fhirsync_resources_imported_total{resource_type=\"Observation\"} 2217",
        "fhirsync_bytes_transferred_total",
        "fhirsync_run_duration_seconds",
        "fhirsync_watermark_age_seconds",
    ] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
    assert_eq!(op.terminate(), Some(0), "SIGTERM: graceful exit 0\n{}", op.logs());
}

fn ready_true(s: &BulkExportSync) -> bool {
    ready(s).is_some_and(|r| r.0 == "True")
}

#[tokio::test]
async fn a_cron_schedule_starts_runs_and_reports_the_next_one() {
    let _g = SERIAL.lock().await;
    let w = World::new("cron", data()).await;
    let _op = w.operator();
    w.apply_sync("hospital-e", json!({"schedule": "* * * * *"})).await;
    let s = wait_for(&w.syncs, "hospital-e", 30, "next run reported", |s| {
        s.status.as_ref().is_some_and(|st| st.next_schedule_time.is_some())
    })
    .await;
    let next = s.status.unwrap().next_schedule_time.unwrap().0;
    assert!(next > jiff::Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(1)).unwrap());
    assert_eq!(next.as_second() % 60, 0, "on a minute boundary");
    // the scheduled run happens at that minute
    let s = wait_for(&w.syncs, "hospital-e", 90, "scheduled run succeeded", ready_true).await;
    let runs = w.runs_of("hospital-e").await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].spec.trigger, fhirsync::api::Trigger::Schedule);
    let st = s.status.unwrap();
    assert!(st.last_schedule_time.unwrap().0 >= next);
    assert!(st.next_schedule_time.unwrap().0 > next, "the next slot moved on");
}

#[tokio::test]
async fn leader_election_hands_a_running_sync_to_the_standby() {
    use k8s_openapi::api::coordination::v1::Lease;
    let _g = SERIAL.lock().await;
    cluster::apply_core_shims();
    let w = World::new("leader", SourceConfig { polls_before_done: 1_000_000, ..data() }).await;
    let leases: Api<Lease> = Api::namespaced(cluster::client().await, &w.ns);
    let lease_name = "fhirsync-operator";
    let args = ["--leader-elect", "--lease-name", lease_name, "--lease-namespace", w.ns.as_str()];
    let mut a =
        Operator::start_env(&w.ns, w.dir.path(), &args, &[("POD_NAME", "op-a"), ("FHIRSYNC_LEASE_SECONDS", "4")]);
    let holder = |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.clone());
    wait_for(&leases, lease_name, 30, "op-a leads", move |l| holder(l).as_deref() == Some("op-a")).await;
    let b = Operator::start_env(&w.ns, w.dir.path(), &args, &[("POD_NAME", "op-b"), ("FHIRSYNC_LEASE_SECONDS", "4")]);
    // the standby is Ready (rollouts and drains proceed) without acting
    let http = reqwest::Client::new();
    let mut standby_ready = false;
    for _ in 0..200 {
        if http.get(format!("{}/readyz", b.admin)).send().await.is_ok_and(|r| r.status().is_success()) {
            standby_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // an HTTP endpoint: nothing to watch
    }
    assert!(standby_ready, "standby not ready: {}", b.logs());

    w.apply_sync("hospital-f", json!({})).await;
    let run = loop {
        if let Some(r) = w.runs_of("hospital-f").await.into_iter().next() {
            break r;
        }
        w.source.wait_for(|l| l.polls >= 1).await;
    };
    wait_for(&w.runs, &run.name_any(), 60, "exporting", |r| {
        r.status.as_ref().is_some_and(|s| s.export_status_url.is_some())
    })
    .await;
    w.source.wait_for(|l| l.polls >= 2).await;
    assert!(!b.logs().contains("acquired leadership"), "the standby must not act while the leader lives");
    a.kill(); // the leader dies mid-run
    w.source.configure(|c| c.polls_before_done = 0);
    let r = wait_for(&w.runs, &run.name_any(), 60, "standby finishes the run", |r| phase(r).is_finished()).await;
    assert_eq!(phase(&r), Phase::Succeeded, "{:?}\n{}", r.status, b.logs());
    assert!(b.logs().contains("acquired leadership"));
    let l = leases.get(lease_name).await.unwrap();
    assert_eq!(holder(&l).as_deref(), Some("op-b"));
    let log = w.source.log();
    assert_eq!(log.accepted, 1, "the standby resumed the same export");
    assert_eq!(log.max_active_exports, 1, "never two exports at once");
    assert_eq!(w.pathling.log().imports.len(), 1, "imported exactly once");
}

#[tokio::test]
async fn a_paused_leader_that_wakes_up_stops_acting_before_the_new_one_works() {
    use k8s_openapi::api::coordination::v1::Lease;
    let _g = SERIAL.lock().await;
    cluster::apply_core_shims();
    let w = World::new("paused", SourceConfig { polls_before_done: 1_000_000, ..data() }).await;
    let leases: Api<Lease> = Api::namespaced(cluster::client().await, &w.ns);
    let lease_name = "fhirsync-operator";
    let args = ["--leader-elect", "--lease-name", lease_name, "--lease-namespace", w.ns.as_str()];
    let env = |pod| [("POD_NAME", pod), ("FHIRSYNC_LEASE_SECONDS", "4")];
    let mut a = Operator::start_env(&w.ns, w.dir.path(), &args, &env("op-a"));
    let holder = |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.clone());
    wait_for(&leases, lease_name, 30, "op-a leads", move |l| holder(l).as_deref() == Some("op-a")).await;
    let b = Operator::start_env(&w.ns, w.dir.path(), &args, &env("op-b"));
    w.apply_sync("hospital-p", json!({})).await;
    let run = loop {
        if let Some(r) = w.runs_of("hospital-p").await.into_iter().next() {
            break r;
        }
        w.source.wait_for(|l| l.polls >= 1).await;
    };
    w.source.wait_for(|l| l.polls >= 2).await;
    // the leader freezes mid-export; the standby takes the lease and the run
    a.signal("STOP");
    wait_for(&leases, lease_name, 60, "op-b took over", move |l| holder(l).as_deref() == Some("op-b")).await;
    let polls = w.source.log().polls;
    w.source.wait_for(|l| l.polls > polls).await; // op-b polls the same export
    // the old leader wakes up: it must not poll, release, fail or clean up anything
    a.signal("CONT");
    for _ in 0..200 {
        if !a.is_running() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // a process exit: nothing to watch
    }
    assert!(!a.is_running(), "the old leader exits once it sees the lease is gone:\n{}", a.logs());
    assert!(w.source.log().status_deletes.is_empty(), "nobody released the export the new leader works on");
    w.source.configure(|c| c.polls_before_done = 0);
    let r = wait_for(&w.runs, &run.name_any(), 60, "op-b finishes the run", |r| phase(r).is_finished()).await;
    assert_eq!(phase(&r), Phase::Succeeded, "{:?}\nop-a:\n{}\nop-b:\n{}", r.status, a.logs(), b.logs());
    let log = w.source.log();
    assert_eq!(log.accepted, 1, "one export, resumed by the new leader");
    assert_eq!(log.max_active_exports, 1);
    assert_eq!(log.status_deletes.len(), 1, "released once, by the new leader, after its transfer");
    assert_eq!(w.pathling.log().imports.len(), 1, "imported exactly once");
    assert!(!a.logs().contains("run failed"), "the old leader failed nothing:\n{}", a.logs());
}

#[tokio::test]
async fn two_syncs_on_one_source_never_export_at_once() {
    let _g = SERIAL.lock().await;
    let w = World::new("shared-src", SourceConfig { polls_before_done: 2, ..data() }).await;
    let _op = w.operator();
    w.apply_sync("ward-1", json!({})).await;
    w.apply_sync("ward-2", json!({"export": {"types": ["Patient"]}})).await;
    wait_for(&w.syncs, "ward-1", 60, "ward-1 Ready", ready_true).await;
    wait_for(&w.syncs, "ward-2", 60, "ward-2 Ready", ready_true).await;
    let log = w.source.log();
    assert_eq!(log.max_active_exports, 1, "one export in flight per source and credential");
    assert_eq!(log.kickoffs.len(), 2, "the second run waited for the first instead of being refused");
    assert_eq!(w.pathling.log().max_concurrent_imports, 1);
}
