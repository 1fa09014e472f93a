//! `sync-once --verify`: after the run, a verification through the same engine and the same
//! decisions (`crate::sync::verify`) as the operator — and, when it finds Pathling missing resources
//! and `spec.verify.repair` allows, a repair run of those types and a second verification.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::drift::RepairState;
use crate::api::{BulkExportRunStatus, BulkExportSync, Drift, Phase, RunTemplate, VerifyRun};
use crate::run::{self, Deps, DriveError, Persist, PersistError, RunInputs};
use crate::sync::{self, verify as decide};

/// Keeps nothing: a verification is not resumed by a later invocation.
struct Nowhere;

impl Persist for Nowhere {
    async fn save(&mut self, _: &BulkExportRunStatus) -> Result<(), PersistError> {
        Ok(())
    }
}

/// How a verification ended.
pub enum Verified {
    /// The drift, after any repair.
    Done(Drift),
    /// A verification or repair run failed (its status says why).
    Failed(Box<BulkExportRunStatus>),
    /// Interrupted.
    Cancelled,
}

async fn drive_one(
    inputs: &RunInputs,
    deps: &Deps,
    cancel: &CancellationToken,
) -> Result<BulkExportRunStatus, DriveError> {
    let mut st = BulkExportRunStatus::default();
    let (tx, rx) = watch::channel(st.clone());
    let reporter = tokio::spawn(super::sync_once::report_progress(rx, false));
    let r = run::drive(inputs, deps, &mut st, &mut Nowhere, &tx, cancel).await;
    drop(tx);
    let _ = reporter.await;
    r.map(|()| st)
}

/// Verifies (and repairs) the sync `sync` in namespace `ns`; `pending_after` is the watermark.
pub async fn verify(
    sync: &BulkExportSync,
    ns: &str,
    deps: &Deps,
    pending_after: Option<Timestamp>,
    cancel: &CancellationToken,
) -> Result<Verified, DriveError> {
    let name = sync.metadata.name.clone().unwrap_or_else(|| "sync".into());
    let repair = sync.spec.verify.as_ref().map(|v| v.repair).unwrap_or(true);
    let stamp = Timestamp::now().strftime("%Y%m%d%H%M%S").to_string();
    let inputs = |suffix: &str, template: RunTemplate, verify: Option<VerifyRun>| {
        let uid = uuid::Uuid::new_v4().simple().to_string();
        RunInputs {
            namespace: ns.to_string(),
            name: sync::run_name(&name, &format!("{suffix}-{stamp}-{}", &uid[..6])),
            uid,
            template,
            since: None,
            verify,
        }
    };
    let verify_run =
        |recheck: bool| VerifyRun { repair, pending_after: pending_after.map(Time), shared_with: vec![], recheck };
    let first = inputs("verify", RunTemplate::from(&sync.spec), Some(verify_run(false)));
    let st = match drive_one(&first, deps, cancel).await {
        Ok(st) => st,
        Err(DriveError::Cancelled) => return Ok(Verified::Cancelled),
        Err(e) => return Err(e),
    };
    let Some(report) = st.drift.clone().filter(|_| st.phase == Phase::Succeeded) else {
        return Ok(Verified::Failed(Box::new(st)));
    };
    let mut drift = decide::after_verification(None, &first.name, report, false, repair);
    let Some(types) = drift.repair.as_ref().filter(|r| r.state == RepairState::Pending).map(|r| r.types.clone()) else {
        return Ok(Verified::Done(drift));
    };
    eprintln!("repairing: exporting {} in full", types.join(", "));
    let mut template = RunTemplate::from(&sync.spec);
    template.export.types = types;
    let fix = inputs("repair", template, None);
    drift = decide::repair_started(&drift, &fix.name);
    let st = match drive_one(&fix, deps, cancel).await {
        Ok(st) => st,
        Err(DriveError::Cancelled) => return Ok(Verified::Cancelled),
        Err(e) => return Err(e),
    };
    let ok = st.phase == Phase::Succeeded;
    drift = decide::after_repair(&drift, &fix.name, ok, st.message.as_deref().unwrap_or_default());
    if !ok {
        return Ok(Verified::Done(drift));
    }
    let check = inputs("recheck", RunTemplate::from(&sync.spec), Some(verify_run(true)));
    let st = match drive_one(&check, deps, cancel).await {
        Ok(st) => st,
        Err(DriveError::Cancelled) => return Ok(Verified::Cancelled),
        Err(e) => return Err(e),
    };
    Ok(match st.drift.clone().filter(|_| st.phase == Phase::Succeeded) {
        Some(report) => Verified::Done(decide::after_verification(Some(&drift), &check.name, report, true, repair)),
        None => Verified::Done(
            decide::after_failed_verification(Some(&drift), &check.name, st.message.as_deref().unwrap_or_default())
                .unwrap_or(drift),
        ),
    })
}

/// Prints a verification's outcome as text.
pub fn print_text(d: &Drift) {
    let (status, reason, message) = decide::in_sync(Some(d), true).unwrap_or(("Unknown", "NotVerified", String::new()));
    println!("in sync:    {status} ({reason})");
    println!("drift:      {message}");
    for t in &d.types {
        let mut line = format!("  {}: source {}, pathling {}", t.type_, t.source, t.pathling);
        if t.missing > 0 {
            line.push_str(&format!(", missing {} (e.g. {})", t.missing, t.missing_examples.join(", ")));
        }
        if t.extra > 0 {
            line.push_str(&format!(", extra {} (e.g. {})", t.extra, t.extra_examples.join(", ")));
        }
        if t.pending > 0 {
            line.push_str(&format!(", pending {}", t.pending));
        }
        println!("{line}");
    }
}

/// Whether the drift ends in sync (the `InSync` condition would be True).
pub fn in_sync(d: &Drift) -> bool {
    decide::in_sync(Some(d), true).is_some_and(|(s, _, _)| s == "True")
}
