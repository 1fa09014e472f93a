//! The BulkExportSync controller's runs: a new one built (pure) and created (idempotently, by its
//! deterministic name), and a finished one folded into the sync's status (pure) — a verification's
//! or repair's into the drift, any other run's into the watermark, the last successful run and the
//! conditions.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::PostParams;
use kube::{Api, Resource, ResourceExt};

use super::Error;
use super::notes::Note;
use crate::api::conditions::{set_condition, types};
use crate::api::{
    ANNOTATION_WATERMARK_BASIS, BulkExportRun, BulkExportRunSpec, BulkExportSync, BulkExportSyncStatus, FIELD_MANAGER,
    LABEL_SYNC, Phase, RunSummary,
};
use crate::sync::{self, WatermarkMove};

fn run_is_finished(r: &BulkExportRun) -> bool {
    r.status.as_ref().is_some_and(|s| s.phase.is_finished())
}

/// A new run of `sync`, annotated with the watermark basis of the status being decided (`st`), so
/// that its watermark applies only while that basis holds.
pub(super) fn new_run(
    sync: &BulkExportSync,
    st: &BulkExportSyncStatus,
    name: &str,
    spec: BulkExportRunSpec,
) -> BulkExportRun {
    let basis = sync::watermark_basis(&sync::watermark_scope(&sync.spec), st.handled_reset_watermark.as_deref());
    BulkExportRun {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: sync.namespace(),
            annotations: Some([(ANNOTATION_WATERMARK_BASIS.to_string(), basis)].into()),
            labels: Some([(LABEL_SYNC.to_string(), sync::label_value(&sync.name_any()))].into()),
            owner_references: sync.controller_owner_ref(&()).map(|o| vec![o]),
            // set at creation: the run controller need not patch it in
            finalizers: Some(vec![crate::api::FINALIZER_RUN.to_string()]),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

/// Creates a run (idempotent: its name is deterministic). Returns whether a run of that name had
/// been created and finished before (then it is not adopted as the active run).
pub(super) async fn create_run(runs_api: &Api<BulkExportRun>, run: &BulkExportRun) -> Result<bool, Error> {
    let name = run.name_any();
    match runs_api.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, run).await {
        Ok(_) => Ok(false),
        // created before a crash or by a decision whose status write was lost: the run's
        // deterministic name makes this idempotent; adopt it unless it already finished
        Err(kube::Error::Api(s)) if s.code == 409 => {
            Ok(runs_api.get_opt(&name).await?.is_some_and(|r| run_is_finished(&r)))
        }
        Err(e) => Err(e.into()),
    }
}

/// A finished run's results go into the sync's status: a verification's or repair's into the
/// drift, any other run's into the watermark and conditions.
pub(super) fn finished(
    sync: &BulkExportSync,
    st: &mut BulkExportSyncStatus,
    run: &BulkExportRun,
    overlap: Duration,
    scheduled: bool,
    notes: &mut Vec<Note>,
) {
    st.active_run = None;
    if !super::drift::fold(sync, st, run, notes) {
        fold(sync, st, run, overlap, scheduled, notes);
    }
}

/// Folds a finished run into the sync's status: results, watermark, conditions.
fn fold(
    sync: &BulkExportSync,
    st: &mut BulkExportSyncStatus,
    run: &BulkExportRun,
    overlap: Duration,
    scheduled: bool,
    notes: &mut Vec<Note>,
) {
    let gen_ = sync.metadata.generation;
    let rs = run.status.clone().unwrap_or_default();
    let retry = if scheduled {
        "the next scheduled run retries"
    } else {
        "fix the cause, then annotate the sync with fhirsync.io/run-now=<new value> to retry"
    };
    let scope = sync::watermark_scope(&sync.spec);
    let applies = sync::run_applies(
        run.annotations().get(ANNOTATION_WATERMARK_BASIS).map(String::as_str),
        run.spec.template.as_ref().map(sync::template_scope).as_deref(),
        &scope,
        &sync::watermark_basis(&scope, st.handled_reset_watermark.as_deref()),
    );
    if rs.phase == Phase::Succeeded {
        if !applies {
            tracing::info!(sync = %sync.name_any(), run = %run.name_any(), "the run covered an earlier spec or preceded a watermark reset: the watermark stays reset");
        }
        let moved = sync.spec.incremental
            && applies
            && match sync::watermark_after(&rs, st.watermark.as_ref().map(|t| t.0), overlap) {
                WatermarkMove::To(w) => {
                    st.watermark = Some(Time(w));
                    true
                }
                WatermarkMove::Stays => false,
            };
        let total: i64 = rs.resources.values().sum();
        st.last_run_resources = Some(total);
        st.last_successful_run = Some(RunSummary {
            name: run.name_any(),
            finished_at: rs.completion_time.clone(),
            transaction_time: rs.transaction_time.clone(),
            resources: rs.resources.clone(),
            deleted: rs.deleted,
            deletion_source: rs.deletion_source,
        });
        let msg = format!(
            "run {} imported {total} resources{}",
            run.name_any(),
            if rs.deleted > 0 { format!(" and applied {} deletions", rs.deleted) } else { String::new() }
        );
        set_condition(&mut st.conditions, types::READY, true, "Succeeded", msg, gen_);
        let held = match (&st.watermark, moved) {
            (_, true) => String::new(),
            (_, false) if !applies => {
                " It ran for an earlier spec (or before a watermark reset): the next run fetches from the reset watermark."
                    .into()
            }
            (Some(w), false) => format!(" The watermark stays at {} so the next run fetches again what failed.", w.0),
            (None, false) => " The next run is a full export again, to fetch what failed.".into(),
        };
        let degraded_condition = rs.conditions.iter().find(|c| c.type_ == types::DEGRADED && c.status == "True");
        let run_degraded = degraded_condition.map(|c| c.message.clone()).unwrap_or_default();
        let run_degraded_reason = degraded_condition.map(|c| c.reason.as_str()).unwrap_or_default();
        let degraded = if rs.export_errors > 0 {
            Some((
                "PartialExport",
                format!("run {}: the source reported {} export errors.{held}", run.name_any(), rs.export_errors),
            ))
        } else if rs.deletions_incomplete {
            let reason = if run_degraded_reason == "DeletionsUnsupported" {
                "DeletionsUnsupported"
            } else {
                "DeletionsIncomplete"
            };
            Some((reason, format!("run {}: {run_degraded}", run.name_any())))
        } else if rs.deletion_source == Some(crate::api::DeletionSource::Unavailable) {
            Some(("DeletionsUnavailable", format!("run {}: {run_degraded}", run.name_any())))
        } else {
            None
        };
        match degraded {
            Some((reason, msg)) => {
                if reason != "PartialExport" {
                    notes.push(Note::warning(reason, "Run", msg.clone()));
                }
                set_condition(&mut st.conditions, types::DEGRADED, true, reason, msg, gen_);
            }
            None => {
                set_condition(&mut st.conditions, types::DEGRADED, false, "Succeeded", "the last run succeeded", gen_);
            }
        }
    } else {
        let reason = rs.reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| "RunFailed".into());
        let msg = format!("run {} failed: {}; {retry}", run.name_any(), rs.message.clone().unwrap_or_default());
        set_condition(&mut st.conditions, types::READY, false, "RunFailed", msg.clone(), gen_);
        set_condition(&mut st.conditions, types::DEGRADED, true, &reason, msg.clone(), gen_);
        notes.push(Note::warning(&reason, "Run", msg));
    }
}
