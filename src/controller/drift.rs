//! The BulkExportSync controller's drift part: adapts `crate::sync::verify` to the cluster. Creates
//! verification and repair runs, folds their results into `status.drift`, keeps the `InSync`
//! condition, the drift gauges, and an Event per verification that finds drift.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::Context;
use super::notes::Note;
use crate::api::conditions::{remove_condition, set_condition_status, types};
use crate::api::{
    ANNOTATION_VERIFY_NOW, BulkExportRun, BulkExportRunSpec, BulkExportSync, BulkExportSyncStatus, Drift, Phase,
    RunTemplate, SyncRef, Trigger, VerifyRun,
};
use crate::metrics::{DriftLabels, SyncLabels};
use crate::schedule::Schedule;
use crate::sync::verify::{self as decide, Due, Facts};

/// The verify schedule, or the reason it cannot be parsed.
pub fn schedule(sync: &BulkExportSync) -> Result<Option<Schedule>, String> {
    match sync.spec.verify.as_ref().and_then(|v| v.schedule.as_ref()) {
        Some(expr) => Schedule::parse(expr, &sync.spec.time_zone).map(Some),
        None => Ok(None),
    }
}

/// Which verification or repair is due.
pub fn due(
    sync: &BulkExportSync,
    st: &BulkExportSyncStatus,
    schedule: Option<&Schedule>,
    now: Timestamp,
) -> Option<Due> {
    let f = Facts {
        schedule,
        suspend: sync.spec.suspend,
        verify_now: sync.annotations().get(ANNOTATION_VERIFY_NOW).cloned(),
        handled_verify_now: st.handled_verify_now.clone(),
        last_slot: st.last_verify_schedule_time.as_ref().map(|t| t.0),
        created: sync.creation_timestamp().map(|t| t.0),
        has_succeeded: st.last_successful_run.is_some(),
        drift: st.drift.as_ref(),
    };
    decide::due(&sync.name_any(), &f, now)
}

/// Other BulkExportSyncs that write any of this sync's types into the same Pathling (their extras
/// are not this sync's to delete).
pub fn shared_with(ctx: &Context, sync: &BulkExportSync) -> Vec<String> {
    let Some(store) = ctx.sync_store.get() else { return vec![] };
    let url = sync.spec.target.url.trim_end_matches('/');
    let mine = &sync.spec.export.types;
    let mut out: Vec<String> = store
        .state()
        .iter()
        .filter(|o| o.uid() != sync.uid() && o.metadata.deletion_timestamp.is_none())
        .filter(|o| o.spec.target.url.trim_end_matches('/') == url)
        .filter(|o| {
            mine.is_empty() || o.spec.export.types.is_empty() || o.spec.export.types.iter().any(|t| mine.contains(t))
        })
        .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
        .collect();
    out.sort();
    out.truncate(100);
    out
}

/// The run spec of a due verification or repair (the repair exports only its types, in full).
pub fn run_spec(
    shared_with: &(dyn Fn() -> Vec<String> + Sync),
    sync: &BulkExportSync,
    st: &BulkExportSyncStatus,
    due: &Due,
) -> (String, BulkExportRunSpec) {
    let mut template = RunTemplate::from(&sync.spec);
    match due {
        Due::Verify { name, recheck, .. } => {
            let verify = VerifyRun {
                repair: sync.spec.verify.as_ref().map(|v| v.repair).unwrap_or(true),
                // changes after the watermark are the next run's business, not drift
                pending_after: st
                    .watermark
                    .clone()
                    .or_else(|| st.last_successful_run.as_ref().and_then(|r| r.transaction_time.clone())),
                shared_with: shared_with(),
                recheck: *recheck,
            };
            let spec = BulkExportRunSpec {
                sync_ref: SyncRef { name: sync.name_any() },
                since: None,
                trigger: Trigger::Verify,
                template: Some(template),
                verify: Some(verify),
            };
            (name.clone(), spec)
        }
        Due::Repair { name, types } => {
            template.export.types = types.clone();
            let spec = BulkExportRunSpec {
                sync_ref: SyncRef { name: sync.name_any() },
                since: None,
                trigger: Trigger::Repair,
                template: Some(template),
                verify: None,
            };
            (name.clone(), spec)
        }
    }
}

