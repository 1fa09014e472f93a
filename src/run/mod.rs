//! THE run engine: one BulkExportRun as an explicit state machine
//! (Pending → Exporting → Transferring → Importing → Deleting → Succeeded | Failed).
//!
//! [`Engine::step`] performs one transition (or one poll) and leaves everything a restarted process
//! needs in the status; [`drive`] loops steps, persisting the status after each one. The controller and
//! `fhirsync sync-once` both use it; neither knows the protocol.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::conditions::{set_condition, types};
use crate::api::{BulkExportRunStatus, FileCounts, Phase};
use crate::fhir::bulk::{Kickoff, Manifest, Poll};
use crate::fhir::client::Error as HttpError;
use crate::fhir::retry::backoff;
use crate::pathling::{ImportInput, JobPoll, PnpRequest, Submit};

pub mod locks;
pub mod resolve;
pub mod transfer;

pub use locks::KeyedLocks;
pub use resolve::{Options, RunSetup};

use transfer::{FileJob, Tally};

/// Machine-readable reasons used in conditions and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InvalidSpec,
    AuthFailed,
    SourceUnreachable,
    TargetUnreachable,
    ExportFailed,
    TransferFailed,
    ImportFailed,
    RunTimeout,
    Cancelled,
    PartialExport,
}

impl Reason {
    /// CamelCase reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidSpec => "InvalidSpec",
            Reason::AuthFailed => "AuthFailed",
            Reason::SourceUnreachable => "SourceUnreachable",
            Reason::TargetUnreachable => "TargetUnreachable",
            Reason::ExportFailed => "ExportFailed",
            Reason::TransferFailed => "TransferFailed",
            Reason::ImportFailed => "ImportFailed",
            Reason::RunTimeout => "RunTimeout",
            Reason::Cancelled => "Cancelled",
            Reason::PartialExport => "PartialExport",
        }
    }
}

/// A run failure: a reason and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
}

impl Failure {
    /// Builds a failure.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// What the driver does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Persist and step again at once.
    Continue,
    /// Persist, then step again after this wait.
    Wait(Duration),
    /// The run has ended (Succeeded or Failed).
    Done,
}

/// In-memory state of a run in this process: held locks, the manifest, the error streak. Losing it
/// (a restart) is harmless: the persisted status is enough to resume.
#[derive(Default)]
pub struct Memory {
    manifest: Option<Manifest>,
    source_lock: Option<locks::LockGuard>,
    pathling_lock: Option<locks::LockGuard>,
    errors: u32,
    released: bool,
}

/// Most consecutive transient errors tolerated before a run fails.
pub const MAX_TRANSIENT_ERRORS: u32 = 8;
const POLL_BASE: Duration = Duration::from_secs(1);
const POLL_MAX: Duration = Duration::from_secs(60);
const ERROR_BASE: Duration = Duration::from_secs(2);
const ERROR_MAX: Duration = Duration::from_secs(300);
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Attempts per file before the transfer fails.
pub const FILE_ATTEMPTS: u32 = 4;

fn now() -> Time {
    Time(Timestamp::now())
}

/// One run's engine: the resolved setup plus the process-wide locks.
pub struct Engine {
    pub setup: RunSetup,
    pub locks: KeyedLocks,
    /// `namespace/name` of the run, used as lock holder and in messages.
    pub id: String,
    /// Delay scale for retries (1.0 in production; tests may shrink it).
    pub backoff_scale: f64,
}

fn http_reason(e: &HttpError, phase_reason: Reason, unreachable: Reason) -> Reason {
    match e {
        HttpError::Auth(_) => Reason::AuthFailed,
        HttpError::Status { status: 401 | 403, .. } => Reason::AuthFailed,
        HttpError::Transport { .. } | HttpError::Timeout { .. } => unreachable,
        HttpError::Config(_) => Reason::InvalidSpec,
        _ => phase_reason,
    }
}

fn auth_hint(e: &HttpError) -> &'static str {
    match e {
        HttpError::Status { status: 401, .. } => {
            " — the server rejected the credentials: check the auth block and the Secret it references"
        }
        HttpError::Status { status: 403, .. } => {
            " — the credentials lack permission: grant the client the needed scope or role"
        }
        _ => "",
    }
}

