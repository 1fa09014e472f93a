//! BulkExportRun controller: drives each run through the engine in a task of its own — started once
//! per run per process, on a copy of the run read from the API server (never a stale cache) — and
//! stores its status through one writer that never overwrites a finished run. A finalizer cancels a
//! run that is deleted while running, using the run's own template (its sync may be gone already).

use crate::fhir::retry::rules;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::status::{Applied, apply};
use super::{Context, Error, RunTask};
use crate::api::validate::validate_bulk_sync;
use crate::api::{
    BulkExportRun, BulkExportRunStatus, BulkExportSync, FIELD_MANAGER, FINALIZER_RUN, Phase, RunTemplate,
};
use crate::run::{self, DriveError, Failure, Persist, PersistError, Reason, RunInputs};

/// Builds the controller future and its cache-sync check, on the shared run watch.
pub fn controller(
    ctx: Arc<Context>,
    runs: impl futures::Stream<Item = Result<BulkExportRun, kube::runtime::watcher::Error>> + Send + 'static,
    store: kube::runtime::reflector::Store<BulkExportRun>,
    stop: CancellationToken,
) -> (BoxFuture<'static, ()>, super::ReadyCheck) {
    super::launch(Controller::for_stream(runs, store), ctx, stop, reconcile)
}

async fn reconcile(run: Arc<BulkExportRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = run.namespace().unwrap_or_default();
    let api: Api<BulkExportRun> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER_RUN, run, |event| async {
        match event {
            Finalizer::Apply(r) => apply_run(r, ctx.clone()).await,
            Finalizer::Cleanup(r) => cleanup(r, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply_run(run: Arc<BulkExportRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    if run.status.as_ref().is_some_and(|s| s.phase.is_finished()) || ctx.shutdown.is_cancelled() {
        return Ok(Action::await_change());
    }
    let Some(uid) = run.uid() else { return Ok(Action::await_change()) };
    let mut tasks = ctx.tasks.lock().unwrap_or_else(|p| p.into_inner());
    if tasks.contains_key(&uid) {
        return Ok(Action::await_change()); // once per run per process
    }
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(drive_run(run.clone(), ctx.clone(), cancel.clone()));
    tasks.insert(uid, RunTask { cancel, handle });
    Ok(Action::await_change())
}

/// Stores a run's status: only when it changed, guarded by resourceVersion, and never over a run
/// that finished (or was replaced) elsewhere.
struct Writer {
    api: Api<BulkExportRun>,
    name: String,
    uid: String,
    state: Arc<tokio::sync::Mutex<WriterState>>,
}

struct WriterState {
    rv: Option<String>,
    last: Option<BulkExportRunStatus>,
}

impl Clone for Writer {
    fn clone(&self) -> Self {
        Self { api: self.api.clone(), name: self.name.clone(), uid: self.uid.clone(), state: self.state.clone() }
    }
}

impl Writer {
    async fn write(&self, st: &BulkExportRunStatus) -> Result<(), PersistError> {
        let mut g = self.state.lock().await;
        if g.last.as_ref() == Some(st) {
            return Ok(());
        }
        let mut conflicts = 0u32;
        let mut failures = rules::STATUS_WRITE.start();
        loop {
            let e = match apply(&self.api, &self.name, g.rv.as_deref(), st).await {
                Ok(Applied::Written(rv)) => {
                    g.rv = rv;
                    g.last = Some(st.clone());
                    return Ok(());
                }
                Ok(Applied::Gone | Applied::NotHeld) => return Err(PersistError::Gone),
                Ok(Applied::Conflict) => {
                    // the object changed: if only its metadata or spec did (a filled template, a
                    // finalizer), adopt its version; if its status is not what we wrote (finished,
                    // or driven elsewhere), never overwrite it
                    match self.api.get_opt(&self.name).await {
                        Ok(Some(r)) if r.uid().as_deref() == Some(self.uid.as_str()) => {
                            if r.status != g.last {
                                return Err(PersistError::Gone);
                            }
                            g.rv = r.resource_version();
                            conflicts += 1;
                            if conflicts < 5 {
                                continue;
                            }
                            "repeated conflicts".to_string()
                        }
                        Ok(_) => return Err(PersistError::Gone),
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => e.to_string(),
            };
            let Some(wait) = failures.failed(None) else {
                return Err(PersistError::Failed(e));
            };
            tracing::debug!(run = %self.name, error = %e, "storing the run status failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

impl Persist for Writer {
    async fn save(&mut self, st: &BulkExportRunStatus) -> Result<(), PersistError> {
        self.write(st).await
    }
}

/// Reads the run from the API server (not the cache); `None` when it is gone or replaced.
async fn fresh(api: &Api<BulkExportRun>, name: &str, uid: &str, cancel: &CancellationToken) -> Option<BulkExportRun> {
    let mut failures = rules::RUN_READ.start();
    loop {
        match api.get_opt(name).await {
            Ok(Some(r)) if r.uid().as_deref() == Some(uid) => return Some(r),
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(run = %name, error = %e, "reading the run failed; retrying");
                let wait = failures.failed(None).unwrap_or(rules::RUN_READ.max);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return None,
                }
            }
        }
    }
}

/// The run's template: its own, or — for a run created by hand — the sync's spec, copied into the
/// run once (so an edit of the sync never reaches it, and it can be cleaned up without the sync).
async fn template(api: &Api<BulkExportRun>, run: &BulkExportRun, ctx: &Context) -> Result<RunTemplate, Failure> {
    if let Some(t) = &run.spec.template {
        return Ok(t.clone());
    }
    let ns = run.namespace().unwrap_or_default();
    let sync_name = &run.spec.sync_ref.name;
    let syncs: Api<BulkExportSync> = Api::namespaced(ctx.client.clone(), &ns);
    let sync = match syncs.get_opt(sync_name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(Failure::new(
                Reason::InvalidSpec,
                format!("BulkExportSync {ns}/{sync_name} (spec.syncRef) does not exist; create it or fix syncRef"),
            ));
        }
        Err(e) => {
            return Err(Failure::new(Reason::InvalidSpec, format!("reading BulkExportSync {ns}/{sync_name}: {e}")));
        }
    };
    validate_bulk_sync(&sync.spec)
        .map_err(|m| Failure::new(Reason::InvalidSpec, format!("BulkExportSync {sync_name}: {m}")))?;
    let t = RunTemplate::from(&sync.spec);
    let patch = serde_json::json!({"spec": {"template": t}});
    api.patch(
        &run.name_any(),
        &PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|e| Failure::new(Reason::InvalidSpec, format!("recording the run's template: {e}")))?;
    Ok(t)
}

async fn drive_run(cached: Arc<BulkExportRun>, ctx: Arc<Context>, cancel: CancellationToken) {
    let (ns, name, uid) = (cached.namespace().unwrap_or_default(), cached.name_any(), cached.uid().unwrap_or_default());
    let api: Api<BulkExportRun> = Api::namespaced(ctx.client.clone(), &ns);
    // a run the cache shows never started needs no read: its first write is guarded by this
    // resourceVersion and stops if the stored status is not what the cache shows; a resumed run is
    // read from the API server first
    let mut first = cached.status.is_none().then(|| (*cached).clone());
    loop {
        let run = match first.take() {
            Some(r) => r,
            None => match fresh(&api, &name, &uid, &cancel).await {
                Some(r) => r,
                None => return,
            },
        };
        let mut st = run.status.clone().unwrap_or_default();
        if st.phase.is_finished() || run.metadata.deletion_timestamp.is_some() {
            return;
        }
        let mut writer = Writer {
            api: api.clone(),
            name: name.clone(),
            uid: uid.clone(),
            state: Arc::new(tokio::sync::Mutex::new(WriterState {
                rv: run.resource_version(),
                last: run.status.clone(),
            })),
        };
        let template = match template(&api, &run, &ctx).await {
            Ok(t) => t,
            Err(f) => {
                run::mark_failed(&mut st, &f);
                let _ = writer.write(&st).await;
                count_finished(&ctx, &st);
                ctx.event(&run, EventType::Warning, f.reason.as_str(), "Run", f.message).await;
                return;
            }
        };
        ctx.metrics.run_tasks.inc();
        let inputs = RunInputs {
            namespace: ns.clone(),
            name: name.clone(),
            uid: uid.clone(),
            template,
            since: run.spec.since.as_ref().map(|t| t.0),
            verify: verify_of(&run.spec),
        };
        let (tx, rx) = watch::channel(st.clone());
        let stop_lazy = cancel.child_token();
        let lazy = tokio::spawn(write_progress(writer.clone(), rx, stop_lazy.clone()));
        let r = run::drive(&inputs, &ctx.deps(), &mut st, &mut writer, &tx, &cancel).await;
        stop_lazy.cancel();
        let _ = lazy.await;
        match r {
            Ok(()) => {
                count_finished(&ctx, &st);
                // a person should see what went wrong; a success is in the status (and the log)
                let note = st.message.clone().unwrap_or_default();
                let reason = match st.phase {
                    Phase::Succeeded if st.export_errors > 0 => Some("PartialExport".to_string()),
                    Phase::Succeeded => None,
                    _ => Some(st.reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| "Failed".into())),
                };
                if let Some(reason) = reason {
                    ctx.event(&run, EventType::Warning, &reason, "Run", note).await;
                }
                return;
            }
            Err(DriveError::Cancelled) => {
                tracing::info!(run = %format!("{ns}/{name}"), "run paused (shutdown or deletion)");
                return;
            }
            Err(DriveError::Gone) => return,
            Err(DriveError::Fenced) => {
                tracing::warn!(run = %format!("{ns}/{name}"), "this process no longer holds the lease: it stops acting on the run");
                return;
            }
            Err(DriveError::Persist(e)) => {
                // the API server refused our writes for a while: resume from what it holds
                tracing::warn!(run = %format!("{ns}/{name}"), error = %e, "could not store the run status; resuming in 30s");
                tokio::select! {
                    _ = tokio::time::sleep(rules::STATUS_WRITE.max) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
}

/// How often progress (a phase between the durable facts, bytes, a place in a queue) is stored at
/// most: a run that ends within it costs only its durable writes (intent, status URL, release, end).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// Stores progress snapshots lazily: at most every [`PROGRESS_EVERY`], and only what changed.
async fn write_progress(writer: Writer, mut rx: watch::Receiver<BulkExportRunStatus>, stop: CancellationToken) {
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(PROGRESS_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let st = rx.borrow_and_update().clone();
        if writer.write(&st).await.is_err() {
            return;
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

/// How long a deleted run's cleanup is retried while a peer refuses it, before the finalizer goes
/// anyway (with a Warning naming what was left behind).
const CLEANUP_GRACE: Duration = Duration::from_secs(600);

async fn cleanup(run: Arc<BulkExportRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.fence.holds() {
        return Ok(Action::await_change()); // the replica that holds the lease cleans up
    }
    let uid = run.uid().unwrap_or_default();
    let task = ctx.tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
    if let Some(t) = task {
        t.cancel.cancel();
        let _ = t.handle.await;
    }
    let ns = run.namespace().unwrap_or_default();
    let api: Api<BulkExportRun> = Api::namespaced(ctx.client.clone(), &ns);
    // the latest stored status (the cached object may predate the task's last write)
    let latest = api.get_opt(&run.name_any()).await?.filter(|r| r.uid() == run.uid()).unwrap_or_else(|| (*run).clone());
    let Some(template) = latest.spec.template.clone() else {
        return Ok(Action::await_change()); // never started: nothing outside to clean
    };
    let mut st = latest.status.clone().unwrap_or_default();
    let was_running = !st.phase.is_finished();
    let inputs = RunInputs {
        namespace: ns.clone(),
        name: latest.name_any(),
        uid,
        template,
        since: latest.spec.since.as_ref().map(|t| t.0),
        verify: verify_of(&latest.spec),
    };
    let result = run::cancel(&inputs, &ctx.deps(), &mut st).await;
    if was_running {
        let _ = apply(&api, &latest.name_any(), None, &st).await;
    }
    match result {
        Ok(()) => {
            if was_running {
                ctx.event(
                    &latest,
                    EventType::Normal,
                    "Cancelled",
                    "Cancel",
                    "the run was deleted: export released on the source, Pathling's job cancelled, staged files removed".into(),
                )
                .await;
            }
            Ok(Action::await_change())
        }
        Err(left) => {
            let age = latest
                .metadata
                .deletion_timestamp
                .as_ref()
                .map(|t| Timestamp::now().duration_since(t.0).unsigned_abs())
                .unwrap_or_default();
            if age < CLEANUP_GRACE {
                return Err(Error::CleanupBlocked(format!(
                    "cleanup of the deleted run is incomplete, retrying: {left}"
                )));
            }
            ctx.event(
                &latest,
                EventType::Warning,
                "CleanupIncomplete",
                "Cancel",
                format!("gave up cleaning up after {}s: {left}", CLEANUP_GRACE.as_secs()),
            )
            .await;
            Ok(Action::await_change())
        }
    }
}

/// What a verification run is told (a run made by hand with trigger Verify gets the defaults).
fn verify_of(spec: &crate::api::BulkExportRunSpec) -> Option<crate::api::VerifyRun> {
    (spec.trigger == crate::api::Trigger::Verify).then(|| spec.verify.clone().unwrap_or_default())
}
