//! The operator: thin controllers over the run engine. `Context` carries the shared dependencies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::future::BoxFuture;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::metrics::Metrics;
use crate::run::{Deps, KeyedLocks, Options};
use crate::secrets::{KubeSecrets, SecretSource};
use crate::telemetry::LogFormat;

mod bulk_plan;
pub mod bulk_run;
mod bulk_sync;
pub mod cache;
pub mod drift;
pub mod leader;
mod notes;
pub mod relay;
pub mod status;
mod subscription_desired;
mod subscription_plan;
pub mod subscription_sync;
mod sync_preflight;
mod sync_runs;
mod target_watch;

/// Flags of `fhirsync run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Address of the admin server (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Namespace to watch (repeatable); default: all namespaces.
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,
    /// Take part in leader election (one active controller among replicas).
    #[arg(long)]
    pub leader_elect: bool,
    /// Namespace of the Lease (default: the pod's namespace, from POD_NAMESPACE or the service account).
    #[arg(long)]
    pub lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = "fhirsync-operator")]
    pub lease_name: String,
    /// Every staging.volume.path must lie under this directory.
    #[arg(long)]
    pub staging_root: Option<PathBuf>,
    /// Where verifications of pingAndPull syncs (which have no staging area) spill sorted ids.
    #[arg(long, env = "FHIRSYNC_SPILL_DIR")]
    pub spill_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level (tracing EnvFilter directive, e.g. info or fhirsync=debug).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    #[command(flatten)]
    pub receiver: relay::ReceiverArgs,
}

/// Controller errors (reconciles are retried with backoff). Each keeps its cause, and each has its
/// own metric reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing a finalizer failed, or the reconcile behind it did (its own reason).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error(transparent)]
    Bind(#[from] crate::serve::BindError),
    /// No Kubernetes cluster to talk to.
    #[error("no Kubernetes cluster: set KUBECONFIG or run in a pod ({0})")]
    NoCluster(#[source] kube::Error),
    /// A file named by a flag cannot be read or used.
    #[error("{flag} {path}: {source}")]
    File {
        flag: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A flag's value cannot work (the message says how to fix it).
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    /// This process no longer leads: it exits so that one leader acts.
    #[error("{0}; exiting so that a single leader acts")]
    LostLeadership(&'static str),
    /// What a deleted object left behind (Subscriptions on a source, a run's staged files) cannot be
    /// removed yet.
    #[error("{0}")]
    CleanupBlocked(String),
}

impl Error {
    /// A short reason label for metrics.
    pub fn reason(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube(_) => "KubeApi",
            Error::Finalizer(f) => match f.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.reason(),
                _ => "Finalizer",
            },
            Error::Bind(_) => "Bind",
            Error::NoCluster(_) => "NoCluster",
            Error::File { .. } | Error::Flag { .. } => "Flag",
            Error::LostLeadership(_) => "LostLeadership",
            Error::CleanupBlocked(_) => "CleanupBlocked",
        }
    }
}

/// Re-creatable wait for a controller's cache to sync. (kube's readiness future wakes only one
/// waiter, and the controller itself is one: so the check is polled again with a timeout.)
pub type ReadyCheck =
    Box<dyn Fn() -> BoxFuture<'static, Result<(), kube::runtime::reflector::store::WriterDropped>> + Send + Sync>;

/// A run being driven by this process (kept until the run is deleted: a run's task starts once per
/// process).
pub struct RunTask {
    pub cancel: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
}

/// Shared dependencies of the controllers.
pub struct Context {
    pub client: Client,
    /// One recorder for the process: it deduplicates repeated Events.
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub locks: KeyedLocks,
    pub secrets: Arc<dyn SecretSource>,
    pub opts: Options,
    /// Run tasks by the run's uid.
    pub tasks: Mutex<HashMap<String, RunTask>>,
    /// The cached runs of each sync (the shared run watch keeps it).
    pub runs: Arc<cache::RunIndex>,
    /// FhirSubscriptionSyncs whose first status write already waited once.
    pub deferred: Mutex<std::collections::HashSet<String>>,
    /// The last status this process wrote to each BulkExportSync.
    pub sync_writes: status::OwnWrites<crate::api::BulkExportSyncStatus>,
    /// The relay of this process (FhirSubscriptionSyncs with `delivery: Relay`).
    pub relay: Arc<crate::relay::Relay>,
    /// Wakes the FhirSubscriptionSync controller when a sync's relay counters changed.
    pub relay_wake: tokio::sync::broadcast::Sender<(String, String)>,
    /// The receiver's base URL as sources reach it (`--receiver-url`).
    pub receiver_url: Option<url::Url>,
    /// Whether this process relays, or forwards to the lease holder.
    pub leadership: Arc<crate::relay::receiver::Leadership>,
    /// The cached BulkExportSyncs (set when their controller starts): which syncs share a Pathling.
    pub sync_store: std::sync::OnceLock<kube::runtime::reflector::Store<crate::api::BulkExportSync>>,
    /// When each FhirSubscriptionSync (by uid) was last verified in this process.
    pub verifications: Mutex<HashMap<String, std::time::Instant>>,
    pub shutdown: CancellationToken,
    /// Whether this process may act now (leader election): checked before every status write
    /// and every step of a run.
    pub fence: crate::fence::Fence,
}

/// A short, jittered wait before deciding again after a status conflict (so that many conflicting
/// reconciles do not retry in lock step).
pub fn conflict_backoff() -> std::time::Duration {
    crate::fhir::retry::rules::conflict_requeue()
}

impl Context {
    /// What a run uses from this process.
    pub fn deps(&self) -> Deps {
        Deps {
            secrets: self.secrets.clone(),
            locks: self.locks.clone(),
            opts: self.opts.clone(),
            backoff_scale: 1.0,
            fence: self.fence.clone(),
            clock: self.metrics.run_clock.clone(),
        }
    }

    /// How long a settled FhirSubscriptionSync waits before its next verification; `None`: verify now.
    /// The first time this process sees a settled one (after a restart), the wait is a stable
    /// fraction of `interval` picked from its uid, so verifications spread out.
    pub fn verification_wait(
        &self,
        uid: &str,
        interval: std::time::Duration,
        settled: bool,
    ) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        let mut m = self.verifications.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(uid) {
            Some(last) if settled => (now < *last + interval).then(|| *last + interval - now),
            Some(_) => None,
            None if settled => {
                let fraction =
                    (u64::from_str_radix(&crate::sync::fingerprint(uid)[..8], 16).unwrap_or(0) % 1000) as f64 / 1000.0;
                let wait = interval.mul_f64(fraction);
                m.insert(uid.to_string(), now.checked_sub(interval.saturating_sub(wait)).unwrap_or(now));
                Some(wait)
            }
            None => None,
        }
    }

    /// Whether a first status write of `uid` may wait for one more look (once per object and process).
    pub fn defer_first_write(&self, uid: &str) -> bool {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner()).insert(uid.to_string())
    }

    /// Records a verification now.
    pub fn verified(&self, uid: &str) {
        self.verifications.lock().unwrap_or_else(|p| p.into_inner()).insert(uid.to_string(), std::time::Instant::now());
    }

    /// Publishes an Event (its note bounded); failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let mut note = note;
        crate::text::cut_bytes(&mut note, 1000);
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::debug!(error = %e, "could not publish event");
        }
    }
}

