//! `fhirsync sync-once`: one run of a BulkExportSync from a YAML file, without a cluster, through the
//! same engine as the operator. `--state` keeps the watermark and an in-flight run between invocations.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::{BulkExportRunStatus, BulkExportSync, Phase, parse_duration, validate::validate_bulk_sync};
use crate::run::{self, DriveError, Engine, KeyedLocks, Options, Persist};
use crate::secrets::{DirSecrets, SecretSource};

/// Errors before a run could start (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a BulkExportSync: {message}")]
    Parse { path: String, message: String },
    #[error("invalid BulkExportSync: {0}")]
    Invalid(String),
    #[error("state file {path}: {message}")]
    State { path: String, message: String },
}

/// What `--state` keeps between invocations.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// `_since` of the next incremental run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<Timestamp>,
    /// Fingerprint of the query the watermark belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark_scope: Option<String>,
    /// A run in flight (resumed by the next invocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunState>,
}

/// A run in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    pub status: BulkExportRunStatus,
}

/// Output format of the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Arguments of `sync-once`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The BulkExportSync YAML file.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Directory of mounted Secrets: a reference {name, key} is read from DIR/name/key.
    #[arg(long)]
    pub secrets_dir: Option<PathBuf>,
    /// State file: keeps the watermark and an in-flight run between invocations.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Summary format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

struct NoSecrets;
impl SecretSource for NoSecrets {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        r: &'a crate::api::SecretKeyRef,
    ) -> futures::future::BoxFuture<'a, Result<Vec<u8>, crate::secrets::SecretError>> {
        let e = crate::secrets::SecretError::Unavailable {
            namespace: namespace.into(),
            name: r.name.clone(),
            message: "no --secrets-dir given (lay the Secret out as DIR/name/key)".into(),
        };
        Box::pin(async move { Err(e) })
    }
}

/// Stable 64-bit FNV-1a fingerprint (std's hasher is not stable across releases).
pub fn fingerprint(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The query a watermark belongs to: source URL, export (without its initial `since`) and target URL.
pub fn watermark_scope(sync: &BulkExportSync) -> String {
    let mut e = sync.spec.export.clone();
    e.since = None;
    fingerprint(&format!(
        "{}|{}|{}",
        sync.spec.source.url.trim_end_matches('/'),
        serde_json::to_string(&e).unwrap_or_default(),
        sync.spec.target.url.trim_end_matches('/')
    ))
}

/// Parses the first BulkExportSync document of a YAML file.
pub fn load_sync(path: &Path) -> Result<BulkExportSync, CliError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError::Read { path: path.display().to_string(), source: e })?;
    let p = path.display().to_string();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)
            .map_err(|e| CliError::Parse { path: p.clone(), message: e.to_string() })?;
        if v.get("kind").and_then(|k| k.as_str()) == Some("BulkExportSync") {
            return serde_yaml::from_value(v).map_err(|e| CliError::Parse { path: p.clone(), message: e.to_string() });
        }
    }
    Err(CliError::Parse { path: p, message: "no document with kind: BulkExportSync".into() })
}

fn read_state(path: &Path) -> Result<State, CliError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| CliError::State { path: path.display().to_string(), message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(CliError::State { path: path.display().to_string(), message: e.to_string() }),
    }
}

fn write_state(path: &Path, s: &State) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec_pretty(s).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, data).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

struct StatePersist {
    path: Option<PathBuf>,
    state: State,
}

impl Persist for StatePersist {
    async fn save(&mut self, st: &BulkExportRunStatus) -> Result<(), String> {
        if let Some(r) = &mut self.state.run {
            r.status = st.clone();
        }
        match &self.path {
            Some(p) => write_state(p, &self.state),
            None => Ok(()),
        }
    }
}

/// The end-of-run summary.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub run: String,
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub message: String,
    pub since: Option<Timestamp>,
    pub resources: std::collections::BTreeMap<String, i64>,
    pub total_resources: i64,
    pub deleted: i64,
    pub export_errors: i64,
    pub files: i64,
    pub bytes: i64,
    pub duration: Option<String>,
    pub watermark: Option<Timestamp>,
}