impl Engine {
    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.backoff_scale)
    }

    /// Performs one step. Never returns an error: failures become `phase: Failed` in the status.
    pub async fn step(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Next {
        if st.phase.is_finished() {
            return Next::Done;
        }
        if st.start_time.is_none() {
            st.start_time = Some(now());
        }
        if let Some(start) = &st.start_time {
            let elapsed = Timestamp::now().duration_since(start.0).unsigned_abs();
            if elapsed > self.setup.run_timeout {
                let f = Failure::new(
                    Reason::RunTimeout,
                    format!(
                        "the run exceeded spec.runTimeout ({}) in phase {:?}; the export was cancelled. Raise runTimeout if the source is this slow",
                        humantime::format_duration(self.setup.run_timeout),
                        st.phase
                    ),
                );
                return self.fail(st, mem, f).await;
            }
        }
        let r = match st.phase {
            Phase::Pending => self.kickoff(st, mem).await,
            Phase::Exporting => self.poll_export(st, mem).await,
            Phase::Transferring => self.transfer(st, mem, progress).await,
            Phase::Importing => self.import(st, mem).await,
            Phase::Deleting => self.deletes(st, mem).await,
            Phase::Succeeded | Phase::Failed => Ok(Next::Done),
        };
        match r {
            Ok(n) => n,
            Err(f) => self.fail(st, mem, f).await,
        }
    }

    /// Retries a transient error with backoff, or turns it into a failure.
    fn transient(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        what: &str,
        e: &HttpError,
        reason: Reason,
        unreachable: Reason,
    ) -> Result<Next, Failure> {
        if e.is_transient() && mem.errors < MAX_TRANSIENT_ERRORS {
            mem.errors += 1;
            let wait = self.scaled(backoff(mem.errors, ERROR_BASE, ERROR_MAX));
            st.message = Some(format!(
                "{what}: {e}; retry {}/{MAX_TRANSIENT_ERRORS} in {}",
                mem.errors,
                humantime::format_duration(wait)
            ));
            return Ok(Next::Wait(wait));
        }
        Err(Failure::new(http_reason(e, reason, unreachable), format!("{what}: {e}{}", auth_hint(e))))
    }

    async fn kickoff(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) -> Result<Next, Failure> {
        let Some(_) = &self.setup.staging else {
            return self.import(st, mem).await; // pingAndPull: Pathling exports itself
        };
        if mem.source_lock.is_none() {
            match self.locks.try_lock(&format!("source:{}", self.setup.source_key), &self.id) {
                Ok(g) => mem.source_lock = Some(g),
                Err(holder) => {
                    st.message = Some(format!(
                        "waiting: run {holder} has an export in flight on the same source and credential (servers allow one at a time)"
                    ));
                    return Ok(Next::Wait(self.scaled(LOCK_WAIT)));
                }
            }
        }
        let sent = now();
        match self.setup.source.kickoff(&self.setup.export).await {
            Ok(Kickoff::Accepted { status_url }) => {
                mem.errors = 0;
                st.kickoff_time = Some(sent);
                st.export_status_url = Some(status_url);
                st.phase = Phase::Exporting;
                st.message = Some("export started; polling the source".into());
                Ok(Next::Continue)
            }
            Ok(Kickoff::Busy { wait, message }) => {
                st.message = Some(format!("the source is busy ({message}); trying again"));
                Ok(Next::Wait(
                    wait.map(|w| self.scaled(w)).unwrap_or_else(|| self.scaled(backoff(2, ERROR_BASE, ERROR_MAX))),
                ))
            }
            Err(e) => self.transient(st, mem, "export kick-off", &e, Reason::ExportFailed, Reason::SourceUnreachable),
        }
    }

    async fn poll_export(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) -> Result<Next, Failure> {
        let url = st
            .export_status_url
            .clone()
            .ok_or_else(|| Failure::new(Reason::ExportFailed, "no export status URL recorded"))?;
        match self.setup.source.poll(&url).await {
            Ok(Poll::InProgress { progress, wait }) => {
                mem.errors = 0;
                if let Some(p) = &progress {
                    // HAPI keeps answering 202 for a cancelled or errored job
                    if job_is_dead(p) {
                        return Err(Failure::new(
                            Reason::ExportFailed,
                            format!(
                                "the source reports the export job as {p:?}; it will not complete. The next run starts a new export"
                            ),
                        ));
                    }
                }
                st.progress = progress;
                let w = match wait {
                    Some(w) => {
                        st.poll_attempts = 0;
                        self.scaled(w)
                    }
                    None => {
                        st.poll_attempts = st.poll_attempts.saturating_add(1);
                        self.scaled(backoff(st.poll_attempts.min(16), POLL_BASE, POLL_MAX))
                    }
                };
                st.message = Some("export in progress on the source".into());
                Ok(Next::Wait(w))
            }
            Ok(Poll::Complete(m)) => {
                mem.errors = 0;
                st.transaction_time = m.transaction_time.as_deref().and_then(|t| t.parse::<Timestamp>().ok()).map(Time);
                st.files = Some(FileCounts { total: m.output.len() as i64, staged: 0 });
                st.progress = Some("export complete".into());
                st.phase = Phase::Transferring;
                st.message = Some(format!("transferring {} files", m.output.len()));
                mem.manifest = Some(*m);
                Ok(Next::Continue)
            }
            Ok(Poll::Retry { wait, message, throttled }) => {
                if throttled {
                    st.message = Some("the source asks to slow down (429); waiting".into());
                    return Ok(Next::Wait(wait.map(|w| self.scaled(w)).unwrap_or(self.scaled(POLL_MAX))));
                }
                let e = HttpError::Protocol { url: String::new(), message };
                if mem.errors < MAX_TRANSIENT_ERRORS {
                    mem.errors += 1;
                    let w = wait
                        .map(|w| self.scaled(w))
                        .unwrap_or_else(|| self.scaled(backoff(mem.errors, ERROR_BASE, ERROR_MAX)));
                    st.message = Some(format!(
                        "status poll failed transiently ({}); retry {}/{MAX_TRANSIENT_ERRORS}",
                        e.to_string().trim_start_matches(": "),
                        mem.errors
                    ));
                    return Ok(Next::Wait(w));
                }
                Err(Failure::new(
                    Reason::ExportFailed,
                    format!("status polling kept failing: {}", e.to_string().trim_start_matches(": ")),
                ))
            }
            Ok(Poll::Failed { status, message }) => {
                let reason = if matches!(status, 401 | 403) { Reason::AuthFailed } else { Reason::ExportFailed };
                Err(Failure::new(reason, format!("the export failed on the source (HTTP {status}): {message}")))
            }
            Err(e) => self.transient(st, mem, "status poll", &e, Reason::ExportFailed, Reason::SourceUnreachable),
        }
    }

    async fn manifest(&self, st: &BulkExportRunStatus, mem: &mut Memory) -> Result<Manifest, Failure> {
        if let Some(m) = &mem.manifest {
            return Ok(m.clone());
        }
        // resumed after a restart: the source keeps the manifest until we release it
        let url = st
            .export_status_url
            .clone()
            .ok_or_else(|| Failure::new(Reason::TransferFailed, "no export status URL recorded"))?;
        match self.setup.source.poll(&url).await {
            Ok(Poll::Complete(m)) => {
                mem.manifest = Some((*m).clone());
                Ok(*m)
            }
            Ok(other) => Err(Failure::new(
                Reason::TransferFailed,
                format!(
                    "the export's manifest is no longer available from the source ({other:?}); the next run starts a new export"
                ),
            )),
            Err(e) => Err(Failure::new(
                http_reason(&e, Reason::TransferFailed, Reason::SourceUnreachable),
                format!("re-reading the manifest: {e}"),
            )),
        }
    }

    async fn transfer(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<Next, Failure> {
        let staging =
            self.setup.staging.clone().ok_or_else(|| Failure::new(Reason::InvalidSpec, "no staging configured"))?;
        let m = match self.manifest(st, mem).await {
            Ok(m) => m,
            Err(f) if f.reason == Reason::SourceUnreachable && mem.errors < MAX_TRANSIENT_ERRORS => {
                mem.errors += 1;
                st.message = Some(format!("{}; retry {}/{MAX_TRANSIENT_ERRORS}", f.message, mem.errors));
                return Ok(Next::Wait(self.scaled(backoff(mem.errors, ERROR_BASE, ERROR_MAX))));
            }
            Err(f) => return Err(f),
        };
        let mut jobs: Vec<FileJob> = m
            .output
            .iter()
            .enumerate()
            .map(|(i, f)| FileJob {
                name: format!("{}.{i:05}.ndjson", safe_type(&f.type_)),
                file: f.clone(),
                counts_resources: true,
            })
            .collect();
        if self.setup.apply_deletes {
            jobs.extend(m.deleted.iter().enumerate().map(|(i, f)| FileJob {
                name: format!("deleted.{i:05}.bundles"),
                file: f.clone(),
                counts_resources: false,
            }));
        }
        let total = jobs.len() as i64;
        st.files = Some(FileCounts { total, staged: 0 });
        let tally = Arc::new(Mutex::new(Tally::default()));
        let requires = m.requires_access_token;
        let base = Arc::new(st.clone());
        let results: Vec<Result<(), Failure>> = futures::stream::iter(jobs)
            .map(|job| {
                self.stage_with_retries(staging.clone(), job, requires, tally.clone(), base.clone(), total, progress)
            })
            .buffer_unordered(self.setup.max_parallel)
            .collect()
            .await;
        if let Some(Err(f)) = results.into_iter().find(|r| r.is_err()) {
            return Err(f);
        }
        let t = tally.lock().unwrap_or_else(|p| p.into_inner()).clone();
        st.files = Some(FileCounts { total, staged: t.staged });
        st.bytes = t.bytes;
        st.resources = t.resources;
        st.resource_count = Some(st.resources.values().sum());
        st.progress = Some(format!("{total}/{total} files"));
        // error[]: import what was exported, report the errors
        let mut samples = vec![];
        let mut errors = 0;
        for f in &m.error {
            match transfer::inspect_errors(&self.setup.source, f, requires, &mut samples).await {
                Ok(n) => errors += n,
                Err(e) => samples.push(format!("error file unreadable: {e}")),
            }
        }
        st.export_errors = errors;
        if errors > 0 || !samples.is_empty() {
            st.reason = Some(Reason::PartialExport.as_str().into());
            let msg = format!(
                "the source reported {errors} export errors (imported what was exported); first: {}",
                samples.join(" | ")
            );
            set_condition(&mut st.conditions, types::DEGRADED, true, Reason::PartialExport.as_str(), &msg, None);
            st.message = Some(msg);
        }
        // release the export now: single-export servers free the slot, and the files are ours
        self.release_export(st, mem).await;
        st.phase = Phase::Importing;
        Ok(Next::Continue)
    }

    #[allow(clippy::too_many_arguments)]
    async fn stage_with_retries(
        &self,
        staging: Arc<dyn crate::staging::Staging>,
        job: FileJob,
        requires: bool,
        tally: Arc<Mutex<Tally>>,
        base: Arc<BulkExportRunStatus>,
        total: i64,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<(), Failure> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match transfer::stage_file(&self.setup.source, staging.as_ref(), &job, requires, &tally).await {
                Ok(()) => {
                    let t = tally.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let mut s = (*base).clone();
                    s.files = Some(FileCounts { total, staged: t.staged });
                    s.bytes = t.bytes;
                    s.resource_count = Some(t.resources.values().sum());
                    s.resources = t.resources;
                    s.progress = Some(format!("{}/{} files", t.staged, total));
                    progress.send_replace(s);
                    return Ok(());
                }
                Err(e) if e.retryable() && attempt < FILE_ATTEMPTS => {
                    tracing::warn!(file = %job.name, attempt, error = %e, "file transfer failed; retrying");
                    tokio::time::sleep(self.scaled(backoff(attempt, ERROR_BASE, Duration::from_secs(60)))).await;
                }
                Err(e) => {
                    let reason = match &e {
                        transfer::FileError::Http(h) => {
                            http_reason(h, Reason::TransferFailed, Reason::SourceUnreachable)
                        }
                        _ => Reason::TransferFailed,
                    };
                    return Err(Failure::new(
                        reason,
                        format!("{} ({}) failed after {attempt} attempts: {e}", job.name, job.file.type_),
                    ));
                }
            }
        }
    }

    async fn release_export(&self, st: &BulkExportRunStatus, mem: &mut Memory) {
        if mem.released {
            return;
        }
        if let Some(url) = &st.export_status_url
            && let Err(e) = self.setup.source.release(url).await
        {
            tracing::warn!(run = %self.id, error = %e, "could not release the export on the source");
        }
        mem.released = true;
        mem.source_lock = None;
    }

    async fn staged_inputs(&self) -> Result<Vec<ImportInput>, Failure> {
        let Some(staging) = &self.setup.staging else { return Ok(vec![]) };
        let names = staging
            .list()
            .await
            .map_err(|e| Failure::new(Reason::ImportFailed, format!("listing staged files: {e}")))?;
        Ok(names
            .iter()
            .filter(|n| n.ends_with(".ndjson"))
            .filter_map(|n| {
                n.split('.').next().map(|t| ImportInput { resource_type: t.to_string(), url: staging.pathling_url(n) })
            })
            .collect())
    }

    async fn import(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) -> Result<Next, Failure> {
        let pnp = self.setup.staging.is_none();
        if mem.pathling_lock.is_none() {
            match self.locks.try_lock(&format!("pathling:{}", self.setup.pathling_key), &self.id) {
                Ok(g) => mem.pathling_lock = Some(g),
                Err(holder) => {
                    st.message = Some(format!(
                        "waiting: run {holder} is importing into the same Pathling (it runs one import at a time)"
                    ));
                    return Ok(Next::Wait(self.scaled(LOCK_WAIT)));
                }
            }
        }
        let pathling = &self.setup.pathling;
        let Some(job) = st.import_job_url.clone() else {
            let submitted = if pnp {
                if st.kickoff_time.is_none() {
                    st.kickoff_time = Some(now());
                }
                st.phase = Phase::Importing;
                let req = PnpRequest {
                    export_url: self.setup.source_url.clone(),
                    save_mode: self.setup.save_mode.clone(),
                    types: self.setup.export.types.clone(),
                    since: self.setup.export.since.clone(),
                    type_filters: self.setup.export.type_filters.clone(),
                    elements: self.setup.export.elements.clone(),
                };
                pathling.import_pnp(&req).await
            } else {
                let inputs = self.staged_inputs().await?;
                if inputs.is_empty() {
                    st.message = Some("nothing to import".into());
                    mem.pathling_lock = None;
                    st.phase = Phase::Deleting;
                    return Ok(Next::Continue);
                }
                pathling.import(&inputs, &self.setup.save_mode).await
            };
            return match submitted {
                Ok(Submit::Accepted { job_url }) => {
                    mem.errors = 0;
                    st.import_job_url = Some(job_url);
                    st.message = Some("import submitted to Pathling".into());
                    Ok(Next::Continue)
                }
                Ok(Submit::Busy { wait, message }) => {
                    st.message = Some(format!("Pathling is busy ({message}); resubmitting later"));
                    Ok(Next::Wait(wait.map(|w| self.scaled(w)).unwrap_or_else(|| self.scaled(Duration::from_secs(10)))))
                }
                Err(e) => {
                    self.transient(st, mem, "Pathling $import", &e, Reason::ImportFailed, Reason::TargetUnreachable)
                }
            };
        };
        match pathling.poll_job(&job).await {
            Ok(JobPoll::Running { progress, wait }) => {
                mem.errors = 0;
                st.poll_attempts = st.poll_attempts.saturating_add(1);
                st.progress = Some(format!("import: {}", progress.unwrap_or_else(|| "running".into())));
                Ok(Next::Wait(wait.map(|w| self.scaled(w)).unwrap_or_else(|| {
                    self.scaled(backoff(st.poll_attempts.min(16), POLL_BASE, Duration::from_secs(30)))
                })))
            }
            Ok(JobPoll::Done(_)) => {
                st.import_job_url = None;
                st.poll_attempts = 0;
                st.progress = Some("import complete".into());
                mem.pathling_lock = None;
                st.phase = Phase::Deleting;
                Ok(Next::Continue)
            }
            Ok(JobPoll::Busy { wait, message }) => {
                // Pathling refused this job because another import runs: forget it, resubmit later
                let _ = pathling.delete_job(&job).await;
                st.import_job_url = None;
                st.message = Some(format!("Pathling is busy with another import ({message}); resubmitting later"));
                Ok(Next::Wait(wait.map(|w| self.scaled(w)).unwrap_or_else(|| self.scaled(Duration::from_secs(10)))))
            }
            Ok(JobPoll::Lost) => {
                st.import_job_url = None;
                st.message = Some("Pathling no longer knows the import job (restarted?); resubmitting".into());
                Ok(Next::Continue)
            }
            Ok(JobPoll::Failed { status, message }) => {
                // delete it so that an identical resubmission is not coalesced into the failed job
                let _ = pathling.delete_job(&job).await;
                st.import_job_url = None;
                let reason = if matches!(status, 401 | 403) { Reason::AuthFailed } else { Reason::ImportFailed };
                let hint = if status == 403 {
                    " — check that the staging URL lies under Pathling's pathling.import.allowableSources"
                } else {
                    ""
                };
                Err(Failure::new(reason, format!("Pathling's import failed (HTTP {status}): {message}{hint}")))
            }
            Err(e) => {
                self.transient(st, mem, "Pathling $job poll", &e, Reason::ImportFailed, Reason::TargetUnreachable)
            }
        }
    }

    async fn deletes(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) -> Result<Next, Failure> {
        if self.setup.apply_deletes
            && let Some(staging) = &self.setup.staging
        {
            let names = staging
                .list()
                .await
                .map_err(|e| Failure::new(Reason::ImportFailed, format!("listing staged files: {e}")))?;
            let mut n = 0;
            for name in names.iter().filter(|n| n.starts_with("deleted.")) {
                match transfer::replay_deletes(staging.as_ref(), name, &self.setup.pathling).await {
                    Ok(k) => n += k,
                    Err(msg) if mem.errors < MAX_TRANSIENT_ERRORS => {
                        mem.errors += 1;
                        st.message =
                            Some(format!("replaying deletions: {msg}; retry {}/{MAX_TRANSIENT_ERRORS}", mem.errors));
                        return Ok(Next::Wait(self.scaled(backoff(mem.errors, ERROR_BASE, ERROR_MAX))));
                    }
                    Err(msg) => return Err(Failure::new(Reason::ImportFailed, format!("replaying deletions: {msg}"))),
                }
            }
            st.deleted = n;
        }
        self.finish(st, mem).await;
        Ok(Next::Done)
    }

    async fn finish(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) {
        self.release_export(st, mem).await;
        if let Some(s) = &self.setup.staging
            && let Err(e) = s.remove_all().await
        {
            tracing::warn!(run = %self.id, error = %e, "could not remove staged files");
        }
        st.phase = Phase::Succeeded;
        st.completion_time = Some(now());
        st.duration = duration_of(st);
        st.progress = Some("done".into());
        st.resource_count = Some(st.resources.values().sum());
        let partial = st.export_errors > 0;
        let msg = format!(
            "imported {} resources in {} files{}{}",
            st.resources.values().sum::<i64>(),
            st.files.as_ref().map(|f| f.staged).unwrap_or(0),
            if st.deleted > 0 { format!(", replayed {} deletions", st.deleted) } else { String::new() },
            if partial { format!("; {} export errors (see Degraded)", st.export_errors) } else { String::new() }
        );
        set_condition(&mut st.conditions, types::COMPLETE, true, "Succeeded", &msg, None);
        st.message = match crate::api::conditions::get_condition(&st.conditions, types::DEGRADED) {
            Some(d) if partial => Some(format!("{msg}. {}", d.message)),
            _ => Some(msg),
        };
        mem.pathling_lock = None;
    }

    async fn fail(&self, st: &mut BulkExportRunStatus, mem: &mut Memory, f: Failure) -> Next {
        self.cleanup(st, mem).await;
        st.phase = Phase::Failed;
        st.completion_time = Some(now());
        st.duration = duration_of(st);
        st.reason = Some(f.reason.as_str().into());
        st.message = Some(f.message.clone());
        set_condition(&mut st.conditions, types::FAILED, true, f.reason.as_str(), f.message, None);
        Next::Done
    }

    /// Best-effort teardown of everything the run holds outside: cancels the export on the source,
    /// cancels the Pathling job, removes staged files. Used on failure and on cancellation.
    pub async fn cleanup(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) {
        if !st.phase.is_finished() {
            self.release_export(st, mem).await;
            if let Some(job) = st.import_job_url.take()
                && let Err(e) = self.setup.pathling.delete_job(&job).await
            {
                tracing::warn!(run = %self.id, error = %e, "could not cancel the Pathling import job");
            }
        }
        if let Some(s) = &self.setup.staging
            && let Err(e) = s.remove_all().await
        {
            tracing::warn!(run = %self.id, error = %e, "could not remove staged files");
        }
        mem.source_lock = None;
        mem.pathling_lock = None;
    }

    /// Cancels a run in flight: cleanup, then `Failed` with reason Cancelled.
    pub async fn cancel(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) {
        if st.phase.is_finished() {
            self.cleanup(st, mem).await;
            return;
        }
        self.fail(st, mem, Failure::new(Reason::Cancelled, "the run was cancelled")).await;
    }
}

