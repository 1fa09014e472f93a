//! BulkExportRun controller: drives one run through the engine in a task of its own, persisting the
//! status after every step; a finalizer cancels the export and cleans staging when a running run is
//! deleted.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Context, Error, RunTask};
use crate::api::conditions::{set_condition, set_insecure_tls, types};
use crate::api::validate::validate_bulk_sync;
use crate::api::{BulkExportRun, BulkExportRunStatus, BulkExportSync, FIELD_MANAGER, FINALIZER_RUN, Phase};
use crate::run::{self, DriveError, Engine, Failure, Memory, Persist, Reason};

/// Builds the controller future and its cache-sync check.
pub fn controller(
    ctx: Arc<Context>,
    ns: Option<String>,
    stop: CancellationToken,
) -> (BoxFuture<'static, ()>, super::ReadyCheck) {
    let api: Api<BulkExportRun> = super::scoped_api(&ctx.client, &ns);
    super::launch(Controller::new(api, watcher::Config::default()), ctx, stop, reconcile)
}

fn task_key(run: &BulkExportRun) -> String {
    format!("{}/{}/{}", run.namespace().unwrap_or_default(), run.name_any(), run.uid().unwrap_or_default())
}

async fn reconcile(run: Arc<BulkExportRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = run.namespace().unwrap_or_default();
    let api: Api<BulkExportRun> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER_RUN, run, |event| async {
        match event {
            Finalizer::Apply(r) => apply(r, ctx.clone()).await,
            Finalizer::Cleanup(r) => cleanup(r, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()))
}

async fn apply(run: Arc<BulkExportRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    if run.status.as_ref().is_some_and(|s| s.phase.is_finished()) {
        return Ok(Action::await_change());
    }
    if ctx.shutdown.is_cancelled() {
        return Ok(Action::await_change());
    }
    let key = task_key(&run);
    let mut tasks = ctx.tasks.lock().unwrap_or_else(|p| p.into_inner());
    if tasks.get(&key).is_some_and(|t| !t.handle.is_finished()) {
        return Ok(Action::await_change());
    }
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(drive_run(run.clone(), ctx.clone(), cancel.clone()));
    tasks.insert(key, RunTask { cancel, handle });
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Writes the newest status snapshot with server-side apply; the one lock orders all writers, and
/// each write takes the latest snapshot, so an older one never overwrites a newer one.
#[derive(Clone)]
struct StatusWriter {
    api: Api<BulkExportRun>,
    name: String,
    rx: watch::Receiver<BulkExportRunStatus>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl StatusWriter {
    async fn write_latest(&self) -> Result<(), String> {
        let _g = self.lock.lock().await;
        let st = self.rx.borrow().clone();
        let mut last = String::new();
        for attempt in 0..5u32 {
            match patch_status(&self.api, &self.name, &st).await {
                Ok(()) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => return Err("the run was deleted".into()),
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
                }
            }
        }
        Err(last)
    }
}

impl Persist for StatusWriter {
    async fn save(&mut self, _st: &BulkExportRunStatus) -> Result<(), String> {
        // drive() has just published `_st` as the newest snapshot
        self.write_latest().await
    }
}

async fn patch_status(api: &Api<BulkExportRun>, name: &str, st: &BulkExportRunStatus) -> Result<(), kube::Error> {
    let body = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportRun", "status": st});
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await.map(|_| ())
}

fn mark_failed(st: &mut BulkExportRunStatus, f: &Failure) {
    st.phase = Phase::Failed;
    st.reason = Some(f.reason.as_str().into());
    st.message = Some(f.message.clone());
    st.completion_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
    set_condition(&mut st.conditions, types::FAILED, true, f.reason.as_str(), f.message.clone(), None);
}

/// Resolves the sync and secrets into an engine for this run.
async fn engine_for(run: &BulkExportRun, ctx: &Context) -> Result<Engine, Failure> {
    let ns = run.namespace().unwrap_or_default();
    let syncs: Api<BulkExportSync> = Api::namespaced(ctx.client.clone(), &ns);
    let sync_name = &run.spec.sync_ref.name;
    let sync = match syncs.get_opt(sync_name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(Failure::new(
                Reason::InvalidSpec,
                format!("BulkExportSync {ns}/{sync_name} (spec.syncRef) does not exist; create it or fix syncRef"),
            ));
        }
        Err(e) => {
            return Err(Failure::new(
                Reason::SourceUnreachable,
                format!("reading BulkExportSync {ns}/{sync_name}: {e}"),
            ));
        }
    };
    validate_bulk_sync(&sync.spec)
        .map_err(|m| Failure::new(Reason::InvalidSpec, format!("BulkExportSync {sync_name}: {m}")))?;
    let since = run.spec.since.as_ref().map(|t| t.0);
    let setup = run::resolve::setup(&sync.spec, &ns, &run.name_any(), since, ctx.secrets.as_ref(), &ctx.opts).await?;
    Ok(Engine { setup, locks: ctx.locks.clone(), id: format!("{ns}/{}", run.name_any()), backoff_scale: 1.0 })
}

async fn drive_run(run: Arc<BulkExportRun>, ctx: Arc<Context>, cancel: CancellationToken) {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let api: Api<BulkExportRun> = Api::namespaced(ctx.client.clone(), &ns);
    let mut st = run.status.clone().unwrap_or_default();
    let fresh = st.start_time.is_none();
    let (tx, rx) = watch::channel(st.clone());
    let mut writer = StatusWriter { api, name: name.clone(), rx, lock: Arc::default() };
    let engine = match engine_for(&run, &ctx).await {
        Ok(e) => e,
        Err(f) => {
            mark_failed(&mut st, &f);
            tx.send_replace(st.clone());
            let _ = writer.write_latest().await;
            ctx.event(run.as_ref(), EventType::Warning, f.reason.as_str(), "Run", f.message).await;
            count_finished(&ctx, &st);
            return;
        }
    };
    set_insecure_tls(&mut st.conditions, engine.setup.insecure_tls, None);
    if fresh {
        ctx.event(
            run.as_ref(),
            EventType::Normal,
            "Started",
            "Run",
            format!(
                "run started (since: {})",
                run.spec.since.as_ref().map(|t| t.0.to_string()).unwrap_or_else(|| "full export".into())
            ),
        )
        .await;
    } else {
        tracing::info!(run = %format!("{ns}/{name}"), phase = ?st.phase, "resuming run");
    }
    // progress snapshots (during long transfers) are written every few seconds
    let progress_task = {
        let w = writer.clone();
        let mut rx = w.rx.clone();
        let stop = cancel.child_token();
        let s2 = stop.clone();
        (
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = s2.cancelled() => return,
                    }
                    if rx.has_changed().unwrap_or(false) {
                        rx.mark_unchanged();
                        let _ = w.write_latest().await;
                    }
                }
            }),
            stop,
        )
    };
    let r = run::drive(&engine, &mut st, &mut writer, &tx, &cancel).await;
    progress_task.1.cancel();
    let _ = progress_task.0.await;
    match r {
        Ok(()) => {
            let note = st.message.clone().unwrap_or_default();
            let (t, reason) = match st.phase {
                Phase::Succeeded if st.export_errors > 0 => (EventType::Warning, "PartialExport".to_string()),
                Phase::Succeeded => (EventType::Normal, "Succeeded".to_string()),
                _ => {
                    (EventType::Warning, st.reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| "Failed".into()))
                }
            };
            ctx.event(run.as_ref(), t, &reason, "Run", note).await;
            count_finished(&ctx, &st);
        }
        Err(DriveError::Cancelled) => {
            tracing::info!(run = %format!("{ns}/{name}"), "run paused (shutdown or deletion)")
        }
        Err(DriveError::Persist(e)) => {
            tracing::warn!(run = %format!("{ns}/{name}"), error = %e, "could not persist run status; will resume")
        }
    }
}

