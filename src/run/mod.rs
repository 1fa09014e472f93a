//! THE run engine: one BulkExportRun as an explicit state machine
//! (Pending → Exporting → Transferring → Importing → Deleting → Succeeded | Failed).
//!
//! [`Engine::step`] performs one transition (or one poll) and leaves everything a restarted process
//! needs in the status; [`drive`] loops steps under the run's deadline, persisting the status. The
//! controller and `fhirsync sync-once` both call [`drive`] (and [`cancel`]); neither knows the
//! protocol, and neither writes a run's outcome itself.
//!
//! One file per phase (`export`, `transfer`, `import`, `deletes`), the end of a run in `finish`, and
//! the one failure policy in `policy`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::validate::template_values;
use crate::api::{BulkExportRunStatus, Phase, RunTemplate};
use crate::fhir::bulk::Manifest;
use crate::secrets::SecretSource;

mod crawl;
mod deletes;
mod export;
mod finish;
mod import;
pub mod locks;
pub mod names;
pub mod policy;
pub mod preflight;
pub mod presence;
pub mod resolve;
pub mod transfer;
mod verify;

pub use locks::KeyedLocks;
pub use policy::{Failure, Reason};
pub use resolve::{Options, RunSetup};

/// What the driver does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Step again at once.
    Continue,
    /// Step again after this wait.
    Wait(Duration),
    /// The run has ended (Succeeded or Failed).
    Done,
}

/// In-memory state of a run in this process: held locks, the manifest, the failure streaks. Losing it
/// (a restart) is harmless: the persisted status is enough to resume.
#[derive(Default)]
pub struct Memory {
    manifest: Option<Arc<Manifest>>,
    source_lock: Option<locks::LockGuard>,
    pathling_lock: Option<locks::LockGuard>,
    streaks: policy::Streaks,
    /// The kick-off intent was recorded by this process (else a recorded one was lost in a crash).
    kickoff_intent: bool,
    /// Pathling answered its preflight in this process.
    target_checked: bool,
    /// Consecutive `$job` answers "unknown job".
    lost_jobs: u32,
    /// When the current wait for an asynchronous job began, and the polls it has cost (paces them).
    waiting: Option<(Instant, u32)>,
    /// A verification's progress in this process.
    verify: verify::VerifyMemory,
    /// A search crawl's open file and place.
    crawl: Option<crawl::CrawlMemory>,
    /// The types a crawl reads, when the source's CapabilityStatement said which.
    crawl_types: Option<Vec<String>>,
    /// `method: Auto`: the source's CapabilityStatement was read for `$export`.
    method_checked: bool,
}

/// One run's engine: the resolved setup plus the process-wide locks.
pub struct Engine {
    pub setup: RunSetup,
    pub locks: KeyedLocks,
    /// `namespace/name` of the run, used as lock holder and in messages.
    pub id: String,
    /// The run's uid: claims its staging area.
    pub uid: String,
    /// Delay scale for waits (1.0 in production; tests shrink it).
    pub backoff_scale: f64,
}

impl Memory {
    /// The job waited for changed (one was submitted, or the last one ended): the next poll
    /// starts a new schedule, early.
    pub(crate) fn reset_polls(&mut self) {
        self.waiting = None;
    }
}

pub(crate) fn now() -> Time {
    Time(Timestamp::now())
}

impl Engine {
    /// The run's staging area (every run but pingAndPull has one).
    pub(crate) fn staging(&self) -> Result<Arc<dyn crate::staging::Staging>, Failure> {
        self.setup.staging.clone().ok_or_else(|| Failure::new(Reason::InvalidSpec, "no staging configured"))
    }

    /// `export.until`: what a run covers ends there at the latest.
    pub(crate) fn until(&self) -> Option<Timestamp> {
        self.setup.export.until.as_deref().and_then(|u| u.parse().ok())
    }

