//! The BulkExportSync planner as tables: a sync, its runs, the preflight's verdict → the conditions,
//! the acts and the next look.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Value, json};

use super::*;
use crate::api::conditions::types;

const NOW: &str = "2026-12-02T08:00:00Z";

/// A sync named `s` (generation 2) with `spec` merged over a valid one and `status` (where
/// `"watermarkScope": "current"` stands for the scope of its own spec).
fn sync(spec: Value, status: Value, annotations: Value) -> BulkExportSync {
    let mut base = json!({
        "source": {"url": "http://s/fhir"}, "target": {"url": "http://p/fhir"},
        "staging": {"volume": {"path": "/staging", "pathlingPath": "file:///staging"}}
    });
    for (k, v) in spec.as_object().cloned().unwrap_or_default() {
        base[k] = v;
    }
    let mut s: BulkExportSync = serde_json::from_value(json!({
        "apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportSync",
        "metadata": {"name": "s", "namespace": "ns", "uid": "u1", "generation": 2,
                     "creationTimestamp": "2026-12-01T00:00:00Z", "annotations": annotations},
        "spec": base
    }))
    .expect("a valid sync");
    let mut status = status;
    if status["watermarkScope"] == "current" {
        status["watermarkScope"] = json!(crate::sync::watermark_scope(&s.spec));
    }
    s.status = Some(serde_json::from_value(status).expect("a valid status"));
    s
}

fn run(name: &str, created: &str, trigger: &str, status: Value) -> Arc<BulkExportRun> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportRun",
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
            "spec": {"syncRef": {"name": "s"}, "trigger": trigger},
            "status": status
        }))
        .expect("a valid run"),
    )
}

fn ok_run(name: &str, created: &str) -> Arc<BulkExportRun> {
    run(
        name,
        created,
        "Schedule",
        json!({"phase": "Succeeded", "transactionTime": "2026-12-02T07:00:00Z",
               "completionTime": "2026-12-02T07:01:00Z", "resources": {"Patient": 3}}),
    )
}

/// A settled sync: its scope recorded, its generation run, its preflight passed.
fn settled(extra: Value) -> Value {
    let mut v = json!({"watermarkScope": "current", "lastRunGeneration": 2, "preflightGeneration": 2});
    for (k, x) in extra.as_object().cloned().unwrap_or_default() {
        v[k] = x;
    }
    v
}

fn describe(a: &Act) -> String {
    match a {
        Act::Event(n) => format!("event {}", n.reason),
        Act::Create(r) => format!("create {:?}", r.spec.trigger),
        Act::Prune(n) => format!("prune {n}"),
    }
}

fn condition(st: &BulkExportSyncStatus, t: &str) -> (String, String) {
    let c = crate::api::conditions::get_condition(&st.conditions, t);
    c.map(|c| (c.status.clone(), c.reason.clone())).unwrap_or_else(|| ("-".into(), "-".into()))
}

struct Want {
    ready: (&'static str, &'static str),
    progressing: (&'static str, &'static str),
    acts: &'static [&'static str],
    next: Next,
}

/// Plans one pass; `held` is what the preflight said (when the planner asked).
fn plan(sync: &BulkExportSync, runs: &[Arc<BulkExportRun>], held: Option<u64>) -> (Plan, Option<Gate>) {
    let opts = Options::default();
    let shared = || vec!["other/sync".to_string()];
    let o = Observed { sync, runs, opts: &opts, shared_with: &shared, now: NOW.parse::<Timestamp>().unwrap() };
    match begin(&o) {
        Begun::Done(p) => (*p, None),
        Begun::Draft(d) => {
            let gate = d.gate();
            let held = match gate {
                Gate::Check => held.map(Duration::from_secs),
                Gate::Wait(w) => Some(w),
                Gate::Pass => None,
            };
            (d.finish(held), Some(gate))
        }
    }
}