/// Runs the command; returns the process exit code.
pub async fn run(args: Args) -> i32 {
    match run_inner(&args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

async fn run_inner(args: &Args) -> Result<i32, CliError> {
    let sync = load_sync(&args.file)?;
    validate_bulk_sync(&sync.spec).map_err(CliError::Invalid)?;
    if let Some(s) = &sync.spec.schedule {
        crate::schedule::Schedule::parse(s, &sync.spec.time_zone).map_err(CliError::Invalid)?;
    }
    let overlap = parse_duration(&sync.spec.since_overlap).map_err(CliError::Invalid)?;
    let ns = sync.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = sync.metadata.name.clone().unwrap_or_else(|| "sync".into());
    let mut state = match &args.state {
        Some(p) => read_state(p)?,
        None => State::default(),
    };
    let scope = watermark_scope(&sync);
    if state.watermark_scope.as_deref() != Some(&scope) {
        state.watermark = None; // the old watermark describes another query
        state.watermark_scope = Some(scope);
    }
    let resumed = state.run.is_some();
    let run_state = match state.run.clone() {
        Some(r) => r,
        None => {
            let since = if sync.spec.incremental {
                state.watermark.or(sync.spec.export.since.as_ref().map(|t| t.0))
            } else {
                sync.spec.export.since.as_ref().map(|t| t.0)
            };
            RunState {
                name: format!("{name}-{}", Timestamp::now().as_second() / 60),
                since,
                status: BulkExportRunStatus::default(),
            }
        }
    };
    state.run = Some(run_state.clone());
    let secrets: Box<dyn SecretSource> = match &args.secrets_dir {
        Some(d) => Box::new(DirSecrets::new(d)),
        None => Box::new(NoSecrets),
    };
    let mut status = run_state.status.clone();
    let mut persist = StatePersist { path: args.state.clone(), state };
    let setup = match run::resolve::setup(
        &sync.spec,
        &ns,
        &run_state.name,
        run_state.since,
        secrets.as_ref(),
        &Options::default(),
    )
    .await
    {
        Ok(s) => Some(s),
        Err(f) => {
            status.phase = Phase::Failed;
            status.reason = Some(f.reason.as_str().into());
            status.message = Some(f.message);
            None
        }
    };
    let (tx, rx) = watch::channel(status.clone());
    let reporter = tokio::spawn(report_progress(rx, resumed));
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            c2.cancel();
        }
    });
    let mut interrupted = false;
    if let Some(setup) = setup {
        let insecure = setup.insecure_tls;
        let engine =
            Engine { setup, locks: KeyedLocks::default(), id: format!("{ns}/{}", run_state.name), backoff_scale: 1.0 };
        if insecure {
            eprintln!("warning: tls.insecureSkipVerify is in use: server certificates are not verified");
        }
        match run::drive(&engine, &mut status, &mut persist, &tx, &cancel).await {
            Ok(()) => {}
            Err(DriveError::Cancelled) => interrupted = true,
            Err(DriveError::Persist(e)) => {
                return Err(CliError::State {
                    path: args.state.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    message: e,
                });
            }
        }
    }
    drop(tx);
    let _ = reporter.await;
    if interrupted {
        eprintln!(
            "interrupted in phase {:?}; {}",
            status.phase,
            if args.state.is_some() {
                "run again with the same --state to resume"
            } else {
                "without --state the run cannot be resumed"
            }
        );
        return Ok(130);
    }
    // the run has ended: fold it into the state
    let mut watermark = persist.state.watermark;
    if status.phase == Phase::Succeeded && sync.spec.incremental {
        watermark = run::next_watermark(&status, overlap).or(watermark);
    }
    persist.state.watermark = watermark;
    persist.state.run = None;
    if let Some(p) = &args.state {
        write_state(p, &persist.state).map_err(|e| CliError::State { path: p.display().to_string(), message: e })?;
    }
    let summary = Summary {
        run: run_state.name.clone(),
        phase: status.phase,
        reason: status.reason.clone(),
        message: status.message.clone().unwrap_or_default(),
        since: run_state.since,
        total_resources: status.resources.values().sum(),
        resources: status.resources.clone(),
        deleted: status.deleted,
        export_errors: status.export_errors,
        files: status.files.as_ref().map(|f| f.staged).unwrap_or(0),
        bytes: status.bytes,
        duration: status.duration.clone(),
        watermark,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default()),
        Output::Text => print_text(&summary),
    }
    Ok(if status.phase == Phase::Succeeded { 0 } else { 1 })
}

fn print_text(s: &Summary) {
    let ok = s.phase == Phase::Succeeded;
    println!("run:        {}", s.run);
    println!(
        "result:     {}",
        if ok { "Succeeded".to_string() } else { format!("Failed ({})", s.reason.clone().unwrap_or_default()) }
    );
    println!("message:    {}", s.message);
    println!("since:      {}", s.since.map(|t| t.to_string()).unwrap_or_else(|| "(full export)".into()));
    println!("resources:  {}", s.total_resources);
    for (t, n) in &s.resources {
        println!("  {t}: {n}");
    }
    println!("deleted:    {}", s.deleted);
    println!("errors:     {}", s.export_errors);
    println!("files:      {} ({} bytes)", s.files, s.bytes);
    if let Some(d) = &s.duration {
        println!("duration:   {d}");
    }
    if let Some(w) = s.watermark {
        println!("watermark:  {w} (next incremental _since)");
    }
}

async fn report_progress(mut rx: watch::Receiver<BulkExportRunStatus>, resumed: bool) {
    let tty = std::io::stderr().is_terminal();
    if resumed {
        eprintln!("resuming the run saved in the state file");
    }
    let bar = if tty {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(200));
        Some(b)
    } else {
        None
    };
    let mut last = String::new();
    while rx.changed().await.is_ok() {
        let st = rx.borrow_and_update().clone();
        let line = format!(
            "{:?}: {}{}",
            st.phase,
            st.progress.clone().unwrap_or_default(),
            st.message.as_ref().map(|m| format!(" — {m}")).unwrap_or_default()
        );
        if let Some(b) = &bar {
            if let Some(f) = &st.files
                && st.phase == Phase::Transferring
            {
                b.set_length(f.total as u64);
                b.set_position(f.staged as u64);
            }
            b.set_message(line.clone());
        } else if line != last {
            eprintln!("{} {line}", Time(Timestamp::now()).0.strftime("%H:%M:%S"));
        }
        last = line;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