fn duration_of(st: &BulkExportRunStatus) -> Option<String> {
    let (s, e) = (st.start_time.as_ref()?, st.completion_time.as_ref()?);
    let secs = e.0.duration_since(s.0).as_secs().max(0) as u64;
    Some(humantime::format_duration(Duration::from_secs(secs)).to_string().replace(' ', ""))
}

/// Whether an `X-Progress` text says the job will never finish (HAPI: "Build in progress - Status set
/// to CANCELLED at …" / "… ERRORED …"), without mistaking ordinary text such as "0 errors".
pub fn job_is_dead(progress: &str) -> bool {
    let l = progress.to_ascii_lowercase();
    ["cancelled", "canceled", "errored", "aborted"].iter().any(|w| l.contains(w))
}

/// Resource type names are used in file names: keep them to FHIR's alphabet.
fn safe_type(t: &str) -> String {
    let s: String = t.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    if s.is_empty() { "Resource".into() } else { s }
}

/// The next incremental `_since`: min(transactionTime, kickoff time) − overlap.
pub fn next_watermark(st: &BulkExportRunStatus, overlap: Duration) -> Option<Timestamp> {
    let k = st.kickoff_time.as_ref()?.0;
    let t = st.transaction_time.as_ref().map(|t| t.0.min(k)).unwrap_or(k);
    let overlap = jiff::SignedDuration::try_from(overlap).ok()?;
    t.checked_sub(overlap).ok()
}