/// `fhirsync run`: returns the exit code.
pub async fn run(args: RunArgs) -> i32 {
    match run_inner(args).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "operator stopped");
            eprintln!("error: {e}");
            1
        }
    }
}

async fn run_inner(args: RunArgs) -> Result<(), Error> {
    crate::net::init_tls();
    let client = Client::try_default().await.map_err(Error::NoCluster)?;
    let shutdown = CancellationToken::new();
    {
        let s = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            s.cancel();
        });
    }
    let metrics = Arc::new(Metrics::default());
    let ready = Readiness::default();
    // every listener is bound before anything can say the operator is ready: a port in use
    // stops the process here, with the address in the message
    let admin_listener = crate::serve::bind(args.admin_addr, "--admin-addr").await.map_err(Error::Bind)?;
    let admin = tokio::spawn(admin::serve(admin_listener, ready.clone(), metrics.clone(), shutdown.clone()));
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "fhirsync".into(), instance: std::env::var("POD_NAME").ok() },
    );
    // with election this process acts only while its lease is fresh: from before anything starts
    let fence = crate::fence::Fence::process();
    if args.leader_elect {
        fence.elect();
    }
    let leadership = Arc::new(if args.leader_elect {
        crate::relay::receiver::Leadership::elected()
    } else {
        crate::relay::receiver::Leadership::default()
    });
    let (relay, relay_wake) = relay::start(
        &args.receiver,
        client.clone(),
        metrics.clone(),
        leadership.clone(),
        recorder.clone(),
        shutdown.clone(),
    )
    .await?;
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        relay,
        relay_wake,
        receiver_url: args.receiver.receiver_url.clone(),
        leadership,
        metrics,
        locks: KeyedLocks::default(),
        secrets: Arc::new(KubeSecrets::new(client.clone())),
        opts: Options { staging_root: args.staging_root.clone(), spill_dir: args.spill_dir.clone() },
        tasks: Mutex::new(HashMap::new()),
        runs: Arc::default(),
        verifications: Mutex::default(),
        sync_store: std::sync::OnceLock::new(),
        sync_writes: Default::default(),
        deferred: Mutex::default(),
        shutdown: shutdown.clone(),
        fence,
    });
    let result = if args.leader_elect {
        leader::run_with_election(&args, ctx.clone(), ready.clone()).await
    } else {
        run_controllers(&args, ctx.clone(), ready.clone(), shutdown.clone()).await;
        Ok(())
    };
    shutdown.cancel();
    stop_tasks(&ctx).await;
    let _ = admin.await;
    result
}

