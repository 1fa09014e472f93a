//! Transferring: source → staging with counting, verification and byte caps, then the `error[]`
//! files. Everything streams; nothing holds a whole file, and no line is kept past a bound.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::names::StagedName;
use super::policy::{self, Attempt, Peer};
use super::{Engine, Failure, Memory, Next, Reason};
use crate::api::conditions::{set_condition, types};
use crate::api::{BulkExportRunStatus, FileCounts, Phase};
use crate::fhir::bulk::{BulkClient, Manifest, OutputFile, Poll};
use crate::fhir::class::{Class, classify};
use crate::fhir::client::Error as HttpError;
use crate::fhir::ndjson::{Line, Lines};
use crate::fhir::outcome::OperationOutcome;
use crate::fhir::retry::rules;
use crate::staging::{Staging, StagingError};
use crate::text::peer_text;

/// Attempts per file before the transfer fails (for failures that may pass).
pub const FILE_ATTEMPTS: u32 = match rules::FILE.tries {
    Some(n) => n,
    None => 1,
};
/// Longest `error[]` line whose text is read (longer ones are counted, not read).
pub const ERROR_LINE_MAX: usize = 64 * 1024;

/// Counts non-blank NDJSON lines across chunk boundaries.
#[derive(Default, Debug, Clone, Copy)]
pub struct LineCounter {
    lines: u64,
    in_line: bool,
}

impl LineCounter {
    /// Feeds a chunk.
    pub fn feed(&mut self, mut b: &[u8]) {
        while let Some(i) = memchr::memchr(b'\n', b) {
            if self.in_line || b[..i].iter().any(|c| !c.is_ascii_whitespace()) {
                self.lines += 1;
            }
            self.in_line = false;
            b = &b[i + 1..];
        }
        if !self.in_line && b.iter().any(|c| !c.is_ascii_whitespace()) {
            self.in_line = true;
        }
    }
    /// Lines seen, counting an unterminated last line.
    pub fn total(&self) -> u64 {
        self.lines + u64::from(self.in_line)
    }
}

/// Why one file could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("download: {0}")]
    Http(#[from] HttpError),
    #[error("{0}")]
    Staging(#[from] StagingError),
    #[error("the manifest says {expected} resources, {got} arrived")]
    CountMismatch { expected: u64, got: u64 },
    #[error(
        "it is larger than spec.limits.maxFileSize ({limit} bytes after decompression); raise the limit if the file is genuine"
    )]
    FileTooLarge { limit: u64 },
    #[error(
        "the run staged more than spec.limits.maxRunSize ({limit} bytes); raise the limit if the export is genuine"
    )]
    RunTooLarge { limit: u64 },
}

impl FileError {
    /// Whether another attempt may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            FileError::Http(e) => classify(e).may_pass(),
            FileError::Staging(e) => e.retryable(),
            FileError::CountMismatch { .. } => true,
            FileError::FileTooLarge { .. } | FileError::RunTooLarge { .. } => false,
        }
    }

    fn reason(&self) -> Reason {
        match self {
            FileError::Http(e) => match classify(e) {
                Class::Auth => Reason::AuthFailed,
                Class::Unreachable => Reason::SourceUnreachable,
                Class::Invalid => Reason::InvalidSpec,
                _ => Reason::TransferFailed,
            },
            _ => Reason::TransferFailed,
        }
    }
}

/// Running totals shared by parallel downloads.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub staged: i64,
    pub bytes: i64,
    pub resources: BTreeMap<String, i64>,
}

/// Byte caps of one run.
#[derive(Debug)]
pub struct Caps {
    pub max_file: u64,
    pub max_run: u64,
    /// Bytes staged by the run so far.
    pub run_bytes: AtomicU64,
}

/// What to do with one manifest entry.
#[derive(Debug, Clone)]
pub struct FileJob {
    pub name: StagedName,
    pub file: OutputFile,
}