    pub(crate) fn scaled(&self, d: Duration) -> Duration {
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
        let r = match st.phase {
            Phase::Pending => self.start(st, mem, progress).await,
            Phase::Exporting if st.crawl.is_some() => self.crawl(st, mem, progress).await,
            Phase::Exporting => self.poll_export(st, mem).await,
            Phase::Transferring => self.transfer(st, mem, progress).await,
            Phase::Importing => self.import(st, mem, progress).await,
            Phase::Deleting => self.deletes(st, mem, progress).await,
            Phase::Verifying => self.verify(st, mem, progress).await,
            Phase::Repairing => self.repair(st, mem, progress).await,
            Phase::Succeeded | Phase::Failed => Ok(Next::Done),
        };
        match r {
            Ok(n) => n,
            Err(f) => self.fail(st, mem, f).await,
        }
    }

    /// Handles a failed attempt by the one policy: a wait (with a message) or the run's failure.
    pub(crate) fn on_error(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        a: policy::Attempt<'_>,
        e: &crate::fhir::client::Error,
    ) -> Result<Next, Failure> {
        match policy::decide(a, e, &mut mem.streaks) {
            policy::Decision::Retry { wait, message } => {
                st.message = Some(message);
                Ok(Next::Wait(self.scaled(wait)))
            }
            policy::Decision::Fail(f) => Err(f),
        }
    }

    /// The wait before the next poll of the job being waited for (see [`policy::poll_wait`]); the
    /// first call after [`Memory::reset_polls`] gives the first, early, wait. Counts the poll in
    /// `st.poll_attempts`.
    pub(crate) fn poll_wait(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        server: Option<Duration>,
        max: Duration,
    ) -> Duration {
        let (since, polls) = mem.waiting.get_or_insert_with(|| (Instant::now(), 0));
        let (n, waited) = (*polls, since.elapsed());
        *polls = polls.saturating_add(1);
        st.poll_attempts = n;
        self.scaled(policy::poll_wait(server, n, waited.div_f64(self.backoff_scale.max(1e-6)), max))
    }
}

/// What one run is: its identity, its template and its `_since`.
#[derive(Debug, Clone)]
pub struct RunInputs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub template: RunTemplate,
    pub since: Option<Timestamp>,
    /// Set for a verification run (trigger Verify): it compares ids instead of importing.
    pub verify: Option<crate::api::VerifyRun>,
}

/// Where the runs of a process spend their time: waiting between polls and attempts (their own
/// waits), or working (a step: requests, transfers, queues). Counted in seconds, for the metrics.
#[derive(Clone, Default, Debug)]
pub struct Clock {
    pub waiting: Seconds,
    pub working: Seconds,
}

/// A shared count of seconds.
pub type Seconds = prometheus_client::metrics::counter::Counter<f64, std::sync::atomic::AtomicU64>;

/// What a run uses from its process.
#[derive(Clone)]
pub struct Deps {
    pub secrets: Arc<dyn SecretSource>,
    pub locks: KeyedLocks,
    pub opts: Options,
    /// Delay scale for waits (1.0 in production; tests shrink it).
    pub backoff_scale: f64,
    /// Whether this process may act (leader election): a run stops before its next step once the
    /// fence lapses, and the step in flight is dropped.
    pub fence: crate::fence::Fence,
    /// Where the runs' time goes.
    pub clock: Clock,
}

/// Stores a run's status.
pub trait Persist {
    /// Stores `st` durably before the run goes on (phase changes, a recorded intent, a status URL).
    /// Progress between those goes out through the `progress` channel of [`drive`], for the caller to
    /// store lazily.
    fn save(&mut self, st: &BulkExportRunStatus) -> impl std::future::Future<Output = Result<(), PersistError>> + Send;
}

/// Why a status could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The run was deleted, or finished elsewhere: stop driving it.
    #[error("the run is gone or finished elsewhere")]
    Gone,
    /// Storing failed.
    #[error("{0}")]
    Failed(String),
}

/// Why [`drive`] stopped before the run ended.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("cancelled")]
    Cancelled,
    /// This process may no longer act (its lease lapsed): another replica takes the run over.
    #[error("this process no longer holds the lease")]
    Fenced,
    #[error("the run is gone or finished elsewhere")]
    Gone,
    #[error("persisting the run status failed: {0}")]
    Persist(String),
}

