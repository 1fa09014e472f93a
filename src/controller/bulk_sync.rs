//! BulkExportSync controller: adapts the sync's decisions (`crate::sync`) to the cluster. Creates one
//! BulkExportRun per due run (as a CronJob creates Jobs), each carrying a snapshot of the spec; never
//! two at once; folds each finished run into the sync's status; keeps the history.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::DeleteParams;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::status::{Applied, apply};
use super::{Context, Error};
use crate::api::conditions::{is_true, set_condition, set_insecure_tls, types};
use crate::api::validate::validate_bulk_sync;
use crate::api::{
    ANNOTATION_RESET_WATERMARK, ANNOTATION_RUN_NOW, BulkExportRun, BulkExportRunSpec, BulkExportSync,
    BulkExportSyncStatus, Phase, RunTemplate, SyncRef,
};
use crate::schedule::Schedule;
use crate::sync::{self, History};

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

fn uses_insecure_tls(sync: &BulkExportSync) -> bool {
    [&sync.spec.source.tls, &sync.spec.target.tls].iter().any(|t| t.as_ref().is_some_and(|t| t.insecure_skip_verify))
}

fn phase_reason(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "Pending",
        Phase::Exporting => "Exporting",
        Phase::Transferring => "Transferring",
        Phase::Importing => "Importing",
        Phase::Deleting => "Deleting",
        Phase::Verifying => "Verifying",
        Phase::Repairing => "Repairing",
        Phase::Succeeded => "Succeeded",
        Phase::Failed => "Failed",
    }
}

fn run_is_finished(r: &BulkExportRun) -> bool {
    r.status.as_ref().is_some_and(|s| s.phase.is_finished())
}

