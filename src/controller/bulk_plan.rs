//! The BulkExportSync reconcile's decisions, apart from its actions. From the sync, its runs and the
//! clock, [`begin`] and [`Draft::finish`] compute the new status (every condition set here, once per
//! pass) and the actions to take: Events, runs to create, finished runs to prune, when to look
//! again. No I/O: the one observation made in between — the preflight checks before a first run —
//! is asked for by [`Draft::gate`] and handed back by the actor (`bulk_sync.rs`). Tested as tables
//! in `bulk_plan_tests.rs`.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::notes::Note;
use super::sync_preflight::{self, Gate};
use crate::api::conditions::{is_true, set_condition, set_insecure_tls, types};
use crate::api::validate::{SyncValues, validate_bulk_sync};
use crate::api::{
    ANNOTATION_RESET_WATERMARK, ANNOTATION_RUN_NOW, BulkExportRun, BulkExportRunSpec, BulkExportSync,
    BulkExportSyncStatus, Phase, RunTemplate, SyncRef, Trigger,
};
use crate::run::resolve::Options;
use crate::schedule::Schedule;
use crate::sync::{self, History};

/// What the reconcile observed before deciding.
pub struct Observed<'a> {
    /// The sync, with the newest status this process knows of.
    pub sync: &'a BulkExportSync,
    /// Its runs, oldest first (the active one read from the API server when the cache lacked it).
    pub runs: &'a [Arc<BulkExportRun>],
    pub opts: &'a Options,
    /// Other syncs that write this sync's types into the same Pathling (read for a verification).
    pub shared_with: &'a (dyn Fn() -> Vec<String> + Sync),
    pub now: Timestamp,
}

/// One thing the actor does, in order.
#[derive(Debug, Clone)]
pub enum Act {
    Event(Note),
    /// Create this run; if one of its name already finished, it is not the active run.
    Create(Box<BulkExportRun>),
    /// Delete this finished run (the history keeps `historyLimit`).
    Prune(String),
}

/// When to reconcile again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Only on a change (the spec cannot run as it is).
    Change,
    After(Duration),
}

/// The decision of one pass.
#[derive(Debug, Clone)]
pub struct Plan {
    pub status: BulkExportSyncStatus,
    pub acts: Vec<Act>,
    pub next: Next,
}

/// A pass decided up to the preflight gate.
pub struct Draft<'a> {
    o: &'a Observed<'a>,
    st: BulkExportSyncStatus,
    acts: Vec<Act>,
    values: SyncValues,
    schedule: Option<Schedule>,
    verify_schedule: Option<Schedule>,
    active: Option<Arc<BulkExportRun>>,
}

/// Either a finished decision (the spec cannot run) or a draft waiting for the preflight gate.
pub enum Begun<'a> {
    Done(Box<Plan>),
    Draft(Box<Draft<'a>>),
}

fn uses_insecure_tls(sync: &BulkExportSync) -> bool {
    [&sync.spec.source.tls, &sync.spec.target.tls].iter().any(|t| t.as_ref().is_some_and(|t| t.insecure_skip_verify))
}

/// The reason word of a run's phase (the Progressing condition).
pub fn phase_reason(p: Phase) -> &'static str {
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
fn blocked(mut st: BulkExportSyncStatus, gen_: Option<i64>, reason: &str, msg: String, what: &str) -> Plan {
    set_condition(&mut st.conditions, types::READY, false, reason, msg, gen_);
    let idle = format!("no runs while the {what} is invalid");
    set_condition(&mut st.conditions, types::PROGRESSING, false, reason, idle, gen_);
    st.next_schedule_time = None;
    Plan { status: st, acts: vec![], next: Next::Change }
}

fn done(p: Plan) -> Begun<'static> {
    Begun::Done(Box::new(p))
}