fn count_finished(ctx: &Context, st: &BulkExportRunStatus) {
    let m = &ctx.metrics;
    let result = if st.phase == Phase::Succeeded { "succeeded" } else { "failed" };
    m.runs.get_or_create(&crate::metrics::ResultLabels { result: result.into() }).inc();
    if let (Some(s), Some(e)) = (&st.start_time, &st.completion_time) {
        m.run_duration.observe(e.0.duration_since(s.0).as_secs_f64().max(0.0));
    }
    if st.phase == Phase::Succeeded {
        for (t, n) in &st.resources {
            m.resources_imported
                .get_or_create(&crate::metrics::TypeLabels { resource_type: t.clone() })
                .inc_by((*n).max(0) as u64);
        }
    }
    m.bytes_transferred.inc_by(st.bytes.max(0) as u64);
}

async fn cleanup(run: Arc<BulkExportRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = task_key(&run);
    let task = ctx.tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    if let Some(t) = task {
        t.cancel.cancel();
        let _ = t.handle.await;
    }
    // the latest persisted status (the cached object may predate the task's last write)
    let ns = run.namespace().unwrap_or_default();
    let api: Api<BulkExportRun> = Api::namespaced(ctx.client.clone(), &ns);
    let latest = api.get_opt(&run.name_any()).await?.unwrap_or_else(|| (*run).clone());
    let mut st = latest.status.clone().unwrap_or_default();
    if st.phase.is_finished() {
        return Ok(Action::await_change());
    }
    match engine_for(&latest, &ctx).await {
        Ok(engine) => {
            engine.cancel(&mut st, &mut Memory::default()).await;
            ctx.event(
                &latest,
                EventType::Normal,
                "Cancelled",
                "Cancel",
                "the run was deleted: export cancelled on the source, staged files removed".into(),
            )
            .await;
        }
        Err(f) => {
            tracing::warn!(run = %run.name_any(), error = %f, "cannot clean up the deleted run's export and staging");
        }
    }
    Ok(Action::await_change())
}