#[test]
fn a_pass_decides_conditions_acts_and_the_next_look() {
    let t0 = "2026-12-02T06:00:00Z";
    let t1 = "2026-12-02T06:30:00Z";
    let t2 = "2026-12-02T07:00:00Z";
    let exporting = run("r1", t2, "Schedule", json!({"phase": "Exporting"}));
    let failed = run("r1", t2, "Schedule", json!({"phase": "Failed", "reason": "ExportFailed", "message": "boom"}));
    type Case = (&'static str, BulkExportSync, Vec<Arc<BulkExportRun>>, Option<u64>, Want);
    let table: Vec<Case> = vec![
        (
            "a new sync creates its first run once the preflight passed",
            sync(json!({}), json!({}), json!({})),
            vec![],
            None,
            Want {
                ready: ("False", "Pending"),
                progressing: ("True", "Pending"),
                acts: &["create Schedule"],
                next: Next::After(Duration::from_secs(300)),
            },
        ),
        (
            "a failing preflight holds the first run and looks again when it may check again",
            sync(json!({}), json!({}), json!({})),
            vec![],
            Some(60),
            Want {
                ready: ("False", "Pending"),
                progressing: ("False", "PreflightFailed"),
                acts: &[],
                next: Next::After(Duration::from_secs(60)),
            },
        ),
        (
            "an invalid spec runs nothing and waits for a change",
            sync(json!({"runTimeout": "forever"}), json!({}), json!({})),
            vec![],
            None,
            Want {
                ready: ("False", "InvalidSpec"),
                progressing: ("False", "InvalidSpec"),
                acts: &[],
                next: Next::Change,
            },
        ),
        (
            "an invalid schedule runs nothing",
            sync(json!({"schedule": "every full moon"}), json!({}), json!({})),
            vec![],
            None,
            Want {
                ready: ("False", "InvalidSchedule"),
                progressing: ("False", "InvalidSchedule"),
                acts: &[],
                next: Next::Change,
            },
        ),
        (
            "a succeeded run is folded: Ready, idle, no Event, and an hour until anything is due",
            sync(json!({}), settled(json!({"activeRun": "r1"})), json!({})),
            vec![ok_run("r1", t2)],
            None,
            Want {
                ready: ("True", "Succeeded"),
                progressing: ("False", "Idle"),
                acts: &[],
                next: Next::After(Duration::from_secs(3600)),
            },
        ),
        (
            "a failed run: Ready False, a Warning with the run's reason",
            sync(json!({}), settled(json!({"activeRun": "r1"})), json!({})),
            vec![failed],
            None,
            Want {
                ready: ("False", "RunFailed"),
                progressing: ("False", "Idle"),
                acts: &["event ExportFailed"],
                next: Next::After(Duration::from_secs(3600)),
            },
        ),
        (
            "a run in flight: Progressing says its phase, and a run-now waits for it",
            sync(json!({}), settled(json!({"activeRun": "r1"})), json!({"fhirsync.io/run-now": "1"})),
            vec![exporting.clone()],
            None,
            Want {
                ready: ("False", "Pending"),
                progressing: ("True", "Exporting"),
                acts: &[],
                next: Next::After(Duration::from_secs(300)),
            },
        ),
        (
            "an unfinished run nobody recorded is adopted",
            sync(json!({}), settled(json!({})), json!({})),
            vec![exporting],
            None,
            Want {
                ready: ("False", "Pending"),
                progressing: ("True", "Exporting"),
                acts: &[],
                next: Next::After(Duration::from_secs(300)),
            },
        ),
        (
            "run-now while idle creates a run",
            sync(json!({}), settled(json!({})), json!({"fhirsync.io/run-now": "1"})),
            vec![],
            None,
            Want {
                ready: ("False", "Pending"),
                progressing: ("True", "Pending"),
                acts: &["create RunNow"],
                next: Next::After(Duration::from_secs(300)),
            },
        ),
        (
            "a changed source resets the watermark, with an Event, and runs again in full",
            sync(
                json!({}),
                json!({"watermarkScope": "before", "watermark": t0, "lastRunGeneration": 1, "preflightGeneration": 2}),
                json!({}),
            ),
            vec![],
            None,
            Want {
                ready: ("False", "Pending"),
                progressing: ("True", "Pending"),
                acts: &["event WatermarkReset", "create Schedule"],
                next: Next::After(Duration::from_secs(300)),
            },
        ),
        (
            "the history keeps historyLimit finished runs, pruning the oldest",
            sync(json!({"historyLimit": 1}), settled(json!({})), json!({})),
            vec![ok_run("a", t0), ok_run("b", t1), ok_run("c", t2)],
            None,
            Want {
                ready: ("False", "Pending"),
                progressing: ("False", "Idle"),
                acts: &["prune a", "prune b"],
                next: Next::After(Duration::from_secs(3600)),
            },
        ),
        (
            "an active run the API server no longer has is forgotten",
            sync(json!({}), settled(json!({"activeRun": "gone"})), json!({})),
            vec![],
            None,
            Want {
                ready: ("False", "Pending"),
                progressing: ("False", "Idle"),
                acts: &[],
                next: Next::After(Duration::from_secs(3600)),
            },
        ),
        (
            "a suspended sync starts nothing and says so",
            sync(json!({"suspend": true}), json!({"watermarkScope": "current", "preflightGeneration": 2}), json!({})),
            vec![],
            None,
            Want {
                ready: ("False", "Suspended"),
                progressing: ("False", "Idle"),
                acts: &[],
                next: Next::After(Duration::from_secs(3600)),
            },
        ),
        (
            "verify-now on an idle sync that has succeeded creates a verification",
            sync(
                json!({"verify": {}}),
                settled(json!({"lastSuccessfulRun": {"name": "a", "transactionTime": t0}, "conditions": [
                    {"type": "Ready", "status": "True", "reason": "Succeeded", "message": "m", "lastTransitionTime": t0}
                ]})),
                json!({"fhirsync.io/verify-now": "1"}),
            ),
            vec![],
            None,
            Want {
                ready: ("True", "Succeeded"),
                progressing: ("True", "Pending"),
                acts: &["create Verify"],
                next: Next::After(Duration::from_secs(300)),
            },
        ),
    ];
    for (what, sync, runs, held, want) in table {
        let (p, _) = plan(&sync, &runs, held);
        assert_eq!(condition(&p.status, types::READY), (want.ready.0.into(), want.ready.1.into()), "{what}: Ready");
        assert_eq!(
            condition(&p.status, types::PROGRESSING),
            (want.progressing.0.into(), want.progressing.1.into()),
            "{what}: Progressing"
        );
        assert_eq!(p.acts.iter().map(describe).collect::<Vec<_>>(), want.acts, "{what}: acts");
        assert_eq!(p.next, want.next, "{what}: next");
        assert_eq!(p.status.observed_generation, Some(2), "{what}");
    }
}

/// A run as the planner makes it for `s`, finished with `status`.
fn run_of(s: &BulkExportSync, name: &str, status: Value) -> Arc<BulkExportRun> {
    let spec = BulkExportRunSpec {
        sync_ref: SyncRef { name: "s".into() },
        since: None,
        trigger: Trigger::Schedule,
        template: Some(RunTemplate::from(&s.spec)),
        verify: None,
    };
    let mut r = super::super::sync_runs::new_run(s, s.status.as_ref().unwrap(), name, spec);
    r.status = Some(serde_json::from_value(status).unwrap());
    Arc::new(r)
}

#[test]
fn a_folded_success_moves_the_watermark_and_a_created_run_becomes_the_active_one() {
    let s = sync(json!({}), settled(json!({"activeRun": "r1"})), json!({}));
    let done = json!({"phase": "Succeeded", "kickoffTime": "2026-12-02T07:00:00Z",
                      "transactionTime": "2026-12-02T07:00:00Z", "resources": {"Patient": 3}});
    let (p, _) = plan(&s, &[run_of(&s, "r1", done.clone())], None);
    assert_eq!(
        p.status.watermark.as_ref().map(|t| t.0.to_string()),
        Some("2026-12-02T06:55:00Z".into()),
        "the watermark moved to the run's transactionTime less the overlap"
    );
    assert_eq!(p.status.last_successful_run.as_ref().map(|r| r.name.as_str()), Some("r1"));
    assert_eq!(p.status.active_run, None);

    // a success of an earlier spec (another target) does not move the watermark of this one
    let earlier = sync(json!({"target": {"url": "http://old/fhir"}}), settled(json!({})), json!({}));
    let r = run_of(&earlier, "r1", done);
    let s = sync(json!({}), settled(json!({"activeRun": "r1"})), json!({}));
    let (p, _) = plan(&s, &[r], None);
    assert_eq!(p.status.watermark, None, "the watermark stays reset");
    assert_eq!(condition(&p.status, types::READY), ("True".into(), "Succeeded".into()));

    let s = sync(json!({}), json!({}), json!({}));
    let (p, gate) = plan(&s, &[], None);
    assert_eq!(gate, Some(Gate::Check), "a first run asks for the preflight checks");
    let Some(Act::Create(r)) = p.acts.first() else { panic!("{:?}", p.acts) };
    assert_eq!(p.status.active_run, r.metadata.name, "the created run is the active one");
    assert_eq!(r.metadata.owner_references.as_ref().map(Vec::len), Some(1), "the sync owns its run");
    assert!(r.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(crate::api::ANNOTATION_WATERMARK_BASIS)));

    // a verification carries the syncs it shares Pathling with
    let s = sync(
        json!({"verify": {}}),
        settled(json!({"lastSuccessfulRun": {"name": "a", "transactionTime": "2026-12-02T06:00:00Z"}})),
        json!({"fhirsync.io/verify-now": "1"}),
    );
    let (p, gate) = plan(&s, &[], None);
    assert_eq!(gate, Some(Gate::Pass), "no preflight once a run succeeded");
    let Some(Act::Create(r)) = p.acts.first() else { panic!("{:?}", p.acts) };
    assert_eq!(r.spec.verify.as_ref().map(|v| v.shared_with.clone()), Some(vec!["other/sync".to_string()]));
    assert_eq!(p.status.handled_verify_now.as_deref(), Some("1"));
}