/// Decides a pass up to the preflight gate: the spec, the watermark's scope, the finished run folded,
/// Progressing and Ready.
pub fn begin<'a>(o: &'a Observed<'a>) -> Begun<'a> {
    let sync = o.sync;
    let gen_ = sync.metadata.generation;
    let mut st = sync.status.clone().unwrap_or_default();
    st.observed_generation = gen_;
    let mut acts = vec![];
    set_insecure_tls(&mut st.conditions, uses_insecure_tls(sync), gen_);

    // 1. the spec
    let checked = validate_bulk_sync(&sync.spec).and_then(|v| {
        crate::run::resolve::check_staging_root(&sync.spec.staging, o.opts).map(|()| v).map_err(|f| f.message)
    });
    let values = match checked {
        Ok(v) => v,
        Err(msg) => return done(blocked(st, gen_, "InvalidSpec", format!("{msg}; fix the spec"), "spec")),
    };
    let schedule = match sync.spec.schedule.as_ref().map(|e| Schedule::parse(e, &sync.spec.time_zone)).transpose() {
        Ok(s) => s,
        Err(msg) => {
            let msg = format!("{msg}; fix spec.schedule or spec.timeZone");
            return done(blocked(st, gen_, "InvalidSchedule", msg, "schedule"));
        }
    };
    let verify_schedule = match super::drift::schedule(sync) {
        Ok(s) => s,
        Err(msg) => {
            let msg = format!("spec.verify.schedule: {msg}; fix it");
            return done(blocked(st, gen_, "InvalidSchedule", msg, "verify schedule"));
        }
    };

    // 2. the watermark belongs to one query: a changed source, export or target resets it
    let scope = sync::watermark_scope(&sync.spec);
    if st.watermark_scope.as_deref() != Some(&scope) {
        if st.watermark_scope.is_some() && st.watermark.is_some() {
            let why = "source.url, export or target.url changed: the next run is a full export";
            acts.push(Act::Event(Note::normal("WatermarkReset", "Schedule", why)));
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
        let why = "reset-watermark annotation: the next run is a full export";
        acts.push(Act::Event(Note::normal("WatermarkReset", "Schedule", why)));
    }

    // 3. runs: fold the finished active run, adopt an unfinished one
    if let Some(name) = st.active_run.clone() {
        match o.runs.iter().find(|r| r.name_any() == name) {
            Some(r) if run_is_finished(r) => {
                let mut notes = vec![];
                super::sync_runs::finished(sync, &mut st, r, values.since_overlap, schedule.is_some(), &mut notes);
                acts.extend(notes.into_iter().map(Act::Event));
            }
            Some(_) => {}
            None => st.active_run = None, // gone (the actor asked the API server)
        }
    }
    if st.active_run.is_none()
        && let Some(r) = o.runs.iter().find(|r| !run_is_finished(r))
    {
        st.active_run = Some(r.name_any());
    }
    let active = st.active_run.as_ref().and_then(|a| o.runs.iter().find(|r| &r.name_any() == a)).cloned();
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
    ready(&mut st, sync.spec.suspend, gen_);
    Begun::Draft(Box::new(Draft { o, st, acts, values, schedule, verify_schedule, active }))
}

/// Ready as the last run left it, the spec being valid (again).
fn ready(st: &mut BulkExportSyncStatus, suspend: bool, gen_: Option<i64>) {
    if st.last_successful_run.is_none()
        && !st.conditions.iter().any(|c| c.type_ == types::READY && c.reason == "RunFailed")
    {
        set_condition(&mut st.conditions, types::READY, false, "Pending", "no run has succeeded yet", gen_);
    } else if let Some(c) = st.conditions.iter().find(|c| c.type_ == types::READY)
        && matches!(c.reason.as_str(), "InvalidSpec" | "InvalidSchedule" | "Suspended" | "Pending")
    {
        // the spec is valid again: Ready reflects the last run
        let ok = st.last_successful_run.is_some();
        let (reason, msg) =
            if ok { ("Succeeded", "the last run succeeded") } else { ("Pending", "no run has succeeded yet") };
        set_condition(&mut st.conditions, types::READY, ok, reason, msg, gen_);
    }
    if suspend {
        let ok = st.last_successful_run.is_some() && !is_true(&st.conditions, types::DEGRADED);
        let msg = "spec.suspend is true: no new runs (a run in flight finishes)";
        set_condition(&mut st.conditions, types::READY, ok, "Suspended", msg, gen_);
    }
}

impl<'a> Draft<'a> {
    /// Whether the preflight checks must run before the rest is decided (only before a first run).
    pub fn gate(&self) -> Gate {
        if self.st.last_successful_run.is_some() || self.active.is_some() {
            return Gate::Pass;
        }
        sync_preflight::gate(self.o.sync, &self.st, self.o.now)
    }

    /// The spec's parsed values (what the preflight checks need).
    pub fn values(&self) -> &SyncValues {
        &self.values
    }

    /// Records the preflight findings (`None`: they timed out); returns how long the first run is held.
    pub fn record_preflight(&mut self, findings: Option<&[crate::run::preflight::Finding]>) -> Option<Duration> {
        sync_preflight::record(self.o.sync, &mut self.st, findings, self.o.now)
    }

    /// The rest of the pass: a due run created (or held by the preflight), a due verification or
    /// repair, the next schedule time, the history pruned, when to look again. `held`: the wait
    /// before the preflight checks run again, while they block a first run.
    pub fn finish(self, held: Option<Duration>) -> Plan {
        let Draft { o, mut st, mut acts, values: _, schedule, verify_schedule, active } = self;
        let (sync, now) = (o.sync, o.now);
        let gen_ = sync.metadata.generation;
        let name = sync.name_any();

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
                let msg = format!(
                    "the first run waits until the preflight checks pass (checked again in {}s)",
                    wait.as_secs()
                );
                set_condition(&mut st.conditions, types::PROGRESSING, false, "PreflightFailed", msg, gen_);
            } else if active.is_none() {
                let since = sync::since(&sync.spec, st.watermark.as_ref().map(|t| t.0));
                let spec = BulkExportRunSpec {
                    sync_ref: SyncRef { name: name.clone() },
                    since: since.map(Time),
                    trigger: due.trigger,
                    template: Some(RunTemplate::from(&sync.spec)),
                    verify: None,
                };
                acts.push(Act::Create(Box::new(super::sync_runs::new_run(sync, &st, &due.name, spec))));
                st.active_run = Some(due.name.clone());
                st.last_schedule_time = Some(Time(due.slot.min(now)));
                if due.trigger == Trigger::RunNow {
                    st.handled_run_now = history.run_now.clone();
                }
                st.last_run_generation = gen_;
                let msg = format!("run {} created", due.name);
                set_condition(&mut st.conditions, types::PROGRESSING, true, "Pending", msg, gen_);
            }
        }

        // 5b. a verification or repair, when no run is due or in flight
        if st.active_run.is_none()
            && held.is_none()
            && let Some(due) = super::drift::due(sync, &st, verify_schedule.as_ref(), now)
        {
            let (run_name, spec) = super::drift::run_spec(o.shared_with, sync, &st, &due);
            acts.push(Act::Create(Box::new(super::sync_runs::new_run(sync, &st, &run_name, spec))));
            st.active_run = Some(run_name.clone());
            super::drift::started(&mut st, &due, &run_name, now);
            let msg = format!("run {run_name} created");
            set_condition(&mut st.conditions, types::PROGRESSING, true, "Pending", msg, gen_);
        }
        super::drift::in_sync(sync, &mut st);
        st.next_schedule_time = match (&schedule, sync.spec.suspend) {
            (Some(s), false) => {
                s.next_after(st.last_schedule_time.as_ref().map(|t| t.0.max(now)).unwrap_or(now)).map(Time)
            }
            _ => None,
        };

        // 6. history: finished runs past historyLimit, oldest first
        let finished: Vec<&Arc<BulkExportRun>> =
            o.runs.iter().filter(|r| run_is_finished(r) && st.active_run.as_deref() != Some(&r.name_any())).collect();
        let keep = sync.spec.history_limit as usize;
        if finished.len() > keep {
            for r in &finished[..finished.len() - keep] {
                if r.metadata.deletion_timestamp.is_none() {
                    acts.push(Act::Prune(r.name_any()));
                }
            }
        }

        // 7. when to look again
        let next_verify = match (&verify_schedule, sync.spec.suspend) {
            (Some(s), false) => {
                s.next_after(st.last_verify_schedule_time.as_ref().map(|t| t.0.max(now)).unwrap_or(now))
            }
            _ => None,
        };
        let next_wake = [st.next_schedule_time.as_ref().map(|t| t.0), next_verify].into_iter().flatten().min();
        let next = if let Some(wait) = held {
            wait
        } else if st.active_run.is_some() {
            Duration::from_secs(300)
        } else if let Some(next) = next_wake {
            Duration::from_secs(next.duration_since(now).as_secs().clamp(1, 3600) as u64)
        } else {
            Duration::from_secs(3600)
        };
        Plan { status: st, acts, next: Next::After(next) }
    }
}

#[cfg(test)]
#[path = "bulk_plan_tests.rs"]
mod tests;