/// The fields whose change must be stored before the run goes on: what a restarted process cannot
/// find out again. Everything else (intermediate phases, the import job, progress) goes out lazily:
/// a resumed run re-polls the export, and Pathling coalesces a resubmitted identical `$import`.
fn durable(st: &BulkExportRunStatus) -> impl PartialEq + use<> {
    (
        st.phase.is_finished(),
        st.kickoff_time.clone(),
        st.export_status_url.clone(),
        st.export_released,
        st.lost_kickoffs,
        st.crawl.as_ref().map(|c| (c.types_done, c.after.clone())),
    )
}

async fn save<P: Persist>(persist: &mut P, st: &BulkExportRunStatus) -> Result<(), DriveError> {
    persist.save(st).await.map_err(|e| match e {
        PersistError::Gone => DriveError::Gone,
        PersistError::Failed(m) => DriveError::Persist(m),
    })
}

/// Longest time cleanup (release, cancel, remove staged files) may take when a run fails.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Drives a run to its end: resolve, then step, store, wait, repeat — all under the run's deadline
/// (`runTimeout` from its start), which is enforced inside long steps too. Returns when the run ends,
/// or early when `cancel` fires or the run is gone; the stored status then lets a later `drive`
/// resume. Every snapshot goes to `progress`.
pub async fn drive<P: Persist + Send>(
    inputs: &RunInputs,
    deps: &Deps,
    st: &mut BulkExportRunStatus,
    persist: &mut P,
    progress: &watch::Sender<BulkExportRunStatus>,
    cancel: &CancellationToken,
) -> Result<(), DriveError> {
    if st.phase.is_finished() {
        return Ok(());
    }
    let id = format!("{}/{}", inputs.namespace, inputs.name);
    if st.start_time.is_none() {
        st.start_time = Some(now());
        tracing::info!(run = %id, since = %inputs.since.map(|t| t.to_string()).unwrap_or_else(|| "full export".into()), "run started");
    } else {
        tracing::info!(run = %id, phase = ?st.phase, "run resumed");
    }
    let values = match template_values(&inputs.template) {
        Ok(v) => v,
        Err(m) => {
            finish::mark_failed(st, &Failure::new(Reason::InvalidSpec, format!("{m}; fix the BulkExportSync")));
            progress.send_replace(st.clone());
            return save(persist, st).await;
        }
    };
    let start = st.start_time.as_ref().map(|t| t.0).unwrap_or_else(Timestamp::now);
    let elapsed = Timestamp::now().duration_since(start);
    let elapsed = if elapsed.is_negative() { Duration::ZERO } else { elapsed.unsigned_abs() };
    let remaining = values.run_timeout.saturating_sub(elapsed);
    let deadline = tokio::time::Instant::now() + remaining;
    let timeout = || {
        Failure::new(
            Reason::RunTimeout,
            format!(
                "the run exceeded spec.runTimeout ({}); what it held was released. Raise runTimeout if the source is this slow",
                crate::api::units::show(values.run_timeout)
            ),
        )
    };

    // resolve the template (Secrets are read now: a rotated one takes effect at the next run or resume)
    let mut streaks = policy::Streaks::default();
    let engine = loop {
        let built = tokio::select! {
            e = engine(inputs, deps) => e,
            _ = tokio::time::sleep_until(deadline) => Err(timeout().into()),
            _ = cancel.cancelled() => return Err(DriveError::Cancelled),
        };
        match built {
            Ok(engine) => break engine,
            Err(e) if e.transient && streaks.transient < policy::MAX_STREAK => {
                streaks.transient += 1;
                st.message = Some(format!("{}; retry {}/{}", e.failure.message, streaks.transient, policy::MAX_STREAK));
                progress.send_replace(st.clone());
                let wait = crate::fhir::retry::rules::TRANSIENT.wait(streaks.transient).mul_f64(deps.backoff_scale);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return Err(DriveError::Cancelled),
                }
            }
            Err(e) => {
                finish::mark_failed(st, &e.failure);
                progress.send_replace(st.clone());
                tracing::info!(run = %id, reason = e.failure.reason.as_str(), "run failed before it started: {}", e.failure.message);
                return save(persist, st).await;
            }
        }
    };
    crate::api::conditions::set_insecure_tls(&mut st.conditions, engine.setup.insecure_tls, None);

    let mut mem = Memory::default();
    loop {
        // a process that lost its lease (paused, partitioned) stops before acting again; a step in
        // flight when the fence lapses is dropped, its result neither stored nor followed
        if !deps.fence.holds() {
            return Err(DriveError::Fenced);
        }
        let before = durable(st);
        let phase = st.phase;
        let began = Instant::now();
        let next = tokio::select! {
            biased;
            _ = deps.fence.lapsed() => return Err(DriveError::Fenced),
            _ = cancel.cancelled() => return Err(DriveError::Cancelled),
            n = engine.step(st, &mut mem, progress) => n,
            _ = tokio::time::sleep_until(deadline) => {
                engine.fail(st, &mut mem, timeout()).await
            }
        };
        deps.clock.working.inc_by(began.elapsed().as_secs_f64());
        if !deps.fence.holds() {
            return Err(DriveError::Fenced);
        }
        progress.send_replace(st.clone());
        if st.phase != phase {
            log_phase(&id, phase, st);
        }
        if durable(st) != before || next == Next::Done {
            save(persist, st).await?;
        }
        match next {
            Next::Done => return Ok(()),
            Next::Continue => {}
            Next::Wait(d) => {
                let began = Instant::now();
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = cancel.cancelled() => return Err(DriveError::Cancelled),
                    _ = deps.fence.lapsed() => return Err(DriveError::Fenced),
                }
                deps.clock.waiting.inc_by(began.elapsed().as_secs_f64());
            }
        }
    }
}