/// Persists a status; called after every step.
pub trait Persist {
    /// Saves the status. An error stops driving (the run resumes from the last saved status).
    fn save(&mut self, st: &BulkExportRunStatus) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// Why [`drive`] stopped before the run ended.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("cancelled")]
    Cancelled,
    #[error("persisting the run status failed: {0}")]
    Persist(String),
}

/// Drives a run to its end: step, persist, wait, repeat. Progress snapshots (during transfers) go to
/// `progress`. Returns when the run ends, or early when `cancel` fires or persisting fails; the
/// persisted status then lets a later `drive` resume.
pub async fn drive<P: Persist + Send>(
    engine: &Engine,
    st: &mut BulkExportRunStatus,
    persist: &mut P,
    progress: &watch::Sender<BulkExportRunStatus>,
    cancel: &CancellationToken,
) -> Result<(), DriveError> {
    let mut mem = Memory::default();
    loop {
        let next = tokio::select! {
            n = engine.step(st, &mut mem, progress) => n,
            _ = cancel.cancelled() => return Err(DriveError::Cancelled),
        };
        progress.send_replace(st.clone());
        persist.save(st).await.map_err(DriveError::Persist)?;
        match next {
            Next::Done => return Ok(()),
            Next::Continue => {}
            Next::Wait(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancel.cancelled() => return Err(DriveError::Cancelled),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_jobs_are_recognised_by_their_progress_text() {
        assert!(job_is_dead("Build in progress - Status set to CANCELLED at 2026-11-26T03:00:00Z"));
        assert!(job_is_dead("Build in progress - Status set to ERRORED at 2026-11-26T03:00:00Z"));
        assert!(job_is_dead("Cancelled"));
        assert!(!job_is_dead("Build in progress - Status set to IN_PROGRESS at 2026-11-26T03:00:00Z"));
        assert!(!job_is_dead("45% complete, 0 errors"));
    }

    #[test]
    fn watermark_is_the_earlier_of_transaction_and_kickoff_minus_overlap() {
        let t = |s: &str| Some(Time(s.parse::<Timestamp>().unwrap()));
        let mut st = BulkExportRunStatus { kickoff_time: t("2026-11-26T03:00:00Z"), ..Default::default() };
        st.transaction_time = t("2026-11-26T03:10:00Z"); // HAPI: the job's end
        assert_eq!(next_watermark(&st, Duration::from_secs(300)).unwrap().to_string(), "2026-11-26T02:55:00Z");
        st.transaction_time = t("2026-11-26T02:30:00Z"); // Azure: the queue time
        assert_eq!(next_watermark(&st, Duration::from_secs(300)).unwrap().to_string(), "2026-11-26T02:25:00Z");
        st.kickoff_time = None;
        assert!(next_watermark(&st, Duration::from_secs(300)).is_none());
    }
}
