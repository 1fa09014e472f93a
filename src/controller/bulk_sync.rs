//! BulkExportSync controller: the actor of the sync's decisions (`bulk_plan.rs`, over `crate::sync`).
//! It observes (the cached runs, the active one from the API server when the cache lacks it, the
//! preflight checks when the planner asks), then carries the plan out: Events, runs created (as a
//! CronJob creates Jobs, each carrying a snapshot of the spec), finished runs pruned, gauges, and
//! the one status write.

use std::sync::Arc;

use futures::future::BoxFuture;
use jiff::Timestamp;
use kube::api::DeleteParams;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::bulk_plan::{self, Act, Begun, Next, Observed, Plan};
use super::status::{Applied, apply};
use super::sync_preflight::{self, Gate};
use super::{Context, Error};
use crate::api::{BulkExportRun, BulkExportSync, BulkExportSyncStatus};

/// Builds the controller future and a future that resolves once its cache has synced. Woken by spec
/// changes of a sync (not its status writes) and by its runs finishing.
pub fn controller(
    ctx: Arc<Context>,
    ns: Option<String>,
    finished_runs: impl futures::Stream<Item = Arc<BulkExportRun>> + Send + 'static,
    stop: CancellationToken,
) -> (BoxFuture<'static, ()>, super::ReadyCheck) {
    let (syncs, store) = super::cache::watch::<BulkExportSync>(&ctx.client, &ns);
    let _ = ctx.sync_store.set(store.clone());
    let c = Controller::for_stream(syncs, store).owns_shared_stream(finished_runs);
    super::launch(c, ctx, stop, reconcile)
}

async fn reconcile(sync: Arc<BulkExportSync>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = sync.uid().unwrap_or_default();
    if sync.metadata.deletion_timestamp.is_some() {
        ctx.sync_writes.forget(&uid);
        return Ok(Action::await_change()); // owned runs go with it (garbage collection)
    }
    // a cached copy older than our own last status write: decide on what we wrote
    let sync = match ctx.sync_writes.newer(&uid, sync.resource_version().as_deref()) {
        Some((rv, st)) => {
            let mut s = (*sync).clone();
            s.metadata.resource_version = rv;
            s.status = Some(st);
            Arc::new(s)
        }
        None => sync,
    };
    let ns = sync.namespace().unwrap_or_default();
    let syncs: Api<BulkExportSync> = Api::namespaced(ctx.client.clone(), &ns);
    let runs_api: Api<BulkExportRun> = Api::namespaced(ctx.client.clone(), &ns);
    let before = sync.status.clone().unwrap_or_default();
    let now = Timestamp::now();

    // observe: the cached runs this sync owns (an index over the shared run watch: no LIST); the
    // active one not in the cache (yet, or any more) is asked of the API server before it is forgotten
    let mut runs = ctx.runs.runs_of(&uid);
    if let Some(active) = &before.active_run
        && !runs.iter().any(|r| &r.name_any() == active)
        && let Some(r) = runs_api.get_opt(active).await?
    {
        runs.push(Arc::new(r));
    }
    runs.sort_by(|a, b| a.creation_timestamp().cmp(&b.creation_timestamp()).then(a.name_any().cmp(&b.name_any())));
    let shared_with = || super::drift::shared_with(&ctx, &sync);
    let observed = Observed { sync: &sync, runs: &runs, opts: &ctx.opts, shared_with: &shared_with, now };

    // decide, with the preflight checks run in between when the planner asks for them
    let mut plan = match bulk_plan::begin(&observed) {
        Begun::Done(plan) => *plan,
        Begun::Draft(mut draft) => {
            let held = match draft.gate() {
                Gate::Pass => None,
                Gate::Wait(wait) => Some(wait),
                Gate::Check => {
                    let findings = sync_preflight::check(&ctx, &sync, draft.values()).await;
                    draft.record_preflight(findings.as_deref())
                }
            };
            if held.is_some() {
                tracing::debug!(sync = %sync.name_any(), "a first run is held until the preflight checks pass");
            }
            draft.finish(held)
        }
    };

    // act
    carry_out(&ctx, &sync, &runs_api, &mut plan).await?;
    gauges(&ctx, &sync, &before, &plan.status, now);
    let action = match plan.next {
        Next::Change => Action::await_change(),
        Next::After(d) => Action::requeue(d),
    };
    finish(&ctx, &syncs, &sync, &before, &plan.status, action).await
}

/// Carries out the plan's acts in order. A run that had been created and had finished before (a
/// lost status write) is not adopted as the active run.
async fn carry_out(
    ctx: &Context,
    sync: &BulkExportSync,
    runs_api: &Api<BulkExportRun>,
    plan: &mut Plan,
) -> Result<(), Error> {
    let who = format!("{}/{}", sync.namespace().unwrap_or_default(), sync.name_any());
    for act in &plan.acts {
        match act {
            Act::Event(note) => super::notes::publish(ctx, sync, std::slice::from_ref(note)).await,
            Act::Create(run) => {
                let name = run.name_any();
                let finished_before = super::sync_runs::create_run(runs_api, run).await?;
                tracing::info!(sync = %who, run = %name, trigger = ?run.spec.trigger,
                    since = %run.spec.since.as_ref().map(|t| t.0.to_string()).unwrap_or_else(|| "full export".into()),
                    "run created");
                if finished_before && plan.status.active_run.as_deref() == Some(name.as_str()) {
                    // decided as if it ran now: decide again shortly, without it
                    plan.status.active_run = None;
                    plan.next = Next::After(std::time::Duration::from_secs(1));
                }
            }
            Act::Prune(name) => match runs_api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            },
        }
    }
    Ok(())
}

/// The sync's gauges, from the status decided.
fn gauges(
    ctx: &Context,
    sync: &BulkExportSync,
    before: &BulkExportSyncStatus,
    st: &BulkExportSyncStatus,
    now: Timestamp,
) {
    let labels =
        || crate::metrics::SyncLabels { namespace: sync.namespace().unwrap_or_default(), name: sync.name_any() };
    if let Some(t) = st.last_successful_run.as_ref().and_then(|r| r.finished_at.as_ref()) {
        ctx.metrics.last_success.get_or_create(&labels()).set(t.0.as_millisecond() as f64 / 1000.0);
    }
    if let Some(w) = &st.watermark {
        ctx.metrics.watermark_age.get_or_create(&labels()).set(now.duration_since(w.0).as_secs_f64());
    }
    super::drift::gauges(ctx, sync, st, before.drift.as_ref());
}

async fn finish(
    ctx: &Context,
    api: &Api<BulkExportSync>,
    sync: &BulkExportSync,
    before: &BulkExportSyncStatus,
    st: &BulkExportSyncStatus,
    action: Action,
) -> Result<Action, Error> {
    if st == before {
        return Ok(action);
    }
    let rv = sync.resource_version();
    match apply(api, &sync.name_any(), rv.as_deref(), st).await? {
        Applied::Written(after) => {
            ctx.sync_writes.record(&sync.uid().unwrap_or_default(), rv, after, st.clone());
            Ok(action)
        }
        Applied::Gone | Applied::NotHeld => Ok(Action::await_change()),
        Applied::Conflict => {
            ctx.metrics.status_conflicts.inc();
            // decided on a stale copy: decide again shortly, on fresher data
            Ok(Action::requeue(super::conflict_backoff()))
        }
    }
}
