//! Running the engine in-process against the doubles (shared by the protocol and auth suites).

use std::sync::Arc;
use std::time::Duration;

use fhirsync::api::{BulkExportRunStatus, BulkExportSync, RunTemplate};
use fhirsync::run::{self, Deps, Engine, KeyedLocks, Options, Persist, PersistError, RunInputs};
use fhirsync::secrets::DirSecrets;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pathling::{FakePathling, PathlingConfig};
use super::source::{FakeSource, SourceConfig};

pub const AUTH: &str = ", auth: {bearerToken: {tokenRef: {name: src, key: token}}}";

pub struct Env {
    pub source: FakeSource,
    pub pathling: FakePathling,
    pub dir: tempfile::TempDir,
    pub extra: String,
    pub source_auth: String,
    pub staging_yaml: Option<String>,
}

impl Env {
    pub async fn new(cfg: SourceConfig) -> Self {
        Self::with(cfg, PathlingConfig::default()).await
    }

    pub async fn with(cfg: SourceConfig, mut pcfg: PathlingConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        pcfg.roots.push(("file:///pathling-staging".into(), dir.path().join("staging")));
        Self {
            source: FakeSource::start(cfg).await,
            pathling: FakePathling::start(pcfg).await,
            dir,
            extra: String::new(),
            source_auth: String::new(),
            staging_yaml: None,
        }
    }

    pub fn staging(&self) -> std::path::PathBuf {
        self.dir.path().join("staging")
    }

    pub fn sync(&self) -> BulkExportSync {
        let yaml = format!(
            r#"apiVersion: fhirsync.io/v1alpha1
kind: BulkExportSync
metadata: {{name: hospital-a, namespace: ns1}}
spec:
  source: {{url: "{}"{}}}
  target: {{url: "{}"}}
  staging: {}
  maxParallelDownloads: 3
{}"#,
            self.source.base,
            self.source_auth,
            self.pathling.base,
            self.staging_yaml.clone().unwrap_or_else(|| format!(
                "{{volume: {{path: \"{}\", pathlingPath: \"file:///pathling-staging\"}}}}",
                self.staging().display()
            )),
            self.extra
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    /// What a run named `run` runs: the sync's spec as its template.
    pub fn inputs(&self, run: &str, since: Option<jiff::Timestamp>) -> RunInputs {
        RunInputs {
            namespace: "ns1".into(),
            name: run.into(),
            uid: format!("uid-{run}"),
            template: RunTemplate::from(&self.sync().spec),
            since,
            verify: None,
        }
    }

    /// A verification run of the sync.
    pub fn verify_inputs(&self, run: &str, verify: fhirsync::api::VerifyRun) -> RunInputs {
        RunInputs { verify: Some(verify), ..self.inputs(run, None) }
    }

    /// Secrets from the test directory, fresh locks, waits shrunk 500×.
    pub fn deps(&self) -> Deps {
        self.deps_with(KeyedLocks::default())
    }

    pub fn deps_with(&self, locks: KeyedLocks) -> Deps {
        Deps {
            secrets: Arc::new(DirSecrets::new(self.dir.path().join("secrets"))),
            locks,
            opts: Options::default(),
            backoff_scale: 0.002,
            fence: fhirsync::fence::Fence::open(),
            clock: Default::default(),
        }
    }

    pub async fn engine(&self, run: &str, since: Option<jiff::Timestamp>) -> Result<Engine, run::Failure> {
        self.engine_with(run, since, KeyedLocks::default()).await
    }

    pub async fn engine_with(
        &self,
        run: &str,
        since: Option<jiff::Timestamp>,
        locks: KeyedLocks,
    ) -> Result<Engine, run::Failure> {
        run::engine(&self.inputs(run, since), &self.deps_with(locks)).await.map_err(|e| e.failure)
    }

    pub fn secret(&self, name: &str, key: &str, value: &str) {
        let d = self.dir.path().join("secrets").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(key), value).unwrap();
    }
}

/// Keeps every persisted status, like the API server would.
#[derive(Default)]
pub struct Saved(pub Vec<BulkExportRunStatus>);

impl Persist for Saved {
    async fn save(&mut self, st: &BulkExportRunStatus) -> Result<(), PersistError> {
        self.0.push(st.clone());
        Ok(())
    }
}

/// Drives a run (from `st`) to its end through `run::drive`, as the operator and sync-once do.
pub async fn drive_inputs(env: &Env, inputs: &RunInputs, st: &mut BulkExportRunStatus) -> Saved {
    drive_with(inputs, &env.deps(), st).await
}

/// [`drive_inputs`] with the given process dependencies.
pub async fn drive_with(inputs: &RunInputs, deps: &Deps, st: &mut BulkExportRunStatus) -> Saved {
    let mut saved = Saved::default();
    let (tx, _rx) = watch::channel(st.clone());
    tokio::time::timeout(
        Duration::from_secs(60),
        run::drive(inputs, deps, st, &mut saved, &tx, &CancellationToken::new()),
    )
    .await
    .expect("run did not finish in time")
    .expect("drive");
    saved
}

pub async fn drive(env: &Env, run: &str, since: Option<jiff::Timestamp>, st: &mut BulkExportRunStatus) -> Saved {
    drive_inputs(env, &env.inputs(run, since), st).await
}

pub async fn run_once(env: &Env) -> BulkExportRunStatus {
    let mut st = BulkExportRunStatus::default();
    drive(env, "r1", None, &mut st).await;
    st
}

/// Steps a fresh run until it reaches `phase` (a process that then "crashes": the caller drops the
/// engine and memory and resumes from the returned status).
pub async fn step_until(engine: &Engine, phase: fhirsync::api::Phase) -> (BulkExportRunStatus, run::Memory) {
    let mut st = BulkExportRunStatus::default();
    let mut mem = run::Memory::default();
    let (tx, _rx) = watch::channel(st.clone());
    while st.phase != phase {
        assert!(!st.phase.is_finished(), "the run ended before {phase:?}: {:?}", st.message);
        engine.step(&mut st, &mut mem, &tx).await;
    }
    (st, mem)
}