/// Refuses to run: `Ready=False` and `Progressing=False` with the reason.
fn blocked(st: &mut BulkExportSyncStatus, gen_: Option<i64>, reason: &str, msg: String, what: &str) {
    set_condition(&mut st.conditions, types::READY, false, reason, msg, gen_);
    set_condition(
        &mut st.conditions,
        types::PROGRESSING,
        false,
        reason,
        format!("no runs while the {what} is invalid"),
        gen_,
    );
    st.next_schedule_time = None;
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
    let name = sync.name_any();
    let gen_ = sync.metadata.generation;
    let syncs: Api<BulkExportSync> = Api::namespaced(ctx.client.clone(), &ns);
    let runs_api: Api<BulkExportRun> = Api::namespaced(ctx.client.clone(), &ns);
    let before = sync.status.clone().unwrap_or_default();
    let mut st = before.clone();
    st.observed_generation = gen_;
    let now = Timestamp::now();

    set_insecure_tls(&mut st.conditions, uses_insecure_tls(&sync), gen_);

    // 1. the spec
    let checked = validate_bulk_sync(&sync.spec).and_then(|v| {
        crate::run::resolve::check_staging_root(&sync.spec.staging, &ctx.opts).map(|()| v).map_err(|f| f.message)
    });
    let values = match checked {
        Ok(v) => v,
        Err(msg) => {
            blocked(&mut st, gen_, "InvalidSpec", format!("{msg}; fix the spec"), "spec");
            return finish(&ctx, &syncs, &sync, &before, &st, Action::await_change()).await;
        }
    };
    let schedule = match &sync.spec.schedule {
        Some(expr) => match Schedule::parse(expr, &sync.spec.time_zone) {
            Ok(s) => Some(s),
            Err(msg) => {
                blocked(
                    &mut st,
                    gen_,
                    "InvalidSchedule",
                    format!("{msg}; fix spec.schedule or spec.timeZone"),
                    "schedule",
                );
                return finish(&ctx, &syncs, &sync, &before, &st, Action::await_change()).await;
            }
        },
        None => None,
    };

    let verify_schedule = match super::drift::schedule(&sync) {
        Ok(s) => s,
        Err(msg) => {
            blocked(
                &mut st,
                gen_,
                "InvalidSchedule",
                format!("spec.verify.schedule: {msg}; fix it"),
                "verify schedule",
            );
            return finish(&ctx, &syncs, &sync, &before, &st, Action::await_change()).await;
        }
    };

    // 2. the watermark belongs to one query: a changed source, export or target resets it
    let scope = sync::watermark_scope(&sync.spec);
    if st.watermark_scope.as_deref() != Some(&scope) {
        if st.watermark_scope.is_some() && st.watermark.is_some() {
            ctx.event(
                sync.as_ref(),
                EventType::Normal,
                "WatermarkReset",
                "Schedule",
                "source.url, export or target.url changed: the next run is a full export".into(),
            )
            .await;
        }
        if st.watermark_scope.is_some() {
            st.watermark = None;
        }
        st.watermark_scope = Some(scope);
    }
    let reset = sync.annotations().get(ANNOTATION_RESET_WATERMARK).cloned();
    if reset.is_some() && reset != st.handled_reset_watermark {
        st.watermark = None;
        st.handled_reset_watermark = reset;
        ctx.event(
            sync.as_ref(),
            EventType::Normal,
            "WatermarkReset",
            "Schedule",
            "reset-watermark annotation: the next run is a full export".into(),
        )
        .await;
    }

    // 3. runs: fold the finished active run, adopt an unfinished one
    // the cached runs this sync owns (an index over the shared run watch: no LIST)
    let mut runs = ctx.runs.runs_of(&sync.uid().unwrap_or_default());
    runs.sort_by(|a, b| a.creation_timestamp().cmp(&b.creation_timestamp()).then(a.name_any().cmp(&b.name_any())));
    if let Some(active) = st.active_run.clone() {
        match runs.iter().find(|r| r.name_any() == active) {
            Some(r) if run_is_finished(r) => {
                super::sync_runs::finished(&ctx, &sync, &mut st, r, values.since_overlap, schedule.is_some()).await
            }
            Some(_) => {}
            // not in the cache (yet, or any more): ask the API server before forgetting it
            None => match runs_api.get_opt(&active).await? {
                Some(r) if run_is_finished(&r) => {
                    super::sync_runs::finished(&ctx, &sync, &mut st, &r, values.since_overlap, schedule.is_some()).await
                }
                Some(r) => runs.push(Arc::new(r)),
                None => st.active_run = None,
            },
        }
    }
    if st.active_run.is_none()
        && let Some(r) = runs.iter().find(|r| !run_is_finished(r))
    {
        st.active_run = Some(r.name_any());
    }
    let active = st.active_run.as_ref().and_then(|a| runs.iter().find(|r| &r.name_any() == a)).cloned();
    match &active {
        Some(r) => {
            let phase = r.status.as_ref().map(|s| s.phase).unwrap_or_default();
            let msg = format!("run {} is {}", r.name_any(), phase_reason(phase).to_ascii_lowercase());
            set_condition(&mut st.conditions, types::PROGRESSING, true, phase_reason(phase), msg, gen_);
        }
        None => {
            set_condition(&mut st.conditions, types::PROGRESSING, false, "Idle", "no run in flight", gen_);
        }
    }
    if st.last_successful_run.is_none()
        && !st.conditions.iter().any(|c| c.type_ == types::READY && c.reason == "RunFailed")
    {
        set_condition(&mut st.conditions, types::READY, false, "Pending", "no run has succeeded yet", gen_);
    } else if let Some(c) = st.conditions.iter().find(|c| c.type_ == types::READY)
        && matches!(c.reason.as_str(), "InvalidSpec" | "InvalidSchedule" | "Suspended" | "Pending")
    {
        // the spec is valid again: Ready reflects the last run
        let ok = st.last_successful_run.is_some();
        set_condition(
            &mut st.conditions,
            types::READY,
            ok,
            if ok { "Succeeded" } else { "Pending" },
            if ok { "the last run succeeded" } else { "no run has succeeded yet" },
            gen_,
        );
    }
    if sync.spec.suspend {
        let ok = st.last_successful_run.is_some() && !is_true(&st.conditions, types::DEGRADED);
        set_condition(
            &mut st.conditions,
            types::READY,
            ok,
            "Suspended",
            "spec.suspend is true: no new runs (a run in flight finishes)",
            gen_,
        );
    }

    // 4. before a first run: the preflight checks (a first run waits until nothing blocks it)
    let mut held = None;
    if st.last_successful_run.is_none() && active.is_none() {
        held = super::sync_preflight::preflight(&ctx, &sync, &mut st, &values, now).await;
    }

    // 5. is a run due?
    let history = History {
        run_now: sync.annotations().get(ANNOTATION_RUN_NOW).cloned(),
        handled_run_now: st.handled_run_now.clone(),
        last_schedule: st.last_schedule_time.as_ref().map(|t| t.0),
        created: sync.creation_timestamp().map(|t| t.0),
        generation: gen_,
        last_run_generation: st.last_run_generation,
    };
    if let Some(due) = sync::due(&name, schedule.as_ref(), sync.spec.suspend, &history, now) {
        if let Some(wait) = held {
            tracing::debug!(sync = %name, "first run held until the preflight checks pass");
            set_condition(
                &mut st.conditions,
                types::PROGRESSING,
                false,
                "PreflightFailed",
                format!("the first run waits until the preflight checks pass (checked again in {}s)", wait.as_secs()),
                gen_,
            );
        } else if active.is_some() {
            tracing::debug!(sync = %name, "run due but one is in flight; waiting");
        } else {
            let since = sync::since(&sync.spec, st.watermark.as_ref().map(|t| t.0));
            let spec = BulkExportRunSpec {
                sync_ref: SyncRef { name: name.clone() },
                since: since.map(Time),
                trigger: due.trigger,
                template: Some(RunTemplate::from(&sync.spec)),
                verify: None,
            };
            let created_before = super::sync_runs::create_run(&runs_api, &sync, &st, &due.name, spec).await?;
            tracing::info!(
                sync = %format!("{ns}/{name}"),
                run = %due.name,
                trigger = ?due.trigger,
                since = %since.map(|t| t.to_string()).unwrap_or_else(|| "full export".into()),
                "run created"
            );
            if !created_before {
                st.active_run = Some(due.name.clone());
            }
            st.last_schedule_time = Some(Time(due.slot.min(now)));
            if due.trigger == crate::api::Trigger::RunNow {
                st.handled_run_now = history.run_now.clone();
            }
            st.last_run_generation = gen_;
            set_condition(
                &mut st.conditions,
                types::PROGRESSING,
                true,
                "Pending",
                format!("run {} created", due.name),
                gen_,
            );
        }
    }

    // 5b. a verification or repair, when no run is due or in flight
    if st.active_run.is_none()
        && held.is_none()
        && let Some(due) = super::drift::due(&sync, &st, verify_schedule.as_ref(), now)
    {
        let (run_name, spec) = super::drift::run_spec(&ctx, &sync, &st, &due);
        let trigger = spec.trigger;
        let created_before = super::sync_runs::create_run(&runs_api, &sync, &st, &run_name, spec).await?;
        tracing::info!(sync = %format!("{ns}/{name}"), run = %run_name, trigger = ?trigger, "run created");
        if !created_before {
            st.active_run = Some(run_name.clone());
        }
        super::drift::started(&mut st, &due, &run_name, now);
        set_condition(&mut st.conditions, types::PROGRESSING, true, "Pending", format!("run {run_name} created"), gen_);
    }
    super::drift::update(&ctx, &sync, &mut st, before.drift.as_ref());
    st.next_schedule_time = match (&schedule, sync.spec.suspend) {
        (Some(s), false) => s.next_after(st.last_schedule_time.as_ref().map(|t| t.0.max(now)).unwrap_or(now)).map(Time),
        _ => None,
    };

    // 6. history
    let finished: Vec<&Arc<BulkExportRun>> =
        runs.iter().filter(|r| run_is_finished(r) && st.active_run.as_deref() != Some(&r.name_any())).collect();
    let keep = sync.spec.history_limit as usize;
    if finished.len() > keep {
        for r in &finished[..finished.len() - keep] {
            if r.metadata.deletion_timestamp.is_none() {
                match runs_api.delete(&r.name_any(), &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    // 7. metrics
    if let Some(t) = st.last_successful_run.as_ref().and_then(|r| r.finished_at.as_ref()) {
        ctx.metrics
            .last_success
            .get_or_create(&crate::metrics::SyncLabels { namespace: ns.clone(), name: name.clone() })
            .set(t.0.as_millisecond() as f64 / 1000.0);
    }
    if let Some(w) = &st.watermark {
        ctx.metrics
            .watermark_age
            .get_or_create(&crate::metrics::SyncLabels { namespace: ns.clone(), name: name.clone() })
            .set(now.duration_since(w.0).as_secs_f64());
    }

    let next_verify = match (&verify_schedule, sync.spec.suspend) {
        (Some(s), false) => s.next_after(st.last_verify_schedule_time.as_ref().map(|t| t.0.max(now)).unwrap_or(now)),
        _ => None,
    };
    let next_wake = [st.next_schedule_time.as_ref().map(|t| t.0), next_verify].into_iter().flatten().min();
    let action = if let Some(wait) = held {
        Action::requeue(wait)
    } else if st.active_run.is_some() {
        Action::requeue(Duration::from_secs(300))
    } else if let Some(next) = next_wake {
        let secs = next.duration_since(now).as_secs().clamp(1, 3600) as u64;
        Action::requeue(Duration::from_secs(secs))
    } else {
        Action::requeue(Duration::from_secs(3600))
    };
    finish(&ctx, &syncs, &sync, &before, &st, action).await
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