/// Stages one file, or counts it when a previous attempt already staged it completely.
pub async fn stage_file(
    source: &BulkClient,
    staging: &dyn Staging,
    job: &FileJob,
    requires_token: bool,
    caps: &Caps,
) -> Result<(u64, u64), FileError> {
    let name = job.name.file_name();
    if staging.exists(&name).await? {
        // staged by an earlier attempt or process: count it, and trust it only if it matches
        let s = staging.read(&name).await?;
        let (lines, bytes) = count(s.map_err(FileError::from), caps, None).await?;
        if job.file.count.is_none_or(|expected| expected == lines) {
            return Ok((lines, bytes));
        }
        caps.run_bytes.fetch_sub(bytes, Ordering::Relaxed);
        tracing::warn!(file = %name, "a staged file does not match the manifest count; downloading it again");
    }
    let stream = source.download(&job.file.url, requires_token).await?;
    let mut w = staging.create(&name).await?;
    match count(stream.map_err(FileError::from), caps, Some(w.as_mut())).await {
        Ok((lines, bytes)) => {
            if let Some(expected) = job.file.count
                && expected != lines
            {
                w.abort().await;
                caps.run_bytes.fetch_sub(bytes, Ordering::Relaxed);
                return Err(FileError::CountMismatch { expected, got: lines });
            }
            w.finish().await?;
            Ok((lines, bytes))
        }
        Err(e) => {
            w.abort().await;
            Err(e)
        }
    }
}

