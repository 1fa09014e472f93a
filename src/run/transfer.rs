//! Moving files: source → staging with counting and verification, error[] inspection, deleted[]
//! replay. Everything streams; nothing holds a whole file in memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::io::AsyncBufReadExt;

use crate::fhir::bulk::{BulkClient, OutputFile};
use crate::fhir::client::Error as HttpError;
use crate::fhir::outcome::OperationOutcome;
use crate::pathling::PathlingClient;
use crate::staging::{Staging, StagingError};

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
    #[error("{what}: the manifest says {expected} resources, {got} arrived")]
    CountMismatch { what: String, expected: u64, got: u64 },
}

impl FileError {
    /// Whether another attempt may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            FileError::Http(HttpError::Auth(_) | HttpError::Config(_)) => false,
            FileError::Http(e) => e.is_transient() || e.status().is_none(),
            FileError::Staging(_) => true,
            FileError::CountMismatch { .. } => true,
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

/// What to do with one manifest entry.
#[derive(Debug, Clone)]
pub struct FileJob {
    pub name: String,
    pub file: OutputFile,
    /// Resources (output[]) are counted by type; deleted[] bundles are only staged.
    pub counts_resources: bool,
}

/// Stages one file, or counts it when a previous attempt already staged it completely.
pub async fn stage_file(
    source: &BulkClient,
    staging: &dyn Staging,
    job: &FileJob,
    requires_token: bool,
    tally: &Arc<Mutex<Tally>>,
) -> Result<(), FileError> {
    let mut staged = None;
    if staging.exists(&job.name).await? {
        // staged by an earlier attempt or process: count it, and trust it only if it matches
        let mut s = staging.read(&job.name).await?;
        let (mut c, mut n) = (LineCounter::default(), 0u64);
        while let Some(chunk) = s.try_next().await? {
            c.feed(&chunk);
            n += chunk.len() as u64;
        }
        if job.file.count.is_none_or(|expected| expected == c.total()) {
            staged = Some((c.total(), n));
        } else {
            tracing::warn!(file = %job.name, "a staged file does not match the manifest count; downloading it again");
        }
    }
    let (lines, bytes) = match staged {
        Some(x) => x,
        None => {
            let stream = source.download(&job.file.url, requires_token).await?;
            let mut w = staging.create(&job.name).await?;
            match copy(stream, w.as_mut()).await {
                Ok((lines, bytes)) => {
                    if let Some(expected) = job.file.count
                        && expected != lines
                    {
                        w.abort().await;
                        return Err(FileError::CountMismatch {
                            what: format!("{} file {}", job.file.type_, job.name),
                            expected,
                            got: lines,
                        });
                    }
                    w.finish().await?;
                    (lines, bytes)
                }
                Err(e) => {
                    w.abort().await;
                    return Err(e);
                }
            }
        }
    };
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    t.staged += 1;
    t.bytes += bytes as i64;
    if job.counts_resources {
        *t.resources.entry(job.file.type_.clone()).or_default() += lines as i64;
    }
    Ok(())
}

async fn copy(
    stream: impl Stream<Item = Result<Bytes, HttpError>>,
    w: &mut dyn crate::staging::StagedWriter,
) -> Result<(u64, u64), FileError> {
    let mut stream = std::pin::pin!(stream);
    let (mut c, mut n) = (LineCounter::default(), 0u64);
    while let Some(chunk) = stream.try_next().await? {
        c.feed(&chunk);
        n += chunk.len() as u64;
        w.write(chunk).await?;
    }
    Ok((c.total(), n))
}

/// Reads an error[] file: number of OperationOutcomes and the first few diagnostics.
pub async fn inspect_errors(
    source: &BulkClient,
    file: &OutputFile,
    requires_token: bool,
    samples: &mut Vec<String>,
) -> Result<i64, HttpError> {
    let stream = source.download(&file.url, requires_token).await?;
    let reader = tokio_util::io::StreamReader::new(stream.map_err(std::io::Error::other));
    let mut lines = reader.lines();
    let mut n = 0;
    while let Some(line) = lines.next_line().await.map_err(|e| HttpError::Transport {
        url: crate::fhir::client::redact(&url::Url::parse(&file.url).unwrap_or_else(|_| source.http().base().clone())),
        message: e.to_string(),
    })? {
        if line.trim().is_empty() {
            continue;
        }
        n += 1;
        if samples.len() < 3 {
            let s = OperationOutcome::parse(line.as_bytes())
                .map(|o| o.summary())
                .unwrap_or_else(|| line.chars().take(200).collect());
            samples.push(s);
        }
    }
    Ok(n)
}

/// Replays one staged deleted[] file (NDJSON of transaction Bundles with DELETE entries) as DELETEs on
/// Pathling. A 404 counts as done, so a resumed replay is harmless. Returns deletions applied.
pub async fn replay_deletes(staging: &dyn Staging, name: &str, pathling: &PathlingClient) -> Result<i64, String> {
    let stream = staging.read(name).await.map_err(|e| e.to_string())?;
    let reader = tokio_util::io::StreamReader::new(stream.map_err(std::io::Error::other));
    let mut lines = reader.lines();
    let mut targets = vec![];
    let mut applied = 0;
    while let Some(line) = lines.next_line().await.map_err(|e| format!("reading {name}: {e}"))? {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("{name}: a line is not a JSON Bundle: {e}"))?;
        for entry in v.get("entry").and_then(|e| e.as_array()).into_iter().flatten() {
            let req = entry.get("request");
            let method = req.and_then(|r| r.get("method")).and_then(|m| m.as_str()).unwrap_or("");
            let url = req.and_then(|r| r.get("url")).and_then(|m| m.as_str()).unwrap_or("");
            if method.eq_ignore_ascii_case("DELETE")
                && let Some((t, id)) = type_and_id(url)
            {
                targets.push((t, id));
            }
        }
        // bounded: flush in batches so a huge file never sits in memory
        if targets.len() >= 1000 {
            applied += delete_all(pathling, std::mem::take(&mut targets)).await?;
        }
    }
    applied += delete_all(pathling, targets).await?;
    Ok(applied)
}

async fn delete_all(pathling: &PathlingClient, targets: Vec<(String, String)>) -> Result<i64, String> {
    let n = targets.len() as i64;
    futures::stream::iter(targets)
        .map(|(t, id)| async move {
            pathling.delete_resource(&t, &id).await.map_err(|e| format!("DELETE {t}/{id} on Pathling: {e}"))
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| n)
}

/// `Patient/123`, `https://x/fhir/Patient/123` or `Patient/123/_history/2` → (`Patient`, `123`).
pub fn type_and_id(url: &str) -> Option<(String, String)> {
    let path = url.split(['?', '#']).next()?;
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let segs = match segs.iter().position(|s| *s == "_history") {
        Some(i) => &segs[..i],
        None => &segs[..],
    };
    if segs.len() < 2 {
        return None;
    }
    let (t, id) = (segs[segs.len() - 2], segs[segs.len() - 1]);
    if t.chars().next()?.is_ascii_uppercase() && !id.is_empty() { Some((t.to_string(), id.to_string())) } else { None }
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

    #[test]
    fn parses_delete_urls() {
        assert_eq!(type_and_id("Patient/123"), Some(("Patient".into(), "123".into())));
        assert_eq!(
            type_and_id("https://s/fhir/Observation/o-1/_history/3"),
            Some(("Observation".into(), "o-1".into()))
        );
        assert_eq!(type_and_id("123"), None);
    }
}
