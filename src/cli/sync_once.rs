//! `fhirsync sync-once`: one run of a BulkExportSync from a YAML file, without a cluster, through the
//! same engine and the same decisions (`crate::sync`) as the operator. `--state` keeps the watermark
//! and an in-flight run between invocations; it is locked while in use, and a run in it is resumed
//! only for the sync it was started for.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::input::{SpecArgs, load_checked};
use super::state::{RunState, State, StatePersist, lock_state, read_state, write_state};
use crate::api::{BulkExportRunStatus, Phase, RunTemplate};
use crate::run::{self, Deps, DriveError, KeyedLocks, Options, RunInputs};
use crate::secrets::SecretSource;
use crate::sync::{self, WatermarkMove};

pub use super::input::CliError;

/// Output format of the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Arguments of `sync-once`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// State file: keeps the watermark and an in-flight run between invocations.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Summary format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    /// After the run, verify that Pathling holds what the source holds (ids per type), and repair what
    /// differs unless the file's spec.verify.repair is false. Exit code 3 when drift remains.
    #[arg(long)]
    pub verify: bool,
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
    /// How the source was read: `BulkExport` or `Search`.
    pub method: &'static str,
    /// Search pages read (a run by search).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_pages: Option<u32>,
    pub since: Option<Timestamp>,
    pub resources: std::collections::BTreeMap<String, i64>,
    pub total_resources: i64,
    pub deleted: i64,
    /// Where the deletions came from (Manifest, History, Unavailable, FullExport, Disabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_source: Option<crate::api::DeletionSource>,
    pub export_errors: i64,
    pub files: i64,
    pub bytes: i64,
    pub duration: Option<String>,
    pub watermark: Option<Timestamp>,
    /// With `--verify`: what the verification found, and its repair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<crate::api::Drift>,
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
    let (sync, values) = load_checked(&args.spec.file)?;
    let ns = sync.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = sync.metadata.name.clone().unwrap_or_else(|| "sync".into());
    let _lock = match &args.state {
        Some(p) => Some(lock_state(p)?),
        None => None,
    };
    let mut state = match &args.state {
        Some(p) => read_state(p)?,
        None => State::default(),
    };
    let scope = sync::watermark_scope(&sync.spec);
    if state.watermark_scope.as_deref() != Some(&scope) {
        if state.run.is_some() {
            return Err(CliError::State {
                path: args.state.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                message:
                    "it holds a run in flight for another sync (its source, export or target differ from this file's); \
                          run again with the file it was started with, or use another --state file"
                        .into(),
            });
        }
        state.watermark = None; // the old watermark describes another query
        state.watermark_scope = Some(scope);
    }
    let resumed = state.run.is_some();
    let run_state = match state.run.clone() {
        Some(r) => r,
        None => {
            let stamp = Timestamp::now().strftime("%Y%m%d%H%M%S").to_string();
            let uid = uuid::Uuid::new_v4().simple().to_string();
            RunState {
                name: sync::run_name(&name, &format!("{stamp}-{}", &uid[..6])),
                uid,
                since: sync::since(&sync.spec, state.watermark),
                template: Some(RunTemplate::from(&sync.spec)),
                status: BulkExportRunStatus::default(),
            }
        }
    };
    state.run = Some(run_state.clone());
    let secrets: Arc<dyn SecretSource> = args.spec.secrets();
    let inputs = RunInputs {
        namespace: ns.clone(),
        name: run_state.name.clone(),
        uid: run_state.uid.clone(),
        template: run_state.template.clone().unwrap_or_else(|| RunTemplate::from(&sync.spec)),
        since: run_state.since,
        verify: None,
    };
    let deps = Deps {
        secrets,
        locks: KeyedLocks::default(),
        opts: Options::default(),
        backoff_scale: 1.0,
        fence: crate::fence::Fence::open(),
        clock: Default::default(),
    };
    let mut status = run_state.status.clone();
    let mut persist = StatePersist { path: args.state.clone(), state };
    if inputs.template.source.tls.as_ref().is_some_and(|t| t.insecure_skip_verify)
        || inputs.template.target.tls.as_ref().is_some_and(|t| t.insecure_skip_verify)
    {
        eprintln!("warning: tls.insecureSkipVerify is in use: server certificates are not verified");
    }
    let (tx, rx) = watch::channel(status.clone());
    let reporter = tokio::spawn(report_progress(rx, resumed));
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            c2.cancel();
        }
    });
    let r = run::drive(&inputs, &deps, &mut status, &mut persist, &tx, &cancel).await;
    drop(tx);
    let _ = reporter.await;
    match r {
        Ok(()) => {}
        Err(DriveError::Cancelled) => {
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
        Err(e) => {
            return Err(CliError::State {
                path: args.state.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                message: e.to_string(),
            });
        }
    }
    // the run has ended: fold it into the state
    let mut watermark = persist.state.watermark;
    if sync.spec.incremental
        && let WatermarkMove::To(w) = sync::watermark_after(&status, watermark, values.since_overlap)
    {
        watermark = Some(w);
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
        method: if status.crawl.is_some() { "Search" } else { "BulkExport" },
        search_pages: status.crawl.as_ref().map(|c| c.pages),
        since: run_state.since,
        total_resources: status.resources.values().sum(),
        resources: status.resources.clone(),
        deleted: status.deleted,
        deletion_source: status.deletion_source,
        export_errors: status.export_errors,
        files: status.files.as_ref().map(|f| f.staged).unwrap_or(0),
        bytes: status.bytes,
        duration: status.duration.clone(),
        watermark,
        drift: None,
    };
    let mut summary = summary;
    let mut code = if status.phase == Phase::Succeeded { 0 } else { 1 };
    if args.verify && code == 0 {
        match super::verify::verify(&sync, &ns, &deps, watermark, &cancel).await {
            Ok(super::verify::Verified::Done(d)) => {
                if !super::verify::in_sync(&d) {
                    code = 3;
                }
                summary.drift = Some(d);
            }
            Ok(super::verify::Verified::Failed(st)) => {
                eprintln!("error: the verification failed: {}", st.message.unwrap_or_default());
                code = 1;
            }
            Ok(super::verify::Verified::Cancelled) => {
                eprintln!("interrupted during the verification; the run itself is complete");
                return Ok(130);
            }
            Err(e) => {
                eprintln!("error: the verification stopped: {e}");
                code = 1;
            }
        }
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default()),
        Output::Text => {
            print_text(&summary);
            if let Some(d) = &summary.drift {
                super::verify::print_text(d);
            }
        }
    }
    Ok(code)
}

