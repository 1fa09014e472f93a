//! Running the engine in-process against the doubles (shared by the protocol and auth suites).

use std::time::Duration;

use fhirsync::api::{BulkExportRunStatus, BulkExportSync};
use fhirsync::run::{self, Engine, KeyedLocks, Options, Persist};
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

    pub async fn engine(&self, run: &str, since: Option<jiff::Timestamp>) -> Result<Engine, run::Failure> {
        self.engine_with(run, since, KeyedLocks::default()).await
    }

    pub async fn engine_with(
        &self,
        run: &str,
        since: Option<jiff::Timestamp>,
        locks: KeyedLocks,
    ) -> Result<Engine, run::Failure> {
        let sync = self.sync();
        let secrets = DirSecrets::new(self.dir.path().join("secrets"));
        let setup = run::resolve::setup(&sync.spec, "ns1", run, since, &secrets, &Options::default()).await?;
        Ok(Engine { setup, locks, id: format!("ns1/{run}"), backoff_scale: 0.002 })
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
    async fn save(&mut self, st: &BulkExportRunStatus) -> Result<(), String> {
        self.0.push(st.clone());
        Ok(())
    }
}

pub async fn drive(engine: &Engine, st: &mut BulkExportRunStatus) -> Saved {
    let mut saved = Saved::default();
    let (tx, _rx) = watch::channel(st.clone());
    tokio::time::timeout(Duration::from_secs(60), run::drive(engine, st, &mut saved, &tx, &CancellationToken::new()))
        .await
        .expect("run did not finish in time")
        .expect("drive");
    saved
}

pub async fn run_once(env: &Env) -> BulkExportRunStatus {
    let engine = env.engine("r1", None).await.expect("setup");
    let mut st = BulkExportRunStatus::default();
    drive(&engine, &mut st).await;
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