/// Runs all controllers until `stop` fires; marks ready once their caches have synced.
pub async fn run_controllers(args: &RunArgs, ctx: Arc<Context>, ready: Readiness, stop: CancellationToken) {
    let namespaces: Vec<Option<String>> =
        if args.namespaces.is_empty() { vec![None] } else { args.namespaces.iter().cloned().map(Some).collect() };
    let mut futs = vec![];
    let mut stores = vec![];
    for ns in namespaces {
        let (run_root, run_store, finished_runs) = cache::run_watch(&ctx.client, &ns, ctx.runs.clone());
        let (f, s) = bulk_run::controller(ctx.clone(), run_root, run_store, stop.clone());
        futs.push(f);
        stores.push(s);
        let (f, s) = bulk_sync::controller(ctx.clone(), ns.clone(), finished_runs, stop.clone());
        futs.push(f);
        stores.push(s);
        let (f, s) = subscription_sync::controller(ctx.clone(), ns, stop.clone());
        futs.push(f);
        stores.push(s);
    }
    let r = ready.clone();
    let s2 = stop.clone();
    tokio::spawn(async move {
        for check in stores {
            loop {
                if s2.is_cancelled() {
                    return;
                }
                match tokio::time::timeout(std::time::Duration::from_millis(200), check()).await {
                    Ok(Ok(())) => break,
                    Ok(Err(_)) => return,
                    Err(_) => {}
                }
            }
        }
        tracing::info!("caches synced; ready");
        r.set(true);
    });
    futures::future::join_all(futs).await;
}

/// Cancels every run task (their status is persisted; they resume on the next start) and waits.
pub async fn stop_tasks(ctx: &Context) {
    let tasks: Vec<RunTask> = {
        let mut m = ctx.tasks.lock().unwrap_or_else(|p| p.into_inner());
        m.drain().map(|(_, t)| t).collect()
    };
    for t in &tasks {
        t.cancel.cancel();
    }
    for t in tasks {
        let _ = t.handle.await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// An Api over the watched scope: one namespace, or all.
pub fn scoped_api<K>(client: &Client, ns: &Option<String>) -> kube::Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(n) => kube::Api::namespaced(client.clone(), n),
        None => kube::Api::all(client.clone()),
    }
}

/// Counts a failed reconcile and retries it after a pause (kube-runtime backs off on repeats).
pub fn error_policy<K>(
    obj: std::sync::Arc<K>,
    e: &Error,
    ctx: std::sync::Arc<Context>,
) -> kube::runtime::controller::Action
where
    K: kube::Resource<DynamicType = ()>,
{
    let kind = K::kind(&()).to_string();
    tracing::warn!(kind = %kind, name = %kube::ResourceExt::name_any(obj.as_ref()), error = %e, "reconcile failed");
    ctx.metrics
        .reconcile_failures
        .get_or_create(&crate::metrics::FailureLabels { kind, reason: e.reason().into() })
        .inc();
    kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(10))
}

/// Starts a configured controller: its future (until `stop`) and a check for its cache having synced.
pub fn launch<K, F, Fut>(
    c: kube::runtime::Controller<K>,
    ctx: Arc<Context>,
    stop: CancellationToken,
    reconcile: F,
) -> (BoxFuture<'static, ()>, ReadyCheck)
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<kube::runtime::controller::Action, Error>> + Send + 'static,
{
    let stop2 = stop.clone();
    let c = c.graceful_shutdown_on(async move { stop.cancelled().await });
    let store = c.store();
    let mut reconcile = reconcile;
    let kind = crate::metrics::KindLabels { kind: K::kind(&()).to_string() };
    // a reconcile waiting on a slow peer does not hold up shutdown
    let counted = move |obj: Arc<K>, ctx: Arc<Context>| {
        ctx.metrics.reconciles.get_or_create(&kind).inc();
        let r = reconcile(obj, ctx);
        let stop = stop2.clone();
        async move {
            tokio::select! {
                r = r => r,
                _ = stop.cancelled() => Ok(kube::runtime::controller::Action::await_change()),
            }
        }
    };
    let fut = Box::pin(drain(c.run(counted, error_policy::<K>, ctx)));
    (
        fut,
        Box::new(move || {
            let s = store.clone();
            Box::pin(async move { s.wait_until_ready().await })
        }),
    )
}

/// Drains a controller stream, counting reconciles.
pub async fn drain<S, T, E>(stream: S)
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    stream
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile loop error");
            }
        })
        .await;
}