fn print_text(s: &Summary) {
    let ok = s.phase == Phase::Succeeded;
    println!("run:        {}", s.run);
    println!(
        "result:     {}",
        if ok { "Succeeded".to_string() } else { format!("Failed ({})", s.reason.clone().unwrap_or_default()) }
    );
    println!("message:    {}", s.message);
    match s.search_pages {
        Some(p) => println!("method:     Search ({p} pages)"),
        None => println!("method:     {}", s.method),
    }
    println!("since:      {}", s.since.map(|t| t.to_string()).unwrap_or_else(|| "(full export)".into()));
    println!("resources:  {}", s.total_resources);
    for (t, n) in &s.resources {
        println!("  {t}: {n}");
    }
    match s.deletion_source {
        Some(src) => println!("deleted:    {} (deletions from: {})", s.deleted, src.as_str()),
        None => println!("deleted:    {}", s.deleted),
    }
    println!("errors:     {}", s.export_errors);
    println!("files:      {} ({} bytes)", s.files, s.bytes);
    if let Some(d) = &s.duration {
        println!("duration:   {d}");
    }
    if let Some(w) = s.watermark {
        println!("watermark:  {w} (next incremental _since)");
    }
}

pub(super) async fn report_progress(mut rx: watch::Receiver<BulkExportRunStatus>, resumed: bool) {
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
        let line = progress_line(&st);
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

/// One progress line: the phase, then what is happening (no empty parts).
pub fn progress_line(st: &BulkExportRunStatus) -> String {
    let mut parts = vec![];
    if let Some(m) = st.message.as_deref().filter(|m| !m.is_empty()) {
        parts.push(m.to_string());
    }
    if let Some(p) = st.progress.as_deref().filter(|p| !p.is_empty() && !parts.iter().any(|m| m.contains(p))) {
        parts.push(format!("({p})"));
    }
    if parts.is_empty() { format!("{:?}", st.phase) } else { format!("{:?}: {}", st.phase, parts.join(" ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_have_no_empty_parts_or_echoes() {
        let st = |phase: Phase, message: Option<&str>, progress: Option<&str>| BulkExportRunStatus {
            phase,
            message: message.map(str::to_string),
            progress: progress.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(progress_line(&st(Phase::Pending, None, None)), "Pending");
        assert_eq!(progress_line(&st(Phase::Pending, Some(""), Some(""))), "Pending");
        assert_eq!(
            progress_line(&st(Phase::Exporting, Some("export in progress on the source"), Some("45% complete"))),
            "Exporting: export in progress on the source (45% complete)"
        );
        assert_eq!(
            progress_line(&st(Phase::Importing, Some("import complete"), Some("import complete"))),
            "Importing: import complete"
        );
    }
}