/// Records in the status that `due` was started as run `name`.
pub fn started(st: &mut BulkExportSyncStatus, due: &Due, name: &str, now: Timestamp) {
    match due {
        Due::Verify { slot, verify_now, .. } => {
            if let Some(s) = slot {
                st.last_verify_schedule_time = Some(Time((*s).min(now)));
            }
            if verify_now.is_some() {
                st.handled_verify_now = verify_now.clone();
            }
        }
        Due::Repair { .. } => {
            if let Some(d) = &st.drift {
                st.drift = Some(decide::repair_started(d, name));
            }
        }
    }
}

/// Folds a finished verification or repair run into the status; `false` for other runs.
pub fn fold(sync: &BulkExportSync, st: &mut BulkExportSyncStatus, run: &BulkExportRun, notes: &mut Vec<Note>) -> bool {
    let rs = run.status.clone().unwrap_or_default();
    let name = run.name_any();
    let message = rs.message.clone().unwrap_or_default();
    match run.spec.trigger {
        Trigger::Verify => {
            let v = run.spec.verify.clone().unwrap_or_default();
            if rs.phase == Phase::Succeeded
                && let Some(report) = rs.drift.clone()
            {
                let d = decide::after_verification(st.drift.as_ref(), &name, report, v.recheck, v.repair);
                if !d.in_sync {
                    notes.push(Note::warning("DriftFound", "Verify", format!("run {name}: {message}")));
                }
                st.drift = Some(d);
            } else {
                notes.push(Note::warning("VerifyFailed", "Verify", format!("run {name} failed: {message}")));
                st.drift = decide::after_failed_verification(st.drift.as_ref(), &name, &message);
                set_condition_status(
                    &mut st.conditions,
                    types::IN_SYNC,
                    "Unknown",
                    "VerifyFailed",
                    format!("the verification {name} failed: {message}"),
                    sync.metadata.generation,
                );
                return true;
            }
        }
        Trigger::Repair => {
            if let Some(d) = &st.drift {
                st.drift = Some(decide::after_repair(d, &name, rs.phase == Phase::Succeeded, &message));
            }
            if rs.phase != Phase::Succeeded {
                notes.push(Note::warning("RepairFailed", "Repair", format!("run {name} failed: {message}")));
            }
        }
        _ => return false,
    }
    in_sync(sync, st);
    true
}

/// Keeps the `InSync` condition in step with `status.drift`.
pub fn in_sync(sync: &BulkExportSync, st: &mut BulkExportSyncStatus) {
    let gen_ = sync.metadata.generation;
    match decide::in_sync(st.drift.as_ref(), sync.spec.verify.is_some()) {
        Some((status, reason, msg)) => {
            let keep_failure = status == "Unknown"
                && st.conditions.iter().any(|c| c.type_ == types::IN_SYNC && c.reason == "VerifyFailed");
            if !keep_failure {
                set_condition_status(&mut st.conditions, types::IN_SYNC, status, reason, msg, gen_);
            }
        }
        None => {
            remove_condition(&mut st.conditions, types::IN_SYNC);
        }
    }
}

/// Keeps the drift gauges in step with `status.drift`; `before` is the drift the gauges showed
/// (types no longer listed are removed).
pub fn gauges(ctx: &Context, sync: &BulkExportSync, st: &BulkExportSyncStatus, before: Option<&Drift>) {
    let (ns, name) = (sync.namespace().unwrap_or_default(), sync.name_any());
    let labels = |t: &str, kind: &str| DriftLabels {
        namespace: ns.clone(),
        name: name.clone(),
        resource_type: t.to_string(),
        kind: kind.to_string(),
    };
    if let Some(b) = before {
        for t in &b.types {
            if st.drift.as_ref().is_none_or(|d| !d.types.iter().any(|x| x.type_ == t.type_)) {
                ctx.metrics.drift.remove(&labels(&t.type_, "missing"));
                ctx.metrics.drift.remove(&labels(&t.type_, "extra"));
            }
        }
    }
    if let Some(d) = &st.drift {
        for t in &d.types {
            ctx.metrics.drift.get_or_create(&labels(&t.type_, "missing")).set(t.missing);
            ctx.metrics.drift.get_or_create(&labels(&t.type_, "extra")).set(t.extra - d.deleted.min(t.extra));
        }
        let sl = SyncLabels { namespace: ns.clone(), name: name.clone() };
        let ok = st.conditions.iter().any(|c| c.type_ == types::IN_SYNC && c.status == "True");
        ctx.metrics.in_sync.get_or_create(&sl).set(i64::from(ok));
        if let Some(t) = &d.verified_at {
            ctx.metrics.last_verification.get_or_create(&sl).set(t.0.as_millisecond() as f64 / 1000.0);
        }
    }
}