fn log_phase(id: &str, from: Phase, st: &BulkExportRunStatus) {
    match st.phase {
        Phase::Succeeded => tracing::info!(
            run = %id,
            resources = st.resource_count.unwrap_or(0),
            deleted = st.deleted,
            export_errors = st.export_errors,
            bytes = st.bytes,
            duration = st.duration.as_deref().unwrap_or(""),
            "run succeeded"
        ),
        Phase::Failed => tracing::info!(
            run = %id,
            reason = st.reason.as_deref().unwrap_or(""),
            duration = st.duration.as_deref().unwrap_or(""),
            "run failed: {}",
            st.message.as_deref().unwrap_or("")
        ),
        to => tracing::info!(run = %id, from = ?from, to = ?to, "run phase: {}", st.message.as_deref().unwrap_or("")),
    }
}

/// Cancels a run that is not finished (its BulkExportRun was deleted): releases the export on the
/// source, cancels Pathling's job, removes staged files, and marks it Failed (Cancelled). Uses the
/// run's own template: its BulkExportSync may be gone already. Returns what could not be cleaned up.
pub async fn cancel(inputs: &RunInputs, deps: &Deps, st: &mut BulkExportRunStatus) -> Result<(), String> {
    let engine = engine(inputs, deps).await.map_err(|e| e.failure.message)?;
    let mut mem = Memory::default();
    let left = tokio::time::timeout(CLEANUP_TIMEOUT, engine.cleanup(st, &mut mem))
        .await
        .unwrap_or_else(|_| vec![format!("cleanup took longer than {}s", CLEANUP_TIMEOUT.as_secs())]);
    if !st.phase.is_finished() {
        finish::mark_failed(
            st,
            &Failure::new(Reason::Cancelled, "the run was cancelled (its BulkExportRun was deleted)"),
        );
    }
    if left.is_empty() { Ok(()) } else { Err(left.join("; ")) }
}

/// Resolves a run's template (and Secrets) into an engine: what [`drive`] and [`cancel`] do first.
pub async fn engine(inputs: &RunInputs, deps: &Deps) -> Result<Engine, resolve::SetupError> {
    let values = template_values(&inputs.template)
        .map_err(|m| Failure::new(Reason::InvalidSpec, format!("{m}; fix the BulkExportSync")))?;
    let which = resolve::Which {
        namespace: &inputs.namespace,
        run: &inputs.name,
        since: inputs.since,
        verify: inputs.verify.as_ref(),
    };
    let setup = resolve::setup(&inputs.template, &values, which, deps.secrets.as_ref(), &deps.opts).await?;
    Ok(Engine {
        setup,
        locks: deps.locks.clone(),
        id: format!("{}/{}", inputs.namespace, inputs.name),
        uid: inputs.uid.clone(),
        backoff_scale: deps.backoff_scale,
    })
}

pub use export::MAX_LOST_KICKOFFS;
pub use finish::mark_failed;
pub use import::MAX_LOST_JOBS;