/// Counts lines and bytes of a stream against the caps, writing it to `w` when given. Bytes of a
/// failed attempt are given back to the run's budget.
async fn count(
    stream: impl Stream<Item = Result<Bytes, FileError>>,
    caps: &Caps,
    mut w: Option<&mut dyn crate::staging::StagedWriter>,
) -> Result<(u64, u64), FileError> {
    let mut stream = std::pin::pin!(stream);
    let (mut c, mut n, mut added) = (LineCounter::default(), 0u64, 0u64);
    let r: Result<(), FileError> = async {
        while let Some(chunk) = stream.try_next().await? {
            let len = chunk.len() as u64;
            n += len;
            if n > caps.max_file {
                return Err(FileError::FileTooLarge { limit: caps.max_file });
            }
            let before = caps.run_bytes.fetch_add(len, Ordering::Relaxed);
            added += len;
            if before + len > caps.max_run {
                return Err(FileError::RunTooLarge { limit: caps.max_run });
            }
            c.feed(&chunk);
            if let Some(w) = w.as_mut() {
                w.write(chunk).await?;
            }
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => Ok((c.total(), n)),
        Err(e) => {
            caps.run_bytes.fetch_sub(added, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// What the `error[]` files held.
#[derive(Debug, Default)]
pub struct ErrorReport {
    /// Lines that report an error (informational OperationOutcomes are not counted).
    pub errors: i64,
    /// The first few diagnostics, bounded and sanitised.
    pub samples: Vec<String>,
}

/// Reads one `error[]` file line by line (bounded), counting error lines and keeping a few samples.
pub async fn inspect_errors(
    source: &BulkClient,
    file: &OutputFile,
    requires_token: bool,
    max_bytes: u64,
    report: &mut ErrorReport,
) -> Result<(), HttpError> {
    let stream = source.download(&file.url, requires_token).await?;
    let mut read = 0u64;
    let url = crate::text::redact_str(&file.url);
    let capped = stream.map(move |c| {
        let c = c?;
        read += c.len() as u64;
        if read > max_bytes {
            return Err(HttpError::TooLarge { url: url.clone(), what: "an error[] file".into(), limit: max_bytes });
        }
        Ok(c)
    });
    let mut lines = Lines::new(Box::pin(capped), ERROR_LINE_MAX);
    while let Some(line) = lines.next().await {
        let sample = match line? {
            Line::TooLong(n) => Some(format!("(an error line of {n} bytes, not shown)")),
            Line::Text(t) => match OperationOutcome::parse(&t) {
                Some(oo) if !oo.has_errors() => None, // informational
                Some(oo) => Some(oo.summary()),
                None => Some(peer_text(&String::from_utf8_lossy(&t), 200)),
            },
        };
        if let Some(s) = sample {
            report.errors += 1;
            if report.samples.len() < 3 {
                report.samples.push(peer_text(&s, 200));
            }
        }
    }
    Ok(())
}

impl Engine {
    /// The manifest: kept in memory, or read again from the source after a restart (the source keeps
    /// it until the export is released).
    pub(super) async fn manifest(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
    ) -> Result<Result<Arc<Manifest>, Next>, Failure> {
        if let Some(m) = &mem.manifest {
            return Ok(Ok(m.clone()));
        }
        let url = st
            .export_status_url
            .clone()
            .ok_or_else(|| Failure::new(Reason::TransferFailed, "no export status URL recorded"))?;
        match self.setup.source.poll(&url).await {
            Ok(Poll::Complete(m)) => {
                mem.streaks.ok();
                let m = Arc::new(*m);
                mem.manifest = Some(m.clone());
                Ok(Ok(m))
            }
            Ok(Poll::InProgress { .. }) => Err(Failure::new(
                Reason::TransferFailed,
                "the source reports the finished export as running again; the next run starts a new export",
            )),
            Err(e) => {
                let a = Attempt {
                    what: "reading the export's manifest again",
                    peer: Peer::Source,
                    reason: Reason::TransferFailed,
                    first_contact: false,
                };
                self.on_error(st, mem, a, &e).map(Err)
            }
        }
    }

    /// Transferring: stages every file, then reads `error[]`.
    pub(super) async fn transfer(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<Next, Failure> {
        let staging = self.staging()?;
        let m = match self.manifest(st, mem).await? {
            Ok(m) => m,
            Err(next) => return Ok(next),
        };
        staging.claim(&self.uid).await.map_err(|e| Failure::new(Reason::TransferFailed, e.to_string()))?;
        let mut jobs: Vec<FileJob> = vec![];
        for (i, f) in m.output.iter().enumerate() {
            let name = StagedName::output(&f.type_, i).ok_or_else(|| {
                Failure::new(
                    Reason::ExportFailed,
                    format!("output {i} has an invalid type {:?}", peer_text(&f.type_, 64)),
                )
            })?;
            jobs.push(FileJob { name, file: f.clone() });
        }
        if self.setup.apply_deletes {
            jobs.extend(
                m.deleted
                    .iter()
                    .enumerate()
                    .map(|(i, f)| FileJob { name: StagedName::Deleted { index: i }, file: f.clone() }),
            );
        }
        let total = jobs.len() as i64;
        st.files = Some(FileCounts { total, staged: 0 });
        let caps = Caps {
            max_file: self.setup.values.max_file_bytes,
            max_run: self.setup.values.max_run_bytes,
            run_bytes: AtomicU64::new(0),
        };
        let tally = Mutex::new(Tally::default());
        let requires = m.requires_access_token;
        futures::stream::iter(jobs)
            .map(|job| self.stage_with_retries(staging.as_ref(), job, requires, &caps, &tally, total, progress))
            .buffer_unordered(self.setup.max_parallel)
            .try_for_each(|()| async { Ok(()) })
            .await?;
        let t = tally.lock().unwrap_or_else(|p| p.into_inner()).clone();
        st.files = Some(FileCounts { total, staged: t.staged });
        st.bytes = t.bytes;
        st.resources = t.resources;
        st.resource_count = Some(st.resources.values().sum());
        st.progress = Some(format!("{total}/{total} files"));
        // error[]: import what was exported, count and show what failed
        let mut report = ErrorReport::default();
        for f in &m.error {
            if let Err(e) = inspect_errors(&self.setup.source, f, requires, caps.max_file, &mut report).await {
                // an unreadable error file still says something failed
                report.errors += 1;
                if report.samples.len() < 3 {
                    report.samples.push(format!("error file unreadable: {e}"));
                }
            }
        }
        st.export_errors = report.errors;
        st.progress = None;
        st.message = Some(format!("staged {} files; importing", t.staged));
        if report.errors > 0 {
            st.reason = Some(Reason::PartialExport.as_str().into());
            let msg = format!(
                "the source reported {} export errors (what was exported is imported; the watermark does not move past this run's _since, so the next run retries); first: {}",
                report.errors,
                report.samples.join(" | ")
            );
            set_condition(&mut st.conditions, types::DEGRADED, true, Reason::PartialExport.as_str(), &msg, None);
            st.message = Some(msg);
        }
        st.phase = Phase::Importing;
        Ok(Next::Continue)
    }

    #[allow(clippy::too_many_arguments)]
    async fn stage_with_retries(
        &self,
        staging: &dyn Staging,
        job: FileJob,
        requires: bool,
        caps: &Caps,
        tally: &Mutex<Tally>,
        total: i64,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<(), Failure> {
        // failures that may pass count toward FILE_ATTEMPTS; a busy source (429) is waited out as
        // the policy says — its waits grow, and the run's deadline bounds them
        let mut failures = rules::FILE.start();
        let mut busy = policy::Streaks::default();
        loop {
            match stage_file(&self.setup.source, staging, &job, requires, caps).await {
                Ok((lines, bytes)) => {
                    let t = {
                        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                        t.staged += 1;
                        t.bytes += bytes as i64;
                        if let StagedName::Output { type_, .. } = &job.name {
                            *t.resources.entry(type_.clone()).or_default() += lines as i64;
                        }
                        (t.staged, t.bytes, t.resources.values().sum::<i64>())
                    };
                    progress.send_modify(|s| {
                        s.files = Some(FileCounts { total, staged: t.0 });
                        s.bytes = t.1;
                        s.resource_count = Some(t.2);
                        s.progress = Some(format!("{}/{total} files", t.0));
                    });
                    return Ok(());
                }
                Err(FileError::Http(e)) if classify(&e) == Class::Busy => {
                    let a = Attempt {
                        what: "downloading a file",
                        peer: Peer::Source,
                        reason: Reason::TransferFailed,
                        first_contact: false,
                    };
                    if let policy::Decision::Retry { wait, message } = policy::decide(a, &e, &mut busy) {
                        tracing::info!(run = %self.id, file = %job.name.file_name(), "{message}");
                        tokio::time::sleep(self.scaled(wait)).await;
                    }
                }
                Err(e) => {
                    if e.retryable()
                        && let Some(wait) = failures.failed(None)
                    {
                        let attempt = failures.count();
                        tracing::warn!(run = %self.id, file = %job.name.file_name(), attempt, error = %e, "file transfer failed; retrying");
                        tokio::time::sleep(self.scaled(wait)).await;
                        continue;
                    }
                    let tries =
                        if e.retryable() { format!(" after {} attempts", failures.count()) } else { String::new() };
                    return Err(Failure::new(
                        e.reason(),
                        format!("file {} ({}) failed{tries}: {e}", job.name.file_name(), job.file.type_),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lines_across_chunks() {
        let mut c = LineCounter::default();
        c.feed(b"{\"a\":1}\n{\"b\"");
        c.feed(b":2}\n\n  \n{\"c\":3}");
        assert_eq!(c.total(), 3);
        let mut c = LineCounter::default();
        c.feed(b"{}\n");
        c.feed(b"\n");
        assert_eq!(c.total(), 1);
    }

    #[tokio::test]
    async fn caps_stop_a_stream_and_give_bytes_back() {
        let caps = Caps { max_file: 10, max_run: 15, run_bytes: AtomicU64::new(0) };
        let s = futures::stream::iter(vec![Ok(Bytes::from_static(b"0123456\n")), Ok(Bytes::from_static(b"0123456\n"))]);
        assert!(matches!(count(s, &caps, None).await, Err(FileError::FileTooLarge { limit: 10 })));
        assert_eq!(caps.run_bytes.load(Ordering::Relaxed), 0);
        let ok = futures::stream::iter(vec![Ok(Bytes::from_static(b"01234\n"))]);
        assert_eq!(count(ok, &caps, None).await.unwrap(), (1, 6));
        let s = futures::stream::iter(vec![Ok(Bytes::from_static(b"0123456\n")), Ok(Bytes::from_static(b"0\n"))]);
        assert!(matches!(count(s, &caps, None).await, Err(FileError::RunTooLarge { limit: 15 })));
        assert_eq!(caps.run_bytes.load(Ordering::Relaxed), 6);
    }
}
